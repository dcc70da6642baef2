"""The benchmark suite runs end to end in smoke mode: every figure measured, table printed, servers stopped."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "benchmarks", "run.py")

FIGURES = {
    "sync_calls": {"raw", "pyro", "connect", "pool"},
    "sync_p50": {"raw", "pyro", "connect", "pool"},
    "sync_p99": {"raw", "pyro", "connect", "pool"},
    "sync_cpu_client": {"raw", "pyro", "connect", "pool"},
    "sync_cpu_server": {"raw", "pyro", "connect", "pool"},
    "oneway_executed": {"pyro", "connect", "pool", "pool2"},
    "oneway_sent": {"pyro", "connect", "pool", "pool2"},
    "map": {"pyro_loop", "pool", "pool2"},
    "threads_calls": {"pyro", "pool"},
    "threads_errors": {"pyro", "pool"},
    "idle_calls": {"none", "idle"},
    "idle_threads": {"none", "idle"},
    "idle_fds": {"none", "idle"},
    "sleep": {"pool_k1", "pool_k2"},
    "async_calls": {"sync", "aio", "aio_plain", "pool_sync", "pool_aio"},
    "async_p50": {"sync", "aio", "aio_plain", "pool_sync", "pool_aio"},
    "async_cpu_client": {"sync", "aio", "aio_plain", "pool_sync", "pool_aio"},
    "async_cpu_server": {"sync", "aio", "aio_plain", "pool_sync", "pool_aio"},
    "async_concurrent": {"threads", "futures", "aio", "aio_plain"},
    "stream_rate": {"sync", "stream", "astream", "pyro"},
    "stream_rss": {"rss"},
    "concurrent_seconds": {"pool_aio"},
    "concurrent_client_threads": {"pool_aio"},
    "concurrent_worker_threads": {"pool_aio"},
    "concurrent_connections": {"pool_aio"},
    "metrics_calls": {"off", "on"},  # (and "otel" with the otel extra)
    "metrics_cpu_server": {"off", "on"},
}
SIGNED = {"stream_rss"}  # a growth: the worker's RSS may also shrink
NS_FIGURES = {"ns_lookup_p50", "ns_lookup_p99"}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.timeout(240)
def test_smoke_run_measures_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    proc = subprocess.run([sys.executable, RUN, "--smoke", "--json", str(out), "--out", str(md)],
                          capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    assert "| figure | contender | median | spread | vs baseline | target | result |" in proc.stdout
    assert "targets:" in proc.stdout
    assert "python benchmarks/run.py --smoke" in md.read_text()

    data = json.loads(out.read_text())
    figures = data["figures"]
    expected = dict(FIGURES)
    if os.path.exists(os.path.join(ROOT, "benchmarks", "ns_lookup.py")):
        for fig in NS_FIGURES:
            expected[fig] = set()
    for fig, contenders in expected.items():
        assert fig in figures, f"figure {fig} missing from the JSON"
        assert contenders <= set(figures[fig]), (fig, sorted(figures[fig]))
        for contender, row in figures[fig].items():
            assert row["values"], (fig, contender)
            # CPU figures may round to 0 in a short run (10 ms clock ticks)
            assert all(v is not None and math.isfinite(v) and (v >= 0 or fig in SIGNED)
                       for v in row["values"]), (fig, contender, row)
    for k in (1, 2):
        assert figures["sleep"][f"pool_k{k}"]["ideal"] == k * 100
    # the idle figure ran with its connections really open on the worker, and only then
    meta = data["meta"]
    assert meta["idle_connections"] == 1000 and meta["threads"] == 64
    idle_fds = figures["idle_fds"]
    assert idle_fds["idle"]["median"] >= idle_fds["none"]["median"] + 1000, idle_fds
    assert [d["idle_connections"] for d in figures["idle_calls"]["idle"]["details"]] == [1000]
    assert figures["threads_calls"]["pool"]["details"][0]["calls"] == 64 * meta["thread_calls"]
    # the new groups ran at their smoke sizes: streams to their end, every concurrent await answered
    assert figures["stream_rate"]["stream"]["details"][0]["items"] == meta["stream_items"] == 5000
    assert figures["stream_rss"]["rss"]["details"][0]["items"] == meta["rss_items"] == 20_000
    assert figures["async_concurrent"]["aio"]["details"][0]["calls"] == 64 * meta["thread_calls"]
    gathered = figures["concurrent_seconds"]["pool_aio"]["details"][0]
    assert gathered["calls"] == meta["concurrent"] == 500 and gathered["errors"] == 0
    assert gathered["seconds"] >= meta["concurrent_sleep"] == 1.0
    assert gathered["peak_connections"] >= 1 and gathered["peak_client_threads"] >= 1

    statuses = {t["target"]: t["status"] for t in data["targets"]}
    assert len(statuses) == 21  # (20, and the metrics group's cost target)
    assert set(statuses.values()) <= {"pass", "miss", "n/a"}
    assert data["meta"]["pinned"] is True and data["meta"]["smoke"] is True

    # every server the run started is gone once it returns
    pids = data["meta"]["server_pids"]
    assert pids
    assert not [pid for pid in pids if _alive(pid)]


def test_only_rejects_unknown_names():
    proc = subprocess.run([sys.executable, RUN, "--only", "sync,bogus"], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 2
    assert "--only" in proc.stderr

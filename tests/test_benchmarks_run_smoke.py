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
}
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
            assert all(v is not None and math.isfinite(v) and v >= 0 for v in row["values"]), (fig, contender, row)
    for k in (1, 2):
        assert figures["sleep"][f"pool_k{k}"]["ideal"] == k * 100
    # the idle figure ran with its connections really open on the worker, and only then
    meta = data["meta"]
    assert meta["idle_connections"] == 1000 and meta["threads"] == 64
    idle_fds = figures["idle_fds"]
    assert idle_fds["idle"]["median"] >= idle_fds["none"]["median"] + 1000, idle_fds
    assert [d["idle_connections"] for d in figures["idle_calls"]["idle"]["details"]] == [1000]
    assert figures["threads_calls"]["pool"]["details"][0]["calls"] == 64 * meta["thread_calls"]

    statuses = {t["target"]: t["status"] for t in data["targets"]}
    assert len(statuses) == 14
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

"""Metrics and logs (issue 13): Prometheus endpoints of workers, name servers and pools, the cheap statistics
behind them (``Pyro.Daemon.stats()``), and ``--log-format json``; real processes on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any

import Pyro5.api
import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import pyrorpc
from nameserver import NameServerDaemon
from pyrorpc.errors import ConfigurationError, WorkerDrainingError
from pyrorpc.stats import BUCKETS, OK, ServerStats
from pyrorpc.testing import ChildProcess, WorkerProcess, wait_for

TEST_SPEC = "services:Calculator"


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(sample name, sorted labels): value}`` of a Prometheus endpoint (plain urllib)."""
    with urllib.request.urlopen(url, timeout=5) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    return samples(text)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(data: dict[Any, float], name: str, **labels: str) -> float:
    return data.get((name, tuple(sorted(labels.items()))), 0.0)


def start_ns(*args: str) -> tuple[ChildProcess, str, str | None]:
    proc = ChildProcess([sys.executable, "-m", "pyrorpc", "ns", "start", "--port", "0", *args])
    address = proc.expect(r"^NS running on (\S+)").group(1)
    metrics = proc.expect(r"^metrics on (\S+)").group(1) if "--metrics-port" in args else None
    return proc, address, metrics


def free_ports(n: int) -> int:
    """A port P with P .. P+n-1 free on 127.0.0.1 now."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        if first + n > 65535:
            continue
        try:
            socks = []
            for p in range(first, first + n):
                s = socket.socket()
                socks.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("127.0.0.1", p))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


# the statistics alone ------------------------------------------------------------------------------------

def test_server_stats_count_by_outcome_with_latency_buckets() -> None:
    stats = ServerStats("w")
    now = time.monotonic()
    for _ in range(10):
        stats.record("calc", "add", OK, now - 0.002)
    stats.record("calc", "add", OK, now - 0.002, deadline=time.time() - 1)  # ended after its deadline
    snap = stats.methods_snapshot()["calc"]["add"]
    assert (snap["ok"], snap["error"], snap["timeout"], snap["refused"]) == (10, 0, 1, 0)
    assert sum(snap["buckets"]) == 11 and len(snap["buckets"]) == len(BUCKETS) + 1
    assert snap["buckets"][BUCKETS.index(0.0025)] == 11  # 2 ms: in the bucket up to 2.5 ms
    assert 2.0 <= snap["p50_ms"] < 50 and snap["p50_ms"] <= snap["p99_ms"]


# a worker, a name server and a pool, scraped -------------------------------------------------------------

@pytest.mark.timeout(90)
def test_counters_match_the_calls_made(tmp_path: Any) -> None:
    ns_proc, ns, ns_metrics = start_ns("--lease-ttl", "1.5", "--metrics-port", "0")
    worker = None
    try:
        assert ns_metrics is not None
        worker = WorkerProcess(TEST_SPEC, ns, args=["--metrics-port", "0"])
        worker_metrics = worker.expect(r"metrics on (\S+)").group(1)
        with pyrorpc.Pool("calc", ns=ns, cooldown=0.0) as pool:
            wait_for(lambda: pool.workers(), message="the worker in the pool")
            for i in range(20):
                assert pool.add(i, 1) == i + 1
            for i in range(5):
                with pytest.raises(ValueError):
                    pool.fail(f"no {i}")
            early = scrape(worker_metrics)
            assert value(early, "pyrorpc_connections") >= 1  # (the pool's, open)
            with pytest.raises(pyrorpc.errors.CallTimeoutError):
                pool.slow.with_timeout(0.3)(1.0)  # runs on, ends after its deadline: a timeout there too

            def settled() -> Any:
                data = scrape(worker_metrics)
                return data if value(data, "pyrorpc_calls_total", service="calc", method="slow",
                                     outcome="timeout") == 1 else None
            data = wait_for(settled, timeout=10, interval=0.1, message="the timed-out call counted")
            assert value(data, "pyrorpc_calls_total", service="calc", method="add", outcome="ok") == 20
            assert value(data, "pyrorpc_calls_total", service="calc", method="add", outcome="error") == 0
            assert value(data, "pyrorpc_calls_total", service="calc", method="fail", outcome="error") == 5
            assert value(data, "pyrorpc_calls_total", service="calc", method="fail", outcome="ok") == 0
            assert value(data, "pyrorpc_calls_total", service="calc", method="slow", outcome="ok") == 0
            assert value(data, "pyrorpc_call_duration_seconds_count", service="calc", method="add") == 20
            assert value(data, "pyrorpc_call_duration_seconds_bucket", service="calc", method="add", le="+Inf") == 20
            assert value(data, "pyrorpc_call_duration_seconds_sum", service="calc", method="slow") >= 1.0
            assert value(data, "pyrorpc_calls_in_flight") == 0
            assert value(data, "pyrorpc_draining") == 0
            assert ("pyrorpc_oneway_queue_depth", ()) in data

            # the client's side, in this process's default registry
            client = samples(generate_latest(REGISTRY).decode())
            assert value(client, "pyrorpc_pool_calls_total", service="calc", worker=worker.name, outcome="ok") == 20
            assert value(client, "pyrorpc_pool_calls_total", service="calc", worker=worker.name,
                         outcome="error") == 5
            assert value(client, "pyrorpc_pool_calls_total", service="calc", worker=worker.name,
                         outcome="timeout") == 1
            assert value(client, "pyrorpc_pool_call_duration_seconds_count", service="calc",
                         worker=worker.name) == 26
            assert value(client, "pyrorpc_pool_ejections_total", service="calc", worker=worker.name) == 1

            # the stock Pyro5 client's view of the same numbers
            with Pyro5.api.Proxy(f"PYRO:Pyro.Daemon@{worker.uri.split('@')[1]}") as daemon:
                stats = daemon.stats()
            add = stats["methods"]["calc"]["add"]
            assert (add["ok"], add["error"], add["timeout"], add["refused"]) == (20, 0, 0, 0)
            assert stats["methods"]["calc"]["fail"]["error"] == 5
            assert stats["methods"]["calc"]["slow"]["timeout"] == 1
            assert stats["pid"] == worker.worker_pid and stats["name"] == worker.name
            assert stats["in_flight"] == 0 and stats["draining"] is False  # (stats() leaves itself out)
            assert stats["connections"] >= 1 and stats["uptime"] > 0
            assert 0 < add["p50_ms"] <= add["p99_ms"] and sum(add["buckets"]) == 20
            assert len(stats["buckets_ms"]) + 1 == len(add["buckets"])
            calc = stats["services"]["calc"]
            assert (calc["ok"], calc["error"], calc["timeout"], calc["refused"]) == (20, 5, 1, 0)
            assert 0 < calc["p50_ms"] <= calc["p99_ms"] and calc["p99_ms"] >= 1000  # (the slow call's 1 s)

        # the name server: one lease, its renewals going up, the worker in its service
        first = scrape(ns_metrics)
        assert value(first, "pyrorpc_ns_leases") == 1
        assert value(first, "pyrorpc_ns_workers", service="calc") == 1
        assert value(first, "pyrorpc_ns_registrations_total") == 1
        assert value(first, "pyrorpc_ns_lookups_total") >= 1
        renewals = value(first, "pyrorpc_ns_renewals_total")
        wait_for(lambda: value(scrape(ns_metrics), "pyrorpc_ns_renewals_total") >= renewals + 2, timeout=10,
                 interval=0.1, message="renewals counted")
        assert value(first, "pyrorpc_calls_total", service="Pyro.NameServer", method="lease", outcome="ok") >= 1

        worker.kill()
        gone = wait_for(lambda: (d := scrape(ns_metrics)) and value(d, "pyrorpc_ns_expiries_total") == 1 and d,
                        timeout=10, interval=0.1, message="the lease expired")
        assert value(gone, "pyrorpc_ns_leases") == 0
        assert value(gone, "pyrorpc_ns_workers", service="calc") == 0
    finally:
        if worker is not None and worker.alive():
            worker.kill()
        ns_proc.terminate()


def test_calls_refused_while_draining_count_as_refused(ns_addr: str) -> None:
    host = pyrorpc.WorkerHost(__import__("services").Calculator, ns=ns_addr, drain_timeout=5)
    host.start()
    location = host.uri.split("@")[1]  # type: ignore[union-attr]
    slow = threading.Thread(target=lambda: Pyro5.api.Proxy(host.uri).slow(1.0))
    slow.start()
    wait_for(lambda: host.stats.in_flight == 1, message="the slow call in flight")
    stock = Pyro5.api.Proxy(host.uri)  # a stock Pyro5 client hears nothing of the drain: it just calls
    stock._pyroBind()
    stopping = threading.Thread(target=host.stop)
    stopping.start()
    wait_for(lambda: host.stats.draining, message="draining")
    with pytest.raises(WorkerDrainingError):
        stock.add(1, 2)
    stopping.join(10)
    slow.join(10)
    stock._pyroRelease()
    calc = host.stats.methods_snapshot()["calc"]
    assert calc["add"]["refused"] == 1 and calc["add"]["ok"] == 0
    assert calc["slow"]["ok"] == 1
    del location


def test_two_processes_serve_two_metrics_ports(ns_addr: str) -> None:
    first = free_ports(2)
    proc = ChildProcess([sys.executable, "-m", "pyrorpc", "worker", "start", TEST_SPEC, "--ns", ns_addr,
                         "--processes", "2", "--metrics-port", str(first)])
    try:
        for port in (first, first + 1):
            data = wait_for(lambda p=port: _try_scrape(f"http://127.0.0.1:{p}/metrics"), timeout=20, interval=0.1,
                            message=f"metrics on port {port}")
            assert ("pyrorpc_calls_in_flight", ()) in data
        pids = set()
        for port in (first, first + 1):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
                assert b"pyrorpc_connections" in reply.read()
        with pyrorpc.Pool("calc", ns=ns_addr) as pool:
            wait_for(lambda: len(pool.workers()) == 2, timeout=20, message="two workers")
            pids = {w.pid for w in pool.workers()}
        assert len(pids) == 2
    finally:
        assert proc.stop(signal.SIGTERM) == 0, proc.output


def _try_scrape(url: str) -> Any:
    try:
        return scrape(url)
    except OSError:
        return None


# logs --------------------------------------------------------------------------------------------------

def json_lines(lines: list[str]) -> list[dict[str, Any]]:
    out = []
    for line in lines:
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


@pytest.mark.timeout(60)
def test_json_logs_of_failed_calls_leases_and_drains() -> None:
    ns_proc, ns, _ = start_ns("--lease-ttl", "1", "--log-format", "json")
    try:
        worker = WorkerProcess(TEST_SPEC, ns, args=["--log-format", "json"])
        with pyrorpc.Pool("calc", ns=ns) as pool:
            wait_for(lambda: pool.workers(), message="the worker in the pool")
            assert pool.add(1, 2) == 3
            with pytest.raises(ValueError):
                pool.fail("boom")
        line = worker.expect(r'"outcome": "error"', timeout=10).string
        record = json.loads(line)
        assert record["level"] == "INFO" and record["logger"] == "pyrorpc.calls"
        assert (record["service"], record["worker"], record["method"]) == ("calc", worker.name, "fail")
        assert record["duration_ms"] >= 0 and "boom" in record["message"] and record["ts"].endswith("Z")
        assert worker.stop(signal.SIGTERM) == 0
        drains = [r for r in json_lines(worker.lines) if r.get("event") in ("draining", "drained")]
        assert [r["event"] for r in drains] == ["draining", "drained"], worker.output
        assert all(r["worker"] == worker.name and r["service"] == "calc" for r in drains)
        assert not [r for r in json_lines(worker.lines) if r.get("method") == "add"]  # ok calls: no line

        registered = json.loads(ns_proc.expect(r'"event": "registered"').string)
        assert (registered["worker"], registered["service"]) == (worker.name, "calc")
        worker2 = WorkerProcess(TEST_SPEC, ns, args=["--log-format", "json"])
        worker2.kill()
        expired = json.loads(ns_proc.expect(r'"event": "expired"', timeout=10).string)
        assert (expired["worker"], expired["service"], expired["level"]) == (worker2.name, "calc", "INFO")
    finally:
        ns_proc.terminate()


# errors ------------------------------------------------------------------------------------------------

def test_port_in_use_is_a_clear_error(ns_addr: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigurationError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            NameServerDaemon("127.0.0.1", 0, metrics_port=port)
        host = pyrorpc.WorkerHost(__import__("services").Calculator, ns=ns_addr, metrics_port=port)
        with pytest.raises(ConfigurationError, match="cannot serve metrics"):
            host.start()
        assert host.server is None
        for argv in (["worker", "start", TEST_SPEC, "--ns", ns_addr, "--metrics-port", str(port)],
                     ["worker", "start", TEST_SPEC, "--ns", ns_addr, "--processes", "2", "--metrics-port", str(port)],
                     ["ns", "start", "--port", "0", "--metrics-port", str(port)]):
            done = subprocess.run([sys.executable, "-m", "pyrorpc", *argv], capture_output=True, text=True,
                                  timeout=30)
            assert done.returncode == 1, done.stdout + done.stderr
            errors = [ln for ln in done.stderr.splitlines() if ln.startswith("Error:")]
            assert errors and f"cannot serve metrics on 127.0.0.1:{port}" in errors[0], done.stderr
            assert "Traceback" not in done.stderr
    with pytest.raises(ConfigurationError, match="metrics_port"):
        pyrorpc.WorkerHost(__import__("services").Calculator, ns=ns_addr, metrics_port=70000)


def test_missing_extra_is_a_clear_error(tmp_path: Any, ns_addr: str) -> None:
    blocked = tmp_path / "prometheus_client"
    blocked.mkdir()
    (blocked / "__init__.py").write_text("raise ImportError('prometheus_client is not installed here')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for argv in (["worker", "start", TEST_SPEC, "--ns", ns_addr, "--metrics-port", "0"],
                 ["ns", "start", "--port", "0", "--metrics-port", "0"]):
        done = subprocess.run([sys.executable, "-m", "pyrorpc", *argv], capture_output=True, text=True, timeout=30,
                              env=env)
        assert done.returncode == 1, done.stdout + done.stderr
        assert done.stderr.strip().splitlines() == [
            "Error: ConfigurationError: metrics need prometheus_client: install the extra with "
            "pip install 'pyrorpc[metrics]'"], done.stderr
    # without --metrics-port nothing needs it
    proc = ChildProcess([sys.executable, "-m", "pyrorpc", "worker", "start", TEST_SPEC, "--ns", ns_addr], env=env)
    try:
        proc.expect(r"^worker \S+ serving calc")
    finally:
        proc.kill()  # (a SIGTERM right after the ready line may come before its handler is installed)

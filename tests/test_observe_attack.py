"""Regression tests from an adversarial pass over metrics, logs and the dashboard (issue 13): each failed
before its fix."""

from __future__ import annotations

import io
import json
import logging
import socket
import sys
import threading
import time
import urllib.request
import warnings

import Pyro5.api
from services import Calculator

import pyrorpc
from pyrorpc.dashboard import Dashboard
from pyrorpc.logs import setup_logging
from pyrorpc.stats import ERROR, ServerStats
from pyrorpc.testing import wait_for


def _threads() -> int:
    return threading.active_count()


def test_idle_connections_to_the_metrics_port_cost_the_worker_nothing(ns_addr):
    """The metrics endpoint serves at most 32 connections at once and gives each 5 s to ask: 300 idle ones
    cost neither 300 threads nor the worker's calls (prometheus_client's own server kept a thread per
    connection forever), and once they time out a scrape is answered again."""
    with pyrorpc.WorkerHost(Calculator, ns=ns_addr, register=False, metrics_port=0) as host:
        base = _threads()
        idle = [socket.create_connection(("127.0.0.1", host.metrics.port)) for _ in range(300)]
        try:
            time.sleep(0.5)
            assert _threads() < base + 40
            with pyrorpc.connect(host.uri, timeout=5) as proxy:
                assert proxy.add(1, 2) == 3
        finally:
            for sock in idle:
                sock.close()
        wait_for(lambda: b"pyrorpc_calls_total" in urllib.request.urlopen(host.metrics.url, timeout=5).read(), 15,
                 message="a scrape answered after the idle connections left")


def test_idle_connections_to_the_dashboard_cost_it_nothing(ns_addr):
    with Dashboard(pyrorpc.Settings(ns=ns_addr), port=0, interval=0.5) as board:
        base = _threads()
        host, port = board.httpd.server_address[:2]
        idle = [socket.create_connection((host, port)) for _ in range(200)]
        try:
            time.sleep(0.5)
            assert _threads() < base + 40
        finally:
            for sock in idle:
                sock.close()
        wait_for(lambda: json.loads(urllib.request.urlopen(board.url + "api/state", timeout=5).read())["ns"]["ok"],
                 15, message="the dashboard answers again")


def test_stats_leave_themselves_out(ns_addr):
    """A dashboard polling stats() every second does not show up in what it reads: an idle worker has 0
    calls in flight and its call count does not grow with the polls."""
    with pyrorpc.WorkerHost(Calculator, ns=ns_addr, register=False) as host:
        location = host.uri.split("@", 1)[1]
        with Pyro5.api.Proxy(f"PYRO:Pyro.Daemon@{location}") as daemon:
            first = daemon.stats()
            second = daemon.stats()
            third = daemon.stats()
        assert first["in_flight"] == second["in_flight"] == third["in_flight"] == 0
        assert first["calls"] == second["calls"] == third["calls"]


def test_json_logs_stay_json_for_warnings_and_uncaught_exceptions():
    """With --log-format json every line is JSON: warnings.warn() and an exception nobody caught in a thread
    go through logging too."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, threading.excepthook, sys.excepthook)
    out = io.StringIO()
    try:
        setup_logging("json", stream=out)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("careful\nnow", UserWarning, stacklevel=1)
        thread = threading.Thread(target=lambda: 1 / 0, name="boom")
        thread.start()
        thread.join()
    finally:
        logging.captureWarnings(False)
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
        threading.excepthook, sys.excepthook = saved[2], saved[3]
    lines = out.getvalue().splitlines()
    records = [json.loads(line) for line in lines]  # (every line parses)
    assert any("careful" in r["message"] for r in records)
    assert any(r["logger"] == "pyrorpc.uncaught" and "ZeroDivisionError" in r.get("exc", "") for r in records)


def test_a_failed_calls_log_line_is_bounded():
    """A peer controls the text of its call's error (a 5 MB method name is in it): the log line keeps 500
    characters of it."""
    stats = ServerStats("w")
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    log = logging.getLogger("pyrorpc.calls")
    log.addHandler(handler)
    old_level = log.level
    log.setLevel(logging.INFO)
    try:
        stats.record("svc", "m", ERROR, time.monotonic(), None, AttributeError("x" * 5_000_000))
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    assert 0 < len(out.getvalue()) < 1000


@pyrorpc.service("counting")
class Counting:
    def numbers(self, n):
        yield from range(n)

    async def anumbers(self, n):
        for i in range(n):
            yield i

    def broken(self):
        yield 1
        raise ValueError("midway")


def test_streams_count_as_calls_of_their_method():
    """stream() and astream() count in the worker's statistics like any call of their method (ok or error,
    at the stream's end); they were left out."""
    import asyncio

    with pyrorpc.WorkerHost(Counting, register=False) as host:
        with pyrorpc.connect(host.uri, timeout=10) as proxy:
            assert list(proxy.numbers.stream(5)) == [0, 1, 2, 3, 4]

            async def read() -> list[int]:
                return [x async for x in proxy.anumbers.astream(3)]

            assert asyncio.run(read()) == [0, 1, 2]
            try:
                list(proxy.broken.stream())
            except ValueError:
                pass
            location = host.uri.split("@", 1)[1]
            with Pyro5.api.Proxy(f"PYRO:Pyro.Daemon@{location}") as daemon:
                wait_for(lambda: daemon.stats()["methods"].get("counting", {}).get("broken", {}).get("error") == 1,
                         10, message="the failed stream counted")
                methods = daemon.stats()["methods"]["counting"]
        assert methods["numbers"]["ok"] == 1 and methods["anumbers"]["ok"] == 1
        assert methods["broken"]["error"] == 1 and methods["broken"]["ok"] == 0

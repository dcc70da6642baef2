"""pyrorpc benchmark suite: raw TCP, stock Pyro5, RPyC (if installed), pyrorpc connect() and Pool, side by side.

One command starts its own name server, servers and workers on 127.0.0.1, measures every contender in
interleaved rounds (round r runs each contender once, in an order rotated per round, so drift hits all
alike), prints a markdown table with medians, spreads and the performance targets, and stops every
process it started - also on Ctrl-C or an error.

By default every process (this client, each server) is pinned to one CPU, because a wake-up across
CPUs costs ~10x a same-CPU one on a small VM and would swamp the CPU-cost differences being measured;
``--unpinned`` leaves scheduling to the OS.

    python benchmarks/run.py                                   # full run, ~4.5 minutes on 2 slow vCPUs
    python benchmarks/run.py --out docs/benchmarks.md --json docs/benchmarks.json --png docs/benchmarks.png
    python benchmarks/run.py --smoke                           # tiny run (< 30 s), what the test runs
    python benchmarks/run.py --only sync,oneway --rounds 3     # a subset

Figures: ``sync`` (calls/s, p50/p99 latency and client/server CPU per call of ``ping()``), ``oneway``
(``hit()`` calls executed by the worker per second), ``map`` (``Pool.echo.map`` vs a stock Pyro5 ``echo``
loop), ``threads`` (64 client threads sharing one Pool vs 64 threads with a stock Pyro5 proxy each: calls/s
and errors), ``idle`` (a worker's sync calls/s with 1,000 idle connections open on it vs none, and its
thread and descriptor counts), ``sleep`` (10 ms calls as futures through pools of 1/2/4/8/16 workers vs
the ideal), ``async`` (``await m.aio()`` calls/s of an ``async def`` method, one at a time and from 64
tasks at once, against the sync path measured alongside: ``m()`` one at a time, and 64 threads or
``future()`` calls at once), ``stream`` (items/s of ``for x in m.stream(n)`` and ``async for x in
m.astream(n)`` against the sync call rate, stock Pyro5's item streaming and RPyC's generator iteration; the
worker's RSS growth over a stream of 1,000,000 items), ``concurrent`` (10,000 awaits at once of an
``async def`` method sleeping 1 s, on one worker process of 4 threads: wall time, client and worker threads,
connections), ``metrics`` (``Pool.ping()`` calls/s and worker CPU per call with the per-call statistics
and a Prometheus endpoint scraped every 0.5 s, against a worker and pool that record nothing; a third row
adds OpenTelemetry installed but no provider or exporter configured, when ``pyrorpc.tracing`` and the otel
extra are there) and ``ns`` (service lookup among 10,000 registrations: runs ``benchmarks/ns_lookup.py`` and
includes its rows).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import json
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import Pyro5  # noqa: E402
import Pyro5.client  # noqa: E402
from harness import (  # noqa: E402
    ROOT,
    Child,
    astream_run,
    async_concurrent,
    async_loop,
    children,
    fd_count,
    futures_run,
    idle_connections,
    multiplexed,
    oneway_run,
    stream_memory,
    stream_run,
    sync_loop,
    thread_count,
    threaded_run,
    timed_map,
)
from machine import have_rpyc, machine  # noqa: E402
from report import Results, command_line, markdown_report  # noqa: E402
from servers import FRAME  # noqa: E402

import pyrorpc  # noqa: E402

GROUPS = ("sync", "oneway", "map", "threads", "idle", "sleep", "async", "stream", "concurrent", "metrics", "ns")
RPC_GROUPS = frozenset(GROUPS) - {"ns"}
BENCH_GROUPS = {"sync", "oneway", "map", "threads", "async", "stream"}  # served by the "bench" worker
POOL_SIZES = (1, 2, 4, 8, 16)
SMOKE_POOL_SIZES = (1, 2)


# the contenders ---------------------------------------------------------------------------------------

SYNC_FIGURES = {"sync_calls": "calls_per_s", "sync_p50": "p50_us", "sync_p99": "p99_us",
                "sync_cpu_client": "client_cpu_us", "sync_cpu_server": "server_cpu_us"}
ONEWAY_FIGURES = {"oneway_executed": "executed_per_s", "oneway_sent": "sent_per_s"}
THREADS_FIGURES = {"threads_calls": "calls_per_s", "threads_errors": "errors"}
IDLE_FIGURES = {"idle_calls": "calls_per_s", "idle_threads": "threads", "idle_fds": "fds"}
ASYNC_FIGURES = {"async_calls": "calls_per_s", "async_p50": "p50_us", "async_cpu_client": "client_cpu_us",
                 "async_cpu_server": "server_cpu_us"}
METRICS_FIGURES = {"metrics_calls": "calls_per_s", "metrics_cpu_server": "server_cpu_us"}
METRICS_WORKERS = {  # service -> worker arguments: what each row of the metrics figure runs against
    "moff": ["--no-stats", "--no-tracing"], "mon": ["--metrics-port", "0", "--no-tracing"],
    "motel": ["--metrics-port", "0"]}
CONCURRENT_FIGURES = {"concurrent_seconds": "seconds", "concurrent_client_threads": "peak_client_threads",
                      "concurrent_worker_threads": "peak_worker_threads",
                      "concurrent_connections": "peak_connections"}


@dataclasses.dataclass
class Contender:
    """One row set of a figure group: ``run()`` measures once and returns a dict whose ``figures`` keys
    (figure id -> key in that dict) become the round's values."""

    cid: str
    label: str
    figures: dict[str, str]
    run: Callable[[], dict[str, Any]]
    ideal: float | None = None


def recv_exact(sock: Any, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("raw server closed the connection")
        buf += chunk
    return buf


class Bench:
    """Servers, clients and the per-figure measurements of one run."""

    def __init__(self, args: argparse.Namespace, stack: ExitStack, start: Callable[[list[str], str | None], Child],
                 results: Results) -> None:
        self.args = args
        self.stack = stack
        self.start = start
        self.results = results
        self.cpus = None if args.unpinned else str(args.cpu)
        self.pool_sizes = SMOKE_POOL_SIZES if args.smoke else POOL_SIZES
        self.rpyc = args.rpyc and have_rpyc()
        self.pids: dict[str, int] = {}  # server name -> pid, for the CPU-per-call figures
        self.uris: dict[str, str] = {}  # service -> worker URI
        # every coroutine of the run goes through this one event loop (the multiplexed channels of aio()
        # and astream() belong to a loop: warmed up once, reused by every round); closed last
        self.loop = asyncio.new_event_loop()
        stack.callback(self.close_loop)
        # Pyro5's thread server refuses a connection once its pool is full (80 threads by default)
        self.pyro_threadpool = max(128, 2 * args.threads)
        if args.rpyc and not self.rpyc and args.groups & {"sync", "oneway", "stream"}:
            results.notes.append("RPyC not measured: `pip install rpyc` (optional) to include it.")
        if args.groups & {"async", "concurrent"}:
            results.notes.append(
                "async and concurrent have no RPyC row: RPyC has no asyncio client and no async service "
                "methods, and its threaded server serves each connection's requests one at a time on one "
                "thread, so 10,000 awaits of a 1 s sleep would need 10,000 connections and server threads "
                "(or 10,000 s): no fair equivalent. Its `async_` results are not awaitable.")

    def close_loop(self) -> None:
        """Let the closes the proxies scheduled on the loop run (their channels), then close it."""
        loop = self.loop
        try:
            loop.run_until_complete(asyncio.sleep(0.05))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    def log(self, msg: str) -> None:
        if not self.args.quiet:
            print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    # servers
    def start_servers(self) -> None:
        t0 = time.perf_counter()
        groups = self.args.groups
        need_rpc = bool(groups & RPC_GROUPS)
        ns = self.start(["ns"], self.cpus) if need_rpc else None
        raw = self.start(["raw"], self.cpus) if "sync" in groups else None
        pyro = self.start(["pyro"], self.cpus) if groups & {"sync", "oneway", "map", "stream"} else None
        rpyc = self.start(["rpyc"], self.cpus) if self.rpyc and groups & {"sync", "oneway", "stream"} else None
        # its own stock server: every client thread's connection holds one of its threads for good
        pyro_threads = self.start(["pyro", "--threadpool", str(self.pyro_threadpool)], self.cpus) \
            if "threads" in groups else None
        timeout = 60.0
        if ns is not None:
            self.ns = ns.wait_ready(timeout)[1]
            # worker process i serves every service that needs more than i workers: "bench" (1 worker),
            # "bench2" (2 workers) and "sleepK" (K workers, one per process); sleep-bound pools never run
            # while another figure does, so sharing processes costs them nothing. "idle" gets a process
            # of its own, so its thread and descriptor counts are one server's; so does "conc" (the
            # concurrent group's worker, with --concurrent-threads call threads).
            plan: list[tuple[list[str], list[str]]] = []  # (services, extra worker arguments)
            procs = max(self.pool_sizes) if "sleep" in groups else 2
            for i in range(procs):
                services = []
                if groups & BENCH_GROUPS and i == 0:
                    services.append("bench")
                if groups & {"oneway", "map"} and i < 2:
                    services.append("bench2")
                if "sleep" in groups:
                    services += [f"sleep{k}" for k in self.pool_sizes if i < k]
                if services:
                    plan.append((services, []))
            if "idle" in groups:
                plan.append((["idle"], []))
            if "concurrent" in groups:
                plan.append((["conc"], ["--threads", str(self.args.concurrent_threads)]))
            if "metrics" in groups:
                plan += [([svc], extra) for svc, extra in METRICS_WORKERS.items() if svc != "motel" or _traceable()]
            workers = [self.start(["worker", "--ns", self.ns, *[a for s in svc for a in ("--service", s)], *extra],
                                  self.cpus) for svc, extra in plan]
            uris = self.uris  # service -> worker URI, from "READY worker SERVICE=URI ..."
            for (svc, _extra), w in zip(plan, workers, strict=True):
                uris.update(kv.partition("=")[::2] for kv in w.wait_ready(timeout)[1:])
                self.pids.update({s: w.proc.pid for s in svc if s in ("bench", "idle", "conc", *METRICS_WORKERS)})
            if "idle" in groups:
                self.idle_helper = self.start(["idle", "--uri", uris["idle"]], self.cpus)
                self.idle_helper.wait_ready(timeout)
            if "concurrent" in groups:
                port = uris["conc"].rsplit(":", 1)[1]
                self.gather_helper = self.start(
                    ["gather", "--ns", self.ns, "--service", "conc", "--max-in-flight", str(self.args.concurrent),
                     "--worker-pid", str(self.pids["conc"]), "--port", port], self.cpus)
                held = self.gather_helper.wait_ready(timeout)[1].split(",")
                if len(held) != 1 or not held[0].startswith("conc."):
                    raise RuntimeError(f"the gather helper's Pool('conc') holds {held}, expected 1 worker of conc")
        if pyro_threads is not None:
            ready = pyro_threads.wait_ready(timeout)
            self.pyro_threads_uri = ready[1]
            self.results.meta["pyro_threadpool"] = int(ready[2].split("=", 1)[1])
        self.pids.update({name: c.proc.pid for name, c in (("raw", raw), ("pyro", pyro), ("rpyc", rpyc)) if c})
        if raw is not None:
            host, port = raw.wait_ready(timeout)[1].split(":")
            self.raw_addr = (host, int(port))
        if pyro is not None:
            self.pyro_uri = pyro.wait_ready(timeout)[1]
        if rpyc is not None:
            host, port = rpyc.wait_ready(timeout)[1].split(":")
            self.rpyc_addr = (host, int(port))
        self.log(f"servers up in {time.perf_counter() - t0:.1f}s")

    # clients (made once, reused in every round: steady state is what is measured)
    def pyro_proxy(self, uri: str | None = None) -> Any:
        proxy = Pyro5.client.Proxy(uri or self.pyro_uri)

        def release() -> None:
            proxy._pyroClaimOwnership()  # it may belong to a client thread of the threads figure
            proxy._pyroRelease()

        self.stack.callback(release)
        return proxy

    def pool(self, service: str, **kwargs: Any) -> pyrorpc.Pool:
        pool = pyrorpc.Pool(service, ns=self.ns, **kwargs)
        self.stack.callback(pool.close)
        # a figure is only worth its label if the pool holds exactly the workers started for it
        want = {"bench": 1, "bench2": 2, "conc": 1, **dict.fromkeys(METRICS_WORKERS, 1)}.get(service) \
            or int(service[len("sleep"):])
        got = sorted(w.name for w in pool.workers())
        if len(got) != want or not all(name.startswith(service + ".") for name in got):
            raise RuntimeError(f"Pool({service!r}) holds {got}, expected {want} worker(s) of {service!r}")
        return pool

    def connect(self, target: str) -> pyrorpc.Proxy:
        proxy = pyrorpc.connect(target, ns=self.ns)
        self.stack.callback(proxy.close)
        return proxy

    def rpyc_conn(self) -> Any:
        import rpyc
        conn = rpyc.connect(*self.rpyc_addr)
        self.stack.callback(conn.close)
        return conn

    def counter_of(self, pool: pyrorpc.Pool) -> Callable[[], int]:
        """Total ``count()`` over the pool's workers, each read through its own connect() proxy."""
        proxies = [self.connect(w.name) for w in pool.workers()]
        return lambda: sum(p.count() for p in proxies)

    def contenders(self) -> dict[str, list[Contender]]:
        """Per group, the contenders in a fixed order (rotated per round). Each group is built by its own
        method, so no closure can see another group's clients."""
        makers = {"sync": self._sync_group, "oneway": self._oneway_group, "map": self._map_group,
                  "threads": self._threads_group, "idle": self._idle_group, "sleep": self._sleep_group,
                  "async": self._async_group, "stream": self._stream_group, "concurrent": self._concurrent_group,
                  "metrics": self._metrics_group}
        return {group: make() for group, make in makers.items() if group in self.args.groups}

    def _sync_group(self) -> list[Contender]:
        a = self.args

        def sync(cid: str, label: str, call: Callable[[], Any], server: str) -> Contender:
            pid = self.pids[server]
            return Contender(cid, label, SYNC_FIGURES, lambda: sync_loop(call, a.calls, a.warmup, pid))

        sock = socket.create_connection(self.raw_addr)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.stack.callback(sock.close)
        frame = b"x" * FRAME

        def raw_ping() -> None:
            sock.sendall(frame)
            recv_exact(sock, FRAME)

        pyro, conn, pool = self.pyro_proxy(), self.connect("bench"), self.pool("bench")
        group = [sync("raw", f"raw TCP floor ({FRAME} B frames)", raw_ping, "raw"),
                 sync("pyro", "stock Pyro5", lambda: pyro.ping(), "pyro"),
                 sync("connect", "pyrorpc connect()", lambda: conn.ping(), "bench"),
                 sync("pool", "pyrorpc Pool (1 worker)", lambda: pool.ping(), "bench")]
        if self.rpyc:
            ping = self.rpyc_conn().root.ping  # bound once: each root.ping lookup is a round trip of its own
            group.insert(2, sync("rpyc", "RPyC", ping, "rpyc"))
        return group

    def _oneway_group(self) -> list[Contender]:
        a = self.args

        def oneway(cid: str, label: str, send: Callable[[], Any], executed: Callable[[], int]) -> Contender:
            return Contender(cid, label, ONEWAY_FIGURES, lambda: oneway_run(send, executed, a.calls, a.warmup))

        pyro_send, pyro_count = self.pyro_proxy(), self.pyro_proxy()
        conn = self.connect("bench")
        pool1, pool2 = self.pool("bench"), self.pool("bench2")
        group = [
            oneway("pyro", "stock Pyro5", lambda: pyro_send.hit(), lambda: pyro_count.count()),
            oneway("connect", "pyrorpc connect()", lambda: conn.hit.oneway(), lambda: conn.count()),
            oneway("pool", "pyrorpc Pool (1 worker)", lambda: pool1.hit.oneway(), self.counter_of(pool1)),
            oneway("pool2", "pyrorpc Pool (2 workers)", lambda: pool2.hit.oneway(), self.counter_of(pool2)),
        ]
        if self.rpyc:
            import rpyc
            rconn = self.rpyc_conn()
            group.insert(1, oneway("rpyc", "RPyC (async_)", rpyc.async_(rconn.root.hit), rconn.root.count))
        return group

    def _map_group(self) -> list[Contender]:
        a = self.args

        def mapped(cid: str, label: str, run: Callable[[int], list[Any]]) -> Contender:
            return Contender(cid, label, {"map": "calls_per_s"}, lambda: timed_map(run, a.calls, a.warmup))

        def pool_map(pool: pyrorpc.Pool) -> Callable[[int], list[Any]]:
            echo: Any = pool.echo  # a PoolMethod (typed as its base RemoteMethod by __getattr__)
            return lambda n: list(echo.map((i,) for i in range(n)))

        pyro = self.pyro_proxy()
        return [
            mapped("pyro_loop", "stock Pyro5 sync loop", lambda n: [pyro.echo(i) for i in range(n)]),
            mapped("pool", "pyrorpc Pool.map (1 worker)", pool_map(self.pool("bench"))),
            mapped("pool2", "pyrorpc Pool.map (2 workers)", pool_map(self.pool("bench2"))),
        ]

    def _threads_group(self) -> list[Contender]:
        a = self.args
        n, warmup = a.thread_calls, max(2, a.thread_calls // 20)
        pool = self.pool("bench")
        proxies = [self.pyro_proxy(self.pyro_threads_uri) for _ in range(a.threads)]

        def stock(i: int) -> Callable[[], Any]:
            proxy = proxies[i]
            proxy._pyroClaimOwnership()  # a Pyro5 proxy serves the one thread that owns it
            return lambda: proxy.ping()

        def shared(_i: int) -> Callable[[], Any]:
            return lambda: pool.ping()

        def threaded(cid: str, label: str, prepare: Callable[[int], Callable[[], Any]]) -> Contender:
            return Contender(cid, label, THREADS_FIGURES, lambda: threaded_run(prepare, a.threads, n, warmup))

        return [
            threaded("pyro", f"stock Pyro5 thread server, {a.threads} threads × own proxy", stock),
            threaded("pool", f"pyrorpc Pool (1 worker), shared by {a.threads} threads", shared),
        ]

    def _idle_group(self) -> list[Contender]:
        a = self.args
        pid, helper, idle = self.pids["idle"], self.idle_helper, a.idle_connections
        proxy = self.connect("idle")
        proxy.ping()  # its own connection is open before any descriptor is counted

        def measure(with_idle: bool) -> dict[str, Any]:
            with idle_connections(helper, idle, pid) if with_idle else nullcontext(0.0) as opened_in:
                out: dict[str, Any] = sync_loop(lambda: proxy.ping(), a.calls, a.warmup, pid)
                out.update(threads=thread_count(pid), fds=fd_count(pid), idle_connections=idle if with_idle else 0,
                           open_seconds=opened_in)
            return out

        return [Contender("none", "pyrorpc worker, no idle connections", IDLE_FIGURES,
                          functools.partial(measure, False)),
                Contender("idle", f"pyrorpc worker, {idle:,} idle connections open", IDLE_FIGURES,
                          functools.partial(measure, True))]

    def _sleep_group(self) -> list[Contender]:
        group = []
        for k in self.pool_sizes:
            # one call in flight per worker, so the ideal is k x 100/s: the figure shows how well the pool
            # keeps every worker busy (with the default 16 in flight per worker it would be CPU-bound)
            pool = self.pool(f"sleep{k}", max_in_flight=1)
            m = max(4 * k, int(k * 100 * self.args.sleep_seconds))
            group.append(Contender(
                f"pool_k{k}", f"pyrorpc Pool, {k} worker{'s' if k > 1 else ''}", {"sleep": "calls_per_s"},
                functools.partial(futures_run, pool.sleep10.future, m, 2 * k), ideal=k * 100.0))
        return group

    def _async_group(self) -> list[Contender]:
        """aio() against the sync path, side by side on the same worker process: one call at a time
        (latency-bound, like the sync figure) and ``--threads`` callers at once."""
        a = self.args
        pid, loop = self.pids["bench"], self.loop
        conn, pool = self.connect("bench"), self.pool("bench")
        # a window as wide as the callers for the concurrent rows (the default of 16 would cap them)
        wide = self.pool("bench", max_in_flight=a.threads)
        tasks, n, warmup = a.threads, a.thread_calls, max(2, a.thread_calls // 20)

        def checked(out: dict[str, Any], client: Any = None) -> dict[str, Any]:
            if out.get("errors"):
                raise RuntimeError(f"{out['errors']:.0f} calls failed (first: {out.get('first_error')})")
            if client is not None and multiplexed(client) is False:
                raise RuntimeError("aio() fell back to a thread per call: the worker did not accept multiplexing")
            return out

        def one(cid: str, label: str, call: Callable[[], Any], aio: Any = None) -> Contender:
            if aio is not None:  # the client whose aio() this is
                return Contender(cid, label, ASYNC_FIGURES,
                                 lambda: checked(async_loop(loop, call, a.calls, a.warmup, pid), aio))
            return Contender(cid, label, ASYNC_FIGURES, lambda: sync_loop(call, a.calls, a.warmup, pid))

        def concurrent(cid: str, label: str, run: Callable[[], dict[str, Any]], aio: bool = False) -> Contender:
            return Contender(cid, label, {"async_concurrent": "calls_per_s"},
                             lambda: checked(run(), wide if aio else None))

        return [
            one("sync", "connect(): ping(), one at a time", lambda: conn.ping()),
            one("aio", "connect(): await aping.aio() (async def), one at a time", lambda: conn.aping.aio(), conn),
            one("aio_plain", "connect(): await ping.aio() (plain def), one at a time", lambda: conn.ping.aio(), conn),
            one("pool_sync", "Pool (1 worker): ping(), one at a time", lambda: pool.ping()),
            one("pool_aio", "Pool (1 worker): await aping.aio(), one at a time", lambda: pool.aping.aio(), pool),
            concurrent("threads", f"Pool: {tasks} threads × ping()",
                       lambda: threaded_run(lambda _i: lambda: wide.ping(), tasks, n, warmup)),
            concurrent("futures", f"Pool: ping.future(), {tasks} in flight",
                       lambda: futures_run(wide.ping.future, tasks * n, tasks)),
            concurrent("aio", f"Pool: {tasks} tasks × await aping.aio()",
                       lambda: async_concurrent(loop, lambda: wide.aping.aio(), tasks, n, warmup), True),
            concurrent("aio_plain", f"Pool: {tasks} tasks × await ping.aio() (plain def)",
                       lambda: async_concurrent(loop, lambda: wide.ping.aio(), tasks, n, warmup), True),
        ]

    def _stream_group(self) -> list[Contender]:
        """Items/s of a generator method, streamed, against the sync call rate of the same worker measured
        alongside; stock Pyro5 and RPyC iterate the same generator remotely (a round trip per item)."""
        a = self.args
        pid, loop = self.pids["bench"], self.loop
        conn = self.connect("bench")
        pyro = self.pyro_proxy()
        rate = {"stream_rate": "items_per_s"}
        group = [
            Contender("sync", "connect(): ping() calls/s, one at a time (baseline)", {"stream_rate": "calls_per_s"},
                      lambda: sync_loop(lambda: conn.ping(), a.calls, a.warmup, pid)),
            Contender("stream", f"connect(): for x in items.stream({a.stream_items:,})", rate,
                      lambda: stream_run(lambda k: conn.items.stream(k), a.stream_items, a.warmup)),
            Contender("astream", f"connect(): async for x in items.astream({a.stream_items:,})", rate,
                      lambda: astream_run(loop, lambda k: conn.items.astream(k), a.stream_items, a.warmup)),
            Contender("pyro", f"stock Pyro5: for x in items({a.calls:,}) (item streaming)", rate,
                      lambda: stream_run(lambda k: pyro.items(k), a.calls, a.warmup)),
        ]
        if self.rpyc:
            root = self.rpyc_conn().root
            group.append(Contender("rpyc", f"RPyC: for x in items({a.calls:,}) (generator netref)", rate,
                                   lambda: stream_run(lambda k: root.items(k), a.calls, a.warmup)))

        def memory() -> dict[str, Any]:
            for _ in conn.items.stream(a.warmup):  # (a stream's connection and thread exist before "before")
                pass
            return stream_memory(conn.items.stream(a.rss_items), a.rss_items, pid, max(1, a.rss_items // 20))

        group.append(Contender("rss", f"connect(): for x in items.stream({a.rss_items:,})",
                               {"stream_rss": "rss_growth_kib"}, memory))
        return group

    def _concurrent_group(self) -> list[Contender]:
        """``--concurrent`` awaits at once of an async method sleeping ``--concurrent-sleep`` seconds, on one
        worker process of ``--concurrent-threads`` call threads, through one Pool - in a client process of
        its own (``servers.py gather``), so the client's thread count is this figure's only."""
        a = self.args
        n, helper = a.concurrent, self.gather_helper

        def measure() -> dict[str, Any]:
            reply = helper.ask(f"run {n} {a.concurrent_sleep!r}", 300 + 10 * a.concurrent_sleep)
            if reply[0] != "gathered":
                raise RuntimeError("gather helper: " + " ".join(reply))
            out: dict[str, Any] = json.loads(reply[1])
            if out["errors"]:
                raise RuntimeError(f"{out['errors']:.0f} of {n} awaits failed (first: {out.get('first_error')})")
            out.update(worker_threads_setting=a.concurrent_threads, sleep_s=a.concurrent_sleep)
            return out

        return [Contender("pool_aio", f"Pool (1 worker, {a.concurrent_threads} threads): gather of {n:,} "
                          f"aio() sleeping {a.concurrent_sleep:g} s", CONCURRENT_FIGURES, measure)]

    def _metrics_group(self) -> list[Contender]:
        """The cost of metrics on the sync call path: the same Pool.ping() loop against three workers, each a
        process of its own: ``off`` records nothing (worker: no per-call statistics; client: no Pool
        statistics; neither tests for OpenTelemetry), ``on`` keeps every statistic and serves a Prometheus
        endpoint that a thread of this process scrapes every 0.5 s, ``otel`` is ``on`` with OpenTelemetry
        installed but no provider or exporter configured (client and worker)."""
        a = self.args
        tracing = _tracing_module()

        def measure(service: str, stats: bool, traced: bool) -> Callable[[], dict[str, Any]]:
            pool, pid, url = self.pool(service), self.pids[service], self.uris.get(f"metrics:{service}")

            def run() -> dict[str, Any]:
                saved = pool._stats
                if not stats:
                    pool._stats = _NoPoolStats()  # type: ignore[assignment]
                was = tracing.INSTALLED if tracing is not None else False
                if tracing is not None:
                    tracing.INSTALLED = traced
                with _scraping(url) as scrapes:
                    try:
                        out = sync_loop(lambda: pool.ping(), a.calls, a.warmup, pid)
                    finally:
                        pool._stats = saved
                        if tracing is not None:
                            tracing.INSTALLED = was
                out["scrapes"] = scrapes[0]
                return out
            return run

        group = [Contender("off", "Pool (1 worker): no statistics recorded", METRICS_FIGURES,
                           measure("moff", False, False)),
                 Contender("on", "Pool (1 worker): statistics + Prometheus endpoint scraped every 0.5 s",
                           METRICS_FIGURES, measure("mon", True, False))]
        if "motel" in self.pids:
            group.append(Contender("otel", "as on, with OpenTelemetry installed (no provider, no exporter)",
                                   METRICS_FIGURES, measure("motel", True, True)))
        return group

    # the rounds
    def run_rounds(self) -> None:
        groups = self.contenders()
        for r in range(self.args.rounds):
            t0 = time.perf_counter()
            for group in GROUPS:
                entries = groups.get(group)
                if not entries:
                    continue
                shift = r % len(entries)
                for c in entries[shift:] + entries[:shift]:
                    try:
                        out: dict[str, Any] | None = c.run()
                    except Exception as exc:  # one failed contender must not sink the run: NaN for this round
                        if self.args.smoke:
                            raise
                        self.results.notes.append(f"round {r + 1}, {group} / {c.label}: {type(exc).__name__}: {exc}")
                        self.log(f"  {group} / {c.label} FAILED: {exc}")
                        out = None
                    for i, (figure, key) in enumerate(c.figures.items()):
                        self.results.add(figure, c.cid, c.label, math.nan if out is None else out[key],
                                         ideal=c.ideal, details=out if i == 0 else None)
            self.log(f"round {r + 1}/{self.args.rounds} done in {time.perf_counter() - t0:.1f}s")

    # name-server lookup: the other script, run as is; its rows join the table
    def run_ns_lookup(self) -> None:
        script = os.path.join(HERE, "ns_lookup.py")
        if not os.path.exists(script):
            self.results.notes.append("service lookup not measured: benchmarks/ns_lookup.py is missing")
            return
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "ns.json")
            argv = [sys.executable, script, "--json", out, "--rounds", str(max(3, self.args.rounds))]
            argv += ["--smoke"] if self.args.smoke else []
            argv += ["--unpinned"] if self.args.unpinned else []
            self.log("service lookup: " + " ".join(shlex.quote(x) for x in argv[1:]))
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=self.args.ns_timeout, cwd=ROOT,
                                  env=env)
            if proc.returncode != 0:
                raise RuntimeError(f"ns_lookup.py exited {proc.returncode}:\n{proc.stderr[-2000:]}")
            with open(out) as fh:
                report = json.load(fh)
        self.results.meta["ns_lookup"] = {k: v for k, v in report.items() if k != "results"}
        entries = report.get("config", {}).get("entries")
        if entries:
            self.results.notes.append(f"service lookup: {entries:,} registrations; rounds and order are "
                                      "ns_lookup.py's own (interleaved among its measures).")
        for label, res in report["results"].items():
            for figure, key in (("ns_lookup_p50", "p50"), ("ns_lookup_p99", "p99")):
                for rnd in res.get("rounds", []):
                    self.results.add(figure, label, label, float(rnd[key]))


class _NoPoolStats:
    """A Pool's statistics that record nothing (the metrics figure's ``off`` row)."""

    def attempt(self, *_args: Any) -> None:
        pass

    def retried(self) -> None:
        pass

    def failed_over(self) -> None:
        pass

    def ejected(self, *_args: Any) -> None:
        pass


def _tracing_module() -> Any:
    try:
        from pyrorpc import tracing
    except ImportError:
        return None
    return tracing


def _traceable() -> bool:
    """pyrorpc has tracing and the otel extra is installed (the metrics figure's otel row)."""
    tracing = _tracing_module()
    return bool(tracing is not None and tracing.INSTALLED)


class _scraping:  # noqa: N801 - used as a function: ``with _scraping(url) as count``
    """Scrape ``url`` from a thread every 0.5 s while the block runs (nothing for None); yields ``[scrapes]``."""

    def __init__(self, url: str | None) -> None:
        self.url = url
        self.count = [0]
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def _run(self) -> None:
        assert self.url is not None
        while True:
            with urllib.request.urlopen(self.url, timeout=5) as reply:
                reply.read()
            self.count[0] += 1
            if self.stop.wait(0.5):
                return

    def __enter__(self) -> list[int]:
        if self.url is not None:
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()
        return self.count

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(10)


# command line -----------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python benchmarks/run.py", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; smoke 1)")
    parser.add_argument("--calls", type=int, default=None,
                        help="calls per contender per round for sync/oneway/map/idle (default 5000; smoke 200)")
    parser.add_argument("--threads", type=int, default=64, help="client threads of the threads figure (default 64)")
    parser.add_argument("--thread-calls", type=int, default=None,
                        help="calls per client thread per round in the threads figure (default: --calls / 10)")
    parser.add_argument("--idle-connections", type=int, default=1000,
                        help="idle connections held open in the idle figure (default 1000, smoke too)")
    parser.add_argument("--sleep-seconds", type=float, default=None,
                        help="ideal duration of each sleep-bound measure (default 2; smoke 0.3)")
    parser.add_argument("--stream-items", type=int, default=None,
                        help="items per pyrorpc stream in the stream figure (default 200000; smoke 5000)")
    parser.add_argument("--rss-items", type=int, default=None,
                        help="items streamed while the worker's RSS is watched (default 1000000; smoke 20000)")
    parser.add_argument("--concurrent", type=int, default=None,
                        help="awaits at once in the concurrent figure (default 10000; smoke 500)")
    parser.add_argument("--concurrent-sleep", type=float, default=1.0,
                        help="seconds each of those awaits sleeps on the worker (default 1)")
    parser.add_argument("--concurrent-threads", type=int, default=4,
                        help="call threads of the concurrent figure's worker process (default 4)")
    parser.add_argument("--only", default=None, metavar="NAME[,NAME]", help=f"run a subset of: {', '.join(GROUPS)}")
    parser.add_argument("--unpinned", action="store_true", help="do not pin processes to one CPU")
    parser.add_argument("--cpu", type=int, default=min(os.sched_getaffinity(0)),
                        help="the CPU to pin every process to (default: the first this process may use)")
    parser.add_argument("--no-rpyc", dest="rpyc", action="store_false", help="skip RPyC even if installed")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny run: 200 calls (20 per client thread), 1 round, pools of 1/2, small "
                             "streams, 500 concurrent awaits, small name-server registry (< 30 s)")
    parser.add_argument("--json", metavar="PATH", help="write every raw number as JSON")
    parser.add_argument("--out", metavar="PATH", help="write the markdown report (e.g. docs/benchmarks.md)")
    parser.add_argument("--png", metavar="PATH", help="write a chart (needs matplotlib)")
    parser.add_argument("--fail-on-miss", action="store_true", help="exit 1 when a measured target is missed")
    parser.add_argument("--ns-timeout", type=float, default=600.0, help="seconds allowed for ns_lookup.py")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    args.rounds = args.rounds if args.rounds is not None else (1 if args.smoke else 5)
    args.calls = args.calls if args.calls is not None else (200 if args.smoke else 5000)
    args.sleep_seconds = args.sleep_seconds if args.sleep_seconds is not None else (0.3 if args.smoke else 2.0)
    args.warmup = max(10, args.calls // 20)
    args.stream_items = args.stream_items if args.stream_items is not None else (5000 if args.smoke else 200_000)
    args.rss_items = args.rss_items if args.rss_items is not None else (20_000 if args.smoke else 1_000_000)
    args.concurrent = args.concurrent if args.concurrent is not None else (500 if args.smoke else 10_000)
    args.thread_calls = args.thread_calls if args.thread_calls is not None else max(10, args.calls // 10)
    if args.rounds < 1:
        parser.error("`--rounds` must be at least 1 (3 or more for a meaningful spread)")
    if args.calls < 10:
        parser.error("`--calls` must be at least 10")
    if args.threads < 1:
        parser.error("`--threads` must be at least 1")
    if args.thread_calls < 1:
        parser.error("`--thread-calls` must be at least 1")
    if args.idle_connections < 1:
        parser.error("`--idle-connections` must be at least 1")
    if args.sleep_seconds <= 0:
        parser.error("`--sleep-seconds` must be positive")
    for name in ("stream_items", "rss_items", "concurrent", "concurrent_threads"):
        if getattr(args, name) < 1:
            parser.error(f"`--{name.replace('_', '-')}` must be at least 1")
    if args.concurrent_sleep < 0:
        parser.error("`--concurrent-sleep` must not be negative")
    names = [n.strip() for n in (args.only or ",".join(GROUPS)).split(",") if n.strip()]
    unknown = [n for n in names if n not in GROUPS]
    if unknown or not names:
        parser.error(f"`--only` takes names from {', '.join(GROUPS)}; got {args.only!r}")
    args.groups = set(names)
    if not args.unpinned:
        if args.cpu not in os.sched_getaffinity(0):
            parser.error(f"`--cpu` {args.cpu} is not available to this process")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if not args.unpinned:
        # before any thread or child starts, so all of them inherit it
        os.sched_setaffinity(0, {args.cpu})

    def on_sigterm(_signo: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    results = Results({"command": command_line(argv), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                       "pinned": not args.unpinned, "cpu": args.cpu, "rounds": args.rounds, "calls": args.calls,
                       "sleep_seconds": args.sleep_seconds, "smoke": args.smoke, "groups": sorted(args.groups),
                       "threads": args.threads, "thread_calls": args.thread_calls,
                       "idle_connections": args.idle_connections, "stream_items": args.stream_items,
                       "rss_items": args.rss_items, "concurrent": args.concurrent,
                       "concurrent_sleep": args.concurrent_sleep, "concurrent_threads": args.concurrent_threads,
                       "pool_sizes": list(SMOKE_POOL_SIZES if args.smoke else POOL_SIZES),
                       "machine": machine(), "server_pids": [],
                       # other work on the machine skews every figure: what the run started and ended with
                       "loadavg_start": list(os.getloadavg())})
    t0 = time.perf_counter()
    try:
        with children(results.meta["server_pids"]) as start, ExitStack() as stack:
            bench = Bench(args, stack, start, results)
            if args.groups & RPC_GROUPS:
                bench.start_servers()
                bench.run_rounds()
        if "ns" in args.groups:
            bench.run_ns_lookup()
    except KeyboardInterrupt:
        print("interrupted: every process this run started has been stopped", file=sys.stderr)
        return 130
    results.meta["seconds"] = time.perf_counter() - t0
    results.meta["loadavg_end"] = list(os.getloadavg())
    results.evaluate()
    print(results.table())
    print()
    print(results.summary())
    for note in results.notes:
        print(f"note: {note}")
    if args.json:
        results.write_json(args.json)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            fh.write(markdown_report(results, argv))
    if args.png and not results.write_png(args.png):
        print("note: no chart written: `pip install matplotlib` (optional) to get one", file=sys.stderr)
    if args.fail_on_miss and any(t.status == "miss" for t in results.targets):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

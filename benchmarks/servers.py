"""Benchmark servers: the service class, and the processes run.py starts (``python servers.py KIND ...``).

Every server process pins itself to the CPUs given by ``--cpus`` (default: left as inherited), prints one
``READY ...`` line once its socket is bound (and, for workers, registered), and exits when its stdin
closes, so a benchmark run that dies - even by SIGKILL - never leaves servers behind.

Kinds:
    raw      a TCP server echoing fixed-size frames (the floor: what one round trip costs without any RPC)
    pyro     a stock ``Pyro5.server.Daemon`` serving one ``BenchService`` instance (thread server; with
             ``--threadpool N`` its pool grows to N threads instead of Pyro5's default 80)
    rpyc     an RPyC ``ThreadedServer`` with the same methods (only if rpyc is installed)
    ns       pyrorpc's name server (``nameserver.daemon.run``)
    worker   one pyrorpc ``WorkerHost`` per ``--service`` name, all serving ``BenchService`` (``--threads N``:
             the call threads of each, default pyrorpc's)
    idle     a helper holding idle client connections to the worker at ``--uri``: each ``open N`` line on
             stdin opens N more (TCP + pyrorpc handshake, nothing else), ``close`` closes them all; each
             command is answered with a ``READY`` line
    gather   a client of its own (so its threads are this figure's alone) with a ``Pool`` of ``--service``:
             each ``run N SECONDS`` line on stdin awaits N ``asleep.aio(0)`` at once (warm-up), then N
             ``asleep.aio(SECONDS)`` at once, watching its own threads, the ``--worker-pid``'s threads and
             its own connections to the worker's ``--port``; answered with ``READY gathered JSON``
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pyrorpc

FRAME = 64  # bytes per raw TCP ping and pong


@pyrorpc.service("bench")
class BenchService:
    """Trivial methods, identical for every contender (stock Pyro5 serves it as a plain exposed class)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hits = 0

    def ping(self) -> None:
        return None

    def echo(self, x: Any) -> Any:
        return x

    @pyrorpc.oneway
    def hit(self) -> None:
        with self._lock:
            self._hits += 1

    def count(self) -> int:
        with self._lock:
            return self._hits

    def sleep10(self) -> None:
        time.sleep(0.010)

    # pyrorpc only (stock Pyro5 and RPyC have no async methods; generators are streamed by all three)
    async def aping(self) -> None:
        """``ping`` as an ``async def`` method: run on the worker's event loop."""
        return None

    async def asleep(self, seconds: float) -> None:
        """I/O-bound: awaits without holding a worker thread."""
        await asyncio.sleep(seconds)

    def items(self, n: int) -> Iterator[int]:
        """``0 .. n-1``, one at a time: streamed with ``stream()`` / ``astream()``."""
        yield from range(n)


def pin(cpus: str | None) -> None:
    """Pin this process (and the threads it starts later) to ``cpus`` like ``0`` or ``0,1``."""
    if cpus:
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})


def ready(line: str) -> None:
    print(f"READY {line}", flush=True)


def exit_when_parent_goes() -> None:
    """Block until stdin reaches EOF (the benchmark closed it or died), then exit at once."""
    try:
        sys.stdin.buffer.read()
    finally:
        os._exit(0)


# raw TCP ----------------------------------------------------------------------------------------------

def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return bytes(buf)


def _echo_frames(conn: socket.socket) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with conn:
        try:
            while True:
                conn.sendall(_recv_exact(conn, FRAME))
        except (ConnectionError, OSError):
            return


def serve_raw() -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    ready(f"raw 127.0.0.1:{listener.getsockname()[1]}")

    def accept_loop() -> None:
        while True:
            conn, _addr = listener.accept()
            threading.Thread(target=_echo_frames, args=(conn,), daemon=True).start()

    threading.Thread(target=accept_loop, daemon=True).start()
    exit_when_parent_goes()


# stock Pyro5 ------------------------------------------------------------------------------------------

def serve_pyro(threadpool: int | None) -> None:
    import Pyro5
    import Pyro5.server
    if threadpool:
        # this process's own config: the stock server that several client threads share needs a thread
        # per connection (Pyro5's thread server refuses connections once its pool is full)
        Pyro5.config.THREADPOOL_SIZE = threadpool
    daemon = Pyro5.server.Daemon(host="127.0.0.1", port=0)
    uri = daemon.register(BenchService(), "bench")
    threading.Thread(target=daemon.requestLoop, daemon=True).start()
    ready(f"pyro {uri} threadpool={Pyro5.config.THREADPOOL_SIZE}")
    exit_when_parent_goes()


# RPyC -------------------------------------------------------------------------------------------------

def serve_rpyc() -> None:
    import rpyc
    from rpyc.utils.server import ThreadedServer

    bench = BenchService()

    class BenchRpyc(rpyc.Service):  # type: ignore[misc]
        def exposed_ping(self) -> None:
            return None

        def exposed_echo(self, x: Any) -> Any:
            return x

        def exposed_hit(self) -> None:
            bench.hit()

        def exposed_count(self) -> int:
            return bench.count()

        def exposed_items(self, n: int) -> Iterator[int]:
            return bench.items(n)  # a generator: the client gets a netref and iterates it remotely

    server = ThreadedServer(BenchRpyc, hostname="127.0.0.1", port=0,
                            protocol_config={"allow_public_attrs": False})
    threading.Thread(target=server.start, daemon=True).start()
    ready(f"rpyc 127.0.0.1:{server.port}")
    exit_when_parent_goes()


# pyrorpc ----------------------------------------------------------------------------------------------

def serve_ns() -> None:
    from nameserver.daemon import run

    def echo(line: str) -> None:
        if line.startswith("NS running on "):
            ready("ns " + line.split()[3])

    threading.Thread(target=exit_when_parent_goes, daemon=True).start()
    run("127.0.0.1", 0, storage="memory", lease_ttl=30.0, echo=echo)


def serve_workers(ns: str, services: list[str], threads: int | None, *, stats: bool = True, tracing: bool = True,
                  metrics_port: int | None = None) -> None:
    """Serve ``services``; the metrics figure's workers: ``stats=False`` records no per-call statistics (the
    "off" row), ``tracing=False`` as if the otel extra were not installed, ``metrics_port`` a Prometheus
    endpoint (its URL in the READY line as ``metrics:SERVICE=URL``)."""
    if not stats:
        from pyrorpc.stats import ServerStats

        def record(self: ServerStats, *args: Any, **kwargs: Any) -> None:
            # nothing recorded; a call still leaves flight (record() does that with leave=, under its lock)
            leave = args[6] if len(args) > 6 else kwargs.get("leave")
            if leave is not None:
                ServerStats.leave(self, leave)

        ServerStats.record = record  # type: ignore[method-assign]
    if not tracing:
        try:
            from pyrorpc import tracing as otel
            otel.INSTALLED = False
        except ImportError:
            pass
    hosts = [pyrorpc.WorkerHost(BenchService, ns=ns, service=s, threads=threads, metrics_port=metrics_port).start()
             for s in services]
    ready("worker " + " ".join(f"{h.service}={h.uri}" for h in hosts)
          + "".join(f" metrics:{h.service}={h.metrics.url}" for h in hosts if h.metrics is not None))
    # no graceful stop: the name server goes down with the same benchmark run, leases and all
    exit_when_parent_goes()


# idle connections --------------------------------------------------------------------------------------

def hold_idle(uri: str) -> None:
    """Open and close idle connections to ``uri`` on command, from this process (its descriptors, not the
    benchmark client's)."""
    import resource

    import Pyro5.core

    from pyrorpc.security import open_connection

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    target, settings = Pyro5.core.URI(uri), pyrorpc.Settings()
    conns: list[Any] = []
    ready("idle")
    for line in sys.stdin:  # EOF: the benchmark is done (or gone)
        cmd = line.split()
        try:
            if cmd[:1] == ["open"] and len(cmd) == 2:
                t0 = time.perf_counter()
                for _ in range(int(cmd[1])):
                    conns.append(open_connection(target, settings)[0])
                ready(f"opened {len(conns)} {time.perf_counter() - t0:.3f}")
            elif cmd == ["close"]:
                for conn in conns:
                    conn.close()
                conns.clear()
                ready("closed")
            else:
                ready(f"error unknown command {line.strip()!r}")
        except Exception as exc:  # the benchmark reports it; the connections opened so far stay counted
            ready(f"error {type(exc).__name__}: {exc}")
    os._exit(0)


# many awaits at once ------------------------------------------------------------------------------------

def run_gathers(ns: str, service: str, max_in_flight: int, worker_pid: int, port: int) -> None:
    """Answer ``run N SECONDS`` commands (see the module's doc) until stdin closes."""
    from harness import connections_to, gathered_run, multiplexed, process_cpu, thread_count

    me = os.getpid()
    samplers = {"client_threads": lambda: thread_count(me), "worker_threads": lambda: thread_count(worker_pid),
                "connections": lambda: connections_to(port)}  # (the worker serves this client only)
    loop = asyncio.new_event_loop()  # one for every command: its channels stay open between them
    pool = pyrorpc.Pool(service, ns=ns, max_in_flight=max_in_flight)
    workers = [w.name for w in pool.workers()]
    ready(f"gather {','.join(workers) or '-'}")
    for line in sys.stdin:  # EOF: the benchmark is done (or gone)
        cmd = line.split()
        try:
            if cmd[:1] != ["run"] or len(cmd) != 3:
                ready(f"error unknown command {line.strip()!r}")
                continue
            n, seconds = int(cmd[1]), float(cmd[2])
            warm = gathered_run(loop, lambda: pool.asleep.aio(0), n, {})
            if warm["errors"]:
                ready(f"error warm-up: {warm['errors']:.0f} of {n} awaits failed ({warm['first_error']})")
                continue
            if multiplexed(pool) is False:
                ready("error aio() fell back to a thread per call: the worker did not accept multiplexing")
                continue
            worker0 = process_cpu(worker_pid)
            out = gathered_run(loop, functools.partial(pool.asleep.aio, seconds), n, samplers)
            out.update(worker_cpu_s=process_cpu(worker_pid) - worker0, warmup_seconds=warm["seconds"],
                       client_threads_after=thread_count(me), worker_threads_after=thread_count(worker_pid),
                       connections_after=connections_to(port))
            ready("gathered " + json.dumps(out, separators=(",", ":")))
        except Exception as exc:  # the benchmark reports it
            ready(f"error {type(exc).__name__}: {exc}")
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["raw", "pyro", "rpyc", "ns", "worker", "idle", "gather"])
    parser.add_argument("--cpus", default=None, help="pin to these CPUs, e.g. 0 (default: inherited)")
    parser.add_argument("--ns", default=None, help="name server HOST:PORT (worker)")
    parser.add_argument("--service", action="append", default=[], help="service to serve (worker; repeatable)")
    parser.add_argument("--threadpool", type=int, default=None, help="Pyro5 THREADPOOL_SIZE (pyro)")
    parser.add_argument("--threads", type=int, default=None, help="call threads of each WorkerHost (worker)")
    parser.add_argument("--uri", default=None, help="the worker to hold idle connections to (idle)")
    parser.add_argument("--max-in-flight", type=int, default=None, help="the Pool's max_in_flight (gather)")
    parser.add_argument("--worker-pid", type=int, default=None, help="the worker process to watch (gather)")
    parser.add_argument("--port", type=int, default=None, help="the worker's port (gather)")
    parser.add_argument("--no-stats", action="store_true", help="no per-call statistics (worker; metrics figure)")
    parser.add_argument("--no-tracing", action="store_true", help="as without the otel extra (worker)")
    parser.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics (worker)")
    args = parser.parse_args(argv)
    pin(args.cpus)
    if args.kind == "raw":
        serve_raw()
    elif args.kind == "pyro":
        serve_pyro(args.threadpool)
    elif args.kind == "rpyc":
        serve_rpyc()
    elif args.kind == "ns":
        serve_ns()
    elif args.kind == "idle":
        if not args.uri:
            parser.error("idle needs --uri")
        hold_idle(args.uri)
    elif args.kind == "gather":
        if not (args.ns and len(args.service) == 1 and args.max_in_flight and args.worker_pid and args.port):
            parser.error("gather needs --ns, one --service, --max-in-flight, --worker-pid and --port")
        run_gathers(args.ns, args.service[0], args.max_in_flight, args.worker_pid, args.port)
    else:
        if not args.ns or not args.service:
            parser.error("worker needs --ns and at least one --service")
        serve_workers(args.ns, args.service, args.threads, stats=not args.no_stats, tracing=not args.no_tracing,
                      metrics_port=args.metrics_port)


if __name__ == "__main__":
    main()

"""pyrorpc's server core against real sockets and processes: connections are not calls, limits, drain,
bounded stop, bad requests, garbage, Pyro5 interop, callbacks (issue 9).

Workers run in this process (``WorkerHost``) where a test needs to look inside, and as
``pyrorpc worker start test_server_core:Core`` processes where the point is a whole process (threads,
signals, exit status). Raw-socket helpers below speak Pyro5's protocol with ``pyrorpc.protocol`` and
stock Pyro5's serpent serializer.
"""

from __future__ import annotations

import logging
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import Pyro5.api
import Pyro5.core
import Pyro5.errors
import pytest
from Pyro5 import serializers
from Pyro5.callcontext import current_context
from services import Calculator

import pyrorpc
from pyrorpc import protocol
from pyrorpc.security import open_connection
from pyrorpc.testing import ChildProcess, wait_for
from pyrorpc.wire import invoke
from pyrorpc.wire import loads as wire_loads

SERPENT = serializers.serializers["serpent"]
SPEC = "test_server_core:Core"
MB = 1024 * 1024


# the service these tests serve ------------------------------------------------------------------

_GATE = threading.Event()  # big(..., gated=True) waits for it (in-process workers only)
_HANG = threading.Event()  # hang() waits for it, at most 30 s
_hanging: list[int] = []


class _BadState:
    def __getstate__(self) -> Any:
        raise RuntimeError("this object refuses to be serialized")


class _Unknown:
    """Serialized by the client as a dict with a ``__class__`` no worker accepts."""

    def __init__(self) -> None:
        self.value = 1


def _journal(entry: str) -> None:
    path = os.environ.get("CORE_JOURNAL")
    if path:
        with open(path, "a") as fh:
            fh.write(entry + "\n")


@pyrorpc.service("core")
class Core:
    def ok(self, x: Any) -> Any:
        return x

    def peer(self) -> list[Any]:
        """The client's address as the worker sees it: the same value means the same connection."""
        return list(current_context.client_sock_addr)

    def gen(self) -> Any:
        return (i for i in range(3))

    def lock(self) -> Any:
        return threading.Lock()

    def bad_state(self) -> Any:
        return _BadState()

    def big(self, size: int, gated: bool = False) -> bytes:
        if gated:
            _GATE.wait(30)
        return b"x" * size

    def work(self, token: str, seconds: float) -> str:
        _journal(token)
        time.sleep(seconds)
        return token

    @pyrorpc.oneway
    def hang(self) -> None:
        _journal("hang")
        _hanging.append(1)
        _HANG.wait(30)

    def bye(self) -> None:
        sys.exit(3)  # a method that ends "the program": the caller's error, never the server's thread

    def call_back(self, reporter: Any, n: int) -> int:
        for i in range(n):
            reporter.progress(i)
        return n


class Recorder:
    """A client-side object the worker calls back."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seen: list[int] = []

    def progress(self, i: int) -> None:
        with self._lock:
            self.seen.append(i)


@pytest.fixture(autouse=True)
def _release_hanging_calls() -> Any:
    _GATE.clear()
    _HANG.clear()
    _hanging.clear()
    yield
    _GATE.set()
    _HANG.set()


# raw protocol helpers ---------------------------------------------------------------------------

def address(uri: str) -> tuple[str, int]:
    u = Pyro5.core.URI(uri)
    return u.host, u.port


def object_id(uri: str) -> str:
    return Pyro5.core.URI(uri).object


def recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(min(size - len(buf), MB))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def read_frame(sock: socket.socket) -> tuple[protocol.Header, bytes] | None:
    """The next frame, or None if the server closed the connection first."""
    raw = recv_exactly(sock, protocol.HEADER_SIZE)
    if raw is None:
        return None
    header = protocol.parse_header(raw, 1 << 30)
    payload = recv_exactly(sock, header.ann_size + header.data_size) if header.ann_size + header.data_size else b""
    if payload is None:
        return None
    return header, payload


def connect_frame(obj: str) -> bytes:
    return protocol.pack(protocol.MSG_CONNECT, 0, 0, SERPENT.dumps({"handshake": "hello", "object": obj}))


def raw_connection(uri: str, timeout: float = 5.0) -> socket.socket:
    """A plain socket that completed Pyro5's connect handshake with the object of ``uri``."""
    sock = socket.create_connection(address(uri), timeout=timeout)
    sock.sendall(connect_frame(object_id(uri)))
    frame = read_frame(sock)
    assert frame is not None and frame[0].msg_type == protocol.MSG_CONNECTOK, frame
    return sock


def raw_call(sock: socket.socket, seq: int, body: bytes, flags: int = 0,
             annotations: bytes = b"") -> tuple[bool, bytes]:
    """Send one MSG_INVOKE with ``body`` as its data; returns ``(is_exception, serialized reply)``."""
    sock.sendall(protocol.pack(protocol.MSG_INVOKE, flags, seq, body, annotations))
    frame = read_frame(sock)
    assert frame is not None, "the server closed the connection instead of answering"
    header, payload = frame
    assert header.msg_type == protocol.MSG_RESULT and header.seq == seq, header
    return bool(header.flags & protocol.FLAGS_EXCEPTION), payload[header.ann_size:]


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """True if the peer closes ``sock`` within ``timeout`` (whatever it sent before is read and ignored)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        r, _, _ = select.select([sock], [], [], left)
        if r:
            try:
                if not sock.recv(65536):
                    return True
            except ConnectionResetError:
                return True


def task_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def live(ns: str, service: str) -> list[pyrorpc.WorkerInfo]:
    return pyrorpc.NameServerClient(pyrorpc.Settings(ns=ns, connect_timeout=3)).service_workers(service)


def run_python(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout)


def env_with(**extra: str) -> dict[str, str]:
    return {**os.environ, **extra}


@pytest.fixture
def children() -> Any:
    """Factory for ChildProcess; every child is killed at the end (its output printed, shown on failure)."""
    made: list[ChildProcess] = []

    def make(argv: list[str], env: dict[str, str] | None = None) -> ChildProcess:
        child = ChildProcess(argv, env)
        made.append(child)
        return child

    yield make
    for child in made:
        child.kill()
        print(f"--- output of {child.argv[1:4]}:\n{child.output}")


# 1. idle connections do not lock out clients ---------------------------------------------------------

HOLDING_CLIENT = """
import sys, threading, pyrorpc
pool = pyrorpc.Pool("calc", ns=sys.argv[1], timeout=30)
futures = [pool.slow.future(0.2) for _ in range(16)]
for f in futures:
    f.result(30)
print("HELD", flush=True)
threading.Event().wait(120)  # keep the pool and its 16 connections open until killed
"""

NEW_CLIENT = """
import sys, time, pyrorpc
with pyrorpc.Pool("calc", ns=sys.argv[1], timeout=5) as pool:
    t0 = time.monotonic()
    print("RESULT", pool.add(1, 2), round(time.monotonic() - t0, 3), flush=True)
"""


@pytest.mark.timeout(90)
def test_idle_pools_of_five_clients_do_not_lock_out_a_sixth(ns_addr, worker_factory, children):
    worker = worker_factory("services:Calculator", ns_addr, args=["--threads", "64", "--lease-ttl", "1.5"])
    holders = [children([sys.executable, "-c", HOLDING_CLIENT, ns_addr]) for _ in range(5)]
    for holder in holders:
        holder.expect("^HELD", 60)
    # 5 x 16 connections, more than the worker's 64 threads, are open and idle (as its heartbeat reports)
    wait_for(lambda: [w for w in live(ns_addr, "calc") if w.connections >= 80], 10,
             message="worker reports the 80 idle connections")
    assert worker.alive()
    sixth = run_python(NEW_CLIENT, ns_addr, timeout=60)
    assert sixth.returncode == 0, sixth.stdout + sixth.stderr
    assert "RESULT 3 " in sixth.stdout, sixth.stdout + sixth.stderr
    assert all(h.alive() for h in holders)


def test_twenty_idle_connections_on_a_four_thread_worker(ns_addr):
    with pyrorpc.WorkerHost(Core, register=False, threads=4) as host:
        raw = [open_connection(Pyro5.core.URI(host.uri), pyrorpc.Settings())[0] for _ in range(10)]
        proxies = [pyrorpc.connect(host.uri, timeout=5) for _ in range(10)]
        try:
            for i, p in enumerate(proxies):
                assert p.ok(i) == i  # a call made, then the connection sits idle
            assert host.server.connection_count() == 20
            with pyrorpc.connect(host.uri, timeout=3) as newcomer:
                assert newcomer.ok("served") == "served"
            assert [p.ok(i) for i, p in enumerate(proxies)] == list(range(10))
        finally:
            for c in raw:
                c.close()
            for p in proxies:
                p.close()


# 2. a thousand idle connections cost no threads --------------------------------------------------------

@pytest.mark.timeout(90)
def test_thousand_idle_connections_cost_no_threads(ns_addr, worker_factory):
    threads = 8
    worker = worker_factory("services:Calculator", ns_addr, args=["--threads", str(threads), "--lease-ttl", "1.5"])
    uri = Pyro5.core.URI(worker.uri)
    settings = pyrorpc.Settings(timeout=10)
    conns = [open_connection(uri, settings)[0] for _ in range(1000)]
    try:
        # one call on every connection, 32 at a time, then all of them sit idle
        def calls(chunk: list[Any]) -> list[int]:
            return [invoke(c, "add", (i, 1), {}) for i, c in enumerate(chunk)]

        chunks = [conns[i::32] for i in range(32)]
        with ThreadPoolExecutor(32) as ex:
            results = list(ex.map(calls, chunks))
        assert [r for rs in results for r in rs] == [i + 1 for chunk in chunks for i in range(len(chunk))]
        wait_for(lambda: [w for w in live(ns_addr, "calc") if w.connections >= 1000], 10,
                 message="worker reports 1000 open connections")
        with pyrorpc.connect(worker.uri, timeout=5) as calc:
            assert calc.add(2, 3) == 5
            futures = [calc.add.future(i, i) for i in range(20)]
            assert [f.result(10) for f in futures] == [2 * i for i in range(20)]
        # main + I/O + heartbeat + the call threads; never one per connection
        assert task_count(worker.worker_pid) <= threads + 5, os.listdir(f"/proc/{worker.worker_pid}/task")
    finally:
        for c in conns:
            c.close()


# 3. max_connections ------------------------------------------------------------------------------

def test_max_connections_refuses_the_sixth_clearly_and_serves_the_five(caplog):
    with pyrorpc.WorkerHost(Core, register=False, max_connections=5) as host:
        five = [pyrorpc.connect(host.uri, timeout=5) for _ in range(5)]
        try:
            assert [p.ok(i) for i, p in enumerate(five)] == list(range(5))
            with caplog.at_level(logging.WARNING, logger="pyrorpc.server"):
                sixth = pyrorpc.connect(host.uri, timeout=5, connect_timeout=3)
                t0 = time.monotonic()
                with pytest.raises(Pyro5.errors.PyroError, match="at capacity"):
                    sixth.ok("refused")
                assert time.monotonic() - t0 < 3  # refused at once, not after a connect timeout
                sixth.close()
            assert any("at capacity" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING), \
                caplog.text
            assert [p.ok(i) for i, p in enumerate(five)] == list(range(5))  # the five keep being served
            five.pop().close()
            wait_for(lambda: host.server.connection_count() <= 4, 5, message="a closed connection is let go")
            with pyrorpc.connect(host.uri, timeout=5) as again:
                assert again.ok("room again") == "room again"
        finally:
            for p in five:
                p.close()


# 4. idle timeout ---------------------------------------------------------------------------------

def test_idle_timeout_closes_idle_connections_and_the_proxy_reconnects():
    with pyrorpc.WorkerHost(Core, register=False, idle_timeout=1) as host:
        with pyrorpc.connect(host.uri, timeout=5) as p:
            first_peer = p.peer()
            raw = raw_connection(host.uri)
            try:
                assert closed_by_peer(raw, 5), "an idle connection stayed open past idle_timeout"
            finally:
                raw.close()
            wait_for(lambda: host.server.connection_count() == 0, 5, message="idle connections closed")
            assert p.ok("again") == "again"  # transparently on a new connection
            assert p.peer() != first_peer
            # a connection in use is not idle: calls every 0.1 s for 2.5 s keep the same connection
            busy_peer = p.peer()
            deadline = time.monotonic() + 2.5
            while time.monotonic() < deadline:
                assert p.peer() == busy_peer
                time.sleep(0.1)  # the pace of the calls, not a wait for readiness


# 5. slow-loris ------------------------------------------------------------------------------------

LORIS = """
import selectors, socket, sys, time
hold, per_kind = float(sys.argv[1]), int(sys.argv[2])
targets = []
for spec in sys.argv[3:]:
    host, port, half = spec.split(",")
    targets.append(((host, int(port)), bytes.fromhex(half)))
sel = selectors.DefaultSelector()

def open_one(target, kind):
    sock = socket.create_connection(target[0], timeout=5)
    if kind == "half":
        sock.sendall(target[1])
    sock.setblocking(False)
    sel.register(sock, selectors.EVENT_READ, (target, kind))

for target in targets:
    for kind in ("silent", "half"):
        for _ in range(per_kind):
            open_one(target, kind)
print("READY", flush=True)
reopened = 0
end = time.monotonic() + hold
while time.monotonic() < end:
    for key, _ in sel.select(0.1):
        try:
            data = key.fileobj.recv(4096)
        except BlockingIOError:
            continue
        except OSError:
            data = b""
        if not data:  # the server gave up on it: come back, as an attacker would
            sel.unregister(key.fileobj)
            key.fileobj.close()
            open_one(*key.data)
            reopened += 1
print("DONE", reopened, flush=True)
"""


@pytest.mark.timeout(90)
def test_slow_loris_does_not_delay_calls_or_lease_renewals(nameserver, worker_factory, children):
    env = env_with(PYRORPC_CONNECT_TIMEOUT="2")  # the servers' handshake deadline
    ns = nameserver(lease_ttl=2, env=env)
    worker = worker_factory("services:Calculator", ns.ns, args=["--lease-ttl", "2"], env=env)
    w_host, w_port = address(worker.uri)
    half_worker = connect_frame(object_id(worker.uri))[:20].hex()
    half_ns = connect_frame(Pyro5.core.NAMESERVER_NAME)[:20].hex()
    hold = float(os.environ.get("LORIS_HOLD_SECONDS", "8"))  # the issue says 20 s; 8 keeps the suite short
    loris = children([sys.executable, "-c", LORIS, str(hold), "300",
                      f"{w_host},{w_port},{half_worker}", f"{ns.address.host},{ns.address.port},{half_ns}"])
    loris.expect("^READY", 30)
    settings = pyrorpc.Settings(ns=ns.ns, timeout=5, connect_timeout=5)
    naming = pyrorpc.NameServerClient(settings)
    call_times, lookup_times = [], []
    end = time.monotonic() + hold - 0.5
    while time.monotonic() < end:
        t0 = time.monotonic()
        with pyrorpc.connect(worker.uri, settings=settings) as calc:  # a new client: connect + handshake + call
            assert calc.add(1, 2) == 3
        call_times.append(time.monotonic() - t0)
        t0 = time.monotonic()
        assert naming.lookup(worker.name)[0] == worker.uri
        lookup_times.append(time.monotonic() - t0)
        time.sleep(0.4)  # spread the samples over the hold
    match = loris.expect(r"^DONE (\d+)", 30)
    assert max(call_times) < 1.0, call_times
    assert max(lookup_times) < 1.0, lookup_times
    assert len(call_times) >= 8
    # the servers did enforce their handshake deadline on the silent peers (which came back at once)
    assert int(match.group(1)) >= 600, loris.output
    # the worker kept renewing its lease through it all (4 TTLs)
    workers = live(ns.ns, "calc")
    assert [w.name for w in workers] == [worker.name]
    assert workers[0].last_heartbeat is not None and workers[0].last_heartbeat < 2.0, workers
    assert worker.alive() and ns.alive()


# 6. drain keeps replies ---------------------------------------------------------------------------------

SIZE = 30 * MB


@pytest.mark.timeout(90)
def test_stop_while_a_30mb_reply_is_produced_keeps_it():
    host = pyrorpc.WorkerHost(Core, register=False, drain_timeout=20).start()
    stopped: list[bool] = []
    replies: list[Any] = []
    try:
        with pyrorpc.connect(host.uri, timeout=30) as p:
            caller = threading.Thread(target=lambda: replies.append(p.big(SIZE, True)))
            caller.start()
            wait_for(lambda: host.stats.in_flight == 1, 5, message="call in flight")
            stopper = threading.Thread(target=lambda: stopped.append(host.stop()))
            stopper.start()
            wait_for(lambda: host.stats.draining, 5, message="draining")
            _GATE.set()  # the method returns its 30 MB now, while the worker is stopping
            caller.join(30)
            stopper.join(30)
    finally:
        _GATE.set()
        host.stop()
    assert len(replies) == 1 and len(replies[0]) == SIZE and replies[0] == b"x" * SIZE
    assert stopped == [True]


def test_stop_while_a_30mb_reply_is_written_to_a_slow_reader_keeps_it():
    host = pyrorpc.WorkerHost(Core, register=False, drain_timeout=20).start()
    stopped: list[bool] = []
    try:
        sock = raw_connection(host.uri, timeout=30)
        body = SERPENT.dumpsCall(object_id(host.uri), "big", (SIZE,), {})
        sock.sendall(protocol.pack(protocol.MSG_INVOKE, 0, 1, body))
        # the reply no longer fits in the socket buffers: the worker is writing it while we do not read
        header = protocol.parse_header(recv_exactly(sock, protocol.HEADER_SIZE), 1 << 30)
        assert header.msg_type == protocol.MSG_RESULT and not header.flags & protocol.FLAGS_EXCEPTION
        stopper = threading.Thread(target=lambda: stopped.append(host.stop()))
        stopper.start()
        wait_for(lambda: host.stats.draining, 5, message="draining")
        payload = bytearray()
        total = header.ann_size + header.data_size
        while len(payload) < total:
            slow = len(payload) < total // 3
            chunk = sock.recv(min(total - len(payload), MB), socket.MSG_WAITALL if slow else 0)
            if not chunk:
                break
            payload += chunk
            if slow:
                # more than the socket buffers hold is still unwritten: stop() must still be waiting
                assert stopper.is_alive(), "stop() returned while the reply was still being written"
                time.sleep(0.05)  # a slow reader
        sock.close()
        stopper.join(30)
    finally:
        host.stop()
    assert len(payload) == header.ann_size + header.data_size, "the reply was cut off"
    assert SERPENT.loads(bytes(payload[header.ann_size:])) == b"x" * SIZE  # stock serpent: quicker on 30 MB
    assert stopped == [True]


def test_drain_tells_pyrorpc_clients_at_once_and_their_next_call_never_leaves():
    """A client that took an idle connection just as the worker closed it used to send its call into the
    close (lost, WorkerLostError). Now drain() tells pyrorpc clients first (MSG_NOTICE): on idle
    connections at once, on busy ones with their reply. Stock Pyro5 peers are never sent one."""
    from pyrorpc.endpoint import Endpoint, NotSent

    host = pyrorpc.WorkerHost(Core, register=False, drain_timeout=20).start()
    settings = pyrorpc.Settings(timeout=10)
    stopped: list[bool] = []
    try:
        idle_ep = Endpoint(host.uri, settings, "idle")
        busy_ep = Endpoint(host.uri, settings, "busy")
        assert idle_ep.call("ok", (1,), {}, 5) == 1  # leaves one idle connection
        stock = raw_connection(host.uri)
        pyro_conn, _meta = open_connection(Pyro5.core.URI(host.uri), settings)
        replies: list[Any] = []
        caller = threading.Thread(target=lambda: replies.append(busy_ep.call("big", (10, True), {}, 20)))
        caller.start()
        wait_for(lambda: host.stats.in_flight == 1, 5, message="call in flight")
        stopper = threading.Thread(target=lambda: stopped.append(host.stop()))
        stopper.start()
        wait_for(lambda: host.stats.draining, 5, message="draining")
        # an idle pyrorpc connection hears it at once; a stock one hears nothing
        pyro_conn.sock.settimeout(5)
        frame = read_frame(pyro_conn.sock)
        assert frame is not None and frame[0].msg_type == protocol.MSG_NOTICE
        stock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            stock.recv(1)
        # the idle endpoint's next call never leaves: NotSent (the pool sends it elsewhere)
        wait_for(lambda: not idle_ep._idle[0].idle_and_alive(), 5, message="notice on the idle connection")
        with pytest.raises(NotSent):
            idle_ep.call("ok", (2,), {}, 5)
        assert idle_ep.closed
        # the call in flight gets its reply, and with it the notice: that endpoint takes no further call
        _GATE.set()
        caller.join(10)
        assert replies == [b"x" * 10]
        with pytest.raises(NotSent):
            busy_ep.call("ok", (3,), {}, 5)
        assert busy_ep.closed
        stopper.join(30)
        assert stopped == [True]
        stock.close()
        pyro_conn.close()
    finally:
        _GATE.set()
        host.stop()


@pytest.mark.timeout(60)
def test_sigterm_worker_process_returns_every_reply_of_calls_that_ran(ns_addr, worker_factory, tmp_path):
    journal = tmp_path / "journal"
    worker = worker_factory(SPEC, ns_addr, env=env_with(CORE_JOURNAL=str(journal)))
    ran = lambda: journal.read_text().split() if journal.exists() else []  # noqa: E731
    outcomes: dict[str, Any] = {}
    with pyrorpc.connect(worker.uri, timeout=30) as p:
        first = {f"early{i}": p.work.future(f"early{i}", 1.0) for i in range(6)}
        wait_for(lambda: len(ran()) == 6, 10, message="six calls running")
        worker.signal(signal.SIGTERM)
        later = {}
        for i in range(6):  # sent while the worker drains: refused (never run) or run and answered
            later[f"late{i}"] = p.work.future(f"late{i}", 0.1)
        for token, fut in {**first, **later}.items():
            try:
                outcomes[token] = fut.result(30)
            except Exception as exc:  # noqa: BLE001 - recorded and checked below
                outcomes[token] = exc
    assert worker.wait(30) == 0, worker.output
    executed = set(ran())
    assert {f"early{i}" for i in range(6)} <= executed
    for token, outcome in outcomes.items():
        if token in executed:
            assert outcome == token, f"{token} ran but its reply was lost: {outcome!r}"
        else:
            assert isinstance(outcome, pyrorpc.WorkerLostError), f"{token}: {outcome!r}"


# 7. stop is bounded --------------------------------------------------------------------------------

def test_stop_with_hung_oneways_and_a_backlog_returns_false_in_time(ns_addr):
    host = pyrorpc.WorkerHost(Core, ns=ns_addr, threads=2, drain_timeout=1).start()
    try:
        proxies = [pyrorpc.connect(host.uri, timeout=5) for _ in range(4)]
        try:
            for _ in range(10):  # 40 oneways over 4 connections: far more than 2 threads can take
                for p in proxies:
                    p.hang.oneway()
            wait_for(lambda: len(_hanging) >= 2 and host.stats.in_flight >= 2, 5, message="both call threads hung")
            t0 = time.monotonic()
            drained = host.stop()
            took = time.monotonic() - t0
        finally:
            for p in proxies:
                p.close()
        assert drained is False
        assert took < 1 + 2.5, f"stop() took {took:.1f}s with drain_timeout=1"
        assert live(ns_addr, "core") == []
    finally:
        _HANG.set()
        host.stop()


@pytest.mark.timeout(60)
def test_sigterm_with_hung_oneways_exits_nonzero_within_the_drain_timeout(ns_addr, worker_factory, tmp_path):
    journal = tmp_path / "journal"
    worker = worker_factory(SPEC, ns_addr, args=["--threads", "2", "--drain-timeout", "1"],
                            env=env_with(CORE_JOURNAL=str(journal)))
    with pyrorpc.connect(worker.uri, timeout=5) as p:
        for _ in range(40):
            p.hang.oneway()
        wait_for(lambda: journal.exists() and len(journal.read_text().split()) >= 2, 10,
                 message="both call threads hung")
        t0 = time.monotonic()
        worker.signal(signal.SIGTERM)
        try:
            status = worker.wait(20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"worker did not exit within 20 s of SIGTERM with --drain-timeout 1:\n{worker.output}")
        took = time.monotonic() - t0
    assert took < 1 + 4, f"exit took {took:.1f}s"
    assert status != 0, f"a drain that timed out must exit non-zero:\n{worker.output}"


# 8. a bad request costs only itself -----------------------------------------------------------------------

BAD_CALLS = [
    ("no_such_method", AttributeError, "no_such_method"),
    ("gen", TypeError, "streams its results"),
    ("lock", Pyro5.errors.SerializeError, "lock"),
    ("bad_state", Pyro5.errors.SerializeError, "refuses to be serialized"),
]


def test_bad_calls_fail_alone_on_the_same_proxy_connection():
    with pyrorpc.WorkerHost(Core, register=False) as host, pyrorpc.connect(host.uri, timeout=5) as p:
        peer = p.peer()
        for i in range(20):
            method, error, text = BAD_CALLS[i % len(BAD_CALLS)]
            with pytest.raises(error, match=text):
                p.method(method)()
            assert p.ok(i) == i
        for i in range(5):  # an argument the worker cannot decode (a class it does not accept)
            with pytest.raises(Pyro5.errors.SerializeError):
                p.ok(_Unknown())
            assert p.ok(i) == i
        assert p.peer() == peer, "a failed call cost the connection"
        assert host.server.connection_count() == 1


MALFORMED = [
    (b"(", 0, b""),  # truncated serpent
    (b"\xff\xfe\x00garbage", 0, b""),  # not even text
    (b"# serpent utf-8 python3.2\n{'a': ", 0, b""),
    (SERPENT.dumps(42), 0, b""),  # valid serpent, not a call
    (b"not zlib at all", protocol.FLAGS_COMPRESSED, b""),
    (b"x", 0, b"ABCD" + struct.pack("!I", 10**6)),  # an annotation running past the message
]


def test_malformed_requests_fail_alone_on_the_same_raw_connection():
    with pyrorpc.WorkerHost(Core, register=False) as host:
        sock = raw_connection(host.uri)
        undecodable = []
        try:
            obj = object_id(host.uri)
            for i in range(20):
                body, flags, ann = MALFORMED[i % len(MALFORMED)]
                failed, reply = raw_call(sock, 2 * i + 1, body, flags, ann)
                assert failed, f"{body!r} (flags {flags}) did not fail"
                try:  # what any client (stock Pyro5's serpent) makes of the error
                    error = SERPENT.loads(reply)
                    assert isinstance(error, Exception), error
                except Pyro5.errors.SerializeError as exc:
                    undecodable.append(f"{body[:20]!r} flags={flags} ann={ann!r}: {exc}")
                failed, reply = raw_call(sock, 2 * i + 2, SERPENT.dumpsCall(obj, "ok", (i,), {}))
                assert not failed and wire_loads(reply) == i
        finally:
            sock.close()
        assert undecodable == [], "error replies a client cannot decode"


def test_bad_calls_do_not_eject_a_pool_worker(ns_addr):
    with pyrorpc.WorkerHost(Core, ns=ns_addr) as a, pyrorpc.WorkerHost(Core, ns=ns_addr) as b, \
            pyrorpc.Pool("core", ns=ns_addr, timeout=5) as pool:
        wait_for(lambda: len(pool.workers()) == 2, 10, message="pool sees both workers")
        for i in range(20):
            method, error, text = BAD_CALLS[i % len(BAD_CALLS)]
            with pytest.raises(error, match=text):
                pool.method(method)()
            with pytest.raises(Pyro5.errors.SerializeError):
                pool.ok(_Unknown())
            assert pool.ok(i) == i
        workers = pool.workers()
        assert sorted(w.name for w in workers) == sorted([a.name, b.name])
        assert [w.name for w in workers if w.ejected] == []
        assert pool.ok.broadcast("both") == {a.name: "both", b.name: "both"}


# 9. global Pyro5 config does not leak in ---------------------------------------------------------------

@pytest.mark.timeout(90)
def test_hostile_pyro5_environment_everywhere(children):
    env = env_with(PYRO_SERVERTYPE="multiplex", PYRO_SERIALIZER="marshal", PYRO_COMMTIMEOUT="0.001",
                   PYRORPC_CONNECT_TIMEOUT="5")
    ns_proc = children([sys.executable, "-m", "pyrorpc", "ns", "start", "--port", "0"], env)
    ns = ns_proc.expect(r"^NS running on (\S+)", 20).group(1)
    worker = children([sys.executable, "-m", "pyrorpc", "worker", "start", "services:Calculator", "--ns", ns], env)
    worker.expect(r"^worker \S+ serving calc on ", 20)

    def cli(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "pyrorpc", *args, "--ns", ns], capture_output=True, text=True,
                              timeout=60, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout.strip()

    assert cli("call", "calc", "add", "1", "2") == "3"
    assert cli("call", "calc", "slow", "0.2").isdigit()  # longer than PYRO_COMMTIMEOUT
    assert cli("call", "calc", "add", "'a'", "'b'", "--json") == '"ab"'
    assert "calc." in cli("ns", "list")
    assert ns_proc.alive() and worker.alive()


# 10. interop with stock Pyro5 ------------------------------------------------------------------------

class _StockThing:
    @Pyro5.api.expose
    def hello(self, name: str) -> str:
        return f"hello {name}"

    @Pyro5.api.expose
    def add(self, a: int, b: int) -> int:
        return a + b


def test_stock_pyro5_proxy_calls_a_pyrorpc_worker(ns_addr):
    with pyrorpc.WorkerHost(Calculator, ns=ns_addr) as host:
        with Pyro5.api.Proxy(host.uri) as p:
            p._pyroTimeout = 10
            p._pyroBind()
            assert {"add", "log", "logs"} <= p._pyroMethods
            assert p._pyroOneway == {"log"}
            assert p.add(1, 2) == 3
            assert p.log("stock oneway") is None
            wait_for(lambda: "stock oneway" in p.logs(), 5, message="oneway delivered")
            with Pyro5.api.BatchProxy(p) as batch:
                batch.add(1, 2)
                batch.get("k")
                batch.add(3, 4)
                assert list(batch()) == [3, "value-k", 7]
        daemon_uri = f"PYRO:{Pyro5.core.DAEMON_NAME}@{host.server.location}"
        with Pyro5.api.Proxy(daemon_uri) as d:
            d._pyroTimeout = 10
            assert d.ping() is None
            assert host.server.location in d.info()
            assert host.name in d.registered()
            meta = d.get_metadata(host.name)
            assert "add" in meta["methods"] and "log" in meta["oneway"]
        with Pyro5.api.Proxy(f"PYRONAME:{host.name}@{ns_addr}") as by_name:
            by_name._pyroTimeout = 10
            assert by_name.add(2, 2) == 4
        with Pyro5.api.Proxy(f"PYROMETA:pyrorpc.service:calc@{ns_addr}") as by_meta:
            by_meta._pyroTimeout = 10
            assert by_meta.add(3, 3) == 6


def test_pyrorpc_calls_a_stock_pyro5_daemon():
    daemon = Pyro5.api.Daemon(host="127.0.0.1", port=0)
    uri = daemon.register(_StockThing(), "stock.thing")
    loop = threading.Thread(target=daemon.requestLoop, daemon=True)
    loop.start()
    try:
        with pyrorpc.connect(str(uri), timeout=5) as p:
            assert p.hello("pyrorpc") == "hello pyrorpc"
            assert [f.result(5) for f in [p.add.future(i, 1) for i in range(10)]] == list(range(1, 11))
    finally:
        daemon.shutdown()
        loop.join(5)
        daemon.close()


def test_stock_pyro5_marshal_client_is_refused_clearly():
    Pyro5.config.SERIALIZER = "marshal"  # the autouse fixture resets Pyro5's config afterwards
    with pyrorpc.WorkerHost(Core, register=False) as host:
        with Pyro5.api.Proxy(host.uri) as p:
            p._pyroTimeout = 10
            t0 = time.monotonic()
            with pytest.raises(Pyro5.errors.CommunicationError, match="serpent"):
                p.ok(1)
            assert time.monotonic() - t0 < 5  # refused, not timed out
        with pyrorpc.connect(host.uri, timeout=5) as ours:
            assert ours.ok(1) == 1


# 11. callbacks ----------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_callback_server_with_secret(nameserver, worker_factory):
    secret = "callback-secret-0123"
    env = env_with(PYRORPC_SECRET=secret)
    ns = nameserver(env=env)
    worker = worker_factory(SPEC, ns.ns, env=env)
    recorder = Recorder()
    with pyrorpc.CallbackServer(secret=secret) as callbacks:
        uri = callbacks.register(recorder)
        with pyrorpc.connect("core", ns=ns.ns, secret=secret, timeout=10) as p:
            assert p.call_back(recorder, 3) == 3
        assert recorder.seen == [0, 1, 2]
        # a stock Pyro5 proxy without the secret cannot call the callback object
        with Pyro5.api.Proxy(uri) as stranger:
            stranger._pyroTimeout = 5
            with pytest.raises(Pyro5.errors.CommunicationError):
                stranger.progress(99)
        with pyrorpc.connect(uri, secret="wrong-secret-9876", timeout=5) as wrong:
            with pytest.raises(pyrorpc.AuthenticationError):
                wrong.progress(98)
        assert recorder.seen == [0, 1, 2]
    assert worker.alive()


# 12. garbage -------------------------------------------------------------------------------------------

def _header(msg_type: int = protocol.MSG_INVOKE, data_size: int = 0, ann_size: int = 0, magic: int = protocol.MAGIC,
            serializer_id: int = protocol.SERPENT_ID) -> bytes:
    return protocol.HEADER.pack(b"PYRO", protocol.PROTOCOL_VERSION, msg_type, serializer_id, 0, 1, data_size,
                                ann_size, b"\0" * 16, 0, magic)


@pytest.mark.timeout(60)
def test_garbage_at_worker_and_name_server(nameserver, worker_factory):
    ns = nameserver()
    worker = worker_factory("services:Calculator", ns.ns)
    rng = random.Random(9)
    targets = {"worker": worker.uri, "nameserver": f"PYRO:{Pyro5.core.NAMESERVER_NAME}@{ns.ns}"}
    garbage = [
        rng.randbytes(200),
        _header(msg_type=protocol.MSG_CONNECT, magic=0x1234) + b"x" * 40,
        _header(msg_type=protocol.MSG_CONNECT, data_size=2**32 - 1, ann_size=2**32 - 1),
        b"PYRO" + rng.randbytes(36),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"y" * 20,
    ]
    for name, uri in targets.items():
        for blob in garbage:  # before the handshake: dropped
            with socket.create_connection(address(uri), timeout=5) as sock:
                sock.sendall(blob)
                assert closed_by_peer(sock, 5), f"{name} kept a connection that sent {blob[:16]!r}"
        for blob in garbage[:4]:  # after a valid handshake: dropped too
            with raw_connection(uri) as sock:
                sock.sendall(blob)
                assert closed_by_peer(sock, 5), f"{name} kept a connection that sent {blob[:16]!r}"
    assert worker.alive() and ns.alive()
    with pyrorpc.connect(worker.uri, timeout=5) as calc:
        assert calc.add(1, 2) == 3
    assert [w.name for w in live(ns.ns, "calc")] == [worker.name]


@pytest.mark.timeout(60)
def test_oversized_request_header_is_refused_before_the_payload(nameserver, worker_factory):
    ns = nameserver()
    worker = worker_factory("services:Calculator", ns.ns)
    targets = {"worker": worker.uri, "nameserver": f"PYRO:{Pyro5.core.NAMESERVER_NAME}@{ns.ns}"}
    for name, uri in targets.items():
        with raw_connection(uri) as sock:
            sock.sendall(_header(data_size=65 * MB))  # over the 64 MiB default; no payload follows
            frame = read_frame(sock)
            assert frame is not None, f"{name} closed without saying why"
            header, payload = frame
            assert header.flags & protocol.FLAGS_EXCEPTION
            error = wire_loads(payload[header.ann_size:])
            assert isinstance(error, Pyro5.errors.PyroError) and "exceeds" in str(error), error
            assert closed_by_peer(sock, 5)
        # a connect message too large for a handshake is refused the same way
        with socket.create_connection(address(uri), timeout=5) as sock:
            sock.sendall(_header(msg_type=protocol.MSG_CONNECT, data_size=8 * MB))
            assert closed_by_peer(sock, 5), f"{name} waited for an 8 MB handshake"
    assert worker.alive() and ns.alive()
    with pyrorpc.connect(worker.uri, timeout=5) as calc:
        assert calc.add(1, 2) == 3
    assert pyrorpc.NameServerClient(pyrorpc.Settings(ns=ns.ns)).lookup(worker.name)[0] == worker.uri


# found by review: a method raising SystemExit, a request trickling in, a large reply over TLS ----------

def test_a_method_raising_system_exit_costs_only_its_call():
    with pyrorpc.WorkerHost(Core, register=False, threads=2) as host, pyrorpc.connect(host.uri, timeout=5) as p:
        for _ in range(5):  # more than the worker has call threads
            with pytest.raises(SystemExit):
                p.bye()
        assert p.ok(1) == 1
        futures = [p.ok.future(i) for i in range(8)]
        assert [f.result(5) for f in futures] == list(range(8))


def test_a_request_trickling_in_holds_no_call_thread():
    """threads=1: a peer sending its request a byte every few milliseconds must not keep the only call
    thread from serving another client."""
    with pyrorpc.WorkerHost(Core, register=False, threads=1, connect_timeout=10) as host:
        conn, _meta = open_connection(Pyro5.core.URI(host.uri), host.settings)
        assert invoke(conn, "ok", (1,), {}) == 1  # the connection is served, then idle
        # ~700 bytes at one per 4 ms: about 3 s of trickle, inside the 10 s request deadline
        frame = protocol.pack(protocol.MSG_INVOKE, 0, 2, pyrorpc.codec.dumps((host.name, "ok", ("x" * 600,), {})))

        enough = threading.Event()  # set once the other client has been served: the rest of the trickle adds nothing

        def trickle() -> None:
            for byte in frame[:-1]:
                if enough.is_set():
                    return
                try:
                    conn.sock.send(bytes([byte]))
                except OSError:
                    return
                time.sleep(0.004)

        t = threading.Thread(target=trickle, daemon=True)
        t.start()
        try:
            time.sleep(0.2)  # the trickle is under way
            with pyrorpc.connect(host.uri, timeout=5) as other:
                for i in range(5):
                    started = time.monotonic()
                    assert other.ok(i) == i
                    assert time.monotonic() - started < 1.0
            assert t.is_alive(), "the trickle ended before the other client was served"
        finally:
            enough.set()
            t.join(10)
            conn.close()


@pytest.fixture
def tls_files(tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    paths = {"ca": tmp_path / "ca.pem", "key": tmp_path / "key.pem", "cert": tmp_path / "cert.pem"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    cert.private_key_pem.write_to_path(str(paths["key"]))
    paths["cert"].write_bytes(b"".join(b.bytes() for b in cert.cert_chain_pems))
    return {k: str(v) for k, v in paths.items()}


@pytest.mark.parametrize("delay", [0.0, 0.5])
def test_large_replies_over_tls_arrive_whole(tls_files, delay):
    """A reply larger than the socket buffers is finished by the I/O thread; over TLS each retry must
    repeat the same length or OpenSSL refuses it (the reply used to be lost: BAD_LENGTH)."""
    with pyrorpc.WorkerHost(Core, register=False, tls_cert=tls_files["cert"], tls_key=tls_files["key"]) as host:
        conn, _meta = open_connection(Pyro5.core.URI(host.uri), pyrorpc.Settings(tls_ca=tls_files["ca"]))
        try:
            size = 12_000_000
            frame = protocol.pack(protocol.MSG_INVOKE, 0, 1, pyrorpc.codec.dumps((host.name, "big", (size,), {})))
            conn.send(frame)
            time.sleep(delay)  # a reader that is late: the worker's first send fills the buffers
            header = protocol.parse_header(conn.read_header(), 1 << 30)
            payload = conn._read(header.ann_size + header.data_size)
            assert header.flags & protocol.FLAGS_EXCEPTION == 0
            assert wire_loads(payload[header.ann_size:]) == b"x" * size
        finally:
            conn.close()
        with pyrorpc.connect(host.uri, tls_ca=tls_files["ca"]) as p:
            assert len(p.big(3_000_000)) == 3_000_000


# inline methods (the name server's heartbeats) ---------------------------------------------------------

class _Inline:
    def __init__(self) -> None:
        self.gate = threading.Event()

    @Pyro5.api.expose
    def quick(self, x: int) -> tuple[int, str]:
        return x + 1, threading.current_thread().name

    @Pyro5.api.expose
    def fails(self) -> None:
        raise KeyError("nope")

    @Pyro5.api.expose
    def slow(self) -> str:
        self.gate.wait(10)
        return threading.current_thread().name


def test_inline_methods_run_on_the_io_thread_while_every_call_thread_is_busy() -> None:
    """Methods registered ``inline`` answer from the I/O thread, also while the only call thread is taken;
    their errors, statistics and the other methods' path stay as for any call."""
    obj = _Inline()
    server = pyrorpc.server.Server("127.0.0.1", 0, threads=1, name="inl")
    uri = server.register(obj, "inl", inline=("quick", "fails"))
    server.start()
    try:
        done: list[str] = []

        def slow() -> None:
            with Pyro5.api.Proxy(uri) as busy:
                busy._pyroTimeout = 10
                done.append(busy.slow())

        with Pyro5.api.Proxy(uri) as p:
            p._pyroTimeout = 10
            t = threading.Thread(target=slow)
            t.start()
            wait_for(lambda: server.stats.in_flight == 1, 5)
            assert tuple(p.quick(41)) == (42, "inl-io")
            with pytest.raises(KeyError, match="nope"):
                p.fails()
            for i in range(200):  # pipelined and repeated: still one thread, still answered
                assert p.quick(i)[0] == i + 1
            obj.gate.set()
            t.join(10)
            assert done and done[0].startswith("inl-call")
        methods = server.stats.methods_snapshot()["inl"]
        assert methods["quick"]["ok"] == 201 and methods["fails"]["error"] == 1 and methods["slow"]["ok"] == 1
        assert server.stats.in_flight == 0
    finally:
        server.close()


def test_big_or_declined_inline_requests_go_to_a_call_thread() -> None:
    """The I/O thread only runs small requests of inline methods: a big one (decoding it takes long) and one
    the object declines (``_inline_ok``) run on a call thread, with the same answer, and other clients'
    inline calls are not held up meanwhile."""
    class Decliner(_Inline):
        def _inline_ok(self, method: str, args: Any) -> bool:
            return not (args and args[0] == -1)

    obj = Decliner()
    server = pyrorpc.server.Server("127.0.0.1", 0, threads=4, name="inl")
    uri = server.register(obj, "inl", inline=("quick",))
    server.start()
    try:
        with Pyro5.api.Proxy(uri) as p:
            p._pyroTimeout = 10
            assert tuple(p.quick(1)) == (2, "inl-io")
            result, thread = p.quick(-1)
            assert result == 0 and thread.startswith("inl-call")
            big = list(range(2000))  # (a request of over 4 KB)
            with pytest.raises(TypeError):
                p.quick(big)  # list + 1: the method ran, on a call thread
        wait_for(lambda: server.stats.methods_snapshot()["inl"]["quick"]["error"] == 1, 5)  # (counted after the reply)
        assert server.stats.methods_snapshot()["inl"]["quick"]["ok"] == 2
    finally:
        server.close()


def test_flat_fast_path_leaves_long_arguments_to_the_full_parser(monkeypatch) -> None:
    from pyrorpc import codec

    class Refuse:
        def fullmatch(self, *args: Any) -> None:
            raise AssertionError("the flat path took on a long body")

    body = codec.dumps(("obj", "m", (list(range(3000)),), {}))
    expected = codec.loads_call(body)
    monkeypatch.setattr(codec, "_FLAT_CALL", Refuse())
    assert codec.loads_call(body) == expected

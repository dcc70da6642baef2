"""The call context: deadlines and metadata travel with every call, through a chain of services, to stock
peers unharmed; requests past their deadline do not run; async methods are cancelled at theirs."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import Pyro5.api
import Pyro5.core
import pytest
from Pyro5 import serializers

import pyrorpc
from pyrorpc import protocol
from pyrorpc.codec import SERIALIZER
from pyrorpc.testing import wait_for

SERPENT = serializers.serializers["serpent"]
_ran: list[str] = []
_finally: list[tuple[str, float]] = []


@pyrorpc.service("ctx-last")
class Last:
    def where(self) -> list[Any]:
        call = pyrorpc.current_call()
        assert call is not None
        return [call.remaining(), call.metadata, call.deadline, list(call.caller)]

    def record(self, tag: str) -> str:
        _ran.append(tag)
        return tag

    async def sleepy(self, seconds: float, tag: str) -> str:
        try:
            await asyncio.sleep(seconds)
            return tag
        finally:
            _finally.append((tag, time.monotonic()))

    async def where_async(self) -> list[Any]:
        await asyncio.sleep(0)
        call = pyrorpc.current_call()
        assert call is not None
        return [call.remaining(), call.metadata]


@pyrorpc.service("ctx-mid")
class Mid:
    def relay(self, uri: str, extra: str | None = None) -> list[Any]:
        with pyrorpc.connect(uri, timeout=60) as p:  # 60 s asked; the caller's deadline is what counts
            if extra is None:
                return p.where()
            with pyrorpc.call_metadata(hop=extra):
                return p.where()


@pyrorpc.service("ctx-first")
class First:
    def start(self, mid: str, last: str) -> list[Any]:
        with pyrorpc.connect(mid, timeout=60) as p:
            return p.relay(last, "mid")


@pytest.fixture
def chain() -> Any:
    hosts = [pyrorpc.WorkerHost(cls, register=False).start() for cls in (First, Mid, Last)]
    _ran.clear()
    _finally.clear()
    yield [h.uri for h in hosts]
    for h in hosts:
        h.stop()


def test_current_call_is_none_outside_a_call() -> None:
    assert pyrorpc.current_call() is None


def test_three_services_carry_the_first_callers_metadata_and_deadline(chain: list[str]) -> None:
    first, mid, last = chain
    with pyrorpc.call_metadata(request_id="req-42", tenant="acme"), pyrorpc.connect(first, timeout=5) as p:
        started = time.time()
        remaining, metadata, deadline, _caller = p.start(mid, last)
    assert metadata == {"request_id": "req-42", "tenant": "acme", "hop": "mid"}
    assert 0 < remaining <= 5
    assert started < deadline <= started + 5.05  # the first caller's deadline, not the 60 s the others asked


def test_metadata_nests_and_resets(chain: list[str]) -> None:
    _first, _mid, last = chain
    with pyrorpc.connect(last, timeout=5) as p:
        with pyrorpc.call_metadata(a=1):
            with pyrorpc.call_metadata(b=2):
                assert p.where()[1] == {"a": 1, "b": 2}
            assert p.where()[1] == {"a": 1}
        assert p.where()[1] == {}


def test_metadata_must_serialize() -> None:
    with pytest.raises(TypeError, match="serializable"), pyrorpc.call_metadata(lock=threading.Lock()):
        pass


def test_sync_method_sees_remaining_at_most_its_timeout(chain: list[str]) -> None:
    _first, _mid, last = chain
    with pyrorpc.connect(last, timeout=0.5) as p:
        remaining = p.where()[0]
    assert 0 < remaining <= 0.5


def test_metadata_follows_futures_threads(chain: list[str]) -> None:
    _first, _mid, last = chain
    with pyrorpc.connect(last, timeout=5) as p, pyrorpc.call_metadata(request_id="f1"):
        assert p.where.future().result(5)[1] == {"request_id": "f1"}


def test_async_method_cancelled_at_its_deadline(chain: list[str]) -> None:
    _first, _mid, last = chain
    with pyrorpc.connect(last, timeout=0.5) as p:
        started = time.monotonic()
        with pytest.raises(pyrorpc.CallTimeoutError):
            p.sleepy(5, "slow")
        took = time.monotonic() - started
    assert took < 1.5
    wait_for(lambda: _finally, 1.0, message="the async method's finally")
    tag, when = _finally[0]
    assert tag == "slow" and when - started < 1.0


def test_async_method_sees_its_context(chain: list[str]) -> None:
    _first, _mid, last = chain
    with pyrorpc.connect(last, timeout=3) as p, pyrorpc.call_metadata(k="v"):
        remaining, metadata = p.where_async()
    assert metadata == {"k": "v"} and 0 < remaining <= 3


def _raw(uri: str) -> tuple[socket.socket, str]:
    u = Pyro5.core.URI(uri)
    sock = socket.create_connection((u.host, u.port), timeout=5)
    sock.sendall(protocol.pack(protocol.MSG_CONNECT, 0, 0, SERPENT.dumps({"handshake": "hello", "object": u.object})))
    _read(sock)
    return sock, u.object


def _read(sock: socket.socket) -> tuple[protocol.Header, Any]:
    def exactly(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            assert chunk, "connection closed"
            buf += chunk
        return buf
    header = protocol.parse_header(exactly(protocol.HEADER_SIZE), 1 << 30)
    payload = exactly(header.ann_size + header.data_size) if header.ann_size + header.data_size else b""
    return header, SERPENT.loads(payload[header.ann_size:])


def test_request_past_its_deadline_does_not_run(chain: list[str]) -> None:
    _first, _mid, last = chain
    sock, obj = _raw(last)
    ann = protocol.pack_annotations({"PRDL": b"0"})
    sock.sendall(protocol.pack(protocol.MSG_INVOKE, 0, 1, SERIALIZER.dumpsCall(obj, "record", ("late",), {}), ann))
    header, result = _read(sock)
    assert header.flags & protocol.FLAGS_EXCEPTION and "deadline" in str(result)
    # the same connection still serves, and garbage annotations are ignored
    ann = protocol.pack_annotations({"PRDL": b"soon", "PRMD": b"\xff\x00"})
    sock.sendall(protocol.pack(protocol.MSG_INVOKE, 0, 2, SERIALIZER.dumpsCall(obj, "record", ("ok",), {}), ann))
    header, result = _read(sock)
    assert not header.flags & protocol.FLAGS_EXCEPTION and result == "ok"
    assert _ran == ["ok"]
    sock.close()


def test_stock_pyro5_proxy_calls_without_a_context(chain: list[str]) -> None:
    _first, _mid, last = chain
    with Pyro5.api.Proxy(last) as p:
        remaining, metadata, deadline, _caller = p.where()
        assert remaining is None and deadline is None and metadata == {}
        assert p.sleepy(0.01, "stock") == "stock"


_oneway_seen: list[Any] = []


@pyrorpc.service("ctx-oneway")
class OnewaySink:
    @pyrorpc.oneway
    def note(self, tag: str) -> None:
        call = pyrorpc.current_call()
        _oneway_seen.append((tag, call.metadata if call else None))

    @pyrorpc.oneway
    async def anote(self, tag: str) -> None:
        await asyncio.sleep(0)
        call = pyrorpc.current_call()
        _oneway_seen.append((tag, call.metadata if call else None))

    def where(self) -> Any:
        call = pyrorpc.current_call()
        return call.metadata if call else None

    def slow(self, seconds: float) -> None:
        time.sleep(seconds)

    def record(self, tag: str) -> str:
        _ran.append(tag)
        return tag


@pytest.fixture
def sink() -> Any:
    _oneway_seen.clear()
    _ran.clear()
    host = pyrorpc.WorkerHost(OnewaySink, register=False, threads=1).start()
    yield host
    host.stop()


def test_oneway_calls_sync_and_async_run_with_their_context(sink: Any) -> None:
    with pyrorpc.connect(sink.uri, timeout=5) as p, pyrorpc.call_metadata(r="o1"):
        p.note.oneway("sync")
        p.anote.oneway("async")
        p.note("declared")  # @oneway methods are oneway even when called plainly
    wait_for(lambda: len(_oneway_seen) == 3, 5, message="three oneway calls ran")
    assert sorted(_oneway_seen) == [("async", {"r": "o1"}), ("declared", {"r": "o1"}), ("sync", {"r": "o1"})]


def test_map_and_broadcast_carry_the_context(ns_addr: str) -> None:
    with pyrorpc.WorkerHost(OnewaySink, ns=ns_addr), pyrorpc.Pool("ctx-oneway", ns=ns_addr, timeout=5) as pool:
        with pyrorpc.call_metadata(r="m1"):
            assert list(pool.where.map([(), ()])) == [{"r": "m1"}, {"r": "m1"}]
            assert list(pool.where.broadcast().values()) == [{"r": "m1"}]


def test_a_call_that_waited_past_its_deadline_for_a_thread_does_not_run(sink: Any) -> None:
    # one call thread, busy for 1.5 s: a call with a 0.5 s timeout waits for it on the worker and must not run
    with pyrorpc.connect(sink.uri, timeout=5) as p:
        busy = p.slow.future(1.5)
        wait_for(lambda: sink.stats.in_flight == 1, 5, message="the thread is busy")
        with pytest.raises(pyrorpc.CallTimeoutError):
            p.record.with_timeout(0.5)("late")
        busy.result(5)
        assert p.record("later") == "later"
    assert _ran == ["later"]


def test_a_stock_pyro5_daemon_is_sent_no_annotations() -> None:
    """Extensions are negotiated: a stock Pyro5 daemon sees exactly what a stock client would send."""
    import Pyro5.server
    from Pyro5.callcontext import current_context

    @Pyro5.server.expose
    class Stock:
        def seen(self) -> Any:
            return sorted(current_context.annotations)

    daemon = Pyro5.server.Daemon(host="127.0.0.1", port=0)
    uri = daemon.register(Stock())
    thread = threading.Thread(target=daemon.requestLoop, daemon=True)
    thread.start()
    try:
        with pyrorpc.call_metadata(r="x"), pyrorpc.connect(str(uri), timeout=5) as p:
            assert p.seen() == []
    finally:
        daemon.shutdown()
        thread.join(5)

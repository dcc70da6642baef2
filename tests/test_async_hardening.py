"""``async def`` methods served to plain connections, under attack: SystemExit or KeyboardInterrupt raised by
a coroutine is its caller's error and leaves the event loop running; a stock caller that gives up on a
coroutine that hangs frees its call thread (the coroutine is cancelled); stopping is bounded whatever the
coroutines do; a batch awaits its async methods; a burst of small frames is parsed in linear time."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import Pyro5.api
import Pyro5.core
import Pyro5.errors
import pytest
from Pyro5 import serializers

import pyrorpc
from pyrorpc import protocol
from pyrorpc.codec import SERIALIZER
from pyrorpc.connection import Connection
from pyrorpc.errors import CallTimeoutError
from pyrorpc.testing import wait_for

SERPENT = serializers.serializers["serpent"]
_started: list[Any] = []
_finally: list[Any] = []
_release = threading.Event()  # lets methods that block (or ignore cancellation) go at the end of a test


def _fatal(kind: str) -> BaseException:
    return SystemExit(3) if kind == "exit" else KeyboardInterrupt("stop")


@pyrorpc.service("ahard")
class Target:
    async def quit(self, kind: str) -> None:
        await asyncio.sleep(0)
        raise _fatal(kind)

    @pyrorpc.oneway
    async def quit_oneway(self, kind: str) -> None:
        _started.append(("oneway", kind))
        raise _fatal(kind)

    async def quit_stream(self, kind: str) -> AsyncIterator[int]:
        yield 1
        raise _fatal(kind)

    async def ok(self, x: Any) -> Any:
        await asyncio.sleep(0)
        return x

    async def aadd(self, a: int, b: int) -> int:
        await asyncio.sleep(0)
        return a + b

    def add(self, a: int, b: int) -> int:
        return a + b

    async def hang(self, tag: str) -> None:
        _started.append(tag)
        try:
            await asyncio.Event().wait()
        finally:
            _finally.append(tag)

    async def hang_stream(self, tag: str) -> AsyncIterator[int]:
        try:
            yield 0
            _started.append(tag)
            await asyncio.Event().wait()
            yield 1
        finally:
            _finally.append(tag)

    async def blocker(self, tag: str) -> None:
        _started.append(tag)
        _release.wait(10)  # blocks the event loop itself

    async def stubborn(self, tag: str) -> None:
        _started.append(tag)
        while not _release.is_set():
            try:
                await asyncio.sleep(0.02)
            except asyncio.CancelledError:
                pass  # ignores cancellation


def _host(threads: int = 4, drain_timeout: float = 2.0) -> pyrorpc.WorkerHost:
    _started.clear()
    _finally.clear()
    _release.clear()
    return pyrorpc.WorkerHost(Target, register=False, threads=threads, drain_timeout=drain_timeout).start()


@pytest.fixture
def host() -> Iterator[pyrorpc.WorkerHost]:
    h = _host()
    try:
        yield h
    finally:
        _release.set()
        h.stop()


def _proxy(uri: str, timeout: float = 5.0) -> Any:
    px = Pyro5.api.Proxy(uri)
    px._pyroTimeout = timeout
    return px


def _loop_alive(host: pyrorpc.WorkerHost) -> None:
    """An ordinary async method still answers, on plain connections and on a multiplexed one."""
    with _proxy(host.uri) as px:
        assert px.ok("still") == "still"
    with pyrorpc.connect(host.uri, timeout=5) as p:
        assert p.ok(7) == 7
    sock, obj = _raw(host.uri, mux=True)
    with sock:
        sock.sendall(protocol.pack(protocol.MSG_INVOKE, 0, 1, SERIALIZER.dumpsCall(obj, "ok", ("mux",), {})))
        header, payload = _frame(sock)
        assert header.seq == 1 and SERIALIZER.loads(payload) == "mux"


# 1. SystemExit / KeyboardInterrupt from a coroutine ------------------------------------------------
@pytest.mark.parametrize("kind", ["exit", "interrupt"])
def test_async_system_exit_is_the_callers_error_and_the_loop_survives(host: pyrorpc.WorkerHost, kind: str) -> None:
    expected = SystemExit if kind == "exit" else KeyboardInterrupt
    with _proxy(host.uri) as px, pytest.raises(expected):
        px.quit(kind)
    with pyrorpc.connect(host.uri, timeout=5) as p, pytest.raises(expected):
        p.quit(kind)
    _loop_alive(host)


def test_async_oneway_system_exit_is_logged_and_the_loop_survives(host: pyrorpc.WorkerHost,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pyrorpc.server")
    with _proxy(host.uri) as px:
        px.quit_oneway("exit")
        px.quit_oneway("interrupt")
    wait_for(lambda: "quit_oneway" in caplog.text and "KeyboardInterrupt" in caplog.text
             and "SystemExit" in caplog.text, timeout=5, message="the oneway failures logged")
    wait_for(lambda: host.server.stats.in_flight == 0, timeout=5, message="the oneway calls counted out")
    _loop_alive(host)


@pytest.mark.parametrize("kind", ["exit", "interrupt"])
def test_async_generator_system_exit_for_a_stock_stream_keeps_the_loop(host: pyrorpc.WorkerHost, kind: str) -> None:
    expected = SystemExit if kind == "exit" else KeyboardInterrupt
    with _proxy(host.uri) as px:
        items = px.quit_stream(kind)
        assert next(items) == 1
        with pytest.raises(expected):
            next(items)
    _loop_alive(host)


# 2. a stock caller giving up on a coroutine that hangs ------------------------------------------------
def test_stock_caller_leaving_a_hanging_async_call_frees_its_thread() -> None:
    host = _host(threads=2)
    try:
        for tag in ("a", "b"):  # as many as there are call threads
            with _proxy(host.uri, timeout=0.5) as px, pytest.raises(Pyro5.errors.TimeoutError):
                px.hang(tag)
        with _proxy(host.uri) as px:
            assert px.add(1, 2) == 3
        wait_for(lambda: sorted(_finally) == ["a", "b"], timeout=5, message="the abandoned coroutines cancelled")
        wait_for(lambda: host.server.stats.in_flight == 0, timeout=5, message="the calls counted out")
    finally:
        host.stop()


def test_stock_caller_leaving_a_hanging_async_stream_frees_its_thread() -> None:
    host = _host(threads=2)
    try:
        for tag in ("s1", "s2"):
            with _proxy(host.uri, timeout=0.5) as px:
                items = px.hang_stream(tag)
                assert next(items) == 0
                with pytest.raises(Pyro5.errors.TimeoutError):
                    next(items)
        with _proxy(host.uri) as px:
            assert px.add(2, 3) == 5
        wait_for(lambda: sorted(_finally) == ["s1", "s2"], timeout=5, message="the abandoned generators closed")
    finally:
        host.stop()


def test_a_deadline_still_cancels_a_plain_connection_async_call(host: pyrorpc.WorkerHost) -> None:
    with pyrorpc.connect(host.uri, timeout=0.4) as p, pytest.raises(Pyro5.errors.TimeoutError):
        p.hang("deadline")
    wait_for(lambda: "deadline" in _finally, timeout=5, message="the coroutine cancelled at its deadline")
    _loop_alive(host)


# 3. stop() is bounded whatever the coroutines do ------------------------------------------------------
@pytest.mark.parametrize("method", ["blocker", "stubborn"])
def test_stop_is_bounded_when_an_async_method_blocks_or_ignores_cancellation(method: str) -> None:
    drain_timeout = 0.5
    host = _host(threads=2, drain_timeout=drain_timeout)
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            with _proxy(host.uri, timeout=20) as px:
                getattr(px, method)(method)
        except BaseException as exc:  # the connection closes under it
            outcome.append(exc)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    try:
        wait_for(lambda: method in _started, timeout=5, message=f"{method} running")
        began = time.monotonic()
        host.stop()
        took = time.monotonic() - began
    finally:
        _release.set()
        host.stop()
    caller.join(10)
    assert not caller.is_alive() and outcome
    assert took < drain_timeout + 1.2, f"stop() took {took:.2f}s with drain_timeout={drain_timeout}"


# 4. batches await their async methods -------------------------------------------------------------------
def test_stock_batch_with_an_async_method(host: pyrorpc.WorkerHost) -> None:
    with _proxy(host.uri) as px:
        batch = Pyro5.api.BatchProxy(px)
        batch.add(1, 2)
        batch.aadd(3, 4)
        batch.add(5, 6)
        assert list(batch()) == [3, 7, 11]


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("closed")
        buf += chunk
    return bytes(buf)


def _frame(sock: socket.socket) -> tuple[protocol.Header, bytes]:
    header = protocol.parse_header(_recv(sock, protocol.HEADER_SIZE), 1 << 30)
    payload = _recv(sock, header.ann_size + header.data_size) if header.ann_size + header.data_size else b""
    return header, payload[header.ann_size:]


def _raw(uri: str, mux: bool) -> tuple[socket.socket, str]:
    u = Pyro5.core.URI(uri)
    sock = socket.create_connection((u.host, u.port), timeout=10)
    hello: dict[str, Any] = {"handshake": "hello", "object": u.object}
    if mux:
        hello["pyrorpc"] = {"mux": 1, "notice": 1}
    sock.sendall(protocol.pack(protocol.MSG_CONNECT, 0, 0, SERPENT.dumps(hello)))
    header, _payload = _frame(sock)
    assert header.msg_type == protocol.MSG_CONNECTOK
    return sock, u.object


def _batch(obj: str, seq: int, calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]],
           ann: dict[str, bytes] | None = None) -> bytes:
    packed = protocol.pack_annotations(ann) if ann else b""
    return protocol.pack(protocol.MSG_INVOKE, protocol.FLAGS_BATCH, seq,
                         SERIALIZER.dumpsCall(obj, "<batch>", calls, {}), packed)


@pytest.mark.parametrize("mux", [False, True], ids=["plain", "mux"])
def test_batch_awaits_async_methods_within_the_deadline(host: pyrorpc.WorkerHost, mux: bool) -> None:
    sock, obj = _raw(host.uri, mux)
    with sock:
        sock.sendall(_batch(obj, 1, [("add", (4, 4), {}), ("aadd", (1, 1), {})]))
        header, payload = _frame(sock)
        assert header.flags & protocol.FLAGS_BATCH and header.seq == 1
        assert SERIALIZER.loads(payload) == [8, 2]
        tag = f"batch-{mux}"
        sock.sendall(_batch(obj, 2, [("add", (1, 1), {}), ("hang", (tag,), {}), ("add", (9, 9), {})],
                            {"PRDL": b"0.3"}))
        header, payload = _frame(sock)
        results = SERIALIZER.loads(payload)
        assert header.seq == 2 and results[0] == 2 and len(results) == 2  # stops at the call that failed
        assert isinstance(results[1].exception, CallTimeoutError)
    wait_for(lambda: tag in _finally, timeout=5, message="the batch's coroutine cancelled at its deadline")


# 5. framing is linear -----------------------------------------------------------------------------------
def test_a_burst_of_small_frames_is_parsed_in_linear_time() -> None:
    n = 120_000  # 4.8 MB: parsing it took seconds when every frame copied the rest of the buffer
    frames = [protocol.pack(protocol.MSG_PING, 0, i & 0xFFFF, b"") for i in range(n)]
    a, b = socket.socketpair()
    with a, b:
        conn = Connection(a, None, False)
        conn.feed(b"".join(frames[: n // 2]))
        conn.feed(b"".join(frames[n // 2:]) + frames[0][:10])  # and the start of one more
        began = time.perf_counter()
        seqs = []
        while (frame := conn.next_frame(1 << 20)) is not None:
            seqs.append(frame[0].seq)
        took = time.perf_counter() - began
        assert seqs == [i & 0xFFFF for i in range(n)]
        assert conn.pending and conn.size == 10  # the partial frame stays
        conn.feed(frames[0][10:])
        frame = conn.next_frame(1 << 20)
        assert frame is not None and frame[0].seq == 0 and not conn.pending
    assert took < 1.5, f"{n} frames of {len(frames[0])} bytes took {took:.2f}s to parse"


def test_a_burst_of_frames_on_a_multiplexed_connection_does_not_stall_the_worker(host: pyrorpc.WorkerHost) -> None:
    sock, _obj = _raw(host.uri, mux=True)
    with sock:
        n = 100_000
        cancel = protocol.pack(protocol.MSG_CANCEL, 0, 7, b"")  # for a request that does not exist: ignored
        began = time.monotonic()
        sock.sendall(cancel * n + protocol.pack(protocol.MSG_PING, 0, 2, b""))
        header, payload = _frame(sock)
        took = time.monotonic() - began
        assert header.msg_type == protocol.MSG_PING and header.seq == 2 and payload == b"pong"
    assert took < 3.0, f"{n} frames in one burst took {took:.1f}s"
    with pyrorpc.connect(host.uri) as p:
        assert p.add(1, 1) == 2

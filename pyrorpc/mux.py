"""Multiplexed connections: many requests at once on one connection, answered out of order, and
``async def`` methods on the server's event loop.

A pyrorpc client asks for ``mux`` in its handshake (docs/protocol.md). On such a connection the I/O
thread keeps reading: each request is decoded there and started at once, a sync method on a call thread,
an ``async def`` method as a task on the server's event loop (it holds no thread while it awaits). Every
thread writes its frames under the connection's ``wlock`` without blocking; what the socket does not take
at once waits in ``wq`` and the I/O thread writes it as the peer reads. Requests outstanding on one
connection are bounded (``_MAX_CALLS``): past it the connection is not read until some finish.
``MSG_CANCEL`` cancels a task or closes a stream (push.py); so does the connection closing.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import select
import ssl
import threading
import time
from collections import deque
from functools import partial
from typing import TYPE_CHECKING, Any

import Pyro5.errors
from Pyro5.callcontext import current_context

from . import context, tracing
from .acks import ACK_KEY, RUNNING, check_arguments, seen_ids
from .connection import _DONTWAIT, _EPOLLIN, _EPOLLOUT, _NOT_READY, _ONESHOT, _TLS_CHUNK, CLOSED, Connection
from .errors import CallTimeoutError, WorkerDrainingError, WorkerLostError
from .protocol import (
    FLAGS_BATCH,
    FLAGS_COMPRESSED,
    FLAGS_CORR_ID,
    FLAGS_EXCEPTION,
    FLAGS_ONEWAY,
    HEADER_SIZE,
    MSG_ACCEPTED,
    MSG_CANCEL,
    MSG_CREDIT,
    MSG_INVOKE,
    MSG_PING,
    MSG_RESULT,
    SERPENT_ID,
    ProtocolViolation,
    pack,
    parse_annotations,
    parse_header,
)
from .push import MAX_CREDIT, Pending, _aclose_quietly, _close_quietly, is_stream
from .stats import REFUSED
from .wire import SERIALIZER

if TYPE_CHECKING:
    from .aloop import AsyncRunner
    from .calls import ServerStats, _Target

__all__ = ["MuxHandler"]

log = logging.getLogger("pyrorpc.server")

_EPOLLRDHUP = select.EPOLLRDHUP
_EPOLLHUP = select.EPOLLHUP
_EPOLLERR = select.EPOLLERR
_MAX_CALLS = 4096  # requests outstanding on one connection before we stop reading it
_OUT_HIGH = 8 << 20  # bytes of unsent output on one connection before we stop reading it (and pushing items)
_OUT_LOW = 1 << 20  # ... and below which we start again
_DECODE_INLINE = 64 * 1024  # larger (or compressed) requests are decoded on a call thread, not the I/O thread
_FRAMES_PER_EVENT = 1024  # frames one event of a connection handles before the others get their turn
_STREAM_KEY = "PRST"


def _result(flags: int, header: Any, data: bytes) -> bytes:
    if header.flags & FLAGS_CORR_ID:
        return pack(MSG_RESULT, flags | FLAGS_CORR_ID, header.seq, data, corr_id=header.corr_id)
    return pack(MSG_RESULT, flags, header.seq, data)


class _Output(deque):  # type: ignore[type-arg]
    """A connection's unsent output, and how many bytes it holds."""

    __slots__ = ("nbytes",)

    def __init__(self) -> None:
        super().__init__()
        self.nbytes = 0


class MuxHandler:
    """Multiplexed connections of a ``Server`` (a mixin: the attributes below are the server's)."""

    name: str
    stats: ServerStats
    objects: dict[str, _Target]
    max_message_size: int
    idle_timeout: float
    async_runner: AsyncRunner
    _epoll: Any
    _last_refusal: float
    _refused_oneways: int
    _closed: bool
    _acked_runs: dict[tuple[int, int], bytes]  # (id(conn), seq) -> the send id of an accepted run under way

    if TYPE_CHECKING:  # provided by the Server (declared here for the type checker only)
        def _submit(self, job: Any) -> None: ...

        def _drop(self, conn: Connection) -> None: ...

        def _read_available(self, conn: Connection) -> bool: ...

        def _error_frame(self, exc: BaseException, seq: int, tb: Any, header: Any = None) -> bytes: ...

        def _instance(self, target: _Target, conn: Connection) -> Any: ...

        def _method(self, target: _Target, obj: Any, name: Any) -> Any: ...

        def _attribute(self, target: _Target, conn: Connection, method: str, vargs: Any) -> Any: ...

        def _run_batch(self, target: _Target, conn: Connection, calls: Any) -> tuple[list[Any], bool]: ...

        def _encode_result(self, method: str, result: Any) -> bytes: ...

        def _decode_request(self, flags: int, body: bytes) -> tuple[Any, _Target, Any, Any, Any]: ...

        def _oneway(self, job: tuple[Any, ...]) -> None: ...

        def _record(self, target: _Target, method: Any, failed: bool, err: BaseException | None, started: float,
                    info: Any, leave: bool = False) -> None: ...

        def _record_refused(self, conn: Connection, flags: int, body: Any) -> None: ...

        def _stream_start(self, conn: Connection, header: Any, method: str, result: Any, credit: int,
                          info: context.CallInfo, target: Any = None, started: float = 0.0) -> None: ...

        def _astream_start(self, conn: Connection, header: Any, method: str, result: Any, credit: int,
                           info: context.CallInfo, ctx: Any, target: Any = None, started: float = 0.0) -> None: ...

    # the connection -----------------------------------------------------------------------------
    def _mux_accept(self, conn: Connection) -> None:
        conn.wlock = threading.Lock()
        conn.wq = _Output()
        conn.tasks = {}
        conn.mux = True

    def _mux_event(self, conn: Connection, ev: int) -> None:
        """The I/O thread: write what waits, read what came, start every whole request."""
        ok = True
        with conn.wlock:
            if conn.paused and ev & (_EPOLLRDHUP | _EPOLLHUP | _EPOLLERR):
                ok = False  # the peer left while we were not reading
            else:
                if conn.wq and ev & _EPOLLOUT:
                    ok = self._mux_flush(conn)
                if ok and not conn.paused:
                    ok = self._read_available(conn)
        if not ok:
            self._drop(conn)
            return
        self._mux_process(conn)

    def _mux_process(self, conn: Connection) -> None:
        max_size = self.max_message_size
        budget = _FRAMES_PER_EVENT
        more = False
        while conn.state != CLOSED and not conn.paused:
            if budget <= 0:
                more = True  # the others first: an event brings us back at once
                break
            budget -= 1
            try:
                frame = conn.next_frame(max_size)
            except ProtocolViolation as exc:
                self._mux_violation(conn, str(exc))
                return
            if frame is None:
                break
            header, payload = frame
            try:
                self._mux_frame(conn, header, payload)
            except Exception:  # pragma: no cover - a bug must cost this connection only
                log.exception("%s: error on a multiplexed connection from %s", self.name, conn.peer)
                self._drop(conn)
                return
        self._mux_arm(conn, more)

    def _mux_violation(self, conn: Connection, reason: str) -> None:
        log.warning("%s: dropped %s: %s", self.name, conn.peer, reason)
        self._mux_send(conn, pack(MSG_RESULT, FLAGS_EXCEPTION, 0,
                                  SERIALIZER.dumps(Pyro5.errors.ProtocolError(reason))))
        self._drop(conn)

    def _mux_arm(self, conn: Connection, more: bool = False) -> None:
        with conn.wlock:
            if conn.state == CLOSED:
                return
            # paused: only a hang-up wakes us (the peer leaving must still cancel what runs for it)
            events = _EPOLLRDHUP if conn.paused else _EPOLLIN
            if conn.wq or more:
                events |= _EPOLLOUT  # (a writable socket is an event at once: how `more` gets its turn)
            try:
                self._epoll.modify(conn.fd, events | _ONESHOT)
                return
            except (OSError, ValueError):
                pass
        self._drop(conn)

    def _pause_check(self, conn: Connection) -> bool:
        """Update ``conn.paused`` (``wlock`` held); True when it just resumed (the I/O thread must look at
        what is buffered: see ``_resume``)."""
        if conn.paused:
            if conn.calls < _MAX_CALLS // 2 and conn.wq.nbytes < _OUT_LOW:
                conn.paused = False
                return True
        elif conn.calls >= _MAX_CALLS or conn.wq.nbytes > _OUT_HIGH:
            conn.paused = True
        return False

    def _resume(self, conn: Connection) -> None:
        """From a thread other than the I/O thread: a writable event makes the I/O thread start the requests
        still buffered (``wlock`` held)."""
        if conn.state != CLOSED:
            try:
                self._epoll.modify(conn.fd, _EPOLLIN | _EPOLLOUT | _ONESHOT)
            except (OSError, ValueError):
                pass

    def _mux_flush(self, conn: Connection) -> bool:
        """Write queued output without blocking (``wlock`` held); False if the connection failed."""
        wq = conn.wq
        sock = conn.sock
        tls = conn.tls
        was_high = wq.nbytes > _OUT_LOW
        while wq:
            out = wq[0]
            try:
                sent = sock.send(out[:_TLS_CHUNK]) if tls else sock.send(out[:1 << 20], _DONTWAIT)
            except _NOT_READY:
                break
            except (OSError, ssl.SSLError, ValueError) as exc:
                log.info("%s: could not send to %s: %s", self.name, conn.peer, exc)
                return False
            conn.wrote_at = time.monotonic()
            wq.nbytes -= sent
            if sent >= len(out):
                wq.popleft()
            else:
                wq[0] = memoryview(out)[sent:]
        self._pause_check(conn)
        if was_high and wq.nbytes <= _OUT_LOW:
            # streams held back while the output was backed up may go on
            for entry in list(conn.tasks.values()):
                if is_stream(entry) and entry.blocked:
                    if entry.is_async:
                        self.async_runner.call_soon(entry.unblock)
                    else:
                        entry.unblock()
        return True

    def _mux_send(self, conn: Connection, data: bytes) -> bool:
        """Queue a frame from any thread; written now if the socket takes it. False: connection gone."""
        arm = False
        failed = False
        with conn.wlock:
            if conn.state == CLOSED:
                return False
            wq = conn.wq
            if wq:
                wq.append(data)
                wq.nbytes += len(data)
                if not conn.paused:
                    self._pause_check(conn)
                return True
            try:
                sent = conn.sock.send(data[:_TLS_CHUNK]) if conn.tls else conn.sock.send(data, _DONTWAIT)
            except _NOT_READY:
                sent = 0
            except (OSError, ssl.SSLError, ValueError) as exc:
                log.info("%s: could not send to %s: %s", self.name, conn.peer, exc)
                failed = True
                sent = 0
            if not failed and sent < len(data):
                wq.append(memoryview(data)[sent:] if sent else data)
                wq.nbytes += len(data) - sent
                conn.wrote_at = time.monotonic()
                self._pause_check(conn)
                arm = True
        if failed:
            self._drop(conn)
            return False
        if arm:
            self._mux_arm(conn)
        return True

    def _mux_closed(self, conn: Connection) -> None:
        """The connection is gone: cancel what runs for it (async tasks, streams); sync calls finish alone."""
        entries = list(conn.tasks.values())
        for entry in entries:
            if is_stream(entry) and not entry.is_async:
                entry.cancel()
            elif type(entry) is Pending:
                entry.cancelled = True
        if self.async_runner.started and any(isinstance(e, asyncio.Task) or (is_stream(e) and e.is_async)
                                             for e in entries):
            try:
                self.async_runner.call_soon(self._cancel_all_async, conn)
            except RuntimeError:
                pass

    def _cancel_all_async(self, conn: Connection) -> None:
        for entry in list(conn.tasks.values()):
            if isinstance(entry, asyncio.Task) or (is_stream(entry) and entry.is_async):
                entry.cancel()

    # frames -------------------------------------------------------------------------------------
    def _mux_frame(self, conn: Connection, header: Any, payload: bytes) -> None:
        msg_type = header.msg_type
        if msg_type == MSG_INVOKE:
            self._mux_invoke(conn, header, payload)
        elif msg_type == MSG_CANCEL or msg_type == MSG_CREDIT:
            n = 0
            if msg_type == MSG_CREDIT:
                try:
                    n = int(bytes(payload[header.ann_size:]))
                except ValueError:
                    n = -1
                if not 0 < n < 1 << 31:
                    self._mux_violation(conn, "bad credit")
                    return
            self._mux_control(conn, header.seq, msg_type, n)
        elif msg_type == MSG_PING:
            self._mux_send(conn, pack(MSG_PING, 0, header.seq, b"pong", serializer_id=header.serializer_id))
        else:
            self._mux_violation(conn, f"message type {msg_type} refused on a multiplexed connection")

    def _mux_control(self, conn: Connection, seq: int, msg_type: int, n: int) -> None:
        """MSG_CANCEL / MSG_CREDIT (the I/O thread): a request not started yet remembers it; a sync stream
        takes it here; an async task or stream on the event loop."""
        with conn.wlock:
            entry = conn.tasks.get(seq)
            if type(entry) is Pending:
                if msg_type == MSG_CANCEL:
                    entry.cancelled = True
                else:
                    entry.credit = min(entry.credit + n, MAX_CREDIT)
                return
        if entry is None:
            return  # finished already, or never was: nothing to do
        if is_stream(entry) and not entry.is_async:
            if msg_type == MSG_CANCEL:
                entry.cancel()
            else:
                entry.add_credit(n)
        else:
            self.async_runner.call_soon(self._mux_control_async, conn, seq, msg_type, n)

    def _mux_control_async(self, conn: Connection, seq: int, msg_type: int, n: int) -> None:
        entry: Any = conn.tasks.get(seq)
        if is_stream(entry):
            if msg_type == MSG_CANCEL:
                entry.cancel()
            else:
                entry.add_credit(n)
        elif isinstance(entry, asyncio.Task) and msg_type == MSG_CANCEL:
            entry.cancel()

    def _mux_invoke(self, conn: Connection, header: Any, payload: bytes) -> None:
        """A request arrived (the I/O thread): count it and start it, or have a call thread decode it."""
        flags, seq = header.flags, header.seq
        oneway = bool(flags & FLAGS_ONEWAY)
        if header.serializer_id != SERPENT_ID:
            if not oneway:
                exc = Pyro5.errors.ProtocolError(f"serializer {header.serializer_id} refused: only serpent")
                self._mux_send(conn, self._error_frame(exc, seq, None, header))
            return
        if not oneway:
            with conn.wlock:
                duplicate = seq in conn.tasks
                if not duplicate:
                    conn.tasks[seq] = Pending()
            if duplicate:
                self._mux_violation(conn, f"sequence number {seq} is already in use by a request in progress")
                return
        if not self.stats.enter():
            self._last_refusal = time.monotonic()
            self._record_refused(conn, flags, payload[header.ann_size:])
            if oneway:
                self._refused_oneways += 1
            else:
                conn.tasks.pop(seq, None)
                self._mux_send(conn, self._error_frame(
                    WorkerDrainingError(f"{self.name} is shutting down; the call did not run"), seq, None, header))
            return
        with conn.wlock:
            conn.calls += 1
            self._pause_check(conn)
        if len(payload) > _DECODE_INLINE or flags & FLAGS_COMPRESSED:
            self._submit(partial(self._mux_start, conn, header, payload, True))  # decoding takes a while
        else:
            self._mux_start(conn, header, payload, False)

    def _mux_start(self, conn: Connection, header: Any, payload: bytes, threaded: bool) -> None:
        """Decode a request and start it: on a call thread (this one if ``threaded``), or as a task on the
        event loop for async methods."""
        flags, seq = header.flags, header.seq
        oneway = bool(flags & FLAGS_ONEWAY)
        started = time.monotonic() if threaded else conn.arrived  # (the I/O thread: this frame's arrival)
        target: _Target | None = None
        try:
            ann_size = header.ann_size
            annotations = parse_annotations(payload[:ann_size]) if ann_size else {}
            _object_id, target, method, vargs, kwargs = self._decode_request(flags, payload[ann_size:])
            info = context.incoming(annotations, conn.peer, method if isinstance(method, str) else None,
                                    time.time() - (time.monotonic() - conn.arrived) if threaded else None)
            credit: int | None = None
            raw = annotations.get(_STREAM_KEY)
            if raw is not None:
                try:
                    credit = int(raw)
                except ValueError:
                    credit = 0
                if credit <= 0:
                    raise Pyro5.errors.ProtocolError(f"bad stream credit {raw!r}")
                credit = min(credit, MAX_CREDIT)
            if flags & FLAGS_BATCH or method == "__getattr__" or method == "__setattr__":
                job = partial(self._mux_sync, conn, header, target, method, None, vargs, kwargs, info, annotations,
                              None, started)
            else:
                obj = self._instance(target, conn)
                fn = self._method(target, obj, method)
                acked = not oneway and ACK_KEY in annotations
                if acked and self._mux_accept_send(conn, header, fn, vargs, kwargs, info, annotations[ACK_KEY]):
                    return  # a re-send of a call accepted here already: acknowledged again, not run twice
                if method in target.async_methods:
                    self.async_runner.call_soon(self._mux_start_async, conn, header, method, fn, vargs, kwargs,
                                                info, oneway, credit, target, started, acked)
                    return
                if oneway:
                    self._mux_done(conn, None, None, count=False)  # the oneway run counts itself out
                    self._oneway((fn, vargs, kwargs, conn.peer, None, annotations, info, target, started))
                    return
                job = partial(self._mux_sync, conn, header, target, method, fn, vargs, kwargs, info, annotations,
                              credit, started)
        except BaseException as exc:
            if target is not None:
                self._record(target, method, True, exc, started, None)
            if oneway:
                log.warning("%s: oneway call failed: %s: %s", self.name, type(exc).__name__, exc)
                self._mux_done(conn, None, True)
                return
            if isinstance(exc, ProtocolViolation):
                exc = Pyro5.errors.ProtocolError(str(exc))
            self._mux_done(conn, self._error_frame(exc, seq, exc.__traceback__, header), True, seq=seq)
            return
        if threaded:
            job()
        else:
            self._submit(job)

    def _mux_accept_send(self, conn: Connection, header: Any, fn: Any, vargs: Any, kwargs: Any,
                         info: context.CallInfo, send_id: bytes) -> bool:
        """A request asking for acceptance (``PRAK``, send()): refuse it unrun if the method does not take its
        arguments (TypeError), else acknowledge it (MSG_ACCEPTED) before it is queued. True when it is a re-send
        of an id accepted here already: answered (accepted, and done) without running it again."""
        check_arguments(fn, vargs, kwargs)
        seq = header.seq
        send_id = bytes(send_id)
        seen = seen_ids(self)
        known = seen.accept_or_outcome(send_id)
        if known is not None:
            # a re-send of a call accepted here already: acknowledged again, and answered with the first run's
            # outcome (now, or when that run ends), never run twice
            self._mux_send(conn, pack(MSG_ACCEPTED, 0, seq, b""))  # (before its outcome can be sent: join)
            if known is RUNNING:
                known = seen.join(send_id, (conn, header))
                if known is None:
                    return True  # (answered by _mux_done when the first run ends)
            if known is False:
                exc = WorkerLostError("this call was accepted here already; its outcome cannot be waited for")
                self._mux_done(conn, self._error_frame(exc, seq, None, header), True, seq=seq)
                return True
            flags, body = known
            self._mux_done(conn, _result(flags, header, body), bool(flags & FLAGS_EXCEPTION), seq=seq)
            return True
        info.deadline = None  # accepted: it runs, drain or not, whatever its deadline
        self._acked_runs[(id(conn), seq)] = send_id  # its outcome is remembered (_mux_done; a dict: GIL-safe)
        self._mux_send(conn, pack(MSG_ACCEPTED, 0, seq, b""))
        return False

    def _mux_done(self, conn: Connection, data: bytes | None, failed: bool | None, count: bool = True,
                  seq: int | None = None) -> None:
        """A request is answered (``data``, or None for no answer): out of flight, out of the connection's
        outstanding requests (which may let it be read again), and its sequence number free (``seq``)."""
        if data is not None:
            self._mux_send(conn, data)
        if seq is not None and self._acked_runs:
            send_id = self._acked_runs.pop((id(conn), seq), None)
            if send_id is not None:  # an accepted send's run ended: its re-sends get the outcome
                if data is None:
                    lost = WorkerLostError("its run was cut off before it could answer; it may or may not have run")
                    data = self._error_frame(lost, seq, None)
                self._remember_outcome(send_id, data)
        if count:
            self.stats.leave(bool(failed))
        with conn.wlock:
            if seq is not None:
                conn.tasks.pop(seq, None)
            conn.calls -= 1
            if self._pause_check(conn):
                self._resume(conn)

    def _remember_outcome(self, send_id: bytes, data: bytes) -> None:
        """A send's run ended with the reply ``data``: kept for its re-sends, and sent to those waiting."""
        try:
            header = parse_header(data, len(data), 0)
        except ProtocolViolation:  # pragma: no cover - our own frame
            return
        flags = header.flags & (FLAGS_EXCEPTION | FLAGS_BATCH)
        body = bytes(data[HEADER_SIZE + header.ann_size:header.total])
        for conn, waiter in seen_ids(self).finish(send_id, flags, body):
            self._mux_done(conn, _result(flags, waiter, body), bool(flags & FLAGS_EXCEPTION), seq=waiter.seq)

    def _unstarted_refused(self, conn: Connection, header: Any, method: Any, target: _Target | None = None,
                           started: float = 0.0, acked: bool = False) -> bool:
        """Before a request starts: refuse it unrun when draining (the client sends it elsewhere) or closed,
        or when the client gave it up already. True if it was refused (and answered). An accepted send
        (``acked``) runs unless the server is closed."""
        entry = conn.tasks.get(header.seq)
        if not acked and type(entry) is Pending and entry.cancelled:
            self._mux_done(conn, None, False, seq=header.seq)
            return True
        if self._closed:
            if target is not None:
                self.stats.record(target.label, method, REFUSED, started)
            self._mux_done(conn, None, True, seq=header.seq)
            return True
        if self.stats.draining and not acked:
            self._last_refusal = time.monotonic()
            if target is not None:
                self.stats.record(target.label, method, REFUSED, started)
            data = None if header.flags & FLAGS_ONEWAY else self._error_frame(
                WorkerDrainingError(f"{self.name} is shutting down; {method} did not run"), header.seq, None, header)
            self._mux_done(conn, data, False, seq=header.seq)
            return True
        return False

    # sync methods (a call thread) ---------------------------------------------------------------
    def _mux_sync(self, conn: Connection, header: Any, target: _Target, method: Any, fn: Any, vargs: Any,
                  kwargs: Any, info: context.CallInfo, annotations: dict[str, bytes], credit: int | None,
                  started: float = 0.0) -> None:
        if self._unstarted_refused(conn, header, method, target, started, ACK_KEY in annotations):
            return
        oneway = header.flags & FLAGS_ONEWAY
        if tracing.INSTALLED and info._span is None:
            tracing.start_server(self, target, info, vargs if header.flags & FLAGS_BATCH else None)
        failed = True
        err: BaseException | None = None
        data: bytes | None = None
        token = context.enter(info)
        active = tracing.activate(info) if info._span is not None else None
        try:
            if info.expired:
                raise CallTimeoutError(f"{method}: its deadline passed before it could run; it did not run")
            ctx = current_context
            ctx.client = conn
            ctx.client_sock_addr = conn.peer
            ctx.correlation_id = None
            ctx.annotations = annotations
            if header.flags & FLAGS_BATCH:
                results, failed_batch = self._run_batch(target, conn, vargs)
                data = _result(FLAGS_BATCH, header, SERIALIZER.dumps(results))
                failed = failed_batch
            elif fn is None:
                data = _result(0, header, self._encode_result(method, self._attribute(target, conn, method, vargs)))
                failed = False
            else:
                result = fn(*vargs, **kwargs)
                if inspect.iscoroutine(result) or inspect.isasyncgen(result):
                    # a plain method that returned a coroutine: it runs on the event loop from here
                    self.async_runner.call_soon(self._mux_start_async, conn, header, method, lambda: result, (), {},
                                                info, False, credit, target, started, ACK_KEY in annotations)
                    return
                if credit is not None:
                    self._stream_start(conn, header, method, result, credit, info, target, started)
                    return
                if _streams(result):
                    _close_quietly(result)
                    raise TypeError(f"{method} streams its results: call it with stream() or astream()")
                data = _result(0, header, self._encode_result(method, result))
                failed = False
        except BaseException as exc:  # SystemExit, KeyboardInterrupt raised by a method: that call's error
            err = exc
            data = self._error_frame(exc, header.seq, exc.__traceback__, header)
            if active is not None:
                tracing.finish(info, exc)
        finally:
            if active is not None:
                tracing.deactivate(active)
            context.leave(token)
        if active is not None:  # (unless a coroutine or a stream took the call over: it ends the span)
            tracing.finish(info, None, failed)
        if not header.flags & FLAGS_BATCH:  # (a batch counts its calls itself)
            self._record(target, method, failed, err, started, info)
        self._mux_done(conn, None if oneway else data, failed, seq=None if oneway else header.seq)

    # async methods (the event loop) -------------------------------------------------------------
    def _mux_start_async(self, conn: Connection, header: Any, method: str, fn: Any, vargs: Any, kwargs: Any,
                         info: context.CallInfo, oneway: bool, credit: int | None, target: _Target | None = None,
                         started: float = 0.0, acked: bool = False) -> None:
        seq = None if oneway else header.seq
        if self._unstarted_refused(conn, header, method, target, started, acked):
            return
        ctx = contextvars.copy_context()
        ctx.run(context.enter, info)
        if tracing.INSTALLED and info._span is None:
            tracing.start_server(self, None, info)  # (when tracing is on)
        if info._span is not None:
            ctx.run(tracing.activate, info)  # (for the task made in ``ctx``)
        try:
            if info.expired:
                raise CallTimeoutError(f"{method}: its deadline passed before it could run; it did not run")
            result = ctx.run(fn, *vargs, **kwargs)
        except BaseException as exc:
            if info._span is not None:
                tracing.finish(info, exc)
            if target is not None:
                self._record(target, method, True, exc, started, None)
            if oneway:
                log.warning("%s: oneway call %s failed: %s: %s", self.name, method, type(exc).__name__, exc)
                self._mux_done(conn, None, True)
            else:
                self._mux_done(conn, self._error_frame(exc, header.seq, exc.__traceback__, header), True, seq=seq)
            return
        loop = asyncio.get_running_loop()  # (a callback on the server's loop)
        if credit is not None and not oneway:
            self._astream_start(conn, header, method, result, credit, info, ctx, target, started)
            return
        if inspect.isasyncgen(result) or not inspect.iscoroutine(result):
            # an async generator called without stream(), or an awaitable we don't know how to run
            if inspect.isasyncgen(result):
                loop.create_task(_aclose_quietly(result))
                err = TypeError(f"{method} streams its results: call it with stream() or astream()")
            else:
                _close_quietly(result)
                err = TypeError(f"{method} did not return a coroutine")
            if info._span is not None:
                tracing.finish(info, err)
            if target is not None:
                self._record(target, method, True, err, started, None)
            self._mux_done(conn, None if oneway else self._error_frame(err, header.seq, None, header), True, seq=seq)
            return
        expired = [False]
        task = ctx.run(loop.create_task, self._mux_await(conn, header, method, result, info, oneway, expired, target,
                                                         started))
        if not oneway and not acked:  # (an accepted send is not cancelled by its caller, nor by its going away)
            with conn.wlock:
                pending = conn.tasks.get(header.seq)
                conn.tasks[header.seq] = task
            if type(pending) is Pending and pending.cancelled:
                task.cancel()  # the client gave it up while it was on its way here
        left = info.remaining()
        if left is not None:
            timer = loop.call_later(max(left, 0.0), _expire, task, expired)
            task.add_done_callback(lambda _t: timer.cancel())

    async def _mux_await(self, conn: Connection, header: Any, method: str, coro: Any, info: context.CallInfo,
                         oneway: bool, expired: list[bool], target: _Target | None = None,
                         started: float = 0.0) -> None:
        failed = True
        err: BaseException | None = None
        counted = target is not None
        data: bytes | None = None
        try:
            result = await coro
            if not oneway:
                data = _result(0, header, self._encode_result(method, result))
            failed = False
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            cancelling = getattr(task, "cancelling", None)
            if expired[0]:
                log.info("%s: %s cancelled at its deadline", self.name, method)
                err = CallTimeoutError(f"{method}: cancelled on the worker at its deadline")
                if not oneway:
                    data = self._error_frame(err, header.seq, None, header)
            elif cancelling is not None and not cancelling() and not oneway:
                # nobody cancelled this task: the method's own CancelledError (an inner task's) is its result
                err = exc
                data = self._error_frame(exc, header.seq, exc.__traceback__, header)
            else:  # the caller gave it up (MSG_CANCEL) or went away, or the server is closing: nobody waits
                counted = False  # (and no outcome to count)
            if inspect.getcoroutinestate(coro) == inspect.CORO_CREATED:
                coro.close()  # cancelled before it began: it never runs (and is not "never awaited")
            if info._span is not None:  # (given up by its caller: no error, as on the caller's side)
                tracing.finish(info, err, abandoned=err is None)
        except BaseException as exc:
            if info._span is not None:
                tracing.finish(info, exc)
            err = exc
            if oneway:
                log.warning("%s: oneway call %s failed: %s: %s", self.name, method, type(exc).__name__, exc)
            else:
                data = self._error_frame(exc, header.seq, exc.__traceback__, header)
        if counted:
            assert target is not None
            self._record(target, method, failed, err, started, info)
        if info._span is not None:
            tracing.finish(info, None, failed)
        self._mux_done(conn, data, failed, seq=None if oneway else header.seq)


def _expire(task: asyncio.Task[Any], expired: list[bool]) -> None:
    if not task.done():
        expired[0] = True
        task.cancel()


def _streams(value: Any) -> bool:
    return inspect.isgenerator(value) or inspect.isasyncgen(value)

"""Streamed results, pushed: the items of a generator sent as the client's credit allows (docs/protocol.md).

A request with the ``PRST`` annotation on a multiplexed connection streams its result: ``MSG_ITEMS``
frames of up to ``_BATCH_ITEMS`` items, never more items than the client granted (``PRST``, then each
``MSG_CREDIT``), then one final ``MSG_RESULT`` (``None``, or the exception the generator raised). A sync
generator runs on a call thread while it has credit and is parked, holding no thread, when it has none;
an async generator runs on the server's event loop. Items wait in a frame at most ``_FLUSH_AFTER`` for
company (a timer on the event loop sends a frame whose generator went quiet), and a generator slower than
``_SLOW_ITEM`` per item sends each item at once. ``MSG_CANCEL``, the connection closing, or no credit for
the stall limit (the request's ``PRDL``) close the generator: its ``finally`` runs.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from functools import partial
from typing import TYPE_CHECKING, Any

import Pyro5.errors

from . import context, tracing
from .connection import Connection
from .errors import CallTimeoutError
from .protocol import FLAGS_CORR_ID, MSG_ITEMS, MSG_RESULT, pack
from .wire import SERIALIZER

if TYPE_CHECKING:
    from .aloop import AsyncRunner

__all__ = ["PushStreams"]

log = logging.getLogger("pyrorpc.server")

_BATCH_ITEMS = 256  # stream items per frame at most
_FLUSH_AFTER = 0.002  # seconds items wait in a frame for more before it is sent
_SLOW_ITEM = 0.001  # a generator slower than this per item: each item goes out at once
_GONE = object()  # _send_items: the connection is gone (nothing to report to anyone)
MAX_CREDIT = 1 << 16  # items a client may have granted and not yet received
OUT_HIGH = 8 << 20  # bytes of unsent output on a connection past which streams wait (mux.py's _OUT_HIGH)
OUT_LOW = 1 << 20  # ... and below which they go on


class Pending:
    """A request read but not started yet (in ``conn.tasks`` under its sequence number): what the client
    said about it meanwhile (MSG_CANCEL, MSG_CREDIT) waits here."""

    __slots__ = ("credit", "cancelled")

    def __init__(self) -> None:
        self.credit = 0
        self.cancelled = False


def _result(flags: int, header: Any, data: bytes) -> bytes:
    if header.flags & FLAGS_CORR_ID:
        return pack(MSG_RESULT, flags | FLAGS_CORR_ID, header.seq, data, corr_id=header.corr_id)
    return pack(MSG_RESULT, flags, header.seq, data)


class _Stream:
    """A streamed result in progress: its generator, the credit the client granted, the frame being
    filled, and who runs it."""

    __slots__ = ("server", "conn", "header", "source", "is_async", "credit", "lock", "parked", "cancelled",
                 "finished", "stall", "progress", "wakeup", "method", "info", "batch", "batch_no", "armed",
                 "started", "error", "blocked", "counted")

    def __init__(self, server: Any, conn: Connection, header: Any, source: Any, is_async: bool, credit: int,
                 info: context.CallInfo, method: str) -> None:
        self.server = server
        self.conn = conn
        self.header = header
        self.source = source
        self.is_async = is_async
        self.credit = credit
        self.lock = threading.RLock()
        self.parked = False  # a sync generator waiting for credit (no thread holds it)
        self.cancelled = False
        self.finished = False
        left = info.remaining()
        self.stall = left if left is not None and left > 0 else server.idle_timeout
        self.progress = time.monotonic()
        self.wakeup: asyncio.Event | None = None  # async streams: credit came, or cancelled
        self.method = method
        self.info = info
        self.batch: list[Any] = []  # items of the frame being filled
        self.batch_no = 0  # frames sent so far (a timer flushes only the frame it was set for)
        self.armed = -1  # the frame a flush timer is set for
        self.started = 0.0  # when the frame being filled got its first item
        self.error: BaseException | None = None  # why a timer flush ended the stream
        self.blocked = False  # waiting for the connection's output to drain (the client reads slowly)
        self.counted: tuple[Any, float] | None = None  # (target, request arrival): counted in ServerStats at its end

    # called from the I/O thread (sync streams) or on the event loop (async streams)
    def add_credit(self, n: int) -> None:
        with self.lock:
            self.credit = min(self.credit + n, MAX_CREDIT)
            self.progress = time.monotonic()
            resume = self._unpark(not self.cancelled)
        self._wake(resume)

    def unblock(self) -> None:
        """The connection's output drained (sync streams: any thread; async ones: on the event loop)."""
        with self.lock:
            self.blocked = False
            resume = self._unpark(not self.cancelled)
        self._wake(resume)

    def cancel(self) -> None:
        with self.lock:
            self.cancelled = True
            resume = self._unpark(True)  # (a parked generator is resumed to be closed)
        self._wake(resume)

    def _unpark(self, may_run: bool) -> bool:
        """(``lock`` held) True if a parked sync generator is to run again: it is no longer parked then."""
        resume = self.parked and may_run
        if resume:
            self.parked = False
        return resume

    def _wake(self, resume: bool) -> None:
        """An async stream's pump wakes up; a sync one that was parked gets a call thread."""
        if self.wakeup is not None:
            self.wakeup.set()
        if resume:
            self.server._submit(partial(self.server._pump, self))


class PushStreams:
    """Pushed streams of a ``Server`` (a mixin: the attributes below are the server's)."""

    name: str
    max_message_size: int
    idle_timeout: float
    async_runner: AsyncRunner

    if TYPE_CHECKING:  # provided by the Server (declared here for the type checker only)
        def _submit(self, job: Any) -> None: ...

        def _mux_send(self, conn: Connection, data: bytes) -> bool: ...

        def _mux_done(self, conn: Connection, data: bytes | None, failed: bool | None, count: bool = True) -> None:
            ...

        def _error_frame(self, exc: BaseException, seq: int, tb: Any, header: Any = None) -> bytes: ...

        def _record(self, target: Any, method: Any, failed: bool, err: BaseException | None, started: float,
                    info: Any, leave: bool = False) -> None: ...

    # starting -----------------------------------------------------------------------------------
    def _stream_start(self, conn: Connection, header: Any, method: str, result: Any, credit: int,
                      info: context.CallInfo, target: Any = None, started: float = 0.0) -> None:
        """A call thread starts a sync stream (the request stays in flight until the stream ends)."""
        try:
            source = iter(result)
        except TypeError:
            raise TypeError(f"{method} returned {type(result).__name__}, which is not iterable: it cannot be "
                            "streamed") from None
        stream = _Stream(self, conn, header, source, False, credit, info, method)
        if target is not None:
            stream.counted = (target, started)
        self._register(stream)
        self._pump(stream)

    def _astream_start(self, conn: Connection, header: Any, method: str, result: Any, credit: int,
                       info: context.CallInfo, ctx: Any, target: Any = None, started: float = 0.0) -> None:
        """On the event loop: start an async stream (of an async generator, or of what a coroutine returns)."""
        stream = _Stream(self, conn, header, result, True, credit, info, method)
        if target is not None:
            stream.counted = (target, started)
        stream.wakeup = asyncio.Event()
        self._register(stream)
        ctx.run(asyncio.get_running_loop().create_task, self._astream(stream))

    def _register(self, stream: _Stream) -> None:
        """The stream takes its request's place in ``conn.tasks``, with what the client said meanwhile."""
        conn = stream.conn
        with conn.wlock:
            pending = conn.tasks.get(stream.header.seq)
            conn.tasks[stream.header.seq] = stream
            if type(pending) is Pending:
                stream.credit = min(stream.credit + pending.credit, MAX_CREDIT)
                stream.cancelled = pending.cancelled

    # frames -------------------------------------------------------------------------------------
    def _send_items(self, stream: _Stream, items: list[Any]) -> Any:
        """MSG_ITEMS frame(s) with ``items``: None when sent, ``_GONE`` when the connection is gone, or the
        exception that ends the stream (an item that cannot be serialized or is too large)."""
        try:
            data = SERIALIZER.dumps(items)
        except Exception as exc:
            if len(items) > 1:  # the items before the bad one still go out
                half = len(items) // 2
                return self._send_items(stream, items[:half]) or self._send_items(stream, items[half:])
            return Pyro5.errors.SerializeError(f"cannot serialize an item of {stream.method}: {exc}")
        if len(data) > self.max_message_size:
            if len(items) > 1:  # smaller frames then
                half = len(items) // 2
                return self._send_items(stream, items[:half]) or self._send_items(stream, items[half:])
            return Pyro5.errors.MessageTooLargeError(
                f"an item of {stream.method} ({len(data):,} bytes) exceeds the worker's max_message_size")
        if not self._mux_send(stream.conn, pack(MSG_ITEMS, 0, stream.header.seq, data)):
            return _GONE
        stream.progress = time.monotonic()
        return None

    def _flush(self, stream: _Stream) -> Any:
        """Send the frame being filled (``stream.lock`` held); as ``_send_items``."""
        items, stream.batch = stream.batch, []
        stream.batch_no += 1
        return self._send_items(stream, items) if items else None

    def _failed_flush(self, stream: _Stream, err: Any) -> None:
        """A flush failed: the stream ends (with ``err`` told to the client unless the connection is gone)."""
        if err is not _GONE:
            stream.error = err
        stream.cancelled = True

    def _arm(self, stream: _Stream) -> None:
        """Flush the frame being filled in ``_FLUSH_AFTER`` unless it went out by then (the generator may
        go quiet after an item: the item must not wait for the next one)."""
        stream.armed = stream.batch_no
        if stream.is_async:
            asyncio.get_running_loop().call_later(_FLUSH_AFTER, self._timed_flush, stream, stream.batch_no)
        else:
            loop = self.async_runner.loop
            loop.call_soon_threadsafe(loop.call_later, _FLUSH_AFTER, self._timed_flush, stream, stream.batch_no)

    def _timed_flush(self, stream: _Stream, batch_no: int) -> None:
        with stream.lock:
            if stream.finished or stream.batch_no != batch_no or not stream.batch:
                return
            err = self._flush(stream)
            if err is not None:
                self._failed_flush(stream, err)
        if err is not None and stream.wakeup is not None:
            stream.wakeup.set()

    def _add(self, stream: _Stream, item: Any, took: float, now: float) -> bool:
        """Put an item in the frame, sending it when full or due (``stream.lock`` held); False when the
        stream is to end (see ``stream.cancelled``)."""
        batch = stream.batch
        if not batch:
            stream.started = now
        batch.append(item)
        stream.credit -= 1
        if len(batch) >= _BATCH_ITEMS or took > _SLOW_ITEM or now - stream.started > _FLUSH_AFTER:
            err = self._flush(stream)
            if err is not None:
                self._failed_flush(stream, err)
                return False
        elif stream.armed != stream.batch_no:
            self._arm(stream)
        return True

    def _stream_end(self, stream: _Stream, data: bytes | None, failed: bool) -> None:
        with stream.lock:
            if stream.finished:
                return
            stream.finished = True
        if stream.info._span is not None:
            tracing.finish(stream.info, None, failed)
        if stream.counted is not None:  # (a stream counts as one call of its method, from request to end)
            target, started = stream.counted
            self._record(target, stream.method, failed, None, started, stream.info)
        conn = stream.conn
        if conn.tasks.get(stream.header.seq) is stream:
            del conn.tasks[stream.header.seq]
        self._mux_done(conn, data, failed)

    def _stream_stop(self, stream: _Stream) -> None:
        """End a cancelled stream: with its error if it has one (a failed flush, or the consumer stalled: the
        client is told), else without a word (the client cancelled it or went away: nobody waits)."""
        err = stream.error
        data = None if err is None else self._error_frame(err, stream.header.seq, err.__traceback__, stream.header)
        self._stream_end(stream, data, err is not None)

    def _stream_done(self, stream: _Stream, exc: BaseException | None) -> None:
        """The generator finished (``exc`` None) or raised: the rest of the items, then the final result."""
        if exc is not None and stream.info._span is not None:
            tracing.finish(stream.info, exc)
        with stream.lock:
            err = self._flush(stream) if not stream.finished else None
        if err is not None and err is not _GONE:
            self._stream_end(stream, self._error_frame(err, stream.header.seq, None, stream.header), True)
        elif err is _GONE:
            self._stream_end(stream, None, exc is not None)
        elif exc is None:
            self._stream_end(stream, _result(0, stream.header, SERIALIZER.dumps(None)), False)
        else:
            self._stream_end(stream, self._error_frame(exc, stream.header.seq, exc.__traceback__, stream.header),
                             True)

    # sync generators (call threads) -------------------------------------------------------------
    def _pump(self, stream: _Stream) -> None:
        """Run a sync generator while it has credit (a call thread); park it when it has none."""
        source = stream.source
        token = context.enter(stream.info)
        active = tracing.activate(stream.info) if stream.info._span is not None else None
        try:
            while True:
                with stream.lock:
                    if stream.finished:
                        return
                    if not stream.cancelled and stream.conn.wq.nbytes > OUT_HIGH:
                        stream.blocked = stream.parked = True  # unblock() resumes it when the output drains
                        if stream.conn.wq.nbytes > OUT_LOW:  # (unless it drained meanwhile)
                            return
                        stream.blocked = stream.parked = False
                    if not stream.cancelled and stream.credit <= 0:
                        err = self._flush(stream)
                        if err is not None:
                            self._failed_flush(stream, err)
                        else:
                            stream.parked = True  # add_credit() or cancel() resumes it on a call thread
                            return
                    cancelled = stream.cancelled
                if cancelled:
                    _close_quietly(source)  # its finally runs now
                    self._stream_stop(stream)
                    return
                t0 = time.monotonic()
                try:
                    item = next(source)
                except StopIteration:
                    self._stream_done(stream, None)
                    return
                except BaseException as exc:  # the generator's own error: after the items before it
                    self._stream_done(stream, exc)
                    return
                now = time.monotonic()
                with stream.lock:
                    self._add(stream, item, now - t0, now)
        finally:
            if active is not None:
                tracing.deactivate(active)
            context.leave(token)

    # async generators (the event loop) ----------------------------------------------------------
    async def _astream(self, stream: _Stream) -> None:
        """Run an async generator on the event loop, sending its items as credit allows."""
        agen = stream.source
        wakeup = stream.wakeup
        assert wakeup is not None
        try:
            if not inspect.isasyncgen(agen):
                if inspect.iscoroutine(agen):
                    agen = await agen  # an async def that returns an iterable
                agen = agen.__aiter__() if hasattr(agen, "__aiter__") else _aiter_sync(iter(agen))
            while not stream.cancelled:
                if stream.conn.wq.nbytes > OUT_HIGH:
                    stream.blocked = True
                    wakeup.clear()
                    if stream.conn.wq.nbytes > OUT_LOW:
                        try:
                            await asyncio.wait_for(wakeup.wait(), stream.stall)
                        except asyncio.TimeoutError:
                            stream.cancelled = True
                    stream.blocked = False
                    continue
                if stream.credit <= 0:
                    with stream.lock:
                        err = self._flush(stream)
                        if err is not None:
                            self._failed_flush(stream, err)
                            break
                    wakeup.clear()
                    if stream.credit <= 0 and not stream.cancelled:
                        try:
                            await asyncio.wait_for(wakeup.wait(), stream.stall)
                        except asyncio.TimeoutError:
                            log.info("%s: stream of %s closed: no item taken for %gs", self.name, stream.method,
                                     stream.stall)
                            stream.error = _stalled(stream)
                            stream.cancelled = True
                    continue
                t0 = time.monotonic()
                try:
                    item = await agen.__anext__()
                except StopAsyncIteration:
                    self._stream_done(stream, None)
                    return
                now = time.monotonic()
                with stream.lock:
                    self._add(stream, item, now - t0, now)
            # cancelled by the client, stalled, or the connection went away
            await _aclose_quietly(agen)
            self._stream_stop(stream)
        except asyncio.CancelledError:
            await _aclose_quietly(agen)
            self._stream_stop(stream)
        except BaseException as exc:  # the generator's own error: after the items before it
            self._stream_done(stream, exc)

    def _sweep_streams(self, conn: Connection, now: float) -> None:
        """The I/O thread: close parked sync streams nobody took items from for their stall limit."""
        for entry in list(conn.tasks.values()):
            if isinstance(entry, _Stream) and not entry.is_async and entry.parked \
                    and now - entry.progress > entry.stall:
                log.info("%s: stream of %s closed: no item taken for %gs", self.name, entry.method, entry.stall)
                entry.error = _stalled(entry)
                entry.cancel()


def _stalled(stream: _Stream) -> BaseException:
    """The error a stream ends with when its consumer took no item for its stall limit (raised here so it
    carries a remote traceback: the worker is fine, the consumer was slow)."""
    try:
        raise CallTimeoutError(f"{stream.method}: the worker closed the stream: no item was taken for "
                               f"{stream.stall:g}s")
    except CallTimeoutError as exc:
        return exc


def is_stream(entry: Any) -> bool:
    return isinstance(entry, _Stream)


def _close_quietly(source: Any) -> None:
    close = getattr(source, "close", None)
    if close is not None:
        try:
            close()
        except Exception as exc:
            log.info("closing a generator raised %s: %s", type(exc).__name__, exc)


async def _aclose_quietly(agen: Any) -> None:
    aclose = getattr(agen, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except BaseException as exc:  # its finally may raise; CancelledError too
            log.info("closing an async generator raised %s: %s", type(exc).__name__, exc)
    else:
        _close_quietly(agen)


async def _aiter_sync(it: Any) -> Any:
    for item in it:
        yield item

"""Pyro5's own item streaming, for stock Pyro5 proxies: a method whose result is an iterator, a generator or
an async generator is answered with a stream id, and the client then pulls the items one call at a time.

The reply to the call is a ``MSG_RESULT`` with ``FLAGS_ITEMSTREAMRESULT``, the stream id in its ``STRM``
annotation (where Pyro5's ``Proxy`` reads it) and as its data. The client then calls
``Pyro.Daemon.get_next_stream_item(id)`` over the same connection until ``StopIteration`` is raised to it,
and ``Pyro.Daemon.close_stream(id)`` (oneway) when it stops early. As with a stock Pyro5 daemon, a stream
that raised (``StopIteration`` included) is gone, an unknown id is "item stream terminated", and another
connection asking for it gets "item stream belongs to other client". Unlike Pyro5 (which keeps a
disconnected client's streams for ``ITER_STREAM_LINGER`` seconds and drops them without closing them), a
stream is closed (``close()`` / ``aclose()``: the generator's ``finally`` runs) when its connection
closes, when the client closes it, and when it was not advanced for ``timeout`` seconds (``sweep``).

Async generators are advanced on the server's event loop (``AsyncRunner``); ``StopAsyncIteration`` is
reported as ``StopIteration``. Closing never blocks the I/O thread: async generators are closed on the
event loop, sync ones that are closed by a dropped connection or the sweep on a short-lived thread.
"""

from __future__ import annotations

import logging
import threading
import time
import types
import uuid
from collections.abc import AsyncGenerator
from typing import Any

import Pyro5.errors

from .aloop import AsyncRunner, PeerGone, Raised, wait
from .connection import CLOSED
from .protocol import FLAGS_CORR_ID, FLAGS_ITEMSTREAMRESULT, MSG_RESULT, pack, pack_annotations
from .wire import SERIALIZER

__all__ = ["StockStreams", "stream_reply"]

log = logging.getLogger("pyrorpc.server")


def stream_reply(header: Any, stream_id: str) -> bytes:
    """The reply to a request whose result became stream ``stream_id`` (its sequence and correlation id)."""
    annotations = pack_annotations({"STRM": stream_id.encode("ascii")})
    data = SERIALIZER.dumps(stream_id)
    if header.flags & FLAGS_CORR_ID:
        return pack(MSG_RESULT, FLAGS_ITEMSTREAMRESULT | FLAGS_CORR_ID, header.seq, data, annotations,
                    corr_id=header.corr_id)
    return pack(MSG_RESULT, FLAGS_ITEMSTREAMRESULT, header.seq, data, annotations)


async def _anext(agen: AsyncGenerator[Any, Any]) -> Any:
    # created on the loop, so the loop's async generator hooks see the generator (shutdown_asyncgens);
    # SystemExit and KeyboardInterrupt would end the event loop: they come back as a value (aloop.guarded)
    try:
        return await agen.__anext__()
    except (SystemExit, KeyboardInterrupt, GeneratorExit) as exc:
        return Raised(exc)


async def _aclose(agen: AsyncGenerator[Any, Any]) -> Any:
    try:
        await agen.aclose()
    except (SystemExit, KeyboardInterrupt, GeneratorExit) as exc:
        return Raised(exc)
    return None


def _failure(future: Any) -> BaseException | None:
    """What a finished ``_aclose`` raised, if anything."""
    if future.cancelled():
        return None
    exc = future.exception()
    if exc is None and type(future.result()) is Raised:
        exc = future.result().exc
    return exc


class _Stream:
    __slots__ = ("conn", "it", "is_async", "last", "busy", "lock")

    def __init__(self, conn: Any, it: Any) -> None:
        self.conn = conn  # the connection that may advance it
        self.it = it
        self.is_async = isinstance(it, types.AsyncGeneratorType)
        self.last = time.monotonic()  # last opened or advanced
        self.busy = False  # being advanced now: closers leave it to the advancing thread
        self.lock = threading.Lock()  # one advance at a time


class StockStreams:
    """The open item streams of a server (thread-safe: call threads, the I/O thread and the sweep).

    Args:
        timeout: seconds a stream may go without being advanced before ``sweep`` closes it.
        runner: the server's event loop, for async generators.
    """

    def __init__(self, timeout: float, runner: AsyncRunner) -> None:
        self.timeout = timeout
        self.runner = runner
        self._lock = threading.Lock()
        self._streams: dict[str, _Stream] = {}
        self._by_conn: dict[Any, set[str]] = {}

    def __len__(self) -> int:
        return len(self._streams)

    def open(self, conn: Any, iterator: Any) -> str:
        """Register ``iterator`` (a result of a call on ``conn``) as a stream; its id."""
        stream_id = str(uuid.uuid4())
        stream = _Stream(conn, iterator)
        with self._lock:
            self._streams[stream_id] = stream
            self._by_conn.setdefault(conn, set()).add(stream_id)
        if getattr(conn, "state", None) == CLOSED:  # dropped meanwhile: close_connection may have run already
            self.close_connection(conn)
        return stream_id

    def next_item(self, stream_id: str, conn: Any) -> Any:
        """The next item of the stream, for a call on ``conn``.

        Raises:
            PyroError: unknown (finished, closed) stream, or one that belongs to another connection.
            StopIteration: the stream is exhausted (and gone).
            Exception: whatever the iterator raised (the stream is gone).
        """
        stream = self._owned(stream_id, conn)
        with stream.lock:
            with self._lock:
                if self._streams.get(stream_id) is not stream:
                    raise Pyro5.errors.PyroError("item stream terminated")
                stream.busy = True
            done = False
            try:
                if stream.is_async:
                    # waited for in slices: a caller that gave up and closed its connection frees this thread
                    # (the generator is cancelled, its finally runs)
                    try:
                        return wait(self.runner.submit(_anext(stream.it)), None, stream.conn.peer_closed)
                    except StopAsyncIteration:
                        raise StopIteration from None
                    except PeerGone:
                        raise Pyro5.errors.ConnectionClosedError(
                            "the caller closed its connection; its item stream is cancelled") from None
                return next(stream.it)
            except BaseException:
                done = True  # like Pyro5: a stream that raised (StopIteration too) is removed
                raise
            finally:
                with self._lock:
                    stream.busy = False
                    stream.last = time.monotonic()
                    if done:
                        self._remove(stream_id, stream)
                    # closed by someone else while it was being advanced: closing was left to us
                    closed = not done and self._streams.get(stream_id) is not stream
                if closed:
                    self._close_now(stream_id, stream)

    def close(self, stream_id: str, conn: Any = None) -> None:
        """Close a stream (the client's ``close_stream``); unknown ids, and ids of another connection when
        ``conn`` is known, are ignored."""
        with self._lock:
            stream = self._streams.get(stream_id)
            if stream is None or (conn is not None and stream.conn is not conn):
                return
            self._remove(stream_id, stream)
            if stream.busy:
                return  # the advancing thread closes it
        self._close_now(stream_id, stream)

    def close_connection(self, conn: Any) -> None:
        """Close every stream of a connection that closed."""
        if not self._streams:
            return
        with self._lock:
            ids = self._by_conn.pop(conn, None)
            if not ids:
                return
            doomed = []
            for stream_id in ids:
                stream = self._streams.pop(stream_id, None)
                if stream is not None and not stream.busy:
                    doomed.append((stream_id, stream))
        self._close_later(doomed)

    def sweep(self, now: float) -> None:
        """Close the streams not advanced for ``timeout`` seconds (``now``: ``time.monotonic()``)."""
        if not self._streams or self.timeout <= 0:
            return
        limit = now - self.timeout
        with self._lock:
            doomed = [(sid, s) for sid, s in self._streams.items() if not s.busy and s.last < limit]
            for stream_id, stream in doomed:
                self._remove(stream_id, stream)
        for stream_id, stream in doomed:
            log.info("closed item stream %s of %s: not advanced for %gs", stream_id, stream.conn, self.timeout)
        self._close_later(doomed)

    def close_all(self) -> None:
        """Close every stream (the server is closing)."""
        with self._lock:
            doomed = [(sid, s) for sid, s in self._streams.items() if not s.busy]
            self._streams.clear()
            self._by_conn.clear()
        self._close_later(doomed)

    # internals ----------------------------------------------------------------------------------
    def _owned(self, stream_id: Any, conn: Any) -> _Stream:
        with self._lock:
            stream = self._streams.get(stream_id) if isinstance(stream_id, str) else None
        if stream is None:
            raise Pyro5.errors.PyroError("item stream terminated")
        if stream.conn is not conn:
            raise Pyro5.errors.PyroError("item stream belongs to other client")
        return stream

    def _remove(self, stream_id: str, stream: _Stream) -> None:
        """Forget a stream (the lock held)."""
        if self._streams.get(stream_id) is stream:
            del self._streams[stream_id]
        ids = self._by_conn.get(stream.conn)
        if ids is not None:
            ids.discard(stream_id)
            if not ids:
                del self._by_conn[stream.conn]

    def _close_later(self, doomed: list[tuple[str, _Stream]]) -> None:
        """Close streams without blocking the caller (maybe the I/O thread) on their ``finally`` blocks."""
        if not doomed:
            return
        sync = []
        for stream_id, stream in doomed:
            if stream.is_async:
                self._close_now(stream_id, stream)  # scheduled on the loop, not waited for
            else:
                sync.append((stream_id, stream))
        if sync:
            def run() -> None:
                for stream_id, stream in sync:
                    self._close_now(stream_id, stream)

            threading.Thread(target=run, name=f"{self.runner.name}-stream-close", daemon=True).start()

    def _close_now(self, stream_id: str, stream: _Stream) -> None:
        it = stream.it
        if stream.is_async:
            try:
                future = self.runner.submit(_aclose(it))
            except Exception as exc:  # the loop is gone
                log.info("could not close item stream %s: %s", stream_id, exc)
                return
            future.add_done_callback(lambda f: self._log_close_error(stream_id, _failure(f)))
            return
        close = getattr(it, "close", None)
        if close is None:
            return
        try:
            close()
        except Exception as exc:
            self._log_close_error(stream_id, exc)

    @staticmethod
    def _log_close_error(stream_id: str, exc: BaseException | None) -> None:
        if exc is not None:
            log.warning("item stream %s: error while closing it: %s: %s", stream_id, type(exc).__name__, exc)

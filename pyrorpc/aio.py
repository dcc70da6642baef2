"""Multiplexed connections: many requests outstanding on one socket, answered by sequence number, and
pyrorpc's streams; asyncio channels, the blocking stream connection, and the handshake that negotiates them.

This is transport (see ``docs/protocol.md``): it raises Pyro5's errors (``CommunicationError`` when
nothing was sent, ``ConnectionClosedError`` when a request was lost, ``TimeoutError`` when a reply did
not come in time) and the remote method's own; ``endpoint.py`` turns them into pyrorpc's.
"""

from __future__ import annotations

import asyncio
import ipaddress
import select
import socket
import ssl
from collections import deque
from collections.abc import AsyncGenerator, Callable
from typing import Any

import Pyro5.core
import Pyro5.errors

from . import protocol
from .codec import SERIALIZER
from .compat import remote_traceback, set_remote_traceback
from .config import Settings
from .errors import AuthenticationError, MessageTooLargeError
from .security import _speaks_tls, client_ssl_context, handshake_frame, handshake_reply, open_connection
from .wire import LimitedConnection

__all__ = ["STREAM_WINDOW", "BlockingStream", "ChannelStream", "MuxChannel", "NotWritten", "decode_reply",
           "open_blocking", "open_channel"]

MSG_ITEMS = getattr(protocol, "MSG_ITEMS", 0x51)
MSG_CREDIT = getattr(protocol, "MSG_CREDIT", 0x52)
MSG_CANCEL = getattr(protocol, "MSG_CANCEL", 0x53)
MSG_ACCEPTED = protocol.MSG_ACCEPTED
STREAM_WINDOW = 1024  # items a stream may have in flight or buffered (credit granted half a window at a time)
_HEADER = protocol.HEADER
_HEADER_SIZE = protocol.HEADER_SIZE
_NO_CORRELATION = b"\0" * 16
_SEQS = 0xFFFF
_TOMB_SECONDS = 60.0  # a reply may still come for a request given up this long ago: its number is not reused
_MAX_TOMBS = 32768  # more than that: a fresh channel (the old one closes once its requests are answered)
_BIG = 4096  # requests larger than this remember their size (to blame the right one for a size refusal)
_DAEMON = "Pyro.Daemon"


class NotWritten(Pyro5.errors.CommunicationError):
    """Nothing of the request was written (its channel was closing, or had no free sequence number)."""


class _Expired:
    """Marks a reply that did not come in time (a future's result, cheaper than an exception)."""


_EXPIRED = _Expired()


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_result(_EXPIRED)


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # (a reply nobody awaits: its exception is no "never retrieved" warning)


def _wake(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_result(None)


# the handshake ---------------------------------------------------------------------------------------

# replies ------------------------------------------------------------------------------------------------

def decode_reply(flags: int, body: bytes, max_size: int) -> Any:
    """The value of a MSG_RESULT (or the items of a MSG_ITEMS); raises the remote exception it carries (a
    worker's Pyro5 MessageTooLargeError as pyrorpc's, remote traceback kept)."""
    if flags & protocol.FLAGS_COMPRESSED:
        try:
            body = protocol.decompress(body, max_size)
        except protocol.ProtocolViolation as exc:
            raise Pyro5.errors.ProtocolError(f"bad reply: {exc}") from None
    result = SERIALIZER.loads(body)
    if flags & protocol.FLAGS_EXCEPTION:
        if isinstance(result, Pyro5.errors.MessageTooLargeError) and not isinstance(result, MessageTooLargeError):
            mapped = MessageTooLargeError(*result.args)
            set_remote_traceback(mapped, remote_traceback(result) or [])
            raise mapped
        if isinstance(result, BaseException):
            raise result
        raise Pyro5.errors.ProtocolError(f"exception reply without an exception: {result!r}")
    return result


def _refusal(exc: Any) -> BaseException:
    """What a server's sequence-0 error (sent just before it drops the connection) means for a request."""
    text = str(exc)
    if isinstance(exc, Pyro5.errors.ProtocolError) and ("max_message_size" in text or "message size" in text):
        return MessageTooLargeError(f"the worker refused the request: {text}")
    return Pyro5.errors.ConnectionClosedError(f"the worker dropped the connection: {text}")


def _stream_result_error(method: str) -> TypeError:
    return TypeError(f"{method} returned an iterator or generator: iterate it with p.{method}.stream(...) or "
                     f"p.{method}.astream(...)")


# the asyncio channel --------------------------------------------------------------------------------------

class MuxChannel(asyncio.Protocol):
    """One multiplexed connection on one event loop: requests go out as they come, each under its own
    sequence number (1..65535, never one still outstanding, nor one given up recently: its reply may still
    come); replies and stream items are matched back by it. Used only from its loop's thread.

    A request given up (cancelled or timed out) is cancelled at the worker (MSG_CANCEL); frames for it are
    ignored. When the connection dies every request outstanding on it fails with ConnectionClosedError.
    ``on_notice`` is called when the worker says it is draining, ``on_lost`` when the connection is gone.
    """

    def __init__(self, uri: Pyro5.core.URI, settings: Settings, loop: asyncio.AbstractEventLoop,
                 on_notice: Callable[[], None] | None = None,
                 on_lost: Callable[["MuxChannel"], None] | None = None) -> None:
        self.object_id: str = uri.object
        self.location = uri.location
        self.loop = loop
        self.max_size = settings.max_message_size
        self.transport: asyncio.Transport | None = None
        self.sock: socket.socket | None = None  # ours to close if the loop is closed under the transport
        self.pending: dict[int, Any] = {}  # seq -> Future (a call) or ChannelStream
        self.tombs: dict[int, float] = {}  # seq -> loop time until which a late reply may arrive
        self.closed = False  # the connection is gone
        self.closing = False  # closes once nothing is outstanding (endpoint closed, too many tombs)
        self.draining = False  # the worker said (MSG_NOTICE) it is draining
        self.acks = False  # the worker acknowledges sends (negotiated: "ack")
        self.accepts: dict[int, asyncio.Future[bool]] = {}  # seq -> a send() waiting for MSG_ACCEPTED
        self.last_active = loop.time()
        self.on_notice = on_notice
        self.on_lost = on_lost
        self.handshake: asyncio.Future[tuple[int, bytes]] = loop.create_future()
        self._seq = 0
        self._buf: bytes | bytearray = b""
        self._skip = 0
        self._refused: BaseException | None = None
        self._sizes: dict[int, int] = {}
        self._paused = False
        self._drained: list[asyncio.Future[None]] = []
        self._poller: Any = None
        self._guard: AsyncGenerator[None, None] | None = None

    def __repr__(self) -> str:
        return f"<MuxChannel {self.location} pending={len(self.pending)}>"

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        refused = self._refused
        reason = str(refused or exc or "connection closed by the worker")
        culprit = max(self._sizes, key=self._sizes.__getitem__) if self._sizes else None
        pending, self.pending = self.pending, {}
        for seq, entry in pending.items():
            if refused is not None and isinstance(refused, MessageTooLargeError) and seq == culprit:
                error: BaseException = MessageTooLargeError(str(refused))
            else:
                error = Pyro5.errors.ConnectionClosedError(f"connection lost: {reason}")
            if type(entry) is ChannelStream:
                entry.fail(error)
            elif not entry.done():
                entry.set_exception(error)
        accepts, self.accepts = self.accepts, {}
        for accepted in accepts.values():
            if not accepted.done():
                accepted.set_result(False)  # (its reply future says why)
        if not self.handshake.done():
            self.handshake.set_exception(Pyro5.errors.ConnectionClosedError(f"connection lost: {reason}"))
            self.handshake.exception()  # (whoever waits gets it; nobody may, after a connect timeout)
        for fut in self._drained:
            _wake(fut)
        self._drained.clear()
        if self.on_lost is not None:
            self.on_lost(self)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        drained, self._drained = self._drained, []
        for fut in drained:
            _wake(fut)

    def eof_received(self) -> bool | None:
        return False  # the worker closed its side: so do we (connection_lost follows)

    def data_received(self, data: bytes) -> None:
        self.last_active = self.loop.time()
        if self._skip:
            if len(data) <= self._skip:
                self._skip -= len(data)
                return
            data = data[self._skip:]
            self._skip = 0
        buf = self._buf
        if buf:
            buf += data  # (a bytearray: extended in place)
        else:
            buf = data
        n = len(buf)
        pos = 0
        unpack = _HEADER.unpack_from
        while n - pos >= _HEADER_SIZE:
            tag, version, msg_type, ser_id, flags, seq, data_size, ann_size, _corr, _res, magic = unpack(buf, pos)
            if tag != b"PYRO" or version != protocol.PROTOCOL_VERSION or magic != protocol.MAGIC:
                self._violation("not a Pyro5 message")
                return
            size = data_size + ann_size
            if size > self.max_size:
                self._too_large(msg_type, seq, size)
                have = n - pos - _HEADER_SIZE
                if have >= size:
                    pos += _HEADER_SIZE + size
                    continue
                self._skip = size - have
                pos = n
                break
            end = pos + _HEADER_SIZE + size
            if end > n:
                break
            start = pos + _HEADER_SIZE + ann_size
            body = buf[start:end] if type(buf) is bytes else bytes(buf[start:end])
            pos = end
            if ser_id != protocol.SERPENT_ID and msg_type not in (protocol.MSG_PING, protocol.MSG_NOTICE, MSG_CANCEL):
                self._violation(f"serializer id {ser_id} refused: only serpent is accepted")
                return
            self._frame(msg_type, flags, seq, body)
            if self.closed:
                return
        if pos >= n:
            self._buf = b""
        elif pos == 0:
            self._buf = buf if type(buf) is bytearray else bytearray(buf)
        elif type(buf) is bytearray:
            del buf[:pos]
            self._buf = buf
        else:
            self._buf = bytearray(buf[pos:])

    def _frame(self, msg_type: int, flags: int, seq: int, body: bytes) -> None:
        if msg_type == protocol.MSG_RESULT:
            entry = self.pending.pop(seq, None)
            if self.accepts:
                accepted = self.accepts.pop(seq, None)
                if accepted is not None and not accepted.done():
                    accepted.set_result(False)  # answered without being accepted: refused, or not an acked call
            if entry is None:
                if seq == 0 and flags & protocol.FLAGS_EXCEPTION:
                    self._refusal(body)  # the worker is about to drop the connection
                else:
                    self.tombs.pop(seq, None)  # a late reply to a request we gave up
                return
            if self._sizes:
                self._sizes.pop(seq, None)
            if type(entry) is ChannelStream:
                entry.finish(flags, body)
            elif not entry.done():
                entry.set_result((flags, body))
            if self.closing and not self.pending:
                self.close()
        elif msg_type == MSG_ITEMS:
            entry = self.pending.get(seq)
            if type(entry) is ChannelStream:
                if self._sizes:
                    self._sizes.pop(seq, None)  # accepted: it was not too large
                entry.items(flags, body)
        elif msg_type == MSG_ACCEPTED:
            accepted = self.accepts.pop(seq, None)
            if accepted is not None and not accepted.done():
                accepted.set_result(True)
        elif msg_type == protocol.MSG_NOTICE:
            self.draining = True
            if self.on_notice is not None:
                self.on_notice()
        elif msg_type in (protocol.MSG_CONNECTOK, protocol.MSG_CONNECTFAIL) and not self.handshake.done():
            self.handshake.set_result((msg_type, body))
        elif msg_type != protocol.MSG_PING:
            self._violation(f"unexpected message type {msg_type}")

    def _refusal(self, body: bytes) -> None:
        try:
            exc = SERIALIZER.loads(body)
        except Exception:
            exc = Pyro5.errors.ProtocolError("unreadable error")
        self._refused = _refusal(exc)

    def _too_large(self, msg_type: int, seq: int, size: int) -> None:
        """A frame over our max_message_size: its bytes are skipped; the request it answers fails alone."""
        if msg_type not in (protocol.MSG_RESULT, MSG_ITEMS):
            return
        entry = self.pending.pop(seq, None)
        if entry is None:
            return
        error = MessageTooLargeError(f"the reply of {size:,} bytes exceeds the limit of {self.max_size:,} "
                                     "(max_message_size); the call ran, its result is lost")
        if type(entry) is ChannelStream:
            self._send(protocol.pack(MSG_CANCEL, 0, seq, b""))
            self._bury(seq)
            entry.fail(error)
        elif not entry.done():
            entry.set_exception(error)

    def _violation(self, text: str) -> None:
        self._refused = Pyro5.errors.ConnectionClosedError(f"protocol violation by the worker: {text}")
        self._buf = b""
        if self.transport is not None:
            self.transport.abort()

    # requests
    def usable(self) -> bool:
        return not (self.closed or self.closing or self.draining)

    def unread(self) -> bool:
        """Something waits to be read on the socket (the loop has not got to it yet). On a channel with
        nothing outstanding that is the worker's end (or its draining notice): the caller lets the loop
        read it before sending, so a request never goes to a worker known to be gone."""
        sock = self.sock
        if sock is None or self.closed:
            return False
        poller = self._poller
        if poller is None:
            poller = self._poller = select.poll()
            poller.register(sock.fileno(), select.POLLIN)
        return bool(poller.poll(0))

    def _next_seq(self) -> int:
        seq = self._seq
        pending = self.pending
        tombs = self.tombs
        for _ in range(_SEQS):
            seq = seq + 1 if seq < _SEQS else 1
            if seq in pending:
                continue
            if tombs and seq in tombs:
                if tombs[seq] > self.loop.time():
                    continue
                del tombs[seq]
            self._seq = seq
            return seq
        self.closing = True  # every number is taken: a new channel for the next requests
        raise NotWritten("no free sequence number on this connection")

    def _send(self, frame: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(frame)

    def _bury(self, seq: int) -> None:
        """``seq`` was given up: keep its number out of use while a late reply may still come for it."""
        self.tombs[seq] = self.loop.time() + _TOMB_SECONDS
        if len(self.tombs) > _MAX_TOMBS:
            now = self.loop.time()
            self.tombs = {s: t for s, t in self.tombs.items() if t > now}
            if len(self.tombs) > _MAX_TOMBS:
                self.closing = True

    def cancel(self, seq: int) -> None:
        """Give request ``seq`` up: forget it, and ask the worker to cancel it."""
        entry = self.pending.pop(seq, None)
        if self._sizes:
            self._sizes.pop(seq, None)
        if entry is not None:
            self._send(protocol.pack(MSG_CANCEL, 0, seq, b""))
            self._bury(seq)
        if self.closing and not self.pending:
            self.close()

    async def _writable(self) -> None:
        """Wait while the transport's buffer is over its high-water mark (the worker reads slowly)."""
        while self._paused and not self.closed:
            fut = self.loop.create_future()
            self._drained.append(fut)
            await fut

    def _request(self, method: str, args: Any, kwargs: Any, flags: int, annotations: bytes) -> tuple[int, bytes]:
        data = SERIALIZER.dumpsCall(self.object_id, method, args, kwargs)
        size = len(data) + len(annotations)
        if size > self.max_size:
            raise MessageTooLargeError(f"message of {size + _HEADER_SIZE:,} bytes exceeds the limit of "
                                       f"{self.max_size:,} (max_message_size); nothing was sent")
        if not self.usable():
            raise NotWritten("connection closed before sending")
        seq = self._next_seq()
        frame = _HEADER.pack(b"PYRO", protocol.PROTOCOL_VERSION, protocol.MSG_INVOKE, protocol.SERPENT_ID, flags,
                             seq, len(data), len(annotations), _NO_CORRELATION, 0, protocol.MAGIC)
        if size > _BIG:
            self._sizes[seq] = size
        return seq, frame + annotations + data if annotations else frame + data

    async def call(self, method: str, args: Any, kwargs: Any, flags: int, annotations: bytes,
                   timeout: float) -> Any:
        """Send one request and wait for its reply (``None`` at once for a oneway request).

        Raises:
            NotWritten: not sent (the connection is closing, or no sequence number).
            MessageTooLargeError: the request is over max_message_size (not sent), or was refused for it.
            Pyro5.errors.SerializeError: the arguments cannot be encoded (not sent), or the reply decoded.
            Pyro5.errors.TimeoutError: no reply within ``timeout`` (the worker was told to cancel it).
            Pyro5.errors.ConnectionClosedError: the connection was lost after sending.
            TypeError: the method returned an iterator (use ``stream()``).
            the remote method's own exception.
        """
        if self._paused:
            await self._writable()
        seq, frame = self._request(method, args, kwargs, flags, annotations)
        transport = self.transport
        assert transport is not None
        if flags & protocol.FLAGS_ONEWAY:
            self._sizes.pop(seq, None)
            transport.write(frame)
            return None
        loop = self.loop
        fut = loop.create_future()
        self.pending[seq] = fut
        transport.write(frame)
        timer = loop.call_at(loop.time() + timeout, _expire, fut)
        try:
            reply = await fut
        except asyncio.CancelledError:
            self.cancel(seq)
            raise
        finally:
            timer.cancel()
        if reply is _EXPIRED:
            self.cancel(seq)
            raise Pyro5.errors.TimeoutError(f"no reply within {timeout:g}s")
        rflags, body = reply
        if rflags & protocol.FLAGS_ITEMSTREAMRESULT:
            self._close_stock_stream(body)
            raise _stream_result_error(method)
        return decode_reply(rflags, body, self.max_size)

    async def send(self, method: str, args: Any, kwargs: Any, annotations: bytes, timeout: float,
                   wait: bool) -> tuple["asyncio.Future[tuple[int, bytes]]", bool]:
        """Send a request asking for acceptance (``annotations`` carry ``PRAK``): returns once the worker
        accepted it (MSG_ACCEPTED), or answered it without (a refusal), with the future of its reply
        ``(flags, body)`` and whether it was accepted. With ``wait`` it returns once the reply came. The
        request is never given up after acceptance (no MSG_CANCEL): the worker runs it to its end.

        Raises:
            NotWritten: not sent.
            Pyro5.errors.ConnectionClosedError: the connection was lost after the request was handed to it
                and before the worker accepted it (it may still run there).
            Pyro5.errors.TimeoutError: neither acceptance nor a reply within ``timeout`` (given up), or with
                ``wait`` no reply within ``timeout`` (the call keeps running there).
            Pyro5.errors.ConnectionClosedError: the connection was lost after acceptance (``wait`` only).
            as ``call`` before sending.
        """
        if self._paused:
            await self._writable()
        seq, frame = self._request(method, args, kwargs, 0, annotations)
        transport = self.transport
        assert transport is not None
        loop = self.loop
        reply: asyncio.Future[Any] = loop.create_future()
        reply.add_done_callback(_retrieve)
        accepted: asyncio.Future[Any] = loop.create_future()
        self.pending[seq] = reply
        self.accepts[seq] = accepted
        transport.write(frame)
        deadline = loop.time() + timeout
        timer = loop.call_at(deadline, _expire, accepted)
        try:
            ok = await accepted
            if ok is _EXPIRED:
                self.accepts.pop(seq, None)
                self.cancel(seq)
                raise Pyro5.errors.TimeoutError(f"not accepted within {timeout:g}s")
            if not ok and reply.done() and reply.exception() is not None:
                # the request was handed to the socket: it may have reached the worker (one that was stopped,
                # say, reads it later), so this is no "not sent": only an @idempotent call goes elsewhere
                raise Pyro5.errors.ConnectionClosedError(
                    f"connection lost before the worker acknowledged the call (it may or may not run): "
                    f"{reply.exception()}")
            if wait and not reply.done():
                timer.cancel()
                timer = loop.call_at(deadline, _expire, reply)
                if await asyncio.shield(reply) is _EXPIRED:
                    raise Pyro5.errors.TimeoutError(f"no reply within {timeout:g}s (the call was accepted)")
        except asyncio.CancelledError:
            if not accepted.done():
                self.accepts.pop(seq, None)
                self.cancel(seq)
            raise
        finally:
            timer.cancel()
        return reply, ok

    def _close_stock_stream(self, body: bytes) -> None:
        """The method returned a generator to a plain call: free the worker's Pyro5 stream for it."""
        try:
            stream_id = SERIALIZER.loads(body)
            data = SERIALIZER.dumpsCall(_DAEMON, "close_stream", (stream_id,), {})
            self._send(protocol.pack(protocol.MSG_INVOKE, protocol.FLAGS_ONEWAY, self._next_seq(), data))
        except Exception:
            pass

    async def open_stream(self, method: str, args: Any, kwargs: Any, annotations: bytes) -> "ChannelStream":
        """Send a streaming request (``annotations`` must carry ``PRST``); its items come through the
        returned ChannelStream. Raises as ``call`` does before sending."""
        if self._paused:
            await self._writable()
        seq, frame = self._request(method, args, kwargs, 0, annotations)
        # (its size stays known until its first items: a worker that refuses an oversized request drops the
        # connection, and the largest request not yet answered is the one it refused)
        stream = ChannelStream(self, seq, method)
        self.pending[seq] = stream
        assert self.transport is not None
        self.transport.write(frame)
        return stream

    def close(self, abort: bool = False) -> None:
        """Close now when nothing is outstanding or with ``abort`` (outstanding requests are then lost),
        else once the last reply came."""
        self.closing = True
        transport = self.transport
        if transport is None or self.closed:
            return
        if abort:
            transport.abort()
        elif not self.pending:
            transport.close()

    def close_from_any_thread(self, abort: bool = False) -> None:
        """``close`` from another thread: on the channel's loop, or at once if that loop is closed."""
        try:
            self.loop.call_soon_threadsafe(self.close, abort)
        except RuntimeError:  # its loop is closed: nothing will ever run there again
            self.closed = True
            guard, self._guard = self._guard, None
            if guard is not None:  # (finished here: a closed loop cannot finalize it)
                try:
                    guard.aclose().send(None)
                except (StopIteration, RuntimeError):
                    pass
            if self.sock is not None:
                self.sock.close()


class ChannelStream:
    """The items of one streaming request on a MuxChannel, as they arrive (at most the window buffered).

    ``next_items(timeout)`` returns the next list of items, or None at the stream's end; ``took(n)`` says
    the consumer took ``n`` items (credit goes back to the worker half a window at a time); ``close()``
    gives the stream up (MSG_CANCEL) unless it ended.
    """

    __slots__ = ("channel", "seq", "method", "frames", "end", "error", "waiter", "taken", "done", "__weakref__")

    def __init__(self, channel: MuxChannel, seq: int, method: str) -> None:
        self.channel = channel
        self.seq = seq
        self.method = method
        self.frames: deque[tuple[int, bytes]] = deque()
        self.end: tuple[int, bytes] | None = None
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[Any] | None = None
        self.taken = 0
        self.done = False

    def items(self, flags: int, body: bytes) -> None:
        self.frames.append((flags, body))
        self._wake()

    def finish(self, flags: int, body: bytes) -> None:
        self.end = (flags, body)
        self._wake()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._wake()

    def abort(self, error: BaseException) -> None:
        """From any thread: the stream's owner was closed; the consumer gets ``error``, the worker a cancel."""
        def on_loop() -> None:
            if not self.done:
                self.fail(error)
                self.close()
        try:
            self.channel.loop.call_soon_threadsafe(on_loop)
        except RuntimeError:  # its loop is closed: nobody can be waiting on it
            pass

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            _wake(waiter)

    async def next_items(self, timeout: float) -> list[Any] | None:
        """The next items (a non-empty list) or None at the end.

        Raises:
            Pyro5.errors.TimeoutError: nothing arrived within ``timeout`` (the worker was told to cancel).
            Pyro5.errors.ConnectionClosedError: the connection was lost.
            the exception the stream ended with.
        """
        loop = self.channel.loop
        deadline = loop.time() + timeout
        while True:
            if self.frames:
                flags, body = self.frames.popleft()
                items = decode_reply(flags, body, self.channel.max_size)
                if not isinstance(items, list):
                    raise Pyro5.errors.ProtocolError("stream items that are not a list")
                if items:
                    return items
                continue
            if self.end is not None:
                self.done = True
                flags, body = self.end
                if flags & protocol.FLAGS_ITEMSTREAMRESULT:
                    self.channel._close_stock_stream(body)
                    raise Pyro5.errors.ProtocolError(f"{self.method}: the worker streamed the result with "
                                                     "Pyro5's protocol instead")
                decode_reply(flags, body, self.channel.max_size)
                return None
            if self.error is not None:
                self.done = True
                raise self.error
            left = deadline - loop.time()
            if left <= 0:
                self.close()
                raise Pyro5.errors.TimeoutError(f"no item within {timeout:g}s")
            waiter = self.waiter = loop.create_future()
            timer = loop.call_at(deadline, _wake, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self.waiter = None

    def took(self, n: int) -> None:
        self.taken += n
        if self.taken >= STREAM_WINDOW // 2 and not self.done:
            self.channel._send(protocol.pack(MSG_CREDIT, 0, self.seq, b"%d" % self.taken))
            self.taken = 0

    def close(self) -> None:
        if not self.done:
            self.done = True
            self.channel.cancel(self.seq)


async def _tcp(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    """A connected non-blocking socket (name lookup only for names, not for addresses)."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        targets: list[tuple[Any, ...]] = [(family, socket.SOCK_STREAM, 0, "", (host, port))]
    except ValueError:
        targets = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    last: OSError = OSError(f"no address for {host}")
    for family, kind, proto, _name, address in targets:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            await loop.sock_connect(sock, address)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
        except BaseException:
            sock.close()
            raise
    raise last


async def open_channel(uri: Pyro5.core.URI, settings: Settings, *, on_notice: Callable[[], None] | None = None,
                       on_lost: Callable[[MuxChannel], None] | None = None) -> tuple[MuxChannel, dict[str, Any], bool]:
    """Connect to ``uri`` on the running loop (TCP, TLS, handshake asking for ``mux``); returns the
    channel, the object's metadata, and whether the server accepted multiplexing (if not, the channel
    is closed already: the server speaks plain Pyro5).

    Raises:
        AuthenticationError: the server refused our token, or could not prove it knows the secret.
        ConfigurationError: unusable TLS certificate files.
        Pyro5.errors.CommunicationError: anything else that kept the connection from opening (nothing was
            sent to the object).
    """
    loop = asyncio.get_running_loop()
    timeout = settings.connect_timeout
    ctx = client_ssl_context(settings)
    frame, token = handshake_frame(uri, settings, mux=True)
    channel = MuxChannel(uri, settings, loop, on_notice=on_notice)

    async def connect() -> tuple[int, bytes]:
        sock = channel.sock = await _tcp(loop, uri.host, uri.port)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await loop.create_connection(lambda: channel, sock=sock, ssl=ctx,
                                     server_hostname=uri.host if ctx is not None else None)
        assert channel.transport is not None
        channel.transport.write(frame)
        return await channel.handshake

    try:
        msg_type, body = await asyncio.wait_for(connect(), timeout)
        reply = SERIALIZER.loads(body) if body else None
        meta, mux = handshake_reply(uri, settings, msg_type, reply, token)
    except BaseException as exc:
        channel.close(abort=True)
        if channel.sock is not None and channel.transport is None:
            channel.sock.close()
        if isinstance(exc, (AuthenticationError, asyncio.CancelledError)) or not isinstance(exc, Exception):
            raise
        if isinstance(exc, asyncio.TimeoutError):
            raise Pyro5.errors.CommunicationError(f"cannot connect to {uri.location}: no handshake within "
                                                  f"{timeout:g}s") from None
        if isinstance(exc, ssl.SSLError):
            raise Pyro5.errors.CommunicationError(f"TLS handshake with {uri.location} failed: {exc}") from None
        if ctx is None and isinstance(exc, (Pyro5.errors.ConnectionClosedError, ConnectionResetError)) \
                and await loop.run_in_executor(None, _speaks_tls, uri, timeout):
            raise Pyro5.errors.CommunicationError(
                f"cannot connect to {uri.location}: it needs TLS and this client has no TLS settings; give the "
                "CA that signed its certificate with --tls-ca (tls_ca=, PYRORPC_TLS_CA)") from None
        if isinstance(exc, Pyro5.errors.CommunicationError):
            raise
        raise Pyro5.errors.CommunicationError(f"cannot connect to {uri.location}: {exc}") from None
    if not mux:
        channel.close()
        return channel, meta, False
    extensions = reply.get("pyrorpc") if isinstance(reply, dict) else None
    channel.acks = isinstance(extensions, dict) and bool(extensions.get("ack"))
    channel.on_lost = on_lost
    channel.last_active = loop.time()
    channel._guard = _closed_at_shutdown(channel)
    await channel._guard.__anext__()
    return channel, meta, mux


async def _closed_at_shutdown(channel: MuxChannel) -> AsyncGenerator[None, None]:
    """Started for every channel: its loop closes it (``loop.shutdown_asyncgens()``, which ``asyncio.run``
    calls) when it shuts down, so a channel never outlives its loop open."""
    try:
        yield
    finally:
        if not channel.loop.is_closed():
            channel.close(abort=True)


# the blocking stream connection ------------------------------------------------------------------------

class BlockingStream:
    """One stream on a connection of its own, read in the caller's thread (no other thread involved).

    ``start`` sends the request; then ``next_items(timeout)`` returns lists
    of items until None (the end), ``took(n)`` grants credit back, ``close()`` cancels an unfinished
    stream and closes the connection.
    """

    def __init__(self, conn: LimitedConnection, seq: int, method: str) -> None:
        self.conn = conn
        self.seq = seq
        self.method = method
        self.taken = 0
        self.done = False
        self.aborted: BaseException | None = None  # abort(): why the consumer's next read fails

    @classmethod
    def start(cls, conn: LimitedConnection, method: str, args: Any, kwargs: Any,
              annotations: bytes) -> "BlockingStream":
        """Send the streaming request on ``conn`` (from ``open_blocking``, multiplexing accepted).

        Raises:
            MessageTooLargeError, Pyro5.errors.SerializeError: the request cannot be sent (nothing was).
            Pyro5.errors.CommunicationError: sending failed (the connection is closed).
        """
        try:
            data = SERIALIZER.dumpsCall(conn.objectId, method, args, kwargs)
            conn.send(protocol.pack(protocol.MSG_INVOKE, 0, 1, data, annotations))
        except BaseException:
            conn.close()
            raise
        return cls(conn, 1, method)

    def next_items(self, timeout: float) -> list[Any] | None:
        """The next items (a non-empty list) or None at the end.

        Raises:
            Pyro5.errors.TimeoutError: nothing arrived within ``timeout`` (the stream is cancelled).
            Pyro5.errors.ConnectionClosedError: the connection was lost.
            MessageTooLargeError: a frame over max_message_size (the stream is cancelled).
            the exception the stream ended with.
        """
        conn = self.conn
        conn.set_timeout(timeout)
        while True:
            try:
                raw = conn.read_header()
                header = protocol.parse_header(raw, conn.max_size)
                payload = conn._read(header.ann_size + header.data_size) if header.total > _HEADER_SIZE else b""
            except Pyro5.errors.TimeoutError:
                self.close()
                raise
            except Pyro5.errors.MessageTooLargeError as exc:
                self.close()
                raise MessageTooLargeError(f"{self.method}: {exc}") from None
            except (protocol.ProtocolViolation, Pyro5.errors.ProtocolError) as exc:
                self.close()
                raise Pyro5.errors.ConnectionClosedError(f"protocol violation by the worker: {exc}") from None
            body = payload[header.ann_size:]
            if header.msg_type == MSG_ITEMS and header.seq == self.seq:
                items = decode_reply(header.flags, body, conn.max_size)
                if not isinstance(items, list):
                    raise Pyro5.errors.ProtocolError("stream items that are not a list")
                if items:
                    return items
            elif header.msg_type == protocol.MSG_RESULT and header.seq == self.seq:
                self.done = True
                if header.flags & protocol.FLAGS_ITEMSTREAMRESULT:
                    raise Pyro5.errors.ProtocolError(f"{self.method}: the worker streamed the result with "
                                                     "Pyro5's protocol instead")
                decode_reply(header.flags, body, conn.max_size)
                return None
            elif header.msg_type == protocol.MSG_RESULT and header.seq == 0 \
                    and header.flags & protocol.FLAGS_EXCEPTION:
                self.done = True
                raise _refusal(SERIALIZER.loads(body))

    def abort(self, error: BaseException) -> None:
        """From any thread: the stream's owner was closed. The consumer's read fails (it raises ``error``)
        and the worker sees the connection close (the generator's finally runs)."""
        self.aborted = error
        try:
            self.conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def took(self, n: int) -> None:
        self.taken += n
        if self.taken >= STREAM_WINDOW // 2 and not self.done:
            try:
                self.conn.send(protocol.pack(MSG_CREDIT, 0, self.seq, b"%d" % self.taken))
            except Pyro5.errors.CommunicationError:
                pass  # the connection is gone: the next read says so
            self.taken = 0

    def close(self) -> None:
        """Cancel the stream unless it ended (its generator's ``finally`` runs on the worker), then close."""
        if not self.done:
            self.done = True
            try:
                self.conn.set_timeout(1.0)
                self.conn.send(protocol.pack(MSG_CANCEL, 0, self.seq, b""))
            except Exception:
                pass
        self.conn.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def open_blocking(uri: Pyro5.core.URI, settings: Settings) -> tuple[LimitedConnection, dict[str, Any], bool]:
    """``security.open_connection`` asking for ``mux`` too: the connection, the object's metadata, and
    whether the server accepted multiplexing."""
    conn, meta = open_connection(uri, settings, mux=True)
    return conn, meta, conn.mux

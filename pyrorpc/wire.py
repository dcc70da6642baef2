"""The wire: Pyro5 connections with checked headers and kernel timeouts, and the fast client call path."""

from __future__ import annotations

import select
import socket
import ssl
import struct
from typing import Any

import Pyro5.errors
from Pyro5 import protocol, serializers, socketutil

from . import protocol as wire_protocol
from .codec import SERIALIZER, BytesSerpent, loads
from .compat import remote_traceback, set_remote_traceback
from .errors import MessageTooLargeError

__all__ = ["SERIALIZER", "BytesSerpent", "LimitedConnection", "invoke", "limit_connection", "loads"]

_HEADER_START = 6  # recv_stub reads 'PYRO' + version first, then the rest of the 40-byte header
_HEADER_REST = 34
_SERPENT_ID = serializers.SerpentSerializer.serializer_id
_WAITALL = getattr(socket, "MSG_WAITALL", 0)
_CHUNK = 65536


class LimitedConnection(socketutil.SocketConnection):
    """A Pyro5 socket connection that checks each incoming header before reading its payload (size limit,
    serpent only: marshal is not safe against malicious input), refuses to send oversized messages, and
    reads the 40-byte header in one system call.

    Once ``set_timeout`` was called the socket stays in blocking mode with kernel send/receive timeouts
    (SO_SNDTIMEO/SO_RCVTIMEO): cheaper per call than a Python socket timeout, which polls before every
    send and receive. Until then (the handshake) Pyro5's own timeout handling applies.
    """

    max_size = 64 * 1024 * 1024
    seq = 0
    _state = 0
    _rest = b""
    _buf = b""
    last_used = 0.0  # monotonic time this connection went back to rest (set by its owner)
    _timeout: float | None = None
    _tls = False
    poller: Any = None
    broken = False  # a message was refused mid-stream (or the peer dropped us): close, never reuse
    draining = False  # the server said (MSG_NOTICE) it is draining: send nothing more on this connection
    mux = False  # the server accepted a multiplexed connection (security.open_connection(mux=True))
    context = False  # the server takes the call context in annotations (a pyrorpc server)

    def set_timeout(self, seconds: float) -> None:
        """Kernel timeouts for every send and receive; a change under 5% is not worth a system call."""
        # a call's remaining time can get tiny but never "no timeout" (SO_RCVTIMEO 0 blocks forever)
        seconds = min(max(seconds, 0.001), 3e7)
        current = self._timeout
        if current is not None and abs(current - seconds) <= 0.05 * current:
            return
        sock = self.sock
        if sock.gettimeout() is not None:
            sock.settimeout(None)
        whole = int(seconds)
        tv = struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        self._timeout = seconds

    def send(self, data: bytes) -> None:
        if len(data) > self.max_size:
            raise MessageTooLargeError(f"message of {len(data):,} bytes exceeds the limit of {self.max_size:,} "
                                       "(max_message_size); nothing was sent")
        sock = self.sock
        if sock.gettimeout() is not None:
            return super().send(data)
        try:
            sock.sendall(data)
        except (TimeoutError, BlockingIOError, ssl.SSLWantWriteError):
            raise Pyro5.errors.TimeoutError("sending: timeout") from None
        except OSError as exc:
            raise Pyro5.errors.ConnectionClosedError(f"sending: connection lost: {exc}") from None

    def read_header(self) -> bytes:
        """The next 40-byte message header, refused before its payload is read if the message is too
        large or not serpent (a non-Pyro header is left for the caller to reject)."""
        header = self._read(_HEADER_START + _HEADER_REST)
        if header[:4] == b"PYRO":
            msg_type, serializer_id = header[6], header[7]
            data_size, ann_size = struct.unpack_from("!II", header, 12)
            if data_size + ann_size > self.max_size:
                raise Pyro5.errors.MessageTooLargeError(
                    f"incoming message of {data_size + ann_size:,} bytes exceeds the limit of "
                    f"{self.max_size:,} (max_message_size)")
            if serializer_id != _SERPENT_ID and msg_type != protocol.MSG_PING:
                raise Pyro5.errors.ProtocolError(f"serializer id {serializer_id} refused: only serpent is accepted")
        return header

    def recv(self, size: int) -> bytes:
        # Pyro5's recv_stub reads 6 header bytes, the other 34, then the payload: we read all 40 at once
        if self._state == 0 and size == _HEADER_START:
            header = self.read_header()
            self._rest = header[_HEADER_START:]
            self._state = 1
            return header[:_HEADER_START]  # Pyro5 validates the tag and version itself
        if self._state == 1 and size == _HEADER_REST:
            self._state = 2
            return self._rest
        self._state = 0
        if size > self.max_size:
            raise Pyro5.errors.MessageTooLargeError(
                f"incoming chunk of {size:,} bytes exceeds the limit of {self.max_size:,}")
        return self._read(size) if size else b""

    def _read(self, size: int) -> bytes:
        """Exactly ``size`` bytes (timeouts and errors as Pyro5's CommunicationErrors). Small reads take
        whatever has arrived (up to 64 KiB) and keep the rest, so a reply's header and payload usually
        cost one system call together."""
        buf = self._buf
        if len(buf) >= size:
            if len(buf) == size:
                self._buf = b""
                return buf
            self._buf = buf[size:]
            return buf[:size]
        sock = self.sock
        if sock.gettimeout() is not None:
            self._buf = b""
            return buf + bytes(socketutil.receive_data(sock, size - len(buf)))
        try:
            need = size - len(buf)
            if need <= _CHUNK:
                parts = [buf] if buf else []
                have = len(buf)
                while have < size:
                    chunk = sock.recv(_CHUNK)
                    if not chunk:
                        raise Pyro5.errors.ConnectionClosedError("receiving: connection closed")
                    parts.append(chunk)
                    have += len(chunk)
                data = parts[0] if len(parts) == 1 else b"".join(parts)
                self._buf = data[size:] if have > size else b""
                return data[:size] if have > size else data
            self._buf = b""
            data = b"" if self._tls else sock.recv(need, _WAITALL)
            if len(data) == need:
                return buf + data if buf else data
            more = bytearray(buf)
            more += data
            while len(more) < size:
                chunk = sock.recv(min(size - len(more), 1 << 20))
                if not chunk:
                    raise Pyro5.errors.ConnectionClosedError("receiving: connection closed")
                more += chunk
            return bytes(more)
        except (TimeoutError, BlockingIOError, ssl.SSLWantReadError):
            raise Pyro5.errors.TimeoutError("receiving: timeout") from None
        except OSError as exc:
            raise Pyro5.errors.ConnectionClosedError(f"receiving: connection lost: {exc}") from None

    def idle_and_alive(self) -> bool:
        """For a connection at rest: nothing may be waiting to be read, so readable means closed, or the
        server's notice that it is draining (then ``draining`` is set)."""
        if self._buf:
            self.draining = _is_notice(self._buf)
            return False  # else bytes nobody asked for: the stream is out of step
        poller = self.poller
        if poller is None:
            poller = self.poller = select.poll()
            poller.register(self.sock.fileno(), select.POLLIN)
        if not poller.poll(0):
            return True
        if not self._tls:
            try:
                self.draining = _is_notice(self.sock.recv(_NOTICE_SIZE, socket.MSG_PEEK | socket.MSG_DONTWAIT))
            except OSError:
                pass
        return False


_NOTICE_SIZE = wire_protocol.HEADER_SIZE


def _is_notice(data: bytes) -> bool:
    return len(data) >= _NOTICE_SIZE and data[:4] == b"PYRO" and data[6] == wire_protocol.MSG_NOTICE


def limit_connection(conn: socketutil.SocketConnection, max_size: int) -> LimitedConnection:
    """Turn an existing Pyro5 connection into a LimitedConnection (in place)."""
    conn.__class__ = LimitedConnection
    conn.max_size = max_size  # type: ignore[attr-defined]
    conn._tls = isinstance(conn.sock, ssl.SSLSocket)  # type: ignore[attr-defined]
    return conn  # type: ignore[return-value]



_HEADER = wire_protocol.HEADER
_NO_CORRELATION = b"\0" * 16


def invoke(conn: LimitedConnection, method: str, args: Any, kwargs: Any, flags: int = 0,
           annotations: bytes = b"") -> Any:
    """One Pyro5 call on ``conn`` (what ``Proxy._pyroInvoke`` does, without its per-call overhead).

    Speaks Pyro5's protocol unchanged: a stock Pyro5 daemon serves it. With ``FLAGS_BATCH`` ``args`` is
    the list of ``(method, args, kwargs)`` calls. Raises the remote exception (with ``_pyroTraceback``),
    ``MessageTooLargeError`` for a request or reply over a ``max_message_size`` (ours or the worker's), or a
    Pyro5 CommunicationError, after which the connection must be closed (its state is unknown). After a
    MessageTooLargeError ``conn.broken`` says whether the connection must be closed too. ``annotations``
    are packed annotation chunks (``protocol.pack_annotations``), e.g. the call context's.
    """
    data = SERIALIZER.dumpsCall(conn.objectId, method, args, kwargs)
    seq = conn.seq = (conn.seq + 1) & 0xFFFF
    try:
        conn.send(_HEADER.pack(b"PYRO", protocol.PROTOCOL_VERSION, protocol.MSG_INVOKE, _SERPENT_ID, flags, seq,
                               len(data), len(annotations), _NO_CORRELATION, 0, wire_protocol.MAGIC)
                  + annotations + data)
    except Pyro5.errors.ConnectionClosedError:
        # a server that refuses an oversized request says why, then drops the connection, which can cut
        # our send short: its reason may be waiting to be read
        refusal = _refusal(conn)
        if refusal is not None:
            raise refusal from None
        raise
    if flags & protocol.FLAGS_ONEWAY:
        return None
    try:
        header = conn.read_header()
        while header[6] == wire_protocol.MSG_NOTICE and header[:4] == b"PYRO":
            # the server is draining: it still answers this request (or refuses it, unrun), then nothing
            # more is to be sent on this connection
            conn.draining = True
            size = struct.unpack_from("!II", header, 12)
            if size[0] + size[1]:
                conn._read(size[0] + size[1])
            header = conn.read_header()
    except Pyro5.errors.MessageTooLargeError as exc:
        conn.broken = True  # the payload was never read
        raise MessageTooLargeError(f"{method}: the reply is too large: {exc}; the call ran, its result is lost") \
            from None
    tag, version, msg_type, serializer_id, rflags, rseq, data_size, ann_size, _corr, _res, magic = \
        _HEADER.unpack(header)
    if tag != b"PYRO" or version != protocol.PROTOCOL_VERSION or magic != wire_protocol.MAGIC:
        raise Pyro5.errors.ProtocolError("invalid message or protocol version in reply")
    if msg_type != protocol.MSG_RESULT or serializer_id != _SERPENT_ID:
        raise Pyro5.errors.ProtocolError(f"unexpected reply: type {msg_type}, seq {rseq} (wanted {seq}), "
                                         f"serializer {serializer_id}")
    payload = conn._read(ann_size + data_size) if ann_size + data_size else b""
    body = payload[ann_size:] if ann_size else payload
    if rflags & protocol.FLAGS_COMPRESSED:
        try:
            body = wire_protocol.decompress(body, conn.max_size)
        except wire_protocol.ProtocolViolation as exc:
            raise Pyro5.errors.ProtocolError(f"bad reply: {exc}") from None
    if rflags & protocol.FLAGS_ITEMSTREAMRESULT:
        raise TypeError(f"{method} streams its results: call it with stream() or astream()")
    if rseq != seq and not (rflags & protocol.FLAGS_EXCEPTION and not rseq):
        raise Pyro5.errors.ProtocolError(f"unexpected reply: type {msg_type}, seq {rseq} (wanted {seq}), "
                                         f"serializer {serializer_id}")
    result = SERIALIZER.loads(body)
    if rflags & protocol.FLAGS_EXCEPTION:
        if not rseq and remote_traceback(result) is None:
            # sequence 0 and no remote traceback: the server's account of why it drops the connection
            refusal = _as_refusal(conn, result)
            if refusal is not None:
                raise refusal
        if rseq != seq:
            raise Pyro5.errors.ProtocolError(f"unexpected reply: type {msg_type}, seq {rseq} (wanted {seq}), "
                                             f"serializer {serializer_id}")
        if isinstance(result, Pyro5.errors.MessageTooLargeError):
            # the worker's reply would exceed its own limit (the call ran): pyrorpc's type, remote traceback kept
            mapped = MessageTooLargeError(*result.args)
            set_remote_traceback(mapped, remote_traceback(result) or [])
            raise mapped
        raise result
    return result


def _refusal(conn: LimitedConnection) -> BaseException | None:
    """After a send cut short: the server's refusal frame, if one arrived before it dropped us."""
    conn.broken = True
    try:
        conn.set_timeout(0.5)  # the peer has closed: what it sent is here already, or never comes
        header = conn.read_header()
        tag, _v, msg_type, serializer_id, rflags, rseq, data_size, ann_size, _c, _r, _m = _HEADER.unpack(header)
        if tag != b"PYRO" or msg_type != protocol.MSG_RESULT or rseq or not rflags & protocol.FLAGS_EXCEPTION \
                or serializer_id != _SERPENT_ID:
            return None
        exc = SERIALIZER.loads(conn._read(ann_size + data_size)[ann_size:])
    except Exception:
        return None
    return _as_refusal(conn, exc)


def _as_refusal(conn: LimitedConnection, exc: Any) -> BaseException | None:
    """The error a server sends (as Pyro5 does: a ProtocolError, sequence 0) before it drops a connection;
    an oversized request becomes MessageTooLargeError. None if ``exc`` is something else."""
    if not isinstance(exc, Pyro5.errors.ProtocolError):
        return None
    conn.broken = True
    text = str(exc)
    if "max_message_size" in text or "message size" in text:
        return MessageTooLargeError(f"the worker refused the request: {text}")
    return Pyro5.errors.ProtocolError(f"the worker dropped the connection: {text}")

"""A connection of the server core: its socket, the bytes of the frame now arriving, its state, and the
constants and small socket helpers the I/O thread and the call threads share (no threads here)."""

from __future__ import annotations

import resource
import select
import socket
import ssl
import struct
import time
from typing import Any

from .protocol import HEADER_SIZE, parse_header

__all__ = ["BUSY", "CLOSED", "HANDSHAKE", "IDLE", "PENDING", "REFUSED", "WRITING", "Connection"]

_RECV = 256 * 1024
_LINGER = 0.005  # seconds a call thread waits for the next request before handing the connection back
_REFUSED_LINGER = 1.0  # seconds a refused socket is kept to let the refusal reach the peer
_EPOLLIN = select.EPOLLIN
_EPOLLOUT = select.EPOLLOUT
_ONESHOT = select.EPOLLONESHOT
_DONTWAIT = socket.MSG_DONTWAIT
_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT
_NOT_READY = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
_HANDSHAKE_MAX = 16 * 1024  # bytes a connect message may have (a token and an object id)
_TLS_CHUNK = 1 << 20  # bytes per TLS send: a retry after SSLWantWrite must repeat the same length
_COMPACT = 1 << 20  # consumed bytes at the front of the read buffer worth dropping (when fewer remain)
PENDING = 2  # a reply whose rest the I/O thread writes (the call stays in flight until then)

# connection states
HANDSHAKE, IDLE, BUSY, WRITING, REFUSED, CLOSED = "handshake", "idle", "busy", "writing", "refused", "closed"


def _raise_fd_limit() -> None:
    """A server of thousands of connections needs as many descriptors as the hard limit allows."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))
    except (ValueError, OSError):  # pragma: no cover - not permitted here
        pass


class Connection:
    """One client connection: its socket, what has arrived of the next frame, and per-connection state."""

    __slots__ = ("sock", "fd", "peer", "tls", "state", "chunks", "size", "header", "deadline", "last_active",
                 "started", "instances", "tls_done", "out", "out_failed", "notice", "noticed", "mux", "wlock", "wq",
                 "tasks", "calls", "paused", "wrote_at", "arrived", "pos")

    def __init__(self, sock: socket.socket, peer: Any, tls: bool) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.tls = tls
        self.state = HANDSHAKE
        self.chunks: list[bytes] = []
        self.size = 0  # bytes arrived and not yet taken as frames
        self.pos = 0  # bytes of chunks[0] taken as frames already
        self.header: Any = None
        self.deadline = 0.0
        self.last_active = time.monotonic()
        self.started = 0.0  # when the first bytes of the frame now arriving came
        self.arrived = 0.0  # when the first bytes of the last whole frame came (the call context's clock)
        self.instances: dict[type, Any] | None = None  # instance_mode="session"
        self.tls_done = not tls
        self.out: memoryview | None = None  # the rest of a reply the I/O thread is writing (WRITING)
        self.out_failed: bool | None = False  # that reply's call failed? (None: no call, nothing to count)
        self.notice = False  # a pyrorpc peer: it understands MSG_NOTICE (asked in its handshake)
        self.noticed = False  # it was told we are draining
        # a multiplexed connection (see mux.py): requests run concurrently, any thread writes under wlock
        self.mux = False
        self.wlock: Any = None
        self.wq: Any = None  # bytes waiting to be written, oldest first (the I/O thread finishes them)
        self.tasks: dict[int, Any] = {}  # sequence -> what runs for it (async task, stream), to cancel
        self.calls = 0  # requests running or queued on it
        self.paused = False  # not reading: too many requests outstanding
        self.wrote_at = 0.0  # monotonic time its queued output last moved

    def __repr__(self) -> str:
        return f"<Connection {self.peer} {self.state}>"

    # frames -----------------------------------------------------------------------------------
    # What has arrived is ``chunks`` (as read); its first ``pos`` bytes are frames taken already. Frames are
    # parsed at an offset into the first chunk, which is joined with the chunks after it only when the
    # next frame runs past its end: a burst of N frames costs O(its bytes), not N copies of the rest.
    def feed(self, data: bytes) -> None:
        if not self.size:
            self.started = time.monotonic()
        self.chunks.append(data)
        self.size += len(data)

    def frame_ready(self, max_size: int) -> bool:
        """Whether the next frame has arrived whole (its header is parsed and kept in ``header``).

        Raises:
            ProtocolViolation: the bytes are not a Pyro5 frame, or it is too large.
        """
        header = self.header
        if header is None:
            if self.size < HEADER_SIZE:
                return False
            buf = self._head(HEADER_SIZE)  # (may move pos)
            header = self.header = parse_header(buf, max_size, self.pos)
        return self.size >= header.total

    def next_frame(self, max_size: int) -> tuple[Any, bytes] | None:
        """The next whole frame ``(header, payload)`` if it has arrived, else None.

        Raises:
            ProtocolViolation: the bytes are not a Pyro5 frame, or it is too large.
        """
        header = self.header
        if header is None:
            if self.size < HEADER_SIZE:
                return None
            buf = self._head(HEADER_SIZE)  # (may move pos)
            header = self.header = parse_header(buf, max_size, self.pos)
        total = header.total
        size = self.size
        if size < total:
            return None
        self.arrived = self.started
        buf = self._head(total)
        pos = self.pos
        if size == total:  # the usual case: exactly one frame arrived
            payload = buf[pos + HEADER_SIZE:]
            self.chunks = []
            self.size = 0
            self.pos = 0
        else:
            end = pos + total
            payload = buf[pos + HEADER_SIZE:end]
            size -= total
            self.size = size
            if end >= _COMPACT and size < end and len(self.chunks) == 1:
                # drop a large consumed prefix (copying less than was consumed since the last time)
                self.chunks = [buf[end:]]
                self.pos = 0
            else:
                self.pos = end
            self.started = time.monotonic()
        self.header = None
        return header, payload

    def _head(self, n: int) -> bytes:
        """The first chunk, holding at least ``n`` unconsumed bytes from ``pos`` (there must be as many)."""
        chunks = self.chunks
        first = chunks[0]
        pos = self.pos
        if len(first) - pos >= n:
            return first
        # the frame runs past the first chunk: join its unconsumed rest with the chunks after it (the rest of
        # the first chunk is less than a frame, so each byte is copied about once)
        buf = b"".join([memoryview(first)[pos:], *chunks[1:]]) if pos else b"".join(chunks)
        self.chunks = [buf]
        self.pos = 0
        return buf

    @property
    def pending(self) -> bool:
        return self.size > 0

    def peer_closed(self) -> bool:
        """Whether the peer closed a connection a call thread holds while it waits for a coroutine.

        A stock client sends nothing while it waits for a reply, so end-of-file is all there is to see. Bytes
        that did arrive stay for the thread's next read (a TLS peer's are read and kept in the buffer). A
        multiplexed connection is the I/O thread's to read: only its state tells.
        """
        if self.state == CLOSED:
            return True
        if self.mux:
            return False
        sock = self.sock
        try:
            if not self.tls:
                return not sock.recv(1, _PEEK)
            if not _readable(sock, 0):
                return False
            data = sock.recv(_RECV)
        except _NOT_READY:
            return False
        except (OSError, ssl.SSLError, ValueError):
            return True
        if not data:
            return True
        self.feed(data)
        return False


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1_000_000))


def _readable(sock: Any, timeout: float) -> bool:
    if sock.pending():
        return True
    r, _w, _x = select.select([sock], [], [], timeout)
    return bool(r)

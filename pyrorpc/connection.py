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
_NOT_READY = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
_HANDSHAKE_MAX = 16 * 1024  # bytes a connect message may have (a token and an object id)
_TLS_CHUNK = 1 << 20  # bytes per TLS send: a retry after SSLWantWrite must repeat the same length
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
                 "tasks", "calls", "paused", "wrote_at", "arrived")

    def __init__(self, sock: socket.socket, peer: Any, tls: bool) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.tls = tls
        self.state = HANDSHAKE
        self.chunks: list[bytes] = []
        self.size = 0
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
    def feed(self, data: bytes) -> None:
        if not self.size:
            self.started = time.monotonic()
        self.chunks.append(data)
        self.size += len(data)

    def next_frame(self, max_size: int) -> tuple[Any, bytes] | None:
        """The next whole frame ``(header, payload)`` if it has arrived, else None.

        Raises:
            ProtocolViolation: the bytes are not a Pyro5 frame, or it is too large.
        """
        if self.header is None:
            if self.size < HEADER_SIZE:
                return None
            buf = self._joined()
            self.header = parse_header(buf, max_size)
        header = self.header
        total = header.total
        if self.size < total:
            return None
        self.arrived = self.started
        buf = self._joined()
        if self.size == total:
            payload = buf[HEADER_SIZE:]
            self.chunks = []
            self.size = 0
        else:
            payload = buf[HEADER_SIZE:total]
            rest = buf[total:]
            self.chunks = [rest]
            self.size = len(rest)
            self.started = time.monotonic()
        self.header = None
        return header, payload

    def _joined(self) -> bytes:
        chunks = self.chunks
        if len(chunks) == 1:
            return chunks[0]
        buf = b"".join(chunks)
        self.chunks = [buf]
        return buf

    @property
    def pending(self) -> bool:
        return self.size > 0


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1_000_000))


def _readable(sock: Any, timeout: float) -> bool:
    if sock.pending():
        return True
    r, _w, _x = select.select([sock], [], [], timeout)
    return bool(r)

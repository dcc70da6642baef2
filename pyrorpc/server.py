"""The server core: serves Python objects over Pyro5's wire protocol with an epoll loop and a call pool.

Workers, the name server and client callback objects all run on it. One I/O thread owns the listening
socket and every connection that is not in the middle of a call: it accepts, runs TLS and Pyro5
handshakes, and buffers partial frames, so a silent or slow peer costs a few hundred bytes and never a
thread. A complete request hands its connection to the call pool (at most ``threads`` threads): the
thread runs the call, writes the reply and keeps serving that connection while requests keep coming
(waiting a few milliseconds for the next one, so a busy connection costs no hand-off per call), then gives
it back to the I/O thread. Connections and calls are separate limits: ``max_connections`` sockets,
``threads`` calls running at once.

A call is in flight from the moment its request is read until its reply is written. ``drain()`` refuses
new requests with ``WorkerDrainingError`` (the caller resends them elsewhere) and waits for the calls in
flight, replies included.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import resource
import select
import socket
import ssl
import struct
import threading
import time
import types
import uuid
from collections.abc import Callable
from typing import Any

import Pyro5.errors
from Pyro5.callcontext import current_context

from . import compat
from .errors import AuthenticationError, WorkerDrainingError, make_portable
from .protocol import (
    FLAGS_BATCH,
    FLAGS_COMPRESSED,
    FLAGS_CORR_ID,
    FLAGS_EXCEPTION,
    FLAGS_ONEWAY,
    HEADER_SIZE,
    MSG_CONNECT,
    MSG_CONNECTFAIL,
    MSG_CONNECTOK,
    MSG_INVOKE,
    MSG_PING,
    MSG_RESULT,
    SERPENT_ID,
    ProtocolViolation,
    decompress,
    pack,
    parse_annotations,
    parse_header,
)
from .wire import SERIALIZER, loads

__all__ = ["DAEMON_NAME", "Connection", "DaemonObject", "Server", "ServerStats"]

log = logging.getLogger("pyrorpc.server")

DAEMON_NAME = "Pyro.Daemon"
INSTANCE_MODES = ("single", "session", "percall")
_RECV = 256 * 1024
_LINGER = 0.005  # seconds a call thread waits for the next request before handing the connection back
_REFUSED_LINGER = 1.0  # seconds a refused socket is kept to let the refusal reach the peer
_EPOLLIN = select.EPOLLIN
_EPOLLOUT = select.EPOLLOUT
_ONESHOT = select.EPOLLONESHOT
_DONTWAIT = socket.MSG_DONTWAIT
_NOT_READY = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
_NO_CORR = b"\0" * 16
_PONG = b"pong"

# connection states
HANDSHAKE, IDLE, BUSY, WRITING, REFUSED, CLOSED = "handshake", "idle", "busy", "writing", "refused", "closed"
_PENDING = 2  # _reply: the rest of the reply is left to the I/O thread
_HANDSHAKE_MAX = 16 * 1024  # bytes a connect message may have (a token and an object id)
_BUDGET = 32  # requests a call thread serves on one connection before it lets others go first
_THREAD_IDLE = 30.0  # seconds an idle call thread waits for work before it exits (one always stays)


def _raise_fd_limit() -> None:
    """A server of thousands of connections needs as many descriptors as the hard limit allows."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 65536, hard))
    except (ValueError, OSError):  # pragma: no cover - not permitted here
        pass


class ServerStats:
    """Calls in flight (request read .. reply written), completed and failed; refuses calls once draining."""

    __slots__ = ("_lock", "_idle", "in_flight", "calls", "errors", "draining")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self.in_flight = 0
        self.calls = 0
        self.errors = 0
        self.draining = False

    def enter(self) -> bool:
        """Count a call in; False once draining (the call must be refused)."""
        with self._lock:
            if self.draining:
                return False
            self.in_flight += 1
            return True

    def leave(self, failed: bool) -> None:
        with self._lock:
            self.in_flight -= 1
            self.calls += 1
            if failed:
                self.errors += 1
            if self.draining and not self.in_flight:
                self._idle.notify_all()

    def add(self, calls: int, errors: int) -> None:
        """Count calls that ran inside one request (a batch) besides the request itself."""
        with self._lock:
            self.calls += calls
            self.errors += errors

    def drain(self, timeout: float) -> bool:
        """Refuse new calls and wait until none is in flight; False if ``timeout`` ran out first."""
        with self._idle:
            self.draining = True
            return self._idle.wait_for(lambda: self.in_flight == 0, timeout)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"in_flight": self.in_flight, "calls": self.calls, "errors": self.errors}


class Connection:
    """One client connection: its socket, what has arrived of the next frame, and per-connection state."""

    __slots__ = ("sock", "fd", "peer", "tls", "state", "chunks", "size", "header", "deadline", "last_active",
                 "started", "instances", "tls_done", "out", "out_failed")

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
        self.instances: dict[type, Any] | None = None  # instance_mode="session"
        self.tls_done = not tls
        self.out: memoryview | None = None  # the rest of a reply the I/O thread is writing (WRITING)
        self.out_failed: bool | None = False  # that reply's call failed? (None: no call, nothing to count)

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


class DaemonObject:
    """The ``Pyro.Daemon`` object every Pyro5 daemon serves: what stock clients ask for metadata and pings."""

    def __init__(self, server: "Server") -> None:
        self._server = server

    def registered(self) -> list[str]:
        """Names of every object served here."""
        return list(self._server.objects)

    def ping(self) -> None:
        """Does nothing: for testing the connection."""

    def info(self) -> str:
        s = self._server
        return (f"{DAEMON_NAME} bound on {s.location}, NAT None, {len(s.objects)} objects registered. "
                f"Servertype: pyrorpc.server (epoll, {s.threads} call threads)")

    def get_metadata(self, objectId: str) -> dict[str, Any]:  # noqa: N803 - Pyro5's name
        """Exposed methods, oneway methods and attributes of an object (plus pyrorpc's own extras)."""
        return self._server.metadata(objectId)

    def get_next_stream_item(self, streamId: str) -> Any:  # noqa: N803 - Pyro5's name
        raise Pyro5.errors.PyroError("item stream terminated")

    def close_stream(self, streamId: str) -> None:  # noqa: N803 - Pyro5's name
        pass


for _name in ("registered", "ping", "info", "get_metadata", "get_next_stream_item", "close_stream"):
    setattr(getattr(DaemonObject, _name), compat.EXPOSED_ATTR, True)


class _Target:
    """An object served under an id: an instance, or a class instantiated per session or per call."""

    __slots__ = ("obj", "cls", "mode", "methods", "oneway", "attrs", "extra")

    def __init__(self, obj: Any, mode: str, only_exposed: bool, extra: dict[str, Any] | None) -> None:
        self.obj = obj
        self.cls = obj if isinstance(obj, type) else type(obj)
        self.mode = mode
        members = compat.exposed_members(self.cls, only_exposed)
        self.methods = members["methods"]
        self.oneway = members["oneway"]
        self.attrs = members["attrs"]
        self.extra = extra


_PLAIN = frozenset((type(None), int, str, bytes, float, bool, tuple, list, dict, set, frozenset))


def _is_stream(value: Any) -> bool:
    if type(value) in _PLAIN:
        return False
    return isinstance(value, (types.GeneratorType, types.AsyncGeneratorType)) or (
        hasattr(value, "__next__") and hasattr(value, "__iter__") and not isinstance(value, (str, bytes)))


class Server:
    """Serves registered objects on ``host:port`` over Pyro5's protocol (see the module docstring).

    Args:
        host, port: where to listen (port 0 = any free port); bound in the constructor.
        threads: calls running at once (sync and oneway).
        max_connections: open client connections at once; the next is refused with a clear error.
        idle_timeout: seconds a connection may sit idle before the server closes it (clients reconnect).
        handshake_timeout: seconds a new connection has to complete its TLS and Pyro5 handshakes, and a
            started request to arrive whole.
        max_message_size: largest request accepted (checked on the header, before the payload is read).
        ssl_context: a server-side TLS context, or None.
        verify: called with the client's handshake data; returns the handshake reply or raises
            AuthenticationError (the connection is refused and logged).
        send_timeout: seconds a reply may take to be written before the connection is dropped.
        name: for log lines and refusals.
    """

    def __init__(self, host: str, port: int, *, threads: int = 64, max_connections: int = 4096,
                 idle_timeout: float = 600.0, handshake_timeout: float = 5.0,
                 max_message_size: int = 64 * 1024 * 1024, ssl_context: ssl.SSLContext | None = None,
                 verify: Callable[[Any], Any] | None = None, send_timeout: float = 30.0,
                 name: str = "server", oneway_queue: int | None = None, stats: ServerStats | None = None) -> None:
        self.threads = threads
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout
        self.max_message_size = max_message_size
        self.ssl_context = ssl_context
        self.verify = verify
        self.send_timeout = send_timeout
        self.name = name
        self.stats = stats if stats is not None else ServerStats()
        self.objects: dict[str, _Target] = {}
        self.metadata_extra: dict[str, Any] | None = None  # sent to pyrorpc clients as meta["pyrorpc"]
        _raise_fd_limit()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(1024)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.sock: socket.socket | None = sock
        bound = sock.getsockname()
        self.host, self.port = bound[0], bound[1]
        self.location = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        self.register(DaemonObject(self), DAEMON_NAME)
        self.connections: dict[int, Connection] = {}  # fd -> connection, every state
        self._conn_lock = threading.Lock()
        self._refused = 0  # of self.connections, those only kept to deliver a refusal
        # connections still in their handshake, oldest first: at the limit the oldest is evicted, so silent
        # or slow peers cannot hold the slots that clients completing a handshake in a millisecond need
        self._handshaking: dict[int, Connection] = {}
        self.max_handshaking = max(16, min(1024, max_connections // 4))
        self._refused_oneways = 0
        self._last_refusal = 0.0  # monotonic time of the last request refused while draining
        self._epoll = select.epoll()
        self._epoll.register(sock.fileno(), _EPOLLIN)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._epoll.register(self._wake_r, _EPOLLIN)
        self._io_thread: threading.Thread | None = None
        self._running = False
        self._accepting = True
        # the call pool
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._pool_lock = threading.Lock()
        self._workers = 0
        self._idle_workers = 0
        self._queued = 0
        self._oneway_limit = oneway_queue if oneway_queue is not None else 4 * threads
        self._closed = False
        self._stuck_logged = False

    def __repr__(self) -> str:
        return f"<pyrorpc.Server {self.name} {self.location}>"

    # objects ------------------------------------------------------------------------------------
    def register(self, obj: Any, object_id: str | None = None, *, instance_mode: str = "single",
                 only_exposed: bool = True, extra: dict[str, Any] | None = None) -> str:
        """Serve ``obj`` (an instance, or a class with ``instance_mode`` ``session``/``percall``) under
        ``object_id`` (default: a unique one); returns its ``PYRO:`` URI."""
        if instance_mode not in INSTANCE_MODES:
            raise ValueError(f"`instance_mode` must be one of {', '.join(INSTANCE_MODES)}, got {instance_mode!r}")
        if instance_mode != "single" and not isinstance(obj, type):
            raise ValueError("instance_mode session/percall needs a class")
        if instance_mode == "single" and isinstance(obj, type):
            obj = obj()
        object_id = object_id or f"obj_{uuid.uuid4().hex}"
        if object_id in self.objects:
            raise ValueError(f"object id {object_id!r} is already registered")
        self.objects[object_id] = _Target(obj, instance_mode, only_exposed, extra)
        return self.uri_for(object_id)

    def unregister(self, object_id: str) -> None:
        if object_id != DAEMON_NAME:
            self.objects.pop(object_id, None)

    def uri_for(self, object_id: str) -> str:
        return f"PYRO:{object_id}@{self.location}"

    def metadata(self, object_id: str) -> dict[str, Any]:
        target = self.objects.get(object_id)
        if target is None:
            raise Pyro5.errors.DaemonError("unknown object")
        meta: dict[str, Any] = {"methods": set(target.methods), "oneway": set(target.oneway),
                                "attrs": set(target.attrs)}
        extra = target.extra or self.metadata_extra
        if extra is not None:
            meta["pyrorpc"] = dict(extra, idle_timeout=self.idle_timeout)
        return meta

    # lifecycle ----------------------------------------------------------------------------------
    def start(self) -> "Server":
        """Serve from a background I/O thread; returns at once (the socket is bound already)."""
        if self._io_thread is not None:
            raise RuntimeError("server already started")
        self._running = True
        self._io_thread = threading.Thread(target=self._io_loop, name=f"{self.name}-io", daemon=True)
        self._io_thread.start()
        with self._pool_lock:  # one call thread ready before the first request
            self._workers += 1
        threading.Thread(target=self._worker, name=f"{self.name}-call-1", daemon=True).start()
        return self

    def stop_accepting(self) -> None:
        """Close the listening socket; established connections stay open."""
        self._accepting = False
        self._wake()

    def drain(self, timeout: float) -> bool:
        """Refuse new requests (WorkerDrainingError) and wait for the calls in flight, replies included.

        Then, while requests still come in (callers that have not heard yet), keep refusing them until
        none came for 0.1 s (at most one second more): a request sent just as the connections close would
        be lost to its caller, one that is refused is resent elsewhere."""
        drained = self.stats.drain(timeout)
        settle_until = time.monotonic() + 1.0
        while True:
            quiet = time.monotonic() - self._last_refusal
            if quiet >= 0.1 or time.monotonic() >= settle_until:
                return drained
            time.sleep(0.1 - quiet)

    def close(self) -> None:
        """Close every connection and stop the threads; calls still running are abandoned (and logged)."""
        if self._closed:
            return
        self._closed = True
        self._accepting = False
        self._running = False
        self._wake()
        io = self._io_thread
        if io is not None and io is not threading.current_thread():
            io.join(2)
        with self._conn_lock:
            conns, self.connections = list(self.connections.values()), {}
            self._refused = 0
            self._handshaking = {}
        for conn in conns:
            self._shut(conn)
        with self._pool_lock:
            workers = self._workers
        for _ in range(workers):
            self._jobs.put(None)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            self._epoll.close()
        except OSError:
            pass
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close()
        busy = self.stats.in_flight
        if busy:
            log.warning("%s: closed with %d calls still running; they are abandoned", self.name, busy)
        if self._refused_oneways:
            log.warning("%s: refused %d oneway calls while draining (oneway is at-most-once)", self.name,
                        self._refused_oneways)

    def __enter__(self) -> "Server":
        if self._io_thread is None:
            self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def connection_count(self) -> int:
        """Client connections open now (handshaking, idle or in a call)."""
        return len(self.connections) - self._refused

    # the I/O thread -----------------------------------------------------------------------------
    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _io_loop(self) -> None:
        epoll = self._epoll
        listen_fd = self.sock.fileno() if self.sock is not None else -1
        next_sweep = time.monotonic() + 0.25
        try:
            while self._running:
                try:
                    events = epoll.poll(0.25)
                except InterruptedError:
                    continue
                except (OSError, ValueError):
                    break
                for fd, ev in events:
                    if fd == listen_fd:
                        self._accept()
                    elif fd == self._wake_r:
                        try:
                            os.read(self._wake_r, 4096)
                        except OSError:
                            pass
                    else:
                        conn = self.connections.get(fd)
                        if conn is not None:
                            self._on_event(conn, ev)
                if not self._accepting and self.sock is not None:
                    self._close_listener()
                    listen_fd = -1
                now = time.monotonic()
                if now >= next_sweep:
                    self._sweep(now)
                    next_sweep = now + 0.25
        except Exception:  # pragma: no cover - a bug here must be visible, not a silent dead server
            log.exception("%s: I/O loop crashed", self.name)

    def _close_listener(self) -> None:
        sock, self.sock = self.sock, None
        if sock is None:
            return
        try:
            self._epoll.unregister(sock.fileno())
        except (OSError, ValueError):
            pass
        sock.close()

    def _accept(self) -> None:
        sock = self.sock
        if sock is None or not self._accepting:
            return
        for _ in range(64):
            try:
                client, addr = sock.accept()
            except _NOT_READY:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("%s: cannot accept: %s", self.name, exc)
                return
            self._admit(client, addr)

    def _admit(self, client: socket.socket, addr: Any) -> None:
        try:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client.setblocking(True)
            # call threads read with a short kernel timeout (the linger) and write with a long one; the
            # I/O thread only ever reads with MSG_DONTWAIT
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(_LINGER))
            client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(self.send_timeout))
        except OSError:
            client.close()
            return
        if len(self._handshaking) >= self.max_handshaking \
                or (len(self.connections) - self._refused >= self.max_connections and self._handshaking):
            # evict the oldest connection still handshaking rather than refuse one that may be a client
            oldest = next(iter(self._handshaking.values()))
            log.info("%s: closed %s: still handshaking while others wait", self.name, oldest.peer)
            self._drop(oldest)
        if len(self.connections) - self._refused >= self.max_connections:
            self._refuse(client, addr, f"{self.name} at capacity: {self.max_connections} connections "
                                       "(max_connections)")
            return
        tls = self.ssl_context is not None
        if tls:
            try:
                client.setblocking(False)
                client = self.ssl_context.wrap_socket(client, server_side=True,  # type: ignore[union-attr]
                                                      do_handshake_on_connect=False)
            except (OSError, ssl.SSLError):
                client.close()
                return
        conn = Connection(client, addr, tls)
        conn.deadline = time.monotonic() + self.handshake_timeout
        with self._conn_lock:
            self.connections[conn.fd] = conn
            self._handshaking[conn.fd] = conn
        self._epoll.register(conn.fd, _EPOLLIN | _ONESHOT)
        if tls:
            self._tls_step(conn)

    def _refuse(self, client: socket.socket, addr: Any, reason: str) -> None:
        """Answer a connection we will not serve with CONNECTFAIL at once, without reading its handshake
        (the client reads our answer after sending its own). Kept a moment so the answer is not lost."""
        log.warning("%s: refused connection from %s: %s", self.name, addr, reason)
        try:
            if self.ssl_context is not None or self._refused > 1024:
                client.close()
                return
            client.send(pack(MSG_CONNECTFAIL, 0, 0, SERIALIZER.dumps(reason)), _DONTWAIT)
            client.shutdown(socket.SHUT_WR)
        except OSError:
            client.close()
            return
        conn = Connection(client, addr, False)
        conn.state = REFUSED
        conn.deadline = time.monotonic() + _REFUSED_LINGER
        with self._conn_lock:
            self.connections[conn.fd] = conn
            self._refused += 1
        self._epoll.register(conn.fd, _EPOLLIN | _ONESHOT)

    def _sweep(self, now: float) -> None:
        """Close connections past their deadline: unfinished handshakes and requests, idle ones."""
        idle_limit = now - self.idle_timeout
        expired = []
        for conn in list(self.connections.values()):
            state = conn.state
            if state == BUSY:
                continue
            if state in (HANDSHAKE, REFUSED, WRITING):
                if now >= conn.deadline:
                    expired.append(conn)
            elif conn.pending:
                if now - conn.started > self.handshake_timeout:
                    expired.append(conn)
            elif state == IDLE and conn.last_active < idle_limit:
                expired.append(conn)
        for conn in expired:
            if conn.state == WRITING:
                log.warning("%s: dropped %s: reply not taken within %gs", self.name, conn.peer, self.send_timeout)
            elif conn.state == HANDSHAKE:
                log.info("%s: closed %s: no handshake within %gs", self.name, conn.peer, self.handshake_timeout)
            elif conn.pending and conn.state == IDLE:
                log.info("%s: closed %s: request not complete within %gs", self.name, conn.peer,
                         self.handshake_timeout)
            self._drop(conn)

    def _on_event(self, conn: Connection, ev: int) -> None:
        state = conn.state
        if state == REFUSED:
            try:
                data = conn.sock.recv(4096, _DONTWAIT)
            except _NOT_READY:
                data = b"x"
            except OSError:
                data = b""
            if data:
                self._rearm(conn)
            else:
                self._drop(conn)
            return
        if not conn.tls_done:
            self._tls_step(conn)
            return
        if state == WRITING:
            self._write_more(conn)
            return
        # read what has arrived (never blocking)
        if not self._read_available(conn):
            self._drop(conn)
            return
        if state == HANDSHAKE:
            self._handshake(conn)
            return
        if state != IDLE:
            return
        try:
            frame_ready = conn.size >= HEADER_SIZE and self._frame_complete(conn)
        except ProtocolViolation as exc:
            self._violation(conn, exc)
            return
        if frame_ready:
            conn.state = BUSY
            self._dispatch(conn)
        else:
            self._rearm(conn)

    def _frame_complete(self, conn: Connection) -> bool:
        if conn.header is None:
            conn.header = parse_header(conn._joined(), self.max_message_size)
        return conn.size >= conn.header.total

    def _read_available(self, conn: Connection) -> bool:
        """Read what the socket holds without blocking; False on EOF or a socket error."""
        sock = conn.sock
        try:
            if conn.tls:
                while True:
                    try:
                        data = sock.recv(_RECV)
                    except _NOT_READY:
                        break
                    if not data:
                        return False
                    conn.feed(data)
            else:
                while True:
                    try:
                        data = sock.recv(_RECV, _DONTWAIT)
                    except _NOT_READY:
                        break
                    if not data:
                        return False
                    conn.feed(data)
                    if len(data) < _RECV:
                        break
        except (OSError, ssl.SSLError):
            return False
        if conn.size:
            conn.last_active = time.monotonic()
        return True

    def _rearm(self, conn: Connection, events: int = _EPOLLIN) -> None:
        try:
            self._epoll.modify(conn.fd, events | _ONESHOT)
        except (OSError, ValueError):
            self._drop(conn)

    def _tls_step(self, conn: Connection) -> None:
        try:
            conn.sock.do_handshake()  # type: ignore[attr-defined]
        except ssl.SSLWantReadError:
            self._rearm(conn, _EPOLLIN)
            return
        except ssl.SSLWantWriteError:
            self._rearm(conn, _EPOLLOUT)
            return
        except (ssl.SSLError, OSError) as exc:
            log.warning("%s: TLS handshake with %s failed: %s", self.name, conn.peer, exc)
            self._drop(conn)
            return
        conn.tls_done = True
        self._rearm(conn)

    def _violation(self, conn: Connection, exc: Exception) -> None:
        log.warning("%s: dropped %s: %s", self.name, conn.peer, exc)
        self._send_quietly(conn, pack(MSG_RESULT, FLAGS_EXCEPTION, 0,
                                      SERIALIZER.dumps(Pyro5.errors.ProtocolError(str(exc)))))
        self._drop(conn)

    def _send_quietly(self, conn: Connection, data: bytes) -> None:
        try:
            if conn.tls:
                conn.sock.send(data)
            else:
                conn.sock.send(data, _DONTWAIT)
        except (OSError, ssl.SSLError, ValueError):
            pass

    def _handshake(self, conn: Connection) -> None:
        try:
            frame = conn.next_frame(min(self.max_message_size, _HANDSHAKE_MAX))
        except ProtocolViolation as exc:
            self._violation(conn, exc)
            return
        if frame is None:
            self._rearm(conn)
            return
        header, payload = frame
        reason = None
        reply: Any = None
        if header.msg_type != MSG_CONNECT:
            reason = f"expected a connect message, got type {header.msg_type}"
        elif header.serializer_id != SERPENT_ID:
            reason = f"serializer id {header.serializer_id} refused: only serpent is accepted"
        else:
            try:
                data = loads(payload[header.ann_size:], fallback=False)  # bounded work before authentication
                if not isinstance(data, dict) or not isinstance(data.get("object"), str):
                    raise ValueError("malformed handshake")
                token = data.get("handshake")
                response = self.verify(token) if self.verify is not None else "hello"
                reply = {"handshake": response, "meta": self.metadata(data["object"])}
            except AuthenticationError as exc:
                reason = str(exc)
                log.warning("%s: refused connection from %s: %s", self.name, conn.peer, exc)
            except Exception as exc:
                reason = f"handshake failed: {exc}"
        if reason is not None:
            self._send_quietly(conn, pack(MSG_CONNECTFAIL, 0, header.seq, SERIALIZER.dumps(reason)))
            self._drop(conn)
            return
        try:
            data = SERIALIZER.dumps(reply)
        except Exception as exc:  # pragma: no cover - our own metadata always serializes
            log.error("%s: cannot encode handshake reply: %s", self.name, exc)
            self._drop(conn)
            return
        self._send_quietly(conn, pack(MSG_CONNECTOK, 0, header.seq, data))
        with self._conn_lock:
            self._handshaking.pop(conn.fd, None)
        conn.state = IDLE
        conn.last_active = time.monotonic()
        if conn.pending:  # a pipelining client sent its first request along
            self._on_event(conn, _EPOLLIN)
        else:
            self._rearm(conn)

    def _drop(self, conn: Connection) -> None:
        with self._conn_lock:
            if self.connections.pop(conn.fd, None) is conn and conn.state == REFUSED:
                self._refused -= 1
            if self._handshaking.get(conn.fd) is conn:
                del self._handshaking[conn.fd]
        if conn.state == WRITING and conn.out is not None:
            conn.out = None
            if conn.out_failed is not None:
                self.stats.leave(True)  # the call ran but its reply never got out
        self._shut(conn)

    def _shut(self, conn: Connection) -> None:
        if conn.state == CLOSED:
            return
        conn.state = CLOSED
        try:
            self._epoll.unregister(conn.fd)
        except (OSError, ValueError):
            pass
        try:
            conn.sock.shutdown(socket.SHUT_RDWR)
        except (OSError, ValueError):
            pass
        try:
            conn.sock.close()
        except OSError:
            pass

    # the call pool ------------------------------------------------------------------------------
    def _dispatch(self, conn: Connection) -> None:
        self._submit(conn)

    def _submit(self, job: Any) -> None:
        with self._pool_lock:
            self._queued += 1
            spawn = self._idle_workers < self._queued and self._workers < self.threads
            if spawn:
                self._workers += 1
        if spawn:
            threading.Thread(target=self._worker, name=f"{self.name}-call-{self._workers}", daemon=True).start()
        self._jobs.put(job)

    def _worker(self) -> None:
        jobs = self._jobs
        lock = self._pool_lock
        while True:
            with lock:
                self._idle_workers += 1
            try:
                job = jobs.get(timeout=_THREAD_IDLE)
            except queue.Empty:
                with lock:
                    self._idle_workers -= 1
                    if self._workers > 1:
                        self._workers -= 1
                        return
                continue
            with lock:
                self._idle_workers -= 1
                self._queued -= 1
            if job is None:
                with lock:
                    self._workers -= 1
                return
            try:
                if type(job) is Connection:
                    # a fresh frame per batch of requests keeps the interpreter's specialized code in use
                    while self._serve(job):
                        pass
                else:
                    self._run_oneway(*job)
            except Exception:  # pragma: no cover - a bug must not cost a call thread
                log.exception("%s: unexpected error in a call thread", self.name)

    def _serve(self, conn: Connection) -> bool:
        """Serve ``conn`` while requests keep coming, up to a budget; True to be called again at once.

        When it goes quiet (or a slow peer sends a partial frame) the connection goes back to the I/O
        thread: only the I/O thread waits on quiet or slow sockets. When other work is queued after the
        budget, the connection goes to the back of the queue."""
        sock = conn.sock
        max_size = self.max_message_size
        tls = conn.tls
        budget = _BUDGET
        while True:
            if conn.state != BUSY:
                return False
            try:
                frame = conn.next_frame(max_size)
            except ProtocolViolation as exc:
                self._violation(conn, exc)
                return False
            if frame is not None:
                status = self._handle(conn, frame[0], frame[1])
                if status is _PENDING:
                    return False  # the I/O thread writes the rest of the reply, then serves on
                if not status:
                    self._drop(conn)
                    return False
                budget -= 1
                if budget <= 0:
                    if self._queued:
                        self._submit(conn)  # others first
                        return False
                    return True
                continue
            # wait a moment for more; if nothing comes, give the connection back
            if self._queued and not conn.pending:
                data = None  # threads are wanted elsewhere: no lingering
            else:
                try:
                    if tls:
                        data = sock.recv(_RECV) if _readable(sock, _LINGER) else None
                    else:
                        data = sock.recv(_RECV)
                except _NOT_READY:
                    data = None
                except (OSError, ssl.SSLError, ValueError):
                    data = b""
            if data is None:
                conn.state = IDLE
                conn.last_active = time.monotonic()
                if not self._running:
                    self._drop(conn)
                    return False
                self._rearm(conn)
                return False
            if not data:
                self._drop(conn)
                return False
            conn.feed(data)

    def _reply(self, conn: Connection, data: bytes) -> Any:
        """Send a reply without waiting on the peer: True when it is out, ``_PENDING`` when the I/O thread
        is to write the rest (a peer that reads slowly holds no call thread), False when the connection
        failed."""
        sock = conn.sock
        try:
            sent = sock.send(data) if conn.tls else sock.send(data, _DONTWAIT)
        except _NOT_READY:
            sent = 0
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.info("%s: could not send a reply to %s: %s", self.name, conn.peer, exc)
            return False
        if sent == len(data):
            return True
        conn.out = memoryview(data)[sent:]
        return _PENDING

    def _hand_over_write(self, conn: Connection, failed: bool | None) -> None:
        """The call thread leaves the rest of a reply to the I/O thread (the call stays in flight)."""
        conn.out_failed = failed
        conn.state = WRITING
        conn.deadline = time.monotonic() + self.send_timeout
        self._rearm(conn, _EPOLLOUT | (_EPOLLIN if conn.tls else 0))

    def _write_more(self, conn: Connection) -> None:
        out = conn.out
        if out is None:  # pragma: no cover - defensive
            self._drop(conn)
            return
        sock = conn.sock
        try:
            while out:
                sent = sock.send(out[:1 << 20]) if conn.tls else sock.send(out[:1 << 20], _DONTWAIT)
                out = out[sent:]
        except _NOT_READY:
            conn.out = out
            self._rearm(conn, _EPOLLOUT | (_EPOLLIN if conn.tls else 0))
            return
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.info("%s: could not send a reply to %s: %s", self.name, conn.peer, exc)
            self._drop(conn)
            return
        conn.out = None
        if conn.out_failed is not None:
            self.stats.leave(conn.out_failed)
        conn.state = IDLE
        conn.last_active = time.monotonic()
        try:
            ready = conn.size >= HEADER_SIZE and self._frame_complete(conn)
        except ProtocolViolation as exc:
            self._violation(conn, exc)
            return
        if ready:
            conn.state = BUSY
            self._dispatch(conn)
        else:
            self._rearm(conn)

    def _handle(self, conn: Connection, header: Any, payload: bytes) -> Any:
        """Run one request and write its reply: True when done, ``_PENDING`` when the I/O thread writes
        the rest of the reply (the call counts as in flight until then), False to close the connection."""
        msg_type, flags, seq = header.msg_type, header.flags, header.seq
        if msg_type == MSG_PING:
            return self._uncounted(conn, self._reply(conn, pack(MSG_PING, 0, seq, _PONG,
                                                                serializer_id=header.serializer_id)))
        oneway = flags & FLAGS_ONEWAY
        if msg_type != MSG_INVOKE or header.serializer_id != SERPENT_ID:
            exc: BaseException = Pyro5.errors.ProtocolError(
                f"message type {msg_type} / serializer {header.serializer_id} refused: "
                "only serpent invocations are accepted")
            if not oneway:
                self._reply(conn, pack(MSG_RESULT, FLAGS_EXCEPTION, seq, SERIALIZER.dumps(exc)))
            return False
        stats = self.stats
        if not stats.enter():
            self._last_refusal = time.monotonic()
            if not oneway:
                return self._uncounted(conn, self._reply(conn, self._error_frame(
                    WorkerDrainingError(f"{self.name} is shutting down; the call did not run"), seq, None)))
            self._refused_oneways += 1  # summed up in one log line at close
            return True
        failed = True
        counted = True
        status: Any = True
        try:
            ann_size = header.ann_size
            if ann_size:
                annotations = parse_annotations(payload[:ann_size])
                body = payload[ann_size:]
            else:
                annotations = None
                body = payload
            if flags & FLAGS_COMPRESSED:
                body = decompress(body, self.max_message_size)
            try:
                object_id, method, vargs, kwargs = loads(body)
            except Exception as exc:
                raise Pyro5.errors.SerializeError(f"cannot decode the request: {exc}") from None
            target = self.objects.get(object_id)
            if target is None:
                raise Pyro5.errors.DaemonError("unknown object")
            context = current_context
            context.client = conn  # like Pyro5: .sock is the connection's socket
            context.client_sock_addr = conn.peer
            context.correlation_id = uuid.UUID(bytes=header.corr_id) if flags & FLAGS_CORR_ID else None
            context.annotations = annotations or {}
            if flags & FLAGS_BATCH:
                obj = self._instance(target, conn)
                results: list[Any] = []
                failed_batch = False
                for call in vargs:
                    name, a, kw = call
                    fn = self._method(target, obj, name)
                    try:
                        results.append(fn(*a, **kw))
                    except Exception as exc:
                        self._note_remote(exc)
                        results.append(compat.wrap_exception(exc))
                        failed_batch = True
                        break
                if len(results) > 1:
                    stats.add(len(results) - 1, 0)
                failed = failed_batch
                if oneway:
                    return True
                data = SERIALIZER.dumps(results)
                status = self._reply(conn, pack(MSG_RESULT, FLAGS_BATCH, seq, data))
                return status
            if method == "__getattr__" or method == "__setattr__":
                result = self._attribute(target, conn, method, vargs)
            else:
                obj = self._instance(target, conn)
                fn = self._method(target, obj, method)
                if oneway:
                    counted = False  # the oneway run counts itself out
                    self._oneway(fn, vargs, kwargs, conn.peer)
                    return True
                result = fn(*vargs, **kwargs)
            if oneway:
                failed = False
                return True
            if _is_stream(result):
                close = getattr(result, "close", None)
                if close is not None:
                    try:
                        close()
                    except Exception:
                        pass
                raise Pyro5.errors.SerializeError(
                    f"{method} returned an iterator or generator: streaming results are not supported by this "
                    "worker; return a list")
            try:
                data = SERIALIZER.dumps(result)
            except Exception as exc:
                raise Pyro5.errors.SerializeError(
                    f"cannot serialize the result of {method} ({type(result).__name__}): {exc}") from None
            if len(data) > self.max_message_size:
                raise Pyro5.errors.MessageTooLargeError(
                    f"reply of {len(data):,} bytes exceeds the worker's max_message_size of "
                    f"{self.max_message_size:,}; the call ran but its result cannot be sent")
            failed = False
            status = self._reply(conn, pack(MSG_RESULT, 0, seq, data))
            return status
        except Exception as exc:
            if oneway:
                log.warning("%s: oneway call failed: %s: %s", self.name, type(exc).__name__, exc)
                return True
            if isinstance(exc, ProtocolViolation):  # bad annotations or compressed payload: Pyro5's own error
                exc = Pyro5.errors.ProtocolError(str(exc))
            status = self._reply(conn, self._error_frame(exc, seq, exc.__traceback__))
            return status
        finally:
            if counted:
                if status is _PENDING:
                    self._hand_over_write(conn, failed)
                else:
                    stats.leave(failed)

    def _uncounted(self, conn: Connection, status: Any) -> Any:
        """For replies that are no call (pings, refusals): a pending rest is written without counting."""
        if status is _PENDING:
            self._hand_over_write(conn, None)
        return status

    def _note_remote(self, exc: BaseException) -> None:
        make_portable(type(exc))
        compat.set_remote_traceback(exc, compat.format_traceback())

    def _error_frame(self, exc: BaseException, seq: int, tb: Any) -> bytes:
        make_portable(type(exc))
        if tb is not None:
            compat.set_remote_traceback(exc, compat.format_traceback())
        try:
            data = SERIALIZER.dumps(exc)
        except Exception as err:
            data = SERIALIZER.dumps(Pyro5.errors.SerializeError(
                f"the method raised {type(exc).__name__}, which cannot be serialized: {err}"))
        return pack(MSG_RESULT, FLAGS_EXCEPTION, seq, data)

    def _instance(self, target: _Target, conn: Connection) -> Any:
        mode = target.mode
        if mode == "single":
            return target.obj
        if mode == "percall":
            return target.cls()
        instances = conn.instances
        if instances is None:
            instances = conn.instances = {}
        obj = instances.get(target.cls)
        if obj is None:
            obj = instances[target.cls] = target.cls()
        return obj

    def _method(self, target: _Target, obj: Any, name: Any) -> Any:
        if type(name) is not str or name not in target.methods:
            if isinstance(name, str) and not compat.is_private(name) and hasattr(target.cls, name):
                raise AttributeError(f"attempt to access unexposed attribute '{name}'")
            raise AttributeError(f"remote object has no exposed method {name!r}")
        return getattr(obj, name)

    def _attribute(self, target: _Target, conn: Connection, method: str, vargs: Any) -> Any:
        name = vargs[0] if vargs else None
        if type(name) is not str or name not in target.attrs:
            raise AttributeError(f"attempt to access unexposed or unknown remote attribute '{name}'")
        obj = self._instance(target, conn)
        if method == "__getattr__":
            return getattr(obj, name)
        setattr(obj, name, vargs[1])
        return None

    # oneway calls -------------------------------------------------------------------------------
    def _oneway(self, fn: Any, vargs: Any, kwargs: Any, peer: Any) -> None:
        """Queue a oneway call for the pool (counted in flight until it ran); with the queue full the
        connection's own thread runs it, which stops reading that connection: TCP backpressure."""
        if self._queued >= self._oneway_limit:
            self._run_oneway(fn, vargs, kwargs, peer)
        else:
            self._submit((fn, vargs, kwargs, peer))

    def _run_oneway(self, fn: Any, vargs: Any, kwargs: Any, peer: Any) -> None:
        failed = True
        try:
            current_context.client_sock_addr = peer
            fn(*vargs, **kwargs)
            failed = False
        except Exception as exc:
            log.warning("%s: oneway call %s from %s failed: %s: %s", self.name, getattr(fn, "__name__", fn), peer,
                        type(exc).__name__, exc)
        finally:
            self.stats.leave(failed)


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1_000_000))


def _readable(sock: Any, timeout: float) -> bool:
    if sock.pending():
        return True
    r, _w, _x = select.select([sock], [], [], timeout)
    return bool(r)

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

import logging
import os
import queue
import re
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

from .aloop import AsyncRunner
from .calls import DAEMON_NAME, INSTANCE_MODES, PENDING, CallHandler, DaemonObject, ServerStats, _Target
from .connection import (
    _DONTWAIT,
    _EPOLLIN,
    _EPOLLOUT,
    _LINGER,
    _NOT_READY,
    _RECV,
    _TLS_CHUNK,
    BUSY,
    IDLE,
    WRITING,
    Connection,
    _raise_fd_limit,
    _readable,
)
from .ioloop import IOLoop
from .mux import MuxHandler
from .protocol import (
    FLAGS_BATCH,
    FLAGS_COMPRESSED,
    FLAGS_ONEWAY,
    HEADER_SIZE,
    MSG_INVOKE,
    MSG_NOTICE,
    ProtocolViolation,
    pack,
)
from .push import PushStreams
from .streams import StockStreams

__all__ = ["DAEMON_NAME", "INSTANCE_MODES", "Connection", "DaemonObject", "Server", "ServerStats"]

log = logging.getLogger("pyrorpc.server")

_SETTLE = 0.25  # seconds without a request to refuse before a drained server closes its connections
_BUDGET = 32  # requests a call thread serves on one connection before it lets others go first
_THREAD_IDLE = 30.0  # seconds an idle call thread waits for work before it exits (one always stays)
_NOTICE = pack(MSG_NOTICE, 0, 0, b"")  # "draining: send nothing more here", to peers that asked for it
_NOT_INLINE = FLAGS_ONEWAY | FLAGS_BATCH | FLAGS_COMPRESSED
_INLINE_MAX = 4096  # bytes a request the I/O thread runs itself may have (header included)
# the start of a request's body: its object id and method name (codec._CALL, on bytes)
_CALL = re.compile(rb"# serpent utf-8 python3\.2\n\('([^'\\\n\r\x00]*)','([^'\\\n\r\x00]*)',")


class _Frame:
    """A request the I/O thread read whole and leaves to a call thread (``Server._inline`` declined it)."""

    __slots__ = ("conn", "header", "payload")

    def __init__(self, conn: Connection, header: Any, payload: bytes) -> None:
        self.conn, self.header, self.payload = conn, header, payload


class Server(IOLoop, MuxHandler, PushStreams, CallHandler):
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
        verify: ``verify(token, target=object_id)`` with the client's handshake token; returns the
            handshake reply or raises AuthenticationError (the connection is refused and logged).
        send_timeout: seconds a reply may take to be written before the connection is dropped.
        name: for log lines and refusals.
    """

    def __init__(self, host: str, port: int, *, threads: int = 64, max_connections: int = 4096,
                 idle_timeout: float = 600.0, handshake_timeout: float = 5.0,
                 max_message_size: int = 64 * 1024 * 1024, ssl_context: ssl.SSLContext | None = None,
                 verify: Callable[..., Any] | None = None, send_timeout: float = 30.0,
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
        self.stats.name = name
        self.async_runner = AsyncRunner(name)  # the event loop of async def methods (started on first use)
        self.stock_streams = StockStreams(idle_timeout, self.async_runner)  # Pyro5 item streams (streams.py)
        self.objects: dict[str, _Target] = {}
        self.inline: dict[bytes, frozenset[bytes]] = {}  # object id -> methods the I/O thread runs (register)
        self.metadata_extra: dict[str, Any] | None = None  # sent to pyrorpc clients as meta["pyrorpc"]
        _raise_fd_limit()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(1024)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            reason = exc.strerror or str(exc)
            if isinstance(exc, socket.gaierror):
                reason = f"unknown host {host!r} ({reason})"
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            raise type(exc)(exc.errno, f"cannot listen on {where}: {reason}") from None
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
        self._notice_at = 0.0  # monotonic time drain() told the pyrorpc clients
        self._notice_due = False  # the I/O thread is to send MSG_NOTICE on the idle connections
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
        self._queued_conns = 0
        self._accept_paused_until = 0.0
        self._sweep_at = 0
        self._acked_runs: dict[tuple[int, int], bytes] = {}  # accepted sends under way (mux.py)
        self._oneway_limit = oneway_queue if oneway_queue is not None else 4 * threads
        self._closed = False
        self._stuck_logged = False

    def __repr__(self) -> str:
        return f"<pyrorpc.Server {self.name} {self.location}>"

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
        none came for 0.25 s (at most one second more): a request sent just as the connections close would
        be lost to its caller, one that is refused is resent elsewhere."""
        start = time.monotonic()
        # pyrorpc clients hear it at once, on every connection (idle ones from the I/O thread, the others
        # with their next reply): none of them sends another request here, so none can be cut off below
        self.stats.begin_drain()
        self._notice_at = time.monotonic()
        self._notice_due = True
        self._wake()
        drained = self.stats.drain(timeout)
        # requests already read but still queued for a call thread are not in flight yet: let them be
        # answered (with WorkerDrainingError) before the connections close
        while self._queued_conns and time.monotonic() < start + timeout + 1.0:
            time.sleep(0.005)
        # replies on multiplexed connections are out of flight once queued: let them reach the socket
        while any(c.wq for c in list(self.connections.values()) if c.mux) \
                and time.monotonic() < start + timeout + 1.0:
            time.sleep(0.005)
        settle_until = time.monotonic() + 1.0
        while True:
            if not self._accepting and self.connection_count() <= 0:
                return drained  # no connection left to send anything on (nor a new one)
            # a client that looked at its connection just before the notice came may still send one request
            quiet = time.monotonic() - max(self._last_refusal, self._notice_at)
            if quiet >= _SETTLE or time.monotonic() >= settle_until:
                return drained
            time.sleep(_SETTLE - quiet)

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
            if conn.mux:
                self._mux_closed(conn)
        self.stock_streams.close_all()
        self.async_runner.close()
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

    # the call pool ------------------------------------------------------------------------------
    def _dispatch(self, conn: Connection) -> None:
        if self.inline and self._inline(conn):
            return
        self._submit(conn)

    def _inline(self, conn: Connection) -> bool:
        """Run the request that has arrived whole on ``conn`` here on the I/O thread if it calls a method
        registered ``inline`` (and any such requests behind it); False: it goes to the call pool.

        A name server's heartbeat or lookup then costs no hand-off to a call thread and no linger for a next
        request that will not come for seconds: the two wake-ups and the timed wait were most of its cost."""
        if not self._inline_call(conn):
            return False
        max_size = self.max_message_size
        while True:
            frame = conn.next_frame(max_size)
            assert frame is not None
            status = self._handle_inline(conn, frame[0], frame[1])
            if status is None:  # not for this thread after all (annotations, draining, a big answer ahead)
                self._submit(_Frame(conn, frame[0], frame[1]))
                return True
            if status is PENDING:
                return True  # the I/O thread writes the rest of the reply, then serves on
            if not status:
                self._drop(conn)
                return True
            try:
                ready = conn.size >= HEADER_SIZE and conn.frame_ready(max_size)
            except ProtocolViolation as exc:
                self._violation(conn, exc)
                return True
            if not ready:
                break
            if not self._inline_call(conn):
                self._submit(conn)  # a request of another kind right behind it: a call thread's
                return True
        conn.state = IDLE
        conn.last_active = time.monotonic()
        if self.stats.draining and conn.notice and not conn.noticed:
            self._notify(conn)
        if not self._running:
            self._drop(conn)
        else:
            self._rearm(conn)
        return True

    def _inline_call(self, conn: Connection) -> bool:
        """Whether the whole request buffered on ``conn`` is a plain call of an ``inline`` method."""
        header = conn.header
        if header.msg_type != MSG_INVOKE or header.flags & _NOT_INLINE or header.total > _INLINE_MAX:
            return False  # (a big request is a call thread's to decode: the I/O thread never takes long)
        buf = conn._head(header.total)
        call = _CALL.match(buf, conn.pos + HEADER_SIZE + header.ann_size)
        if call is None:
            return False
        methods = self.inline.get(call.group(1))
        return methods is not None and call.group(2) in methods

    def _submit(self, job: Any) -> None:
        with self._pool_lock:
            self._queued += 1
            if type(job) is Connection or type(job) is _Frame:
                self._queued_conns += 1  # requests read but not yet counted in flight: drain waits for them
            spawn = self._idle_workers < self._queued and self._workers < self.threads
            if spawn:
                self._workers += 1
        if spawn:
            try:
                threading.Thread(target=self._worker, name=f"{self.name}-call-{self._workers}",
                                 daemon=True).start()
            except RuntimeError as exc:  # can't start new thread: the threads there are will get to it
                with self._pool_lock:
                    self._workers -= 1
                log.error("%s: cannot start a call thread: %s", self.name, exc)
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
                    # leave only when no job is waiting (one may have been queued for us meanwhile)
                    if self._workers > 1 and not self._queued:
                        self._workers -= 1
                        return
                continue
            with lock:
                self._idle_workers -= 1
                self._queued -= 1
                if type(job) is Connection or type(job) is _Frame:
                    self._queued_conns -= 1
            if job is None:
                with lock:
                    self._workers -= 1
                return
            try:
                if type(job) is Connection:
                    # a fresh frame per batch of requests keeps the interpreter's specialized code in use
                    while self._serve(job):
                        pass
                elif type(job) is tuple:
                    self._run_oneway(*job)
                elif type(job) is _Frame:
                    self._serve_frame(job)
                else:
                    job()  # a request of a multiplexed connection, or a stream to resume (mux.py)
            except BaseException:  # pragma: no cover - a bug must not cost a call thread or a connection
                log.exception("%s: unexpected error in a call thread", self.name)
                if type(job) is Connection and job.state == BUSY:
                    self._drop(job)
                elif type(job) is _Frame and job.conn.state == BUSY:
                    self._drop(job.conn)

    def _serve_frame(self, job: _Frame) -> None:
        """A call thread runs a request the I/O thread read, then serves the connection on as ``_serve``."""
        conn = job.conn
        if conn.state != BUSY:
            return
        status = self._handle(conn, job.header, job.payload)
        if status is PENDING:
            return
        if not status:
            self._drop(conn)
            return
        while self._serve(conn):
            pass

    def _serve(self, conn: Connection) -> bool:
        """Serve ``conn`` while requests keep coming, up to a budget; True to be called again at once.

        When it goes quiet (or a slow peer sends a partial frame) the connection goes back to the I/O
        thread: only the I/O thread waits on quiet or slow sockets. When other work is queued after the
        budget, the connection goes to the back of the queue."""
        sock = conn.sock
        max_size = self.max_message_size
        tls = conn.tls
        budget = _BUDGET
        partial_read = False  # one short wait for the rest of a frame; a slower peer goes to the I/O thread
        while True:
            if conn.state != BUSY:
                return False
            try:
                frame = conn.next_frame(max_size)
            except ProtocolViolation as exc:
                self._violation(conn, exc)
                return False
            if frame is not None:
                partial_read = False
                status = self._handle(conn, frame[0], frame[1])
                if status is PENDING:
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
            if (self._queued and not conn.pending) or partial_read:
                data = None  # threads are wanted elsewhere, or the peer is slow: no lingering
            else:
                partial_read = conn.pending
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
                if self.stats.draining and conn.notice and not conn.noticed:
                    self._notify(conn)  # (it went quiet before its last reply could carry the notice)
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
        """Send a reply without waiting on the peer: True when it is out, ``PENDING`` when the I/O thread
        is to write the rest (a peer that reads slowly holds no call thread), False when the connection
        failed."""
        if self.stats.draining and conn.notice and not conn.noticed:
            conn.noticed = True
            data += _NOTICE
        sock = conn.sock
        try:
            # TLS: at most the slice _write_more retries with (OpenSSL wants a retry of the same length)
            sent = sock.send(data[:_TLS_CHUNK]) if conn.tls else sock.send(data, _DONTWAIT)
        except _NOT_READY:
            sent = 0
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.info("%s: could not send a reply to %s: %s", self.name, conn.peer, exc)
            return False
        if sent == len(data):
            return True
        conn.out = memoryview(data)[sent:]
        return PENDING

    def _notify(self, conn: Connection) -> None:
        """Tell a pyrorpc client on an idle connection that we are draining (it sends nothing more here)."""
        conn.noticed = True
        self._send_quietly(conn, _NOTICE)

    def _send_notices(self) -> None:
        """The I/O thread, once drain() began: MSG_NOTICE on every idle connection of a pyrorpc peer
        (busy ones get it with their next reply)."""
        self._notice_due = False
        for conn in list(self.connections.values()):
            if conn.state == IDLE and conn.notice and not conn.noticed:
                if conn.mux:
                    conn.noticed = True
                    self._mux_send(conn, _NOTICE)
                else:
                    self._notify(conn)

    def _hand_over_write(self, conn: Connection, failed: bool | None) -> None:
        """The call thread leaves the rest of a reply to the I/O thread (the call stays in flight)."""
        conn.out_failed = failed
        conn.deadline = time.monotonic() + self.send_timeout  # before the state: the sweep reads both
        conn.state = WRITING
        self._rearm(conn, _EPOLLOUT)


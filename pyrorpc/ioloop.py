"""The server core's transport half: connections, and the epoll I/O thread that accepts, handshakes and
buffers them, so that a silent or slow peer costs a buffer and never a thread (see ``server.py``).

``IOLoop`` is a mixin of ``Server``: it owns the listening socket and every connection that is not in
the middle of a call. It accepts, runs the TLS and Pyro5 handshakes (authentication included, with
bounded work: nothing is decoded before the size and type of the connect message are checked), reads
requests as they arrive and hands a connection with a whole request to the call pool. It also finishes
writing replies that a slow reader did not take at once, and closes connections past their deadlines.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import Pyro5.errors

from .connection import (
    _DONTWAIT,
    _EPOLLIN,
    _EPOLLOUT,
    _HANDSHAKE_MAX,
    _LINGER,
    _NOT_READY,
    _ONESHOT,
    _RECV,
    _REFUSED_LINGER,
    _TLS_CHUNK,
    BUSY,
    CLOSED,
    HANDSHAKE,
    IDLE,
    PENDING,
    REFUSED,
    WRITING,
    Connection,
    _timeval,
)
from .errors import AuthenticationError
from .protocol import (
    FLAGS_EXCEPTION,
    HEADER_SIZE,
    MSG_CONNECT,
    MSG_CONNECTFAIL,
    MSG_CONNECTOK,
    MSG_RESULT,
    SERPENT_ID,
    ProtocolViolation,
    pack,
)
from .wire import SERIALIZER, loads

__all__ = ["BUSY", "CLOSED", "HANDSHAKE", "IDLE", "PENDING", "REFUSED", "WRITING", "Connection", "IOLoop"]

log = logging.getLogger("pyrorpc.server")

_SWEEP_SLICE = 2048  # connections a tick (0.25 s) checks for deadlines; more are taken in turns


class IOLoop:
    """The I/O thread of a ``Server`` (a mixin: the attributes below are the server's)."""

    name: str
    sock: socket.socket | None
    connections: dict[int, Connection]
    max_connections: int
    max_handshaking: int
    max_message_size: int
    handshake_timeout: float
    idle_timeout: float
    send_timeout: float
    ssl_context: ssl.SSLContext | None
    verify: Callable[..., Any] | None
    stats: Any
    stock_streams: Any  # streams.StockStreams
    _conn_lock: threading.Lock
    _handshaking: dict[int, Connection]
    _refused: int
    _epoll: Any
    _wake_r: int
    _wake_w: int
    _running: bool
    _accepting: bool
    _notice_due: bool
    _accept_paused_until: float
    _sweep_at: int  # where the next tick's slice of connections starts

    if TYPE_CHECKING:  # provided by the Server (declared here for the type checker only)
        def metadata(self, object_id: str) -> dict[str, Any]: ...

        def _dispatch(self, conn: Connection) -> None: ...

        def _reply(self, conn: Connection, data: bytes) -> Any: ...

        def _hand_over_write(self, conn: Connection, failed: bool | None) -> None: ...

        def _send_notices(self) -> None: ...

        def _notify(self, conn: Connection) -> None: ...

        def _mux_accept(self, conn: Connection) -> None: ...

        def _mux_event(self, conn: Connection, ev: int) -> None: ...

        def _mux_process(self, conn: Connection) -> None: ...

        def _mux_closed(self, conn: Connection) -> None: ...

        def _sweep_streams(self, conn: Connection, now: float) -> None: ...

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
                    try:
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
                    except Exception:  # one connection's trouble (even a bug) must not stop the others
                        log.exception("%s: error handling an event", self.name)
                        conn = self.connections.get(fd)
                        if conn is not None:
                            self._drop(conn)
                if self._notice_due:
                    self._send_notices()
                if not self._accepting and self.sock is not None:
                    self._close_listener()
                    listen_fd = -1
                now = time.monotonic()
                if self._accept_paused_until and now >= self._accept_paused_until and self.sock is not None:
                    self._accept_paused_until = 0.0
                    try:
                        epoll.modify(listen_fd, _EPOLLIN)
                    except (OSError, ValueError):
                        pass
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
                    # out of descriptors or memory: stop watching the listener for a moment (it stays
                    # readable, and polling it would spin), and say so once per pause
                    log.warning("%s: cannot accept: %s (pausing accepts for 0.1 s)", self.name, exc)
                    self._accept_paused_until = time.monotonic() + 0.1
                    try:
                        self._epoll.modify(sock.fileno(), 0)
                    except (OSError, ValueError):
                        pass
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
        expired: dict[int, Connection] = {}
        conns = list(self.connections.values())
        if len(conns) > _SWEEP_SLICE:
            # thousands of connections (a name server's workers): a slice per tick, so each is looked at
            # every len / _SWEEP_SLICE ticks; unfinished handshakes every tick still
            start = self._sweep_at % len(conns)
            self._sweep_at = start + _SWEEP_SLICE
            chunk = conns[start:start + _SWEEP_SLICE]
            conns = chunk + conns[:_SWEEP_SLICE - len(chunk)] + list(self._handshaking.values())
        for conn in conns:
            state = conn.state
            if state == BUSY:
                continue
            if state in (HANDSHAKE, REFUSED, WRITING):
                if now >= conn.deadline:
                    expired[id(conn)] = conn
            elif conn.mux:
                if conn.wq and now - conn.wrote_at > self.send_timeout:
                    log.warning("%s: dropped %s: output not taken within %gs", self.name, conn.peer,
                                self.send_timeout)
                    expired[id(conn)] = conn
                elif conn.pending and not conn.paused and now - conn.started > self.handshake_timeout:
                    expired[id(conn)] = conn  # a request started and never finished arriving (not: one we left unread)
                elif conn.tasks:
                    self._sweep_streams(conn, now)
                elif not conn.calls and not conn.wq and not conn.pending and conn.last_active < idle_limit:
                    expired[id(conn)] = conn
            elif conn.pending:
                if now - conn.started > self.handshake_timeout:
                    expired[id(conn)] = conn
            elif state == IDLE and conn.last_active < idle_limit:
                expired[id(conn)] = conn
        for conn in expired.values():
            if conn.state == WRITING:
                log.warning("%s: dropped %s: reply not taken within %gs", self.name, conn.peer, self.send_timeout)
            elif conn.state == HANDSHAKE:
                log.info("%s: closed %s: no handshake within %gs", self.name, conn.peer, self.handshake_timeout)
            elif conn.pending and conn.state == IDLE:
                log.info("%s: closed %s: request not complete within %gs", self.name, conn.peer,
                         self.handshake_timeout)
            self._drop(conn)
        self.stock_streams.sweep(now)

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
        if conn.mux and state == IDLE:
            self._mux_event(conn, ev)
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
        self._next_request(conn)

    def _next_request(self, conn: Connection) -> None:
        """An idle connection: to the call pool if a whole request is buffered, else wait for more."""
        if conn.mux:
            self._mux_process(conn)
            return
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

    def _frame_complete(self, conn: Connection) -> bool:
        return conn.frame_ready(self.max_message_size)

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
        if conn.state == CLOSED:
            return  # its fd may belong to another connection by now
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
            # worded and logged as a secret refusal is: one warning line naming the peer
            code = getattr(exc, "reason", None)
            if code in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL"):
                reason = "the client does not speak TLS"
            else:
                reason = code.lower().replace("_", " ") if code else exc.strerror or str(exc)
            log.warning("%s: refused connection from %s: TLS handshake failed: %s", self.name, conn.peer, reason)
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
                response = self.verify(token, target=data["object"]) if self.verify is not None else "hello"
                reply = {"handshake": response, "meta": self.metadata(data["object"])}
                wants = data.get("pyrorpc")
                if isinstance(wants, dict):
                    # a pyrorpc peer: what we do beyond Pyro5's protocol (docs/protocol.md); a stock peer
                    # asked for nothing and sees none of it
                    conn.notice = bool(wants.get("notice"))  # told when we drain (see Server.drain)
                    extensions = reply["pyrorpc"] = {"notice": 1, "context": 1}
                    if wants.get("mux"):
                        self._mux_accept(conn)  # many requests at once on this connection (mux.py)
                        extensions["mux"] = 1
                        if wants.get("ack"):
                            extensions["ack"] = 1  # acknowledged sends (PRAK -> MSG_ACCEPTED, mux.py)
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
        status = self._reply(conn, pack(MSG_CONNECTOK, 0, header.seq, data))
        if not status:
            self._drop(conn)
            return
        with self._conn_lock:
            self._handshaking.pop(conn.fd, None)
        if status == PENDING:  # a slow TLS peer: the I/O thread finishes the reply, then serves on
            self._hand_over_write(conn, None)
            return
        conn.state = IDLE
        conn.last_active = time.monotonic()
        self._next_request(conn)  # a pipelining client may have sent its first request along

    def _drop(self, conn: Connection) -> None:
        with self._conn_lock:  # atomic: two threads may drop the same connection
            if conn.state == CLOSED:
                return
            if self.connections.get(conn.fd) is conn:  # the fd may belong to a newer connection
                del self.connections[conn.fd]
                if conn.state == REFUSED:
                    self._refused -= 1
            if self._handshaking.get(conn.fd) is conn:
                del self._handshaking[conn.fd]
            unsent, conn.out = conn.out, None
            count = conn.state == WRITING and unsent is not None and conn.out_failed is not None
        if count:
            self.stats.leave(True)  # the call ran but its reply never got out
        self._shut(conn)
        if conn.mux:
            self._mux_closed(conn)
        self.stock_streams.close_connection(conn)  # its Pyro5 item streams: their generators' finally runs

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

    def _write_more(self, conn: Connection) -> None:
        out = conn.out
        if out is None:  # pragma: no cover - defensive
            self._drop(conn)
            return
        sock = conn.sock
        try:
            while out:
                sent = sock.send(out[:_TLS_CHUNK]) if conn.tls else sock.send(out[:1 << 20], _DONTWAIT)
                out = out[sent:]
        except ssl.SSLWantReadError:  # TLS wants to read first (renegotiation): wait for input, not output
            conn.out = out
            self._rearm(conn, _EPOLLIN)
            return
        except _NOT_READY:
            conn.out = out
            self._rearm(conn, _EPOLLOUT)
            return
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.info("%s: could not send a reply to %s: %s", self.name, conn.peer, exc)
            self._drop(conn)
            return
        conn.out = None
        if conn.out_failed is not None:
            self.stats.leave(conn.out_failed)
        if self.stats.draining and conn.notice and not conn.noticed:
            self._notify(conn)
        conn.state = IDLE
        conn.last_active = time.monotonic()
        self._next_request(conn)


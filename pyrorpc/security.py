"""Security: HMAC handshake tokens, replay protection, TLS contexts, and the one authenticated connect path.

Every connection pyrorpc opens (to a worker or to the name server) goes through ``open_proxy``: TCP
connect, optional TLS with a per-settings context, then Pyro5's connect handshake carrying a fresh
token ``{"ts", "nonce", "mac"}`` with ``mac = HMAC-SHA256(secret, "pyrorpc1:<ts>:<nonce>")``. The server
checks freshness, compares in constant time and refuses a nonce it has seen within the freshness window;
it answers with its own MAC over the client's nonce, which the client checks, so neither side talks to
an impostor. Depends only on Pyro5, ``config`` and ``errors`` (the name server uses it too).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import select
import socket
import ssl
import struct
import threading
import time
from collections import OrderedDict
from typing import Any

import Pyro5.client
import Pyro5.core
import Pyro5.errors
import Pyro5.server
import Pyro5.svr_threads
from Pyro5 import protocol, serializers, socketutil

from .config import Settings
from .errors import AuthenticationError, MessageTooLargeError

__all__ = [
    "BoundedThreadPool",
    "GuardedDaemon",
    "HandshakeVerifier",
    "check_handshake",
    "client_ssl_context",
    "make_token",
    "open_proxy",
    "server_ssl_context",
    "wrap_listener",
]

log = logging.getLogger("pyrorpc.security")

FRESHNESS = 30.0  # seconds a token is accepted for (both directions of clock skew)
AUTH_FAILED = "authentication failed"
_SERIALIZER = serializers.serializers["serpent"]


def _mac(secret: str, *parts: str) -> str:
    return hmac.new(secret.encode(), ":".join(("pyrorpc1",) + parts).encode(), hashlib.sha256).hexdigest()


def make_token(secret: str, now: float | None = None) -> dict[str, Any]:
    """A fresh handshake token for ``secret``."""
    ts = f"{time.time() if now is None else now:.6f}"
    nonce = secrets.token_hex(16)
    return {"ts": ts, "nonce": nonce, "mac": _mac(secret, ts, nonce)}


class HandshakeVerifier:
    """Server side: accepts fresh, correctly signed, never-seen tokens; remembers nonces for FRESHNESS."""

    def __init__(self, secret: str, *, freshness: float = FRESHNESS, max_nonces: int = 1_000_000) -> None:
        self.secret = secret
        self.freshness = freshness
        self.max_nonces = max_nonces
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def verify(self, data: Any, now: float | None = None) -> dict[str, str]:
        """Check a client token; returns the server's proof. Raises AuthenticationError."""
        now = time.time() if now is None else now
        if not isinstance(data, dict):
            raise AuthenticationError(f"{AUTH_FAILED}: no token (is the client missing the secret?)")
        ts, nonce, mac = data.get("ts"), data.get("nonce"), data.get("mac")
        if not (isinstance(ts, str) and isinstance(nonce, str) and isinstance(mac, str)) \
                or len(nonce) > 128 or len(mac) != 64 or len(ts) > 32:
            raise AuthenticationError(f"{AUTH_FAILED}: malformed token")
        if not hmac.compare_digest(mac, _mac(self.secret, ts, nonce)):
            raise AuthenticationError(f"{AUTH_FAILED}: wrong secret")
        try:
            stamp = float(ts)
        except ValueError:
            raise AuthenticationError(f"{AUTH_FAILED}: malformed token") from None
        if abs(now - stamp) > self.freshness:
            raise AuthenticationError(f"{AUTH_FAILED}: stale token (clocks {now - stamp:+.0f}s apart?)")
        with self._lock:
            while self._seen and (next(iter(self._seen.values())) < now - self.freshness
                                  or len(self._seen) >= self.max_nonces):
                self._seen.popitem(last=False)
            if nonce in self._seen:
                raise AuthenticationError(f"{AUTH_FAILED}: replayed token")
            self._seen[nonce] = now
        return {"proof": _mac(self.secret, "server", nonce)}


def check_handshake(verifier: HandshakeVerifier | None, conn: Any, data: Any) -> Any:
    """A daemon's ``validateHandshake``: verify the token (if a secret is set), log and raise if bad."""
    if verifier is None:
        return "hello"
    try:
        return verifier.verify(data)
    except AuthenticationError as exc:
        try:
            peer = conn.sock.getpeername()
        except OSError:
            peer = "?"
        log.warning("refused connection from %s: %s", peer, exc)
        raise


# TLS ----------------------------------------------------------------------------------------------

_contexts: dict[tuple[Any, ...], ssl.SSLContext] = {}
_contexts_lock = threading.Lock()


def client_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The client TLS context for these settings (cached per file set), or None without TLS."""
    if not (settings.tls_ca or settings.tls_cert):
        return None
    key = ("client", settings.tls_cert, settings.tls_key, settings.tls_ca)
    with _contexts_lock:
        ctx = _contexts.get(key)
        if ctx is None:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=settings.tls_ca)
            if settings.tls_cert:
                ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
            _contexts[key] = ctx
        return ctx


def server_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The server TLS context, or None without a certificate; with ``tls_mutual`` clients must present a
    certificate signed by ``tls_ca``."""
    if not settings.tls_cert:
        return None
    key = ("server", settings.tls_cert, settings.tls_key, settings.tls_ca, settings.tls_mutual)
    with _contexts_lock:
        ctx = _contexts.get(key)
        if ctx is None:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=settings.tls_ca)
            ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
            ctx.verify_mode = ssl.CERT_REQUIRED if settings.tls_mutual else ssl.CERT_NONE
            _contexts[key] = ctx
        return ctx


def wrap_listener(transport: Any, ctx: ssl.SSLContext | None) -> None:
    """Make a Pyro5 transport server's listening socket TLS; handshakes happen in connection threads."""
    if ctx is None:
        return
    transport.sock = ctx.wrap_socket(transport.sock, server_side=True, do_handshake_on_connect=False)


# the wire -----------------------------------------------------------------------------------------

_HEADER_START = 6  # recv_stub reads 'PYRO' + version first, then the rest of the 40-byte header
_HEADER_REST = 34
_SERPENT_ID = serializers.SerpentSerializer.serializer_id
_WAITALL = getattr(socket, "MSG_WAITALL", 0)


class LimitedConnection(socketutil.SocketConnection):
    """A Pyro5 socket connection that checks each incoming header before reading its payload (size limit,
    serpent only: marshal is not safe against malicious input), refuses to send oversized messages, and
    reads the 40-byte header in one system call.

    Once ``set_timeout`` was called the socket stays in blocking mode with kernel send/receive timeouts
    (SO_SNDTIMEO/SO_RCVTIMEO): cheaper per call than a Python socket timeout, which polls before every
    send and receive. Until then (the handshake) Pyro5's own timeout handling applies.
    """

    max_size = 64 * 1024 * 1024
    _state = 0
    _rest = b""
    _timeout: float | None = None
    _tls = False
    poller: Any = None

    def set_timeout(self, seconds: float) -> None:
        """Kernel timeouts for every send and receive; a change under 5% is not worth a system call."""
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

    def recv(self, size: int) -> bytes:
        # Pyro5's recv_stub reads 6 header bytes, the other 34, then the payload: we read all 40 at once
        if self._state == 0 and size == _HEADER_START:
            header = self._read(_HEADER_START + _HEADER_REST)
            msg_type, serializer_id = header[6], header[7]
            data_size, ann_size = struct.unpack_from("!II", header, 12)
            if header[:4] == b"PYRO":
                if data_size + ann_size > self.max_size:
                    raise Pyro5.errors.MessageTooLargeError(
                        f"incoming message of {data_size + ann_size:,} bytes exceeds the limit of "
                        f"{self.max_size:,} (max_message_size)")
                if serializer_id != _SERPENT_ID and msg_type != protocol.MSG_PING:
                    raise Pyro5.errors.ProtocolError(
                        f"serializer id {serializer_id} refused: only serpent is accepted")
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
        sock = self.sock
        if sock.gettimeout() is not None:
            return bytes(socketutil.receive_data(sock, size))
        try:
            if self._tls:
                data = b""
            else:
                data = sock.recv(size, _WAITALL)
                if len(data) == size:
                    return data
            buf = bytearray(data)
            while len(buf) < size:
                chunk = sock.recv(min(size - len(buf), 1 << 20))
                if not chunk:
                    raise Pyro5.errors.ConnectionClosedError("receiving: connection closed")
                buf += chunk
            return bytes(buf)
        except (TimeoutError, BlockingIOError, ssl.SSLWantReadError):
            raise Pyro5.errors.TimeoutError("receiving: timeout") from None
        except OSError as exc:
            raise Pyro5.errors.ConnectionClosedError(f"receiving: connection lost: {exc}") from None

    def idle_and_alive(self) -> bool:
        """For a connection at rest: nothing may be waiting to be read, so readable means closed."""
        poller = self.poller
        if poller is None:
            poller = self.poller = select.poll()
            poller.register(self.sock.fileno(), select.POLLIN)
        return not poller.poll(0)


def limit_connection(conn: socketutil.SocketConnection, max_size: int) -> LimitedConnection:
    """Turn an existing Pyro5 connection into a LimitedConnection (in place)."""
    conn.__class__ = LimitedConnection
    conn.max_size = max_size  # type: ignore[attr-defined]
    conn._tls = isinstance(conn.sock, ssl.SSLSocket)  # type: ignore[attr-defined]
    return conn  # type: ignore[return-value]


# the server side ------------------------------------------------------------------------------------

class BoundedThreadPool(Pyro5.svr_threads.Pool):
    """Pyro5's connection thread pool, sized per daemon instead of by the global config."""

    def __init__(self, max_size: int) -> None:
        super().__init__()
        self.max_size = max_size

    def process(self, job: Any) -> None:
        if self.closed:
            raise Pyro5.svr_threads.PoolError("job queue is closed")
        if self.idle:
            worker = self.idle.pop()
        elif self.num_workers() < self.max_size:
            worker = Pyro5.svr_threads.Worker(self)
            worker.start()
        else:
            raise Pyro5.svr_threads.NoFreeWorkersError(
                f"no free workers: all {self.max_size} connection threads busy (raise --threads)")
        self.busy.add(worker)
        worker.process(job)


class GuardedDaemon(Pyro5.server.Daemon):
    """A Pyro5 daemon configured from Settings instead of the global config: its own connection thread
    pool size (``threads``), TLS on the listening socket, and the handshake token check (``secret``)."""

    def __init__(self, host: str, port: int, settings: Settings, **kwargs: Any) -> None:
        super().__init__(host=host, port=port, **kwargs)
        self.verifier = HandshakeVerifier(settings.secret) if settings.secret else None
        self.max_message_size = settings.max_message_size
        self.handshake_timeout = settings.connect_timeout
        old_pool = self.transportServer.pool
        self.transportServer.pool = BoundedThreadPool(settings.threads)
        old_pool.close()
        ctx = server_ssl_context(settings)
        self.tls = ctx is not None
        wrap_listener(self.transportServer, ctx)

    def validateHandshake(self, conn: Any, data: Any) -> Any:  # noqa: N802 - Pyro5 hook
        return check_handshake(self.verifier, conn, data)

    def _handshake(self, conn: Any, denied_reason: Any = None) -> bool:
        limit_connection(conn, self.max_message_size)
        # a client gets connect_timeout to complete the handshake (TLS included), so a silent
        # connection cannot hold a connection thread forever; afterwards idle connections may stay open
        conn.sock.settimeout(self.handshake_timeout)
        ok = bool(super()._handshake(conn, denied_reason))
        if ok:
            conn.sock.settimeout(None)
        return ok


# the connect path ----------------------------------------------------------------------------------

def open_proxy(uri: Pyro5.core.URI, settings: Settings) -> tuple[Pyro5.client.Proxy, dict[str, Any]]:
    """Connect to ``uri`` (TCP, TLS, handshake with token) and return a bound Pyro5 proxy and the
    object's metadata.

    Raises:
        AuthenticationError: the server refused our token, or could not prove it knows the secret.
        Pyro5.errors.CommunicationError: anything else that kept the connection from opening (nothing
            was sent to the object, so the caller may go elsewhere).
    """
    timeout = settings.connect_timeout
    try:
        sock = socket.create_connection((uri.host, uri.port), timeout=timeout)
    except OSError as exc:
        raise Pyro5.errors.CommunicationError(f"cannot connect to {uri.location}: {exc}") from None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ctx = client_ssl_context(settings)
        if ctx is not None:
            try:
                sock = ctx.wrap_socket(sock, server_hostname=uri.host)
            except (ssl.SSLError, OSError) as exc:
                raise Pyro5.errors.CommunicationError(f"TLS handshake with {uri.location} failed: {exc}") \
                    from None
        conn = limit_connection(socketutil.SocketConnection(sock, uri.object), settings.max_message_size)
        token = make_token(settings.secret) if settings.secret else "hello"
        data = _SERIALIZER.dumps({"handshake": token, "object": uri.object})
        conn.send(protocol.SendingMessage(protocol.MSG_CONNECT, 0, 0, _SERIALIZER.serializer_id, data).data)
        msg = protocol.recv_stub(conn, [protocol.MSG_CONNECTOK, protocol.MSG_CONNECTFAIL])
        reply = serializers.serializers_by_id[msg.serializer_id].loads(msg.data) if msg.data else None
    except Pyro5.errors.CommunicationError:
        sock.close()
        raise
    except (OSError, Pyro5.errors.PyroError) as exc:
        sock.close()
        raise Pyro5.errors.CommunicationError(f"cannot connect to {uri.location}: {exc}") from None
    if msg.type == protocol.MSG_CONNECTFAIL:
        sock.close()
        text = str(reply)
        if AUTH_FAILED in text:
            raise AuthenticationError(f"{uri.location} refused us: {text}")
        raise Pyro5.errors.CommunicationError(f"connection to {uri.location} rejected: {text}")
    if settings.secret:
        proof = reply.get("handshake") if isinstance(reply, dict) else None
        nonce = token["nonce"] if isinstance(token, dict) else ""
        if not (isinstance(proof, dict) and isinstance(proof.get("proof"), str)
                and hmac.compare_digest(proof["proof"], _mac(settings.secret, "server", nonce))):
            sock.close()
            raise AuthenticationError(f"{AUTH_FAILED}: {uri.location} did not prove it knows the secret")
    meta = reply.get("meta", {}) if isinstance(reply, dict) else {}
    proxy = Pyro5.client.Proxy(uri)
    proxy._pyroGetMetadata(known_metadata=meta or {"methods": [], "oneway": [], "attrs": []})
    proxy._pyroConnection = conn
    conn.set_timeout(settings.timeout)
    return proxy, meta

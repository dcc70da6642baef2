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
import socket
import ssl
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
from .errors import AuthenticationError
from .wire import SERIALIZER, LimitedConnection, limit_connection

__all__ = [
    "BoundedThreadPool",
    "GuardedDaemon",
    "HandshakeVerifier",
    "check_handshake",
    "client_ssl_context",
    "make_token",
    "open_connection",
    "open_proxy",
    "server_ssl_context",
    "wrap_listener",
]

log = logging.getLogger("pyrorpc.security")

FRESHNESS = 30.0  # seconds a token is accepted for (both directions of clock skew)
AUTH_FAILED = "authentication failed"


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

def open_connection(uri: Pyro5.core.URI, settings: Settings) -> tuple[LimitedConnection, dict[str, Any]]:
    """Connect to ``uri`` (TCP, TLS, handshake with token); returns the connection, ready for
    ``wire.invoke`` with the call timeout set, and the object's metadata.

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
        data = SERIALIZER.dumps({"handshake": token, "object": uri.object})
        conn.send(protocol.SendingMessage(protocol.MSG_CONNECT, 0, 0, SERIALIZER.serializer_id, data).data)
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
    conn.set_timeout(settings.timeout)
    return conn, meta


def open_proxy(uri: Pyro5.core.URI, settings: Settings) -> tuple[Pyro5.client.Proxy, dict[str, Any]]:
    """``open_connection`` wrapped in a bound Pyro5 proxy (for callers that want Pyro5's full API)."""
    conn, meta = open_connection(uri, settings)
    proxy = Pyro5.client.Proxy(uri)
    proxy._pyroGetMetadata(known_metadata=meta or {"methods": [], "oneway": [], "attrs": []})
    proxy._pyroConnection = conn
    return proxy, meta

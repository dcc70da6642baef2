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

import Pyro5.core
import Pyro5.errors
from Pyro5 import socketutil

from . import protocol as wire_protocol
from .config import Settings
from .errors import AuthenticationError, ConfigurationError
from .wire import SERIALIZER, LimitedConnection, limit_connection

__all__ = [
    "HandshakeVerifier",
    "client_ssl_context",
    "make_token",
    "open_connection",
    "server_ssl_context",
    "server_verifier",
]

log = logging.getLogger("pyrorpc.security")

FRESHNESS = 30.0  # seconds a token is accepted for (both directions of clock skew)
AUTH_FAILED = "authentication failed"


def _mac(secret: str, *parts: str) -> str:
    return hmac.new(secret.encode(), ":".join(("pyrorpc1",) + parts).encode(), hashlib.sha256).hexdigest()


def make_token(secret: str, now: float | None = None, target: str = "") -> dict[str, Any]:
    """A fresh handshake token for ``secret``, good only for the object ``target`` (the id the client
    connects to: a worker's name, ``Pyro.NameServer``...), so it cannot be replayed to another server."""
    ts = f"{time.time() if now is None else now:.6f}"
    nonce = secrets.token_hex(16)
    return {"ts": ts, "nonce": nonce, "mac": _mac(secret, ts, nonce, target)}


class HandshakeVerifier:
    """Server side: accepts fresh, correctly signed, never-seen tokens; remembers nonces for FRESHNESS."""

    def __init__(self, secret: str, *, freshness: float = FRESHNESS, max_nonces: int = 1_000_000) -> None:
        self.secret = secret
        self.freshness = freshness
        self.max_nonces = max_nonces
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def verify(self, data: Any, now: float | None = None, target: str = "") -> dict[str, str]:
        """Check a client token; returns the server's proof. Raises AuthenticationError."""
        now = time.time() if now is None else now
        if not isinstance(data, dict):
            raise AuthenticationError(f"{AUTH_FAILED}: no token (is the client missing the secret?)")
        ts, nonce, mac = data.get("ts"), data.get("nonce"), data.get("mac")
        if not (isinstance(ts, str) and isinstance(nonce, str) and isinstance(mac, str)) \
                or len(nonce) > 128 or len(mac) != 64 or len(ts) > 32:
            raise AuthenticationError(f"{AUTH_FAILED}: malformed token")
        if not hmac.compare_digest(mac, _mac(self.secret, ts, nonce, target)):
            raise AuthenticationError(f"{AUTH_FAILED}: wrong secret (or a token made for another object)")
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
                _load_cert_chain(ctx, settings)
            _contexts[key] = ctx
        return ctx


def _load_cert_chain(ctx: ssl.SSLContext, settings: Settings) -> None:
    """``ctx.load_cert_chain`` with an error that says which files did not go together (not "PEM lib")."""
    cert, key = settings.tls_cert, settings.tls_key
    try:
        ctx.load_cert_chain(cert, key)  # type: ignore[arg-type]
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc.strerror or str(exc)
        try:
            with open(cert, encoding="ascii", errors="replace") as f:  # type: ignore[arg-type]
                pem = f.read(1 << 20)
        except OSError:
            pem = ""
        if "CERTIFICATE-----" not in pem:
            raise ConfigurationError(f"cannot load TLS certificate {cert!r}: not a PEM certificate") from None
        if key is None and "PRIVATE KEY-----" not in pem:
            raise ConfigurationError(f"cannot load TLS certificate {cert!r}: its private key is not in that "
                                     "file; give it with --tls-key (tls_key, PYRORPC_TLS_KEY)") from None
        detail = "" if "PEM lib" in reason else f" ({reason})"
        raise ConfigurationError(f"cannot load TLS certificate {cert!r} with key {key!r}{detail}: "
                                 "--tls-key must be the private key of --tls-cert") from None


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
            _load_cert_chain(ctx, settings)
            ctx.verify_mode = ssl.CERT_REQUIRED if settings.tls_mutual else ssl.CERT_NONE
            _contexts[key] = ctx
        return ctx


def server_verifier(settings: Settings) -> Any:
    """The handshake check a server runs for these settings: None without a secret, else a callable
    ``verify(token, target=object_id)`` that returns the server's proof or raises AuthenticationError."""
    if not settings.secret:
        return None
    return HandshakeVerifier(settings.secret).verify


# the connect path ----------------------------------------------------------------------------------

def _speaks_tls(uri: Pyro5.core.URI, timeout: float) -> bool:
    """Only to explain a plain handshake the server cut off: does it answer a TLS hello? (Nothing is sent
    over the probe; its certificate is not checked because nothing is trusted to it.)"""
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.check_hostname = False
    probe.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((uri.host, uri.port), timeout=min(timeout, 2.0)) as raw:
            with probe.wrap_socket(raw):
                return True
    except ssl.SSLError as exc:
        return "ALERT" in str(exc.reason or "")  # e.g. a server that requires a client certificate
    except OSError:
        return False


def handshake_frame(uri: Pyro5.core.URI, settings: Settings, mux: bool = False) -> tuple[bytes, Any]:
    """The MSG_CONNECT frame (with our token, and the extensions we understand beyond Pyro5's protocol:
    a stock Pyro5 server ignores them), and the token it carries."""
    token = make_token(settings.secret, target=uri.object) if settings.secret else "hello"
    extensions = {"notice": 1, "mux": 1, "ack": 1} if mux else {"notice": 1}
    data = SERIALIZER.dumps({"handshake": token, "object": uri.object, "pyrorpc": extensions})
    return wire_protocol.pack(wire_protocol.MSG_CONNECT, 0, 0, data), token


def handshake_reply(uri: Pyro5.core.URI, settings: Settings, msg_type: int, reply: Any,
                    token: Any) -> tuple[dict[str, Any], bool]:
    """The object's metadata and whether the server accepted multiplexing, from its handshake reply.

    Raises:
        AuthenticationError: refused our token, or could not prove it knows the secret.
        Pyro5.errors.CommunicationError: the server rejected the connection otherwise.
    """
    if msg_type == wire_protocol.MSG_CONNECTFAIL:
        text = str(reply)
        if AUTH_FAILED in text:
            raise AuthenticationError(f"{uri.location} refused us: {text}")
        raise Pyro5.errors.CommunicationError(f"connection to {uri.location} rejected: {text}")
    if msg_type != wire_protocol.MSG_CONNECTOK:
        raise Pyro5.errors.CommunicationError(f"cannot connect to {uri.location}: unexpected handshake reply "
                                              f"type {msg_type}")
    if settings.secret:
        proof = reply.get("handshake") if isinstance(reply, dict) else None
        nonce = token["nonce"] if isinstance(token, dict) else ""
        if not (isinstance(proof, dict) and isinstance(proof.get("proof"), str)
                and hmac.compare_digest(proof["proof"], _mac(settings.secret, "server", nonce))):
            raise AuthenticationError(f"{AUTH_FAILED}: {uri.location} did not prove it knows the secret")
    if not isinstance(reply, dict):
        return {}, False
    meta = reply.get("meta")
    extensions = reply.get("pyrorpc")
    return (meta if isinstance(meta, dict) else {}), isinstance(extensions, dict) and bool(extensions.get("mux"))


def open_connection(uri: Pyro5.core.URI, settings: Settings, *, mux: bool = False,
                    timeout: float | None = None) -> tuple[LimitedConnection, dict[str, Any]]:
    """Connect to ``uri`` (TCP, TLS, handshake with token); returns the connection, ready for
    ``wire.invoke`` with the call timeout set, and the object's metadata. With ``mux`` it asks for a
    multiplexed connection (``conn.mux`` says whether the server agreed). Each step of the opening may
    take ``connect_timeout``, or ``timeout`` when that is shorter (what a call has left).

    Raises:
        AuthenticationError: the server refused our token, or could not prove it knows the secret.
        Pyro5.errors.CommunicationError: anything else that kept the connection from opening (nothing
            was sent to the object, so the caller may go elsewhere).
    """
    timeout = settings.connect_timeout if timeout is None else min(settings.connect_timeout, max(timeout, 0.001))
    ctx = client_ssl_context(settings)  # (ConfigurationError for unusable certificate files, before connecting)
    try:
        sock = socket.create_connection((uri.host, uri.port), timeout=timeout)
    except OSError as exc:
        raise Pyro5.errors.CommunicationError(f"cannot connect to {uri.location}: {exc}") from None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ctx is not None:
            try:
                sock = ctx.wrap_socket(sock, server_hostname=uri.host)
            except (ssl.SSLError, OSError) as exc:
                raise Pyro5.errors.CommunicationError(f"TLS handshake with {uri.location} failed: {exc}") \
                    from None
        conn = limit_connection(socketutil.SocketConnection(sock, uri.object), settings.max_message_size)
        conn.set_timeout(timeout)
        frame, token = handshake_frame(uri, settings, mux)
        conn.send(frame)
        header = wire_protocol.parse_header(conn.read_header(), settings.max_message_size)
        if header.msg_type not in (wire_protocol.MSG_CONNECTOK, wire_protocol.MSG_CONNECTFAIL):
            raise Pyro5.errors.ProtocolError(f"unexpected handshake reply type {header.msg_type}")
        payload = conn._read(header.ann_size + header.data_size) if header.ann_size + header.data_size else b""
        reply = SERIALIZER.loads(payload[header.ann_size:]) if header.data_size else None
    except (Pyro5.errors.CommunicationError, ConnectionResetError) as exc:
        sock.close()
        if ctx is None and isinstance(exc, (Pyro5.errors.ConnectionClosedError, ConnectionResetError)) \
                and _speaks_tls(uri, timeout):
            raise Pyro5.errors.CommunicationError(
                f"cannot connect to {uri.location}: it needs TLS and this client has no TLS settings; give the "
                "CA that signed its certificate with --tls-ca (tls_ca=, PYRORPC_TLS_CA)") from None
        if isinstance(exc, Pyro5.errors.CommunicationError):
            raise
        raise Pyro5.errors.CommunicationError(f"cannot connect to {uri.location}: {exc}") from None
    except (OSError, Pyro5.errors.PyroError, wire_protocol.ProtocolViolation, ValueError, SyntaxError) as exc:
        sock.close()
        raise Pyro5.errors.CommunicationError(f"cannot connect to {uri.location}: {exc}") from None
    try:
        meta, conn.mux = handshake_reply(uri, settings, header.msg_type, reply, token)
        extensions = reply.get("pyrorpc") if isinstance(reply, dict) else None
        # a pyrorpc server takes the call context (deadline, metadata) in annotations; a stock one is sent none
        conn.context = isinstance(extensions, dict) and bool(extensions.get("context"))
    except BaseException:
        sock.close()
        raise
    conn.set_timeout(settings.timeout)
    return conn, meta

"""The daemon that serves a NameServer on an explicit host and port, with lease expiry and clean shutdown."""

from __future__ import annotations

import logging
import signal
import sqlite3
import threading
from collections.abc import Callable
from typing import Any

import Pyro5.core
import Pyro5.errors
import Pyro5.nameserver

from pyrorpc.config import Settings
from pyrorpc.metrics import MetricsServer, NameServerCollector, check_port, serve_metrics
from pyrorpc.security import server_ssl_context, server_verifier
from pyrorpc.server import Server

from .registry import NameServer

log = logging.getLogger("pyrorpc.nameserver")

DEFAULT_LEASE_TTL = 10.0


def open_storage(storage: str | None, *, lease_ttl: float = DEFAULT_LEASE_TTL) -> Any:
    """A Pyro5 storage for ``memory`` (default), ``PATH.sqlite`` / ``PATH.db``, Pyro5's ``sql:PATH``, or
    ``etcd://HOST:PORT[,HOST:PORT...][/PREFIX]`` (a registry shared by every name server on that etcd cluster;
    needs the ``etcd`` extra). ``lease_ttl`` is the name server's: with etcd, its registrations outlive it by
    that much at most (time for its workers to move to another name server).

    Raises:
        ValueError: for anything else, a bad etcd URL, etcd3gw missing or etcd not answering.
    """
    if storage in (None, "", "memory"):
        return Pyro5.nameserver.MemoryStorage()
    assert storage is not None
    if storage.startswith("etcd://"):
        from .etcd import EtcdStorage
        return EtcdStorage.from_url(storage, owner_ttl=lease_ttl)
    path = storage[4:] if storage.startswith("sql:") else storage
    if storage.startswith("sql:") or path.endswith((".sqlite", ".sqlite3", ".db")):
        if not path or path == ":memory:":
            raise ValueError(f"storage must be 'memory' or PATH.sqlite, got {storage!r}")
        try:
            return Pyro5.nameserver.SqlStorage(path)
        except sqlite3.Error as exc:
            raise ValueError(f"cannot open storage {path!r}: {exc}") from None
    raise ValueError(f"storage must be 'memory', PATH.sqlite or etcd://HOST:PORT[,HOST:PORT...], got {storage!r}")


class NameServerDaemon:
    """Serves one ``nameserver.NameServer`` under Pyro5's well-known object name on pyrorpc's server core.

    Use it as a context manager, or call ``start()`` (serves in a thread, returns at once: the socket is
    bound in the constructor) or ``serve_forever()``. Expired leases are swept several times per TTL.
    ``settings`` (a ``pyrorpc.Settings``) brings the shared secret, TLS files, call threads, connection
    limits and the handshake deadline (``connect_timeout``). With ``metrics_port`` (the ``metrics`` extra)
    it serves Prometheus metrics on ``http://host:metrics_port/metrics`` (0: any free port, see ``metrics``).

    Raises:
        ValueError: a bad ``lease_ttl``, ``port`` or ``storage``.
        pyrorpc.errors.ConfigurationError: a bad ``metrics_port``, one in use, or prometheus_client missing.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 9090, *, storage: str | None = "memory",
                 lease_ttl: float = DEFAULT_LEASE_TTL, settings: Settings | None = None,
                 metrics_port: int | None = None) -> None:
        if not isinstance(lease_ttl, (int, float)) or not 0.2 <= lease_ttl <= 86400:
            raise ValueError(f"`lease_ttl` must be 0.2-86400 seconds, got {lease_ttl!r}")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            raise ValueError(f"`port` must be 0-65535, got {port!r}")
        check_port(metrics_port)
        settings = settings if settings is not None else Settings()
        self.settings = settings
        self.nameserver: NameServer | None = NameServer(open_storage(storage, lease_ttl=float(lease_ttl)))
        self.nameserver.default_lease_ttl = float(lease_ttl)
        try:
            self.server = Server(host, port, threads=settings.threads, max_connections=settings.max_connections,
                                 idle_timeout=settings.idle_timeout, handshake_timeout=settings.connect_timeout,
                                 max_message_size=settings.max_message_size,
                                 ssl_context=server_ssl_context(settings), verify=server_verifier(settings),
                                 send_timeout=settings.connect_timeout, name="nameserver")
        except Exception:
            self.nameserver.storage.close()
            raise
        self.verifier = self.server.verify
        self.tls = self.server.ssl_context is not None
        self.server.register(self.nameserver, Pyro5.core.NAMESERVER_NAME, inline=NameServer.INLINE)
        self.nameserver.register(Pyro5.core.NAMESERVER_NAME, self.uri,
                                 metadata={"class:Pyro5.nameserver.NameServer", "class:nameserver.NameServer"})
        self.metrics: MetricsServer | None = None
        if metrics_port is not None:
            try:
                self.metrics = serve_metrics(self.server, host, metrics_port, NameServerCollector(self.nameserver))
            except Exception:
                self.server.close()
                self.nameserver.storage.close()
                raise
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep, name="ns-lease-sweeper", daemon=True)
        self._sweeper.start()
        self._started = False
        self._closed = False

    @property
    def locationStr(self) -> str:  # noqa: N802 - the name Pyro5's daemon has
        return self.server.location

    @property
    def address(self) -> tuple[str, int]:
        return self.server.host, self.server.port

    @property
    def uri(self) -> Pyro5.core.URI:
        return Pyro5.core.URI(self.server.uri_for(Pyro5.core.NAMESERVER_NAME))

    def _sweep(self) -> None:
        while True:
            ns = self.nameserver
            if ns is None:
                return
            if self._stop.wait(min(0.25, ns.default_lease_ttl / 4)):
                return
            try:
                ns.expire()  # (logs each expired lease)
            except Exception:  # pragma: no cover - storage trouble must not kill the sweeper
                log.exception("lease sweep failed")

    def start(self) -> "NameServerDaemon":
        """Serve in a background thread; returns at once (the socket is already bound).

        Raises:
            Pyro5.errors.PyroError: the daemon was closed (like Pyro5's, it cannot be reused)."""
        if self._closed:
            raise Pyro5.errors.PyroError("cannot reuse this object")
        if not self._started:
            self._started = True
            self.server.start()
        return self

    def serve_forever(self, *, handle_signals: bool = True,
                      ready: Callable[["NameServerDaemon"], None] | None = None) -> None:
        """Serve until ``shutdown()``; with ``handle_signals`` SIGTERM/SIGINT stop it cleanly."""
        previous: dict[int, Any] = {}
        if handle_signals:
            def stop(_signo: int, _frame: Any) -> None:
                self._stop.set()
            for signo in (signal.SIGTERM, signal.SIGINT):
                previous[signo] = signal.signal(signo, stop)
        try:
            self.start()
            if ready is not None:
                ready(self)
            while not self._stop.wait(0.5):
                pass
        finally:
            self.close()
            for number, handler in previous.items():  # (the process's own handlers again)
                signal.signal(number, handler)

    def shutdown(self) -> None:
        """End ``serve_forever()``."""
        self._stop.set()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self.server.stop_accepting()
        if self.nameserver is not None:
            self.nameserver.release_watches()  # pools waiting on a watch hear now, and can move on at once
        # a call under way (a registration, say) gets a moment to finish and reply
        self.server.drain(min(2.0, self.settings.connect_timeout))
        self.server.close()
        if self.metrics is not None:
            self.metrics.close()
        ns, self.nameserver = self.nameserver, None
        if ns is not None:
            ns.storage.close()

    def __enter__(self) -> "NameServerDaemon":
        if self._closed:
            raise Pyro5.errors.PyroError("cannot reuse this object")
        return self

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        self.close()


def run(host: str = "127.0.0.1", port: int = 9090, *, storage: str | None = "memory",
        lease_ttl: float = DEFAULT_LEASE_TTL, settings: Settings | None = None,
        echo: Callable[[str], None] = print, metrics_port: int | None = None) -> None:
    """Serve a name server in this process until SIGTERM/SIGINT; prints where it listens once bound."""
    daemon = NameServerDaemon(host, port, storage=storage, lease_ttl=lease_ttl, settings=settings,
                              metrics_port=metrics_port)
    assert daemon.nameserver is not None

    def ready(d: NameServerDaemon) -> None:
        count = len(d.nameserver.storage) - 1 if d.nameserver else 0
        extras = [name for name, on in (("secret", d.verifier), ("TLS", d.tls)) if on]
        echo(f"NS running on {d.locationStr} (storage {storage or 'memory'}, lease TTL {lease_ttl:g}s, "
             f"{count} existing registrations{', ' + ' + '.join(extras) if extras else ''})")
        echo(f"URI = {d.uri}")
        if d.metrics is not None:
            echo(f"metrics on {d.metrics.url}")

    daemon.serve_forever(ready=ready)
    echo("NS shut down.")

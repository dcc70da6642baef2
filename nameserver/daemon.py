"""The daemon that serves a NameServer on an explicit host and port, with lease expiry and clean shutdown."""

from __future__ import annotations

import logging
import signal
import sqlite3
import threading
from collections.abc import Callable
from typing import Any

import Pyro5.core
import Pyro5.nameserver

from pyrorpc.config import Settings
from pyrorpc.security import GuardedDaemon

from .registry import NameServer

log = logging.getLogger("pyrorpc.nameserver")

DEFAULT_LEASE_TTL = 10.0


def open_storage(storage: str | None) -> Any:
    """A Pyro5 storage for ``memory`` (default), ``PATH.sqlite`` / ``PATH.db`` or Pyro5's ``sql:PATH``.

    Raises:
        ValueError: for anything else.
    """
    if storage in (None, "", "memory"):
        return Pyro5.nameserver.MemoryStorage()
    assert storage is not None
    path = storage[4:] if storage.startswith("sql:") else storage
    if storage.startswith("sql:") or path.endswith((".sqlite", ".sqlite3", ".db")):
        if not path or path == ":memory:":
            raise ValueError(f"storage must be 'memory' or PATH.sqlite, got {storage!r}")
        try:
            return Pyro5.nameserver.SqlStorage(path)
        except sqlite3.Error as exc:
            raise ValueError(f"cannot open storage {path!r}: {exc}") from None
    raise ValueError(f"storage must be 'memory' or PATH.sqlite, got {storage!r}")


class NameServerDaemon(GuardedDaemon):
    """A Pyro5 daemon holding one ``nameserver.NameServer`` under Pyro5's well-known object name.

    Use it as a context manager, or call ``start()`` (serves in a thread, returns once bound) or
    ``serve_forever()``. Expired leases are swept several times per TTL. ``settings`` (a
    ``pyrorpc.Settings``) brings the shared secret, TLS files and connection thread count.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 9090, *, storage: str | None = "memory",
                 lease_ttl: float = DEFAULT_LEASE_TTL, settings: Settings | None = None) -> None:
        if not isinstance(lease_ttl, (int, float)) or not 0.2 <= lease_ttl <= 86400:
            raise ValueError(f"`lease_ttl` must be 0.2-86400 seconds, got {lease_ttl!r}")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            raise ValueError(f"`port` must be 0-65535, got {port!r}")
        self.nameserver: NameServer | None = NameServer(open_storage(storage))
        self.nameserver.default_lease_ttl = float(lease_ttl)
        try:
            super().__init__(host, port, settings if settings is not None else Settings())
        except Exception:
            self.nameserver.storage.close()
            raise
        self.register(self.nameserver, Pyro5.core.NAMESERVER_NAME)
        self.nameserver.register(Pyro5.core.NAMESERVER_NAME, self.uriFor(self.nameserver),
                                 metadata={"class:Pyro5.nameserver.NameServer", "class:nameserver.NameServer"})
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep, name="ns-lease-sweeper", daemon=True)
        self._sweeper.start()
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.locationStr.rsplit(":", 1)
        return host.strip("[]"), int(port)

    @property
    def uri(self) -> Pyro5.core.URI:
        return self.uriFor(Pyro5.core.NAMESERVER_NAME)

    def _sweep(self) -> None:
        while True:
            ns = self.nameserver
            if ns is None:
                return
            if self._stop.wait(min(0.25, ns.default_lease_ttl / 4)):
                return
            try:
                dead = ns.expire()
                if dead:
                    log.info("lease expired: %s", ", ".join(dead))
            except Exception:  # pragma: no cover - storage trouble must not kill the sweeper
                log.exception("lease sweep failed")

    def start(self) -> "NameServerDaemon":
        """Serve in a background thread; returns at once (the socket is already bound)."""
        self._thread = threading.Thread(target=self.requestLoop, name="ns-requestloop", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self, *, handle_signals: bool = True,
                      ready: Callable[["NameServerDaemon"], None] | None = None) -> None:
        """Run the request loop until shutdown(); with ``handle_signals`` SIGTERM/SIGINT stop it cleanly."""
        if handle_signals:
            def stop(_signo: int, _frame: Any) -> None:
                threading.Thread(target=self.shutdown, daemon=True).start()
            signal.signal(signal.SIGTERM, stop)
            signal.signal(signal.SIGINT, stop)
        if ready is not None:
            ready(self)
        try:
            self.requestLoop()
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        ns, self.nameserver = self.nameserver, None
        super().close()
        if ns is not None:
            ns.storage.close()

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        if self._thread is not None:
            self.shutdown()
            self._thread.join(5)
        self.close()


def run(host: str = "127.0.0.1", port: int = 9090, *, storage: str | None = "memory",
        lease_ttl: float = DEFAULT_LEASE_TTL, settings: Settings | None = None,
        echo: Callable[[str], None] = print) -> None:
    """Serve a name server in this process until SIGTERM/SIGINT; prints where it listens once bound."""
    daemon = NameServerDaemon(host, port, storage=storage, lease_ttl=lease_ttl, settings=settings)
    assert daemon.nameserver is not None

    def ready(d: NameServerDaemon) -> None:
        count = len(d.nameserver.storage) - 1 if d.nameserver else 0
        extras = [name for name, on in (("secret", d.verifier), ("TLS", d.tls)) if on]
        echo(f"NS running on {d.locationStr} (storage {storage or 'memory'}, lease TTL {lease_ttl:g}s, "
             f"{count} existing registrations{', ' + ' + '.join(extras) if extras else ''})")
        echo(f"URI = {d.uri}")

    daemon.serve_forever(ready=ready)
    echo("NS shut down.")

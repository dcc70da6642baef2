"""WorkerHost: serves one service object on pyrorpc's server core, registered with a lease, drained on stop."""

from __future__ import annotations

import inspect
import logging
import os
import signal
import socket
import threading
import time
import uuid
from typing import Any

from .config import Settings, resolve
from .errors import ConfigurationError, NameServerUnavailableError
from .heartbeats import Relay, next_beat
from .metrics import MetricsServer, check_port, serve_metrics
from .naming import SERVICE_TAG, NameServerClient
from .proxy import set_callback_settings
from .security import server_ssl_context, server_verifier
from .server import Server, ServerStats
from .service import check_service_name, public_methods, service_name_of

__all__ = ["WorkerHost", "WorkerStats"]

WorkerStats = ServerStats  # calls in flight / completed / failed of a worker (the server core counts them)

log = logging.getLogger("pyrorpc.worker")

INSTANCE_MODES = ("single", "session", "percall")


class WorkerHost:
    """Serves one instance of a service class (per process, DRb's front object) to remote callers.

    ``start()`` binds, serves in a thread and registers with the name server under ``S.<host>.<pid>.<id>``
    with the tag ``pyrorpc.service:S``; a heartbeat renews the lease every TTL/3 with this worker's load
    and re-registers after a name server restart. The heartbeat goes over one kept, authenticated connection
    to the name server (no handshake per renewal); given several name servers, it renews with the one that
    answers and moves on to the next when it fails. ``stop()`` (also on exit and, inside ``serve()``, on
    SIGTERM/SIGINT) deregisters first, stops accepting, lets in-flight calls finish (``drain_timeout``)
    and closes.

    Args:
        cls: the service class (``@pyrorpc.service``) or any class, then ``service=`` names it.
        ns: name server ``HOST:PORT``, or several (``"a:9090,b:9090"``; env ``PYRORPC_NS``). Name servers
            that share a registry need shared storage (etcd): with memory storage each keeps its own, and the
            worker is registered only with the one it renews with.
        service: service name; defaults to the one given by ``@pyrorpc.service``.
        host, port: where to listen (port 0 = any free port).
        instance_mode: ``single`` (one shared instance, default), ``session`` (per connection) or ``percall``.
        threads: calls this worker runs at once (idle connections hold no thread).
        max_connections: client connections open at once; the next one is refused with a clear error.
        idle_timeout: seconds before the worker closes an idle connection (clients reconnect by themselves).
        lease_ttl: lease TTL to ask for; None takes the name server's.
        drain_timeout: seconds ``stop()`` waits for in-flight calls.
        register: False serves without a name server (reach it by its ``uri``).
        metrics_port: serve Prometheus metrics on ``http://host:metrics_port/metrics`` (the ``metrics`` extra;
            0: any free port, then ``metrics.port``); None (default): no endpoint. The statistics behind it
            are always kept (also ``Pyro.Daemon``'s ``stats()``).
        settings: a ``pyrorpc.Settings``; keyword arguments (also ``secret=``, ``tls_cert=``...) override it.

    Raises:
        ConfigurationError: bad service name or instance mode.
        NameServerUnavailableError: from ``start()``, when the name server cannot be reached.
    """

    def __init__(self, cls: type, *, ns: Any = None, service: str | None = None, host: str | None = None,
                 port: int = 0, instance_mode: str = "single", threads: int | None = None,
                 max_connections: int | None = None, idle_timeout: float | None = None,
                 lease_ttl: float | None = None, drain_timeout: float | None = None, register: bool = True,
                 settings: Settings | None = None, metrics_port: int | None = None, **options: Any) -> None:
        if not inspect.isclass(cls):
            raise ConfigurationError(f"WorkerHost needs a class, got {cls!r}")
        try:
            self.settings = resolve(settings, ns=ns, host=host, threads=threads, max_connections=max_connections,
                                    idle_timeout=idle_timeout, lease_ttl=lease_ttl, drain_timeout=drain_timeout,
                                    **options)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        name = service if service is not None else service_name_of(cls)  # "" is a bad name, not "no name"
        if name is None:
            raise ConfigurationError(f"{cls.__qualname__} has no @pyrorpc.service name; "
                                     "pass service= (CLI: --service NAME)")
        try:
            self.service = check_service_name(name)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        self.metrics_port = check_port(metrics_port)
        self.metrics: MetricsServer | None = None
        if instance_mode not in INSTANCE_MODES:
            raise ConfigurationError(f"`instance_mode` must be one of {', '.join(INSTANCE_MODES)}, "
                                     f"got {instance_mode!r}")
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ConfigurationError(f"`port` must be 0-65535, got {port!r}")
        self.cls = cls
        self.port = port
        self.instance_mode = instance_mode
        self.register = register
        self.stats = ServerStats()
        self.hostname = socket.gethostname().split(".")[0] or "localhost"
        self.name = f"{self.service}.{self.hostname}.{os.getpid()}.{uuid.uuid4().hex[:6]}"
        self.started = time.time()
        self.methods = public_methods(cls)
        self.uri: str | None = None
        self.server: Server | None = None
        self.lease_ttl: float | None = None
        self._naming = NameServerClient(self.settings)
        self._relay = Relay.from_env() if register else None  # a supervisor renewing for its workers
        self._loop_thread: threading.Thread | None = None
        self._heartbeat_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()
        self._drained = True

    def __repr__(self) -> str:
        return f"<WorkerHost {self.name} {self.uri or 'not started'}>"

    @property
    def metadata(self) -> set[str]:
        return {SERVICE_TAG + self.service, f"pyrorpc.host:{self.hostname}", f"pyrorpc.pid:{os.getpid()}",
                f"pyrorpc.threads:{self.settings.threads}", f"pyrorpc.started:{int(self.started)}"}

    def load(self) -> dict[str, Any]:
        """The load report sent with each heartbeat."""
        report: dict[str, Any] = self.stats.snapshot()
        report["connections"] = max(0, self.server.connection_count()) if self.server is not None else 0
        report.update(host=self.hostname, pid=os.getpid(), threads=self.settings.threads, started=self.started)
        return report

    # lifecycle
    def start(self) -> "WorkerHost":
        """Bind, serve in a background thread and register; returns once all three are done."""
        if self.server is not None:
            raise RuntimeError("WorkerHost already started")
        settings = self.settings
        server = Server(settings.host, self.port, threads=settings.threads, max_connections=settings.max_connections,
                        idle_timeout=settings.idle_timeout, handshake_timeout=settings.connect_timeout,
                        max_message_size=settings.max_message_size, ssl_context=server_ssl_context(settings),
                        verify=server_verifier(settings), send_timeout=settings.timeout, name=self.name,
                        stats=self.stats)
        try:
            self.uri = server.register(self.cls, self.name, instance_mode=self.instance_mode, only_exposed=False,
                                       label=self.service)
            server.metadata_extra = {
                "service": self.service, "name": self.name, "threads": settings.threads,
                "idempotent": sorted(m for m, f in self.methods.items() if f["idempotent"]),
            }
            self.server = server
            set_callback_settings(settings)  # references passed to our methods call back with our secret/TLS
            if self.metrics_port is not None:
                self.metrics = serve_metrics(server, settings.host, self.metrics_port)
            server.start()
            if self.register:
                self._first_registration()
                self._heartbeat_thread = threading.Thread(target=self._heartbeat, name=f"{self.name}-heartbeat",
                                                          daemon=True)
                self._heartbeat_thread.start()
        except BaseException:
            self.server = None
            server.close()
            if self.metrics is not None:
                self.metrics.close()
                self.metrics = None
            raise
        log.info("worker %s serving on %s", self.name, self.uri)
        return self

    def _first_registration(self) -> None:
        # a name server started a moment ago (`ns start & worker start`) gets connect_timeout to come up
        deadline = time.monotonic() + self.settings.connect_timeout
        while True:
            try:
                self._renew()
                return
            except NameServerUnavailableError:
                if time.monotonic() + 0.2 > deadline:
                    raise
                time.sleep(0.2)

    def _renew(self) -> None:
        assert self.uri is not None
        ttl = self.lease_ttl or self.settings.lease_ttl
        # a name server that does not answer within a third of the TTL is left for the next one in the list
        wait = min(self.settings.connect_timeout, max(0.5, ttl / 3)) if ttl else None
        self.lease_ttl = self._naming.lease(self.name, self.uri, self.metadata, self.load(),
                                            self.settings.lease_ttl, timeout=wait)

    def _heartbeat(self) -> None:
        healthy = True
        relay = self._relay
        while True:
            period = (self.lease_ttl or self.settings.lease_ttl or 10.0) / 3
            if not healthy:
                period = min(period, 0.5)
            elif relay is not None and not relay.broken and self._naming.can_renew_many:  # in step with the others
                period = max(0.0, next_beat(time.monotonic(), period, relay.phase) - time.monotonic())
            if self._stopping.wait(period):
                return
            if healthy and relay is not None and not relay.broken and self._naming.can_renew_many:
                assert self.uri is not None
                if relay.beat(self.name, self.uri, self.metadata, self.load(), self.settings.lease_ttl):
                    continue  # the supervisor renews it with its other workers' (pyrorpc.heartbeats)
            try:
                self._renew()
                if not healthy:
                    log.info("worker %s: name server reachable again, lease renewed", self.name)
                healthy = True
            except NameServerUnavailableError as exc:
                if healthy:
                    log.warning("worker %s: cannot renew lease: %s", self.name, exc,
                                extra={"event": "renewal failing", "worker": self.name, "service": self.service})
                healthy = False
            except Exception:  # pragma: no cover - keep heartbeating whatever the name server says
                log.exception("worker %s: lease renewal failed", self.name)
                healthy = False

    def serve(self, *, handle_signals: bool = True) -> None:
        """Start if needed and block until ``stop()``; SIGTERM/SIGINT stop it gracefully (main thread only)."""
        if self.server is None:
            self.start()
        previous: dict[int, Any] = {}
        if handle_signals and threading.current_thread() is threading.main_thread():
            def on_signal(signo: int, _frame: Any) -> None:
                log.info("worker %s: signal %d, draining", self.name, signo,
                         extra={"event": "draining", "worker": self.name, "service": self.service})
                threading.Thread(target=self.stop, name="worker-stop", daemon=True).start()
            for signo in (signal.SIGTERM, signal.SIGINT):
                previous[signo] = signal.signal(signo, on_signal)
        try:
            while not self._stopped.wait(0.5):
                pass
        finally:
            for number, handler in previous.items():  # (the process's own handlers again, e.g. Ctrl-C)
                signal.signal(number, handler)

    def stop(self) -> bool:
        """Deregister, stop accepting, drain in-flight calls (replies included), close.

        Returns within ``drain_timeout`` plus a second or two whatever the calls and the name server do;
        False if the drain timed out (calls still running are abandoned and logged). A second call
        returns the first one's result."""
        with self._stop_lock:
            if self._stopped.is_set() or self.server is None:
                self._stopped.set()
                return self._drained
            self._stopping.set()
            server = self.server
            # leave the registry first, without letting an unreachable name server hold up the drain
            leaving = threading.Thread(target=self._deregister, name=f"{self.name}-deregister", daemon=True)
            leaving.start()
            leaving.join(min(1.0, self.settings.drain_timeout))
            server.stop_accepting()
            drained = server.drain(self.settings.drain_timeout)
            if not drained:
                log.warning("worker %s: drain timeout after %gs, %d calls still in flight are abandoned",
                            self.name, self.settings.drain_timeout, self.stats.in_flight)
            server.close()
            leaving.join(0.5)
            if not leaving.is_alive():
                self._naming.close()
            self._drained = drained
            self._stopped.set()
            if self.metrics is not None:
                self.metrics.close()
            log.info("worker %s stopped (drained=%s)", self.name, drained,
                     extra={"event": "drained" if drained else "drain timeout", "worker": self.name,
                            "service": self.service, "in_flight": self.stats.in_flight})
            return drained

    def _deregister(self) -> None:
        if self._heartbeat_thread is not None:
            # a renewal still under way would register us again right after we deregister
            self._heartbeat_thread.join(self.settings.connect_timeout + 1)
        if self.register:
            if self._relay is not None:
                self._relay.bye(self.name)  # (before the removal: a renewal racing with it is taken back)
            try:
                self._naming.remove(self.name)
            except Exception as exc:  # the lease will expire anyway
                log.warning("worker %s: could not deregister: %s", self.name, exc)

    def __enter__(self) -> "WorkerHost":
        if self.server is None:
            self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


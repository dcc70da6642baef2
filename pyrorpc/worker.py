"""WorkerHost: serves one service object in a Pyro5 daemon, registered with a lease, drained on stop."""

from __future__ import annotations

import functools
import inspect
import logging
import os
import queue
import signal
import socket
import threading
import time
import types
import uuid
from collections.abc import Callable
from typing import Any

import Pyro5.server
from Pyro5.callcontext import current_context

from .config import Settings, resolve
from .errors import ConfigurationError, NameServerUnavailableError, WorkerDrainingError, make_portable
from .naming import SERVICE_TAG, NameServerClient
from .security import GuardedDaemon
from .service import check_service_name, public_methods, service_name_of
from .wire import SERIALIZERS_VIEW

__all__ = ["WorkerHost", "WorkerStats"]

log = logging.getLogger("pyrorpc.worker")

INSTANCE_MODES = ("single", "session", "percall")


class WorkerStats:
    """Calls in flight, completed and failed in this worker; refuses calls once draining."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # only stop() waits on it
        self.in_flight = 0
        self.calls = 0
        self.errors = 0
        self.draining = False

    def enter(self) -> None:
        with self._lock:
            if self.draining:
                raise WorkerDrainingError("worker is shutting down; the call did not run")
            self.in_flight += 1

    def leave(self, failed: bool) -> None:
        with self._lock:
            self.in_flight -= 1
            self.calls += 1
            if failed:
                self.errors += 1
            if self.draining and self.in_flight == 0:
                self._cond.notify_all()

    def drain(self, timeout: float) -> bool:
        """Refuse new calls and wait until none is in flight; False if the timeout ran out first."""
        with self._cond:
            self.draining = True
            return self._cond.wait_for(lambda: self.in_flight == 0, timeout)

    def snapshot(self) -> dict[str, int]:
        with self._cond:
            return {"in_flight": self.in_flight, "calls": self.calls, "errors": self.errors}


def _tracked_class(cls: type, stats: WorkerStats) -> type:
    """A subclass of ``cls`` whose public methods count themselves in ``stats``."""
    namespace: dict[str, Any] = {"__module__": cls.__module__, "__qualname__": cls.__qualname__}
    for name in public_methods(cls):
        attr = inspect.getattr_static(cls, name)
        if not inspect.isfunction(attr):
            continue  # static/class methods and other descriptors are served as they are
        namespace[name] = _tracked(attr, stats)
    tracked = type(cls.__name__, (cls,), namespace)
    return Pyro5.server.expose(tracked)


def _tracked(func: Callable[..., Any], stats: WorkerStats) -> Callable[..., Any]:
    @functools.wraps(func)
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        stats.enter()
        failed = True
        try:
            result = func(self, *args, **kwargs)
            failed = False
            return result
        except Exception as exc:
            make_portable(type(exc))
            raise
        finally:
            stats.leave(failed)
    return method


class OnewayExecutor:
    """Runs oneway calls on up to ``threads`` reused threads with a bounded queue.

    Stock Pyro5 starts a new thread for every oneway call; this is cheaper, bounds the threads, and a
    full queue blocks the connection that sends more (TCP backpressure) instead of piling up. A queued
    call counts as in flight, so a draining worker finishes it before exiting.
    """

    def __init__(self, stats: WorkerStats, threads: int, queue_size: int) -> None:
        self.stats = stats
        self.max_threads = threads
        self.queue: queue.Queue[Any] = queue.Queue(queue_size)
        self.threads: list[threading.Thread] = []
        self.idle = 0
        self._lock = threading.Lock()

    def submit(self, method: Callable[..., Any], vargs: Any, kwargs: Any, daemon: Any, client: Any) -> None:
        self.stats.enter()  # refuses (WorkerDrainingError) once draining
        with self._lock:
            if self.idle == 0 and len(self.threads) < self.max_threads:
                t = threading.Thread(target=self._run, name=f"oneway-{len(self.threads)}", daemon=True)
                self.threads.append(t)
                t.start()
        self.queue.put((method, vargs, kwargs, daemon, client, current_context.to_global()))

    def _run(self) -> None:
        while True:
            with self._lock:
                self.idle += 1
            item = self.queue.get()
            with self._lock:
                self.idle -= 1
            if item is None:
                return
            method, vargs, kwargs, daemon, client, context = item
            current_context.from_global(context)
            # submit() counted this call already: run the service's own function, not its counting wrapper
            inner = getattr(getattr(method, "__func__", None), "__wrapped__", None)
            failed = True
            try:
                if inner is not None:
                    inner(method.__self__, *vargs, **kwargs)
                else:
                    method(*vargs, **kwargs)
                failed = False
            except Exception as exc:
                daemon.methodcall_error_handler(daemon, client, method, vargs, kwargs, exc)
            finally:
                self.stats.leave(failed)

    def shutdown(self) -> None:
        for _ in self.threads:
            self.queue.put(None)
        for t in self.threads:
            t.join(5)


class _QueuedOneway:
    """Stands in for Pyro5's ``_OnewayCallThread`` inside our daemon's handleRequest."""

    __slots__ = ("args",)

    def __init__(self, method: Any, vargs: Any, kwargs: Any, daemon: Any, client: Any) -> None:
        self.args = (method, vargs, kwargs, daemon, client)

    def start(self) -> None:
        self.args[3].oneway_executor.submit(*self.args)


def _with_globals(func: Callable[..., Any], **replace: Any) -> Callable[..., Any]:
    """A copy of ``func`` that sees ``replace`` instead of some of its module's globals (for this class
    only: Pyro5's module is untouched)."""
    namespace = dict(func.__globals__, **replace)
    clone = types.FunctionType(func.__code__, namespace, func.__name__, func.__defaults__, func.__closure__)
    clone.__kwdefaults__ = func.__kwdefaults__
    clone.__qualname__ = func.__qualname__
    return clone


@Pyro5.server.expose
class WorkerDaemonObject(Pyro5.server.DaemonObject):
    """The daemon's own object; its metadata also says which methods are idempotent."""

    def get_metadata(self, objectId: str) -> dict[str, Any]:  # noqa: N803 - Pyro5's name
        meta = super().get_metadata(objectId)
        info = getattr(self.daemon, "pyrorpc_info", None)
        if info is not None:
            meta["pyrorpc"] = info
        return meta


class _WorkerDaemon(GuardedDaemon):
    """A guarded daemon that knows its client connections, so stop() can close them after draining."""

    # Pyro5's request handling, with oneway calls queued to our executor instead of a thread each, and
    # replies (exceptions too) serialized so that bytes arrive as bytes
    handleRequest = _with_globals(Pyro5.server.Daemon.handleRequest, _OnewayCallThread=_QueuedOneway,
                                  serializers=SERIALIZERS_VIEW)
    _sendExceptionResponse = _with_globals(Pyro5.server.Daemon._sendExceptionResponse, serializers=SERIALIZERS_VIEW)

    def __init__(self, settings: Settings, port: int, stats: WorkerStats) -> None:
        super().__init__(settings.host, port, settings, interface=WorkerDaemonObject)
        self.oneway_executor = OnewayExecutor(stats, settings.threads, 4 * settings.threads)
        self.pyrorpc_info: dict[str, Any] | None = None
        self.connections: set[Any] = set()
        self._conn_lock = threading.Lock()

    def validateHandshake(self, conn: Any, data: Any) -> Any:  # noqa: N802 - Pyro5 hook
        response = super().validateHandshake(conn, data)
        with self._conn_lock:
            self.connections.add(conn)
        return response

    def clientDisconnect(self, conn: Any) -> None:  # noqa: N802 - Pyro5 hook
        with self._conn_lock:
            self.connections.discard(conn)

    def stop_accepting(self, loop_thread: threading.Thread | None) -> None:
        """End the accept loop and close the listening socket; established connections stay open."""
        server = self.transportServer
        if server is None:
            return
        # a connection accepted from now on is closed at once; the loop ends after its current select
        server.shutting_down = True
        server.wakeup()
        if loop_thread is not None:
            loop_thread.join(5)
        sock, server.sock = server.sock, None
        if sock is not None:
            sock.close()

    def close_connections(self) -> None:
        with self._conn_lock:
            conns, self.connections = list(self.connections), set()
        for conn in conns:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()


class WorkerHost:
    """Serves one instance of a service class (per process, DRb's front object) to remote callers.

    ``start()`` binds, serves in a thread and registers with the name server under ``S.<host>.<pid>.<id>``
    with the tag ``pyrorpc.service:S``; a heartbeat renews the lease every TTL/3 with this worker's load
    and re-registers after a name server restart. ``stop()`` (also on exit and, inside ``serve()``, on
    SIGTERM/SIGINT) deregisters first, stops accepting, lets in-flight calls finish (``drain_timeout``)
    and closes.

    Args:
        cls: the service class (``@pyrorpc.service``) or any class, then ``service=`` names it.
        ns: name server ``HOST:PORT`` (env ``PYRORPC_NS``).
        service: service name; defaults to the one given by ``@pyrorpc.service``.
        host, port: where to listen (port 0 = any free port).
        instance_mode: ``single`` (one shared instance, default), ``session`` (per connection) or ``percall``.
        threads: connection threads (= concurrent client connections this worker accepts).
        lease_ttl: lease TTL to ask for; None takes the name server's.
        drain_timeout: seconds ``stop()`` waits for in-flight calls.
        register: False serves without a name server (reach it by its ``uri``).
        settings: a ``pyrorpc.Settings``; keyword arguments (also ``secret=``, ``tls_cert=``...) override it.

    Raises:
        ConfigurationError: bad service name or instance mode.
        NameServerUnavailableError: from ``start()``, when the name server cannot be reached.
    """

    def __init__(self, cls: type, *, ns: Any = None, service: str | None = None, host: str | None = None,
                 port: int = 0, instance_mode: str = "single", threads: int | None = None,
                 lease_ttl: float | None = None, drain_timeout: float | None = None, register: bool = True,
                 settings: Settings | None = None, **options: Any) -> None:
        if not inspect.isclass(cls):
            raise ConfigurationError(f"WorkerHost needs a class, got {cls!r}")
        self.settings = resolve(settings, ns=ns, host=host, threads=threads, lease_ttl=lease_ttl,
                                drain_timeout=drain_timeout, **options)
        name = service or service_name_of(cls)
        if name is None:
            raise ConfigurationError(f"{cls.__qualname__} has no @pyrorpc.service name; "
                                     "pass service= (CLI: --service NAME)")
        try:
            self.service = check_service_name(name)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        if instance_mode not in INSTANCE_MODES:
            raise ConfigurationError(f"`instance_mode` must be one of {', '.join(INSTANCE_MODES)}, "
                                     f"got {instance_mode!r}")
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ConfigurationError(f"`port` must be 0-65535, got {port!r}")
        self.cls = cls
        self.port = port
        self.instance_mode = instance_mode
        self.register = register
        self.stats = WorkerStats()
        self.hostname = socket.gethostname().split(".")[0] or "localhost"
        self.name = f"{self.service}.{self.hostname}.{os.getpid()}.{uuid.uuid4().hex[:6]}"
        self.started = time.time()
        self.methods = public_methods(cls)
        self.uri: str | None = None
        self.daemon: _WorkerDaemon | None = None
        self.lease_ttl: float | None = None
        self._naming = NameServerClient(self.settings)
        self._loop_thread: threading.Thread | None = None
        self._heartbeat_thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<WorkerHost {self.name} {self.uri or 'not started'}>"

    @property
    def metadata(self) -> set[str]:
        return {SERVICE_TAG + self.service, f"pyrorpc.host:{self.hostname}", f"pyrorpc.pid:{os.getpid()}",
                f"pyrorpc.threads:{self.settings.threads}", f"pyrorpc.started:{int(self.started)}"}

    def load(self) -> dict[str, Any]:
        """The load report sent with each heartbeat."""
        report: dict[str, Any] = self.stats.snapshot()
        report["connections"] = len(self.daemon.connections) if self.daemon is not None else 0
        report.update(host=self.hostname, pid=os.getpid(), threads=self.settings.threads, started=self.started)
        return report

    # lifecycle
    def start(self) -> "WorkerHost":
        """Bind, serve in a background thread and register; returns once all three are done."""
        if self.daemon is not None:
            raise RuntimeError("WorkerHost already started")
        daemon = _WorkerDaemon(self.settings, self.port, self.stats)
        try:
            if self.instance_mode == "single":
                target: Any = _tracked_class(self.cls, self.stats)()
            else:
                target = _tracked_class(self.cls, self.stats)
                target._pyroInstancing = (self.instance_mode, None)
            self.uri = str(daemon.register(target, self.name))
            daemon.pyrorpc_info = {
                "service": self.service, "name": self.name, "threads": self.settings.threads,
                "idempotent": sorted(m for m, f in self.methods.items() if f["idempotent"]),
            }
            self.daemon = daemon
            self._loop_thread = threading.Thread(target=daemon.requestLoop, name=f"{self.name}-loop", daemon=True)
            self._loop_thread.start()
            if self.register:
                self._first_registration()
                self._heartbeat_thread = threading.Thread(target=self._heartbeat, name=f"{self.name}-heartbeat",
                                                          daemon=True)
                self._heartbeat_thread.start()
        except BaseException:
            self.daemon = None
            daemon.stop_accepting(self._loop_thread)
            daemon.close()
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
        self.lease_ttl = self._naming.lease(self.name, self.uri, self.metadata, self.load(),
                                            self.settings.lease_ttl)

    def _heartbeat(self) -> None:
        healthy = True
        while True:
            period = (self.lease_ttl or self.settings.lease_ttl or 10.0) / 3
            if not healthy:
                period = min(period, 0.5)
            if self._stopping.wait(period):
                return
            try:
                self._renew()
                if not healthy:
                    log.info("worker %s: name server reachable again, lease renewed", self.name)
                healthy = True
            except NameServerUnavailableError as exc:
                if healthy:
                    log.warning("worker %s: cannot renew lease: %s", self.name, exc)
                healthy = False
            except Exception:  # pragma: no cover - keep heartbeating whatever the name server says
                log.exception("worker %s: lease renewal failed", self.name)
                healthy = False

    def serve(self, *, handle_signals: bool = True) -> None:
        """Start if needed and block until ``stop()``; SIGTERM/SIGINT stop it gracefully (main thread only)."""
        if self.daemon is None:
            self.start()
        if handle_signals and threading.current_thread() is threading.main_thread():
            def on_signal(signo: int, _frame: Any) -> None:
                log.info("worker %s: signal %d, draining", self.name, signo)
                threading.Thread(target=self.stop, name="worker-stop", daemon=True).start()
            signal.signal(signal.SIGTERM, on_signal)
            signal.signal(signal.SIGINT, on_signal)
        while not self._stopped.wait(0.5):
            pass

    def stop(self) -> bool:
        """Deregister, stop accepting, drain in-flight calls, close. Returns False if the drain timed out."""
        with self._stop_lock:
            if self._stopped.is_set() or self.daemon is None:
                self._stopped.set()
                return True
            self._stopping.set()
            daemon = self.daemon
            if self._heartbeat_thread is not None:
                # a renewal still under way would register us again right after we deregister
                self._heartbeat_thread.join(self.settings.connect_timeout + 1)
            if self.register:
                try:
                    self._naming.remove(self.name)
                except Exception as exc:  # the lease will expire anyway
                    log.warning("worker %s: could not deregister: %s", self.name, exc)
            daemon.stop_accepting(self._loop_thread)
            drained = self.stats.drain(self.settings.drain_timeout)
            if not drained:
                log.warning("worker %s: drain timeout, %d calls still in flight", self.name, self.stats.in_flight)
            daemon.close_connections()
            daemon.oneway_executor.shutdown()
            daemon.close()
            self._stopped.set()
            log.info("worker %s stopped (drained=%s)", self.name, drained)
            return drained

    def __enter__(self) -> "WorkerHost":
        if self.daemon is None:
            self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


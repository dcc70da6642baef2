"""Proxy: a thread-safe client bound to one worker; Endpoint: pooled Pyro5 connections to one worker."""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import Pyro5.core
import Pyro5.errors
from Pyro5 import protocol
from Pyro5.serializers import SerializerBase

from .codec import set_proxy_factory
from .compat import is_exception_wrapper, remote_traceback, unwrap_exception
from .config import MAX_TIMEOUT, MIN_TIMEOUT, Settings, resolve
from .errors import (
    AuthenticationError,
    CallTimeoutError,
    ConfigurationError,
    NoWorkersError,
    WorkerDrainingError,
    WorkerLostError,
)
from .naming import NameServerClient, WorkerInfo
from .security import open_connection
from .wire import LimitedConnection, invoke

__all__ = ["Endpoint", "NotSent", "Proxy", "RemoteMethod", "SlotsBusy", "connect", "set_callback_settings"]


class NotSent(Exception):
    """Internal: the call never reached the worker (connect failed, worker draining); safe to resend."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class SlotsBusy(CallTimeoutError):
    """Every call slot of the worker stayed busy until the timeout (the worker is not at fault)."""


def _remote(exc: BaseException) -> bool:
    # Pyro5 marks exceptions raised by the remote method with their remote traceback
    return remote_traceback(exc) is not None


class Endpoint:
    """Connections to one worker, reused across calls and threads, at most ``capacity`` at once.

    ``call`` raises ``NotSent`` when the request never left (so any method may go elsewhere),
    ``WorkerLostError`` when the connection broke after sending, ``CallTimeoutError`` on timeout, and the
    remote method's own exception otherwise.
    """

    def __init__(self, uri: str, settings: Settings, name: str | None = None, capacity: int | None = None) -> None:
        self.uri = Pyro5.core.URI(uri)
        self.name = name or self.uri.object
        self.settings = settings
        self.capacity = capacity or settings.max_in_flight
        self.in_flight = 0
        self.calls = 0
        self.errors = 0
        self.idempotent: frozenset[str] = frozenset()
        self.oneway: frozenset[str] = frozenset()
        self.methods: frozenset[str] | None = None
        self.max_idle = float("inf")  # seconds a connection may rest before we retire it
        self._idle: list[LimitedConnection] = []
        self._busy: set[Any] = set()  # sockets with a call in flight (abort() shuts them down)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # for callers waiting for a free slot
        self._waiting = 0
        self._closed = False

    def __repr__(self) -> str:
        return f"<Endpoint {self.name} in_flight={self.in_flight}>"

    # connections
    def _connect(self) -> LimitedConnection:
        try:
            conn, meta = open_connection(self.uri, self.settings)
        except AuthenticationError:
            raise
        except Pyro5.errors.PyroError as exc:
            raise NotSent(exc) from exc
        info = meta.get("pyrorpc") or {}
        idle = info.get("idle_timeout")
        if isinstance(idle, (int, float)) and idle > 0:
            # the worker closes connections idle that long: retire ours well before it can race a call
            self.max_idle = idle / 2
        if self.methods is None:
            self.idempotent = frozenset(info.get("idempotent", ()))
            self.oneway = frozenset(meta.get("oneway", ()))
            self.methods = frozenset(meta.get("methods", ()))
        return conn

    def _enter(self, method: str, wait: float) -> LimitedConnection | None:
        """Take a call slot (waiting up to ``wait``) and an idle connection if there is one."""
        with self._lock:
            if self.in_flight < self.capacity and not self._closed:
                self.in_flight += 1
                return self._idle.pop() if self._idle else None
        with self._cond:
            self._waiting += 1
            try:
                if not self._cond.wait_for(lambda: self.in_flight < self.capacity or self._closed, wait):
                    raise SlotsBusy(f"{self.name}.{method}: all {self.capacity} call slots busy for {wait:g}s")
            finally:
                self._waiting -= 1
            if self._closed:
                raise NotSent(Pyro5.errors.CommunicationError(f"{self.name}: endpoint closed"))
            self.in_flight += 1
            return self._idle.pop() if self._idle else None

    def _leave(self, conn: LimitedConnection | None, failed: bool, keep: bool) -> None:
        with self._lock:
            self.in_flight -= 1
            self.calls += 1
            self.errors += failed
            if conn is not None:
                self._busy.discard(conn.sock)
                if keep and not self._closed:
                    conn.last_used = time.monotonic()
                    self._idle.append(conn)
                    conn = None
            if self._waiting:
                self._cond.notify()
        if conn is not None:
            conn.close()

    def _ready(self, conn: LimitedConnection | None) -> LimitedConnection:
        """A live connection: ``conn`` if it still is one, another idle one, or a new one (NotSent)."""
        while conn is not None:
            # An idle connection never has data waiting: readable means the worker closed it (died or
            # stopped). Dropping it here is what keeps a call to a dead worker from being "sent" at all.
            # One idle for half the worker's idle_timeout is retired before the worker closes it.
            if conn.idle_and_alive() and time.monotonic() - conn.last_used < self.max_idle:
                return conn
            conn.close()
            with self._lock:
                conn = self._idle.pop() if self._idle else None
        return self._connect()

    def call(self, method: str, args: Any, kwargs: dict[str, Any] | None, timeout: float,
             oneway: bool = False, wait: float | None = None, batch: bool = False) -> Any:
        """One call: take a slot (waiting up to ``wait``, default ``timeout``) and a connection, invoke.

        With ``batch`` ``args`` is a list of argument tuples for ``method``, sent as one Pyro5 batch
        message: the worker runs them in order and stops at the first exception; the result is the list
        of results so far (an exception as Pyro5's exception wrapper, see ``compat``). A batch refused whole by
        a draining worker raises NotSent."""
        conn = self._enter(method, timeout if wait is None else wait)
        failed = True
        keep = False
        try:
            conn = self._ready(conn)
            conn.set_timeout(timeout)
            self._busy.add(conn.sock)
            flags = protocol.FLAGS_ONEWAY if (oneway or method in self.oneway) else 0
            try:
                if batch:
                    result = invoke(conn, "<batch>", [(method, a, {}) for a in args], None,
                                    flags | protocol.FLAGS_BATCH)
                    if result and is_exception_wrapper(result[0]) \
                            and isinstance(unwrap_exception(result[0]), WorkerDrainingError):
                        raise unwrap_exception(result[0])
                else:
                    result = invoke(conn, method, args, kwargs or {}, flags)
            except WorkerDrainingError as exc:
                # the worker is stopping: no further call goes there (it closes its connections soon, and
                # a call sent just then would be lost), the pool sends this one elsewhere
                self.close()
                raise NotSent(exc) from exc
            except Pyro5.errors.TimeoutError as exc:
                if _remote(exc):
                    keep = True
                    raise
                raise CallTimeoutError(f"{self.name}.{method}: no reply within {timeout:g}s") from exc
            except Pyro5.errors.SerializeError as exc:
                # our arguments could not be encoded (nothing sent), or the reply could not be decoded
                # (the call ran): either way not a lost worker
                keep = _remote(exc)
                raise
            except Pyro5.errors.CommunicationError as exc:
                if _remote(exc):
                    keep = True
                    raise
                raise WorkerLostError(f"{self.name}.{method}: connection lost after the call was sent ({exc})") \
                    from exc
            except Exception:
                keep = True  # the method's own exception: the connection is in step
                raise
            except BaseException:
                # KeyboardInterrupt and the like, mid-call: a reply may still arrive on this connection,
                # so it must never be used again
                keep = False
                raise
            keep = True
            failed = False
            return result
        finally:
            self._leave(conn, failed, keep)

    @property
    def closed(self) -> bool:
        """Closed by ``close()`` or because the worker said it is draining: no further call goes out."""
        return self._closed

    def close(self, *, abort: bool = False) -> None:
        """Close idle connections (busy ones close as their calls end). With ``abort`` the calls in flight
        are cut off too: they fail with WorkerLostError (retried elsewhere when idempotent). For a worker
        known to be gone (lease expired), where waiting for them would only wait for the timeout."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            busy = list(self._busy) if abort else []
            self._cond.notify_all()
        for conn in idle:
            conn.close()
        for sock in busy:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class RemoteMethod:
    """A remote method: call it, or use ``.oneway(...)``, ``.future(...)``, ``await .aio(...)``."""

    __slots__ = ("_client", "_name", "_timeout")

    def __init__(self, client: "Dispatcher", name: str, timeout: float | None = None) -> None:
        self._client = client
        self._name = name
        self._timeout = timeout

    def __repr__(self) -> str:
        return f"<RemoteMethod {self._name} of {self._client!r}>"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._client._call(self._name, args, kwargs, self._timeout, False)

    def oneway(self, *args: Any, **kwargs: Any) -> None:
        """Send and return None once written to the socket: at-most-once, no result, no remote error."""
        self._client._call(self._name, args, kwargs, self._timeout, True)

    def future(self, *args: Any, **kwargs: Any) -> concurrent.futures.Future:  # type: ignore[type-arg]
        """Run the call in the background; blocks only while the client's in-flight window is full."""
        return self._client._submit(self._name, args, kwargs, self._timeout)

    async def aio(self, *args: Any, **kwargs: Any) -> Any:
        """Awaitable form of the call."""
        loop = asyncio.get_running_loop()
        fut = await loop.run_in_executor(None, lambda: self.future(*args, **kwargs))
        return await asyncio.wrap_future(fut)

    def with_timeout(self, seconds: float) -> "RemoteMethod":
        """The same method with its own call timeout."""
        if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) \
                or not MIN_TIMEOUT <= seconds <= MAX_TIMEOUT:
            raise ConfigurationError(f"`seconds` must be {MIN_TIMEOUT:g}-{MAX_TIMEOUT:g} seconds, got {seconds!r}")
        return type(self)(self._client, self._name, float(seconds))


class Window:
    """Counts calls submitted but not finished, and makes submitters wait while ``limit()`` are out."""

    def __init__(self, limit: Callable[[], int]) -> None:
        self.limit = limit
        self.outstanding = 0
        self._cond = threading.Condition(threading.Lock())

    def acquire(self, timeout: float) -> bool:
        with self._cond:
            ok = self._cond.wait_for(lambda: self.outstanding < max(1, self.limit()), timeout)
            if ok:
                self.outstanding += 1
            return ok

    def release(self) -> None:
        with self._cond:
            self.outstanding -= 1
            self._cond.notify()

    def wake(self) -> None:
        """Re-check waiters (after the limit grew)."""
        with self._cond:
            self._cond.notify_all()


class Dispatcher:
    """What Proxy and Pool share: method objects, futures, close, context manager.

    Subclasses implement ``_call(method, args, kwargs, timeout, oneway)``: the single call path.
    """

    _method_class: type[RemoteMethod] = RemoteMethod

    _max_threads = 512  # futures in flight are bounded by the window, not by this

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._methods: dict[str, RemoteMethod] = {}
        self._window = Window(self._capacity)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        self._closed = False

    def __getattr__(self, name: str) -> RemoteMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        return self.method(name)

    def method(self, name: str) -> RemoteMethod:
        """The remote method ``name``; use it when the name collides with one of this object's methods."""
        try:
            return self._methods[name]
        except KeyError:
            if not isinstance(name, str) or not name or name.startswith("_"):
                raise AttributeError(f"not a callable remote method name: {name!r}") from None
            m = self._methods[name] = self._method_class(self, name)
            return m

    def _call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None,
              oneway: bool) -> Any:
        raise NotImplementedError

    def _capacity(self) -> int:
        """How many calls may be in flight at once (the futures window)."""
        raise NotImplementedError

    def _submit(self, method: str, args: Any, kwargs: dict[str, Any] | None, timeout: float | None,
                call: Callable[..., Any] | None = None) -> concurrent.futures.Future:  # type: ignore[type-arg]
        """Run ``call`` (default ``self._call``) in the background once the in-flight window has room."""
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        wait = timeout or self._settings.timeout
        if not self._window.acquire(timeout=wait):
            raise CallTimeoutError(f"{method}: in-flight window full for {wait:g}s")
        executor = self._executor
        if executor is None:
            with self._executor_lock:
                if self._executor is None:
                    self._executor = concurrent.futures.ThreadPoolExecutor(
                        self._max_threads, thread_name_prefix="pyrorpc-call")
                executor = self._executor
        try:
            if call is None:
                fut = executor.submit(self._call, method, args, kwargs or {}, timeout, False)
            else:
                fut = executor.submit(call, method, args, timeout)
        except BaseException:
            self._window.release()
            raise
        fut.add_done_callback(lambda _f: self._window.release())
        return fut

    def close(self) -> None:
        """Release connections and background threads; waits for submitted futures."""
        self._closed = True
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        executor = getattr(self, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=False)


class Proxy(Dispatcher):
    """A thread-safe proxy to one worker; remote methods are its attributes (``p.add(1, 2)``).

    Bound by service name it moves to another worker of the service when its worker is gone before a
    call was sent; bound by worker name or ``PYRO:`` URI it stays. Remote methods whose names collide
    with ``close`` or ``method`` are reached through ``p.method("close")(...)``.
    """

    def __init__(self, target: str, *, settings: Settings, _info: WorkerInfo | None = None) -> None:
        super().__init__(settings)
        self._target = target
        self._naming: NameServerClient | None = None
        self._service: str | None = None
        self._lock = threading.Lock()
        if target.startswith("PYRO:"):
            try:
                Pyro5.core.URI(target)
            except Pyro5.errors.PyroError as exc:
                raise ConfigurationError(f"bad PYRO: URI {target!r}: {exc}") from None
            self._endpoint = Endpoint(target, settings)
        else:
            self._naming = NameServerClient(settings)
            self._endpoint = self._resolve(exclude=None)

    def __repr__(self) -> str:
        return f"<pyrorpc.Proxy {self._target!r} -> {self._endpoint.name}>"

    def _resolve(self, exclude: str | None) -> Endpoint:
        assert self._naming is not None
        target = self._target
        if self._service is None:
            try:
                uri, _meta = self._naming.lookup(target)
                return Endpoint(uri, self._settings, name=target)
            except Pyro5.errors.NamingError:
                self._service = target  # not a registered name: a service name
        workers = [w for w in self._naming.service_workers(self._service) if w.name != exclude]
        if not workers:
            raise NoWorkersError(f"no live worker for service {self._service!r} at name server "
                                 f"{self._settings.ns} (unknown service or worker name?)")
        best = min(workers, key=lambda w: (w.in_flight, w.last_heartbeat or 0.0))
        return Endpoint(best.uri, self._settings, name=best.name,
                        capacity=min(self._settings.max_in_flight, best.threads or self._settings.max_in_flight))

    def _capacity(self) -> int:
        return self._endpoint.capacity

    def _call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None,
              oneway: bool) -> Any:
        timeout = timeout or self._settings.timeout
        endpoint = self._endpoint
        try:
            return endpoint.call(method, args, kwargs, timeout, oneway)
        except NotSent as exc:
            if self._service is None:
                raise WorkerLostError(f"cannot reach {endpoint.name}: {exc.cause}") from exc.cause
        with self._lock:  # the call never left: move to another worker of the service, once
            if self._endpoint is endpoint:
                self._endpoint = self._resolve(exclude=endpoint.name)
                endpoint.close()
        try:
            return self._endpoint.call(method, args, kwargs, timeout, oneway)
        except NotSent as exc:
            raise WorkerLostError(f"cannot reach {self._endpoint.name}: {exc.cause}") from exc.cause

    def close(self) -> None:
        super().close()
        self._endpoint.close()


def connect(target: str, *, ns: Any = None, timeout: float | None = None, settings: Settings | None = None,
            **options: Any) -> Proxy:
    """A Proxy to one worker: ``target`` is a service name, a worker name or a ``PYRO:`` URI.

    Args:
        target: what to call.
        ns: name server ``HOST:PORT`` (env ``PYRORPC_NS``); unused for ``PYRO:`` URIs.
        timeout: default call timeout in seconds.
        settings: a ``pyrorpc.Settings``; ``ns``, ``timeout`` and other keyword options override it.

    Raises:
        NoWorkersError: unknown service or worker name, or no live worker.
        NameServerUnavailableError: the name server cannot be reached.
        ConfigurationError: bad target.
    """
    if not isinstance(target, str) or not target:
        raise ConfigurationError(f"target must be a service name, worker name or PYRO: URI, got {target!r}")
    return Proxy(target, settings=resolve(settings, ns=ns, timeout=timeout, **options))



# objects passed by reference arrive as pyrorpc Proxies ---------------------------------------------------

_callback_settings: Settings | None = None


def set_callback_settings(settings: Settings) -> None:
    """The settings (secret, TLS, timeouts) of the Proxies made for references that arrive in calls and
    replies: the worker's or the callback server's in this process."""
    global _callback_settings
    _callback_settings = settings


def _proxy_from_reference(data: dict[str, Any]) -> Any:
    state = data.get("state")
    if not (isinstance(state, (tuple, list)) and state and isinstance(state[0], str)
            and state[0].startswith("PYRO:")):
        raise Pyro5.errors.SerializeError("malformed proxy reference")
    settings = _callback_settings if _callback_settings is not None else Settings.from_env()
    return Proxy(state[0], settings=settings)


def _proxy_to_reference(proxy: "Proxy") -> dict[str, Any]:
    endpoint = proxy._endpoint
    return {"__class__": "Pyro5.client.Proxy",
            "state": (str(endpoint.uri), tuple(sorted(endpoint.oneway)), tuple(sorted(endpoint.methods or ())), (),
                      "hello", "serpent")}


set_proxy_factory(_proxy_from_reference)
SerializerBase.register_class_to_dict(Proxy, _proxy_to_reference)

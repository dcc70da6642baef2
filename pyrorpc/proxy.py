"""Proxy: a thread-safe client bound to one worker; RemoteMethod and Dispatcher, what Proxy and Pool share."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from typing import Any

import Pyro5.core
import Pyro5.errors
from Pyro5.serializers import SerializerBase

from .acks import Ack
from .aloop import AsyncRunner
from .codec import set_proxy_factory
from .config import MAX_TIMEOUT, MIN_TIMEOUT, Settings, resolve
from .endpoint import Abandoned, CallHandle, Endpoint, NoMux, NotSent, SlotsBusy
from .errors import (
    CallTimeoutError,
    ConfigurationError,
    NoWorkersError,
    WorkerLostError,
)
from .naming import NameServerClient, WorkerInfo

__all__ = ["Abandoned", "CallHandle", "Endpoint", "NoMux", "NotSent", "Proxy", "RemoteMethod", "SlotsBusy",
           "connect", "send_loop", "set_callback_settings"]

_END = object()  # a stream that ended before its first item

_send_runner: AsyncRunner | None = None
_send_runner_lock = threading.Lock()


def send_loop() -> AsyncRunner:
    """The event loop (a daemon thread, started on first use) that blocking send() calls and outboxes run on:
    its multiplexed connections carry every send of this process."""
    global _send_runner
    runner = _send_runner
    if runner is None:
        with _send_runner_lock:
            if _send_runner is None:
                _send_runner = AsyncRunner("pyrorpc-send")
            runner = _send_runner
    return runner


class RemoteMethod:
    """A remote method: call it, or use ``.oneway(...)``, ``.future(...)``, ``await .aio(...)``, and for a
    generator method ``for x in .stream(...)`` / ``async for x in .astream(...)``."""

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
        """Awaitable form of the call, run on the caller's event loop: many calls share one multiplexed
        connection per worker, and neither a pending call nor waiting for a call slot holds a thread (a
        worker that does not multiplex, a stock Pyro5 daemon, gets the call from a thread). Cancelling the
        await (``asyncio.wait_for``, task cancel) gives the call up: its slot is free at once and the worker
        is told to cancel it (an ``async def`` method is cancelled; a sync one may still run)."""
        return await self._client._aio(self._name, args, kwargs, self._timeout)

    def stream(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        """Iterate the items of a generator (or any iterable) result as the worker produces them, with
        backpressure: the worker runs ahead of the consumer by at most a window of items. Blocking, on a
        connection of its own; the timeout bounds the wait for each item (CallTimeoutError). Stopping
        early (``break``, ``close()``, dropping the iterator) closes the generator on the worker. A worker
        lost mid-stream raises WorkerLostError after the items received; a stream is never restarted once
        items came (a Pool starts it on another worker only if it could not be started)."""
        return self._client._stream(self._name, args, kwargs, self._timeout)

    def astream(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        """``stream`` for ``async for``, on the caller's event loop (the worker's multiplexed connection)."""
        return self._client._astream(self._name, args, kwargs, self._timeout)

    def send(self, *args: Any, **kwargs: Any) -> str:
        """Acknowledged send: return once a live worker has accepted the call (queued it to run), without
        waiting for its result; returns the send's id. A worker that dies or refuses (draining) before
        accepting: the call goes to another worker (Pool; a Proxy bound to a service moves once). After
        acceptance: at-most-once, no result, the method's errors are only logged by the worker; except for
        ``@idempotent`` methods, where send() waits for the call to finish and re-sends it elsewhere if the
        worker is lost (at-least-once). The worker remembers the ids it accepted (the last 100,000, for 10
        minutes): a re-send of one is acknowledged without running again. A method that does not take the
        arguments (TypeError), or does not exist, is refused before acceptance and raises here.

        A stock Pyro5 daemon cannot acknowledge: it gets a plain sync call (accepted = completed).
        """
        return self._client._send(self._name, args, kwargs, self._timeout, None)

    def send_as(self, send_id: str, *args: Any, **kwargs: Any) -> str:
        """``send`` under your own id (1-128 ASCII characters): sending it again, to the same worker within
        its memory, is acknowledged without running twice."""
        return self._client._send(self._name, args, kwargs, self._timeout, send_id)

    def enqueue(self, *args: Any, **kwargs: Any) -> str:
        """Keep the call in the Pool's outbox (``Pool(..., outbox=PATH)``) and return its entry id once it is
        durable: a background sender delivers it with ``send()`` semantics when a worker is up, also after
        this process restarts (see ``pyrorpc.Outbox``)."""
        return self._client._enqueue(self._name, args, kwargs)

    def with_timeout(self, seconds: float) -> "RemoteMethod":
        """The same method with its own call timeout."""
        if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) \
                or not MIN_TIMEOUT <= seconds <= MAX_TIMEOUT:
            raise ConfigurationError(f"`seconds` must be {MIN_TIMEOUT:g}-{MAX_TIMEOUT:g} seconds, got {seconds!r}")
        return type(self)(self._client, self._name, float(seconds))


def _set_done(waiter: "asyncio.Future[None]") -> None:
    if not waiter.done():
        waiter.set_result(None)


class Window:
    """Counts calls submitted but not finished, and makes submitters wait while ``limit()`` are out:
    threads in ``acquire``, coroutines in ``acquire_async`` (which holds no thread). After ``close()``
    every acquire fails at once."""

    def __init__(self, limit: Callable[[], int]) -> None:
        self.limit = limit
        self.outstanding = 0
        self.closed = False
        self._cond = threading.Condition(threading.Lock())
        self._async_waiters: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = deque()

    def acquire(self, timeout: float) -> bool:
        """Take a place, waiting up to ``timeout``; False on timeout or once closed."""
        with self._cond:
            ok = self._cond.wait_for(lambda: self.closed or self.outstanding < max(1, self.limit()), timeout)
            if ok and not self.closed:
                self.outstanding += 1
                return True
            return False

    async def acquire_async(self, timeout: float) -> bool:
        """``acquire`` for a coroutine: waits on its event loop, not in a thread."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            with self._cond:
                if self.closed:
                    return False
                if self.outstanding < max(1, self.limit()):
                    self.outstanding += 1
                    return True
                waiter: asyncio.Future[None] = loop.create_future()
                entry = (loop, waiter)
                self._async_waiters.append(entry)
            try:
                await asyncio.wait_for(waiter, max(0.0, deadline - loop.time()))
            except BaseException as exc:  # timed out or cancelled
                with self._cond:
                    if entry in self._async_waiters:
                        self._async_waiters.remove(entry)
                    else:  # a release chose us: hand its wake-up on
                        self._wake_async(1)
                if isinstance(exc, asyncio.TimeoutError):
                    return False
                raise

    def _wake_async(self, n: int) -> None:
        """Wake up to ``n`` waiting coroutines (lock held); each checks again."""
        while n > 0 and self._async_waiters:
            loop, waiter = self._async_waiters.popleft()
            try:
                loop.call_soon_threadsafe(_set_done, waiter)
            except RuntimeError:  # its event loop is closed: nobody waits there
                continue
            n -= 1

    def release(self) -> None:
        with self._cond:
            self.outstanding -= 1
            self._cond.notify()
            self._wake_async(1)

    def wake(self) -> None:
        """Re-check waiters (after the limit grew)."""
        with self._cond:
            self._cond.notify_all()
            self._wake_async(len(self._async_waiters))

    def close(self) -> None:
        """Fail every waiting and future acquire."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()
            self._wake_async(len(self._async_waiters))


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
              oneway: bool, handle: CallHandle | None = None) -> Any:
        raise NotImplementedError

    async def _acall(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None,
                     oneway: bool = False, ack: Ack | None = None) -> Any:
        """``_call`` on the caller's event loop (multiplexed); NoMux, before sending, where that cannot be.
        With ``ack`` it is a send() (``Endpoint.acall``)."""
        raise NoMux()

    def _send(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None,
              send_id: str | None) -> str:
        """send(): the call on the client's send loop (a thread of its own), with acceptance; a worker that
        does not multiplex (a stock Pyro5 daemon) gets a plain sync call."""
        if self._closed:
            raise self._closed_error()
        ack = Ack(send_id or uuid.uuid4().hex)
        # (each attempt has its own timeout; this bounds them all: a Pool may retry an idempotent send)
        wait = (timeout or self._settings.timeout) * (getattr(self, "_retries", 0) + 2) + 5.0
        fut = send_loop().submit(self._acall(method, args, kwargs, timeout, False, ack))
        try:
            fut.result(wait)
        except NoMux:
            self._call(method, args, kwargs, timeout, False)  # accepted = completed
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise CallTimeoutError(f"{method}: not accepted within {wait:g}s") from None
        return ack.id

    def _stream(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                timeout: float | None) -> Iterator[Any]:
        raise NotImplementedError

    def _enqueue(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        raise ConfigurationError(f"{method}.enqueue() needs a Pool made with outbox=PATH")

    def _astream(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                 timeout: float | None) -> AsyncIterator[Any]:
        raise NotImplementedError

    def _capacity(self) -> int:
        """How many calls may be in flight at once (the futures window)."""
        raise NotImplementedError

    def _closed_error(self) -> RuntimeError:
        return RuntimeError(f"{self!r} is closed")

    def _get_executor(self) -> concurrent.futures.ThreadPoolExecutor:
        executor = self._executor
        if executor is None:
            with self._executor_lock:
                if self._closed:
                    raise self._closed_error()
                if self._executor is None:
                    self._executor = concurrent.futures.ThreadPoolExecutor(
                        self._max_threads, thread_name_prefix="pyrorpc-call")
                executor = self._executor
        return executor

    def _submit(self, method: str, args: Any, kwargs: dict[str, Any] | None, timeout: float | None,
                call: Callable[..., Any] | None = None) -> concurrent.futures.Future:  # type: ignore[type-arg]
        """Run ``call`` (default ``self._call``) in the background once the in-flight window has room."""
        if self._closed:
            raise self._closed_error()
        wait = timeout or self._settings.timeout
        if not self._window.acquire(timeout=wait):
            if self._closed:
                raise self._closed_error()
            raise CallTimeoutError(f"{method}: in-flight window full for {wait:g}s")
        try:
            executor = self._get_executor()
            run = contextvars.copy_context().run  # the call context (metadata, deadline) follows the call
            if call is None:
                fut = executor.submit(run, self._call, method, args, kwargs or {}, timeout, False)
            else:
                fut = executor.submit(run, call, method, args, timeout)
        except BaseException:
            self._window.release()
            raise
        fut.add_done_callback(lambda _f: self._window.release())
        return fut

    async def _aio(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None) -> Any:
        """The call as a coroutine: on the event loop over a multiplexed connection, else (a worker that
        does not multiplex) in a thread."""
        if self._closed:
            raise self._closed_error()
        try:
            return await self._acall(method, args, kwargs, timeout)
        except NoMux:
            pass
        return await self._aio_thread(method, args, kwargs, timeout)

    async def _aio_thread(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                          timeout: float | None) -> Any:
        """The call as a coroutine for a worker that does not multiplex: waits for the window on the event
        loop (no thread), runs in this object's own threads (never the loop's default executor), and gives
        the call up when cancelled."""
        if self._closed:
            raise self._closed_error()
        wait = timeout or self._settings.timeout
        if not await self._window.acquire_async(wait):
            if self._closed:
                raise self._closed_error()
            raise CallTimeoutError(f"{method}: in-flight window full for {wait:g}s")
        window = self._window
        once = threading.Lock()

        def release(_fut: Any = None) -> None:
            if once.acquire(blocking=False):
                window.release()

        handle = CallHandle()
        try:
            fut = self._get_executor().submit(contextvars.copy_context().run, self._call, method, args, kwargs,
                                              timeout, False, handle)
        except BaseException:
            release()
            raise
        fut.add_done_callback(release)
        try:
            return await asyncio.wrap_future(fut)
        except asyncio.CancelledError:
            handle.cancel()  # the endpoint's slot and the connection...
            release()  # ...then the window: the next call finds both free
            raise

    def _shut(self) -> None:
        """First step of close(): no new calls, and calls waiting for the window fail at once."""
        self._closed = True
        self._window.close()

    def close(self) -> None:
        """Release connections and background threads; waits for submitted futures."""
        self._shut()
        with self._executor_lock:
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
                uri = Pyro5.core.URI(target)
            except Pyro5.errors.PyroError as exc:
                raise ConfigurationError(f"bad PYRO: URI {target!r}: {exc}") from None
            if uri.sockname is None and not 0 < uri.port <= 65535:  # (the resolver would use port % 65536)
                raise ConfigurationError(f"bad PYRO: URI {target!r}: port must be 1-65535")
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
              oneway: bool, handle: CallHandle | None = None) -> Any:
        if self._closed:
            raise self._closed_error()
        timeout = timeout or self._settings.timeout
        endpoint = self._endpoint
        try:
            return endpoint.call(method, args, kwargs, timeout, oneway, handle=handle)
        except NotSent as exc:
            if self._closed:
                raise self._closed_error() from None
            if self._service is None:
                raise WorkerLostError(f"cannot reach {endpoint.name}: {exc.cause}") from exc.cause
        self._move(endpoint)  # the call never left: move to another worker of the service, once
        try:
            return self._endpoint.call(method, args, kwargs, timeout, oneway, handle=handle)
        except NotSent as exc:
            if self._closed:
                raise self._closed_error() from None
            raise WorkerLostError(f"cannot reach {self._endpoint.name}: {exc.cause}") from exc.cause

    def _move(self, endpoint: Endpoint) -> None:
        """``endpoint`` could not be reached: bind to another worker of the service (unless done already)."""
        with self._lock:
            if self._endpoint is endpoint:
                self._endpoint = self._resolve(exclude=endpoint.name)
                endpoint.close()

    def _unreachable(self, endpoint: Endpoint, exc: NotSent, moved: bool) -> BaseException:
        """What a call that could not be sent to ``endpoint`` raises: ``exc`` itself means "move to another
        worker of the service and try again"."""
        if self._closed:
            return self._closed_error()
        if self._service is None or moved:
            return WorkerLostError(f"cannot reach {endpoint.name}: {exc.cause}")
        return exc

    async def _amove(self, endpoint: Endpoint) -> None:
        # (the name server is asked in a thread of ours: the event loop never blocks)
        await asyncio.wrap_future(self._get_executor().submit(self._move, endpoint))

    async def _acall(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], timeout: float | None,
                     oneway: bool = False, ack: Ack | None = None) -> Any:
        if self._closed:
            raise self._closed_error()
        timeout = timeout or self._settings.timeout
        for moved in (False, True):
            endpoint = self._endpoint
            try:
                return await endpoint.acall(method, args, kwargs, timeout, oneway, ack=ack)
            except NotSent as exc:
                error = self._unreachable(endpoint, exc, moved)
                if error is not exc:
                    raise error from exc.cause
            await self._amove(endpoint)
        raise AssertionError("unreachable")  # pragma: no cover

    def _stream(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                timeout: float | None) -> Iterator[Any]:
        if self._closed:
            raise self._closed_error()
        timeout = timeout or self._settings.timeout
        for moved in (False, True):
            endpoint = self._endpoint
            items: Generator[Any, None, None] | None = None
            try:
                items = endpoint.stream(method, args, kwargs, timeout)
                first = next(items, _END)
            except NotSent as exc:
                if items is not None:
                    items.close()
                error = self._unreachable(endpoint, exc, moved)
                if error is not exc:
                    raise error from exc.cause
                self._move(endpoint)
                continue
            break
        assert items is not None
        try:
            if first is not _END:
                yield first
                yield from items
        finally:
            items.close()

    async def _astream(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                       timeout: float | None) -> AsyncIterator[Any]:
        if self._closed:
            raise self._closed_error()
        timeout = timeout or self._settings.timeout
        for moved in (False, True):
            endpoint = self._endpoint
            items = endpoint.astream(method, args, kwargs, timeout)
            try:
                first = await anext(items, _END)
            except NotSent as exc:
                await items.aclose()
                error = self._unreachable(endpoint, exc, moved)
                if error is not exc:
                    raise error from exc.cause
                await self._amove(endpoint)
                continue
            break
        try:
            if first is not _END:
                yield first
                async for item in items:
                    yield item
        finally:
            await items.aclose()

    def close(self) -> None:
        """Close the connections and threads: calls waiting for a slot fail at once ("is closed"), calls
        in flight finish first."""
        self._shut()
        self._endpoint.close()
        super().close()


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

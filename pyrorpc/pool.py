"""Pool: load-balanced, failover-safe calls over every live worker of one service."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Generator, Iterable, Iterator
from typing import Any

from .acks import Ack
from .balancing import Strategy, make_strategy
from .compat import is_exception_wrapper, remote_traceback, unwrap_exception
from .config import Settings, resolve
from .errors import (
    CallTimeoutError,
    ConfigurationError,
    NameServerUnavailableError,
    NoWorkersError,
    WorkerDrainingError,
    WorkerLostError,
)
from .hedging import EVALUATE_EVERY, MAX_COOLDOWN_FACTOR, Attempt, Health, Hedging, outliers
from .metrics import track_pool
from .naming import NameServerClient, WorkerInfo
from .proxy import _END, Abandoned, CallHandle, Dispatcher, Endpoint, NoMux, NotSent, RemoteMethod, SlotsBusy
from .service import check_service_name
from .stats import ERROR, LOST, NOT_SENT, OK, TIMEOUT, PoolStats

__all__ = ["Pool", "PoolMethod"]

log = logging.getLogger("pyrorpc.pool")


class _Member:
    """A live worker as this pool sees it."""

    __slots__ = ("name", "info", "endpoint", "ejected_until", "strikes", "suspect", "health")

    def __init__(self, info: WorkerInfo, endpoint: Endpoint) -> None:
        self.name = info.name
        self.info = info
        self.endpoint = endpoint
        self.ejected_until = 0.0
        self.strikes = 0
        self.suspect = False  # its lease renewals stopped arriving: hung, or cut off from the network
        self.health = Health()  # its last attempts, for outlier ejection

    @property
    def in_flight(self) -> int:
        return self.endpoint.in_flight + self.endpoint.async_in_flight

    @property
    def reported_load(self) -> int:
        return self.info.in_flight


class _Failed:
    """An item of a batch that raised (kept in place so map can raise it in order)."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _unwrap(values: list[Any]) -> Iterator[Any]:
    for value in values:
        if isinstance(value, _Failed):
            raise value.exc
        yield value


def _missed_heartbeats(info: WorkerInfo) -> bool:
    """True when the worker's last lease renewal is older than 1.5 renew periods (TTL/3 each)."""
    if info.ttl is None or info.last_heartbeat is None:
        return False  # a name server without leases tells us nothing
    return info.last_heartbeat > info.ttl / 2 + 0.25


class PoolMethod(RemoteMethod):
    """A pool's remote method: also ``.map(iterable_of_arg_tuples)`` and ``.broadcast(*args)``."""

    __slots__ = ()

    def map(self, iterable: Iterable[Any], *, window: int | None = None) -> Iterator[Any]:
        """Call once per item (a tuple of arguments, or a single argument); yields results in input order.

        At most ``window`` calls are in flight (default: the pool's capacity). A call that failed raises
        its exception when its result is reached.
        """
        pool: Pool = self._client  # type: ignore[assignment]
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f"`window` must be a positive integer, got {window!r}")
        return pool._map(self._name, iterable, window, self._timeout)

    def broadcast(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Call every live worker once; returns ``{worker_name: result or exception}``."""
        pool: Pool = self._client  # type: ignore[assignment]
        return pool._broadcast(self._name, args, kwargs, self._timeout)


class Pool(Dispatcher):
    """Every live worker of a service, as one thread-safe object: ``pool.add(1, 2)``, ``.oneway``,
    ``.future``, ``.aio``, ``.map``, ``.broadcast``, ``.stream``, ``.astream``.

    Calls go to the worker chosen by ``strategy`` (default least-loaded). A call that could not be sent
    goes to another worker, always; a call lost after it was sent is retried elsewhere only for
    ``@idempotent`` methods (at most ``retries`` times), else ``WorkerLostError``. A failing worker is
    ejected for ``cooldown`` seconds (doubling while it keeps failing) and then tried again. Membership
    is pushed by pyrorpc's name server (a ``watch_service`` long poll, so a new worker gets calls and a
    departed one stops getting them within a round trip of the name server knowing), with a full refresh
    at least every ``refresh`` seconds; against a stock Pyro5 name server it is polled every ``refresh``
    seconds and at once after a failure. While the name server is unreachable the pool keeps the workers
    it knows. Remote methods whose names collide with
    ``close``, ``method`` or ``workers`` are reached through ``pool.method("workers")(...)``.

    Args:
        service: the service name.
        ns: name server ``HOST:PORT``, or several (``"a:9090,b:9090"``): the first that answers.
        strategy: ``least-loaded``, ``power-of-two``, ``round-robin``, ``random`` or a Strategy object.
        timeout: default call timeout; also how long a call waits for a worker to exist.
        max_in_flight: calls in flight per worker from this pool (capped by the worker's threads, except
            ``aio()`` calls of its ``async def`` methods, which hold no thread there).
        refresh: seconds between membership refreshes.
        retries: extra attempts for idempotent calls lost after sending.
        cooldown: seconds a failing worker is left out.
        hedge: ``True``: an ``@idempotent`` call with no reply after the method's observed p95 latency (on a
            typical worker) is also sent to another worker, the first reply wins and the other attempt is
            cancelled; a number: after that many seconds; ``None``/``False`` (default): never.
        hedge_budget: hedges are at most this share of the hedge-eligible calls (a token bucket).
        outlier_ejection: leave out for a cooldown a worker whose median latency over its last 50 calls is
            ``outlier_latency`` times its peers' (and over 1 ms), or whose error rate is over
            ``outlier_errors`` and twice its peers'; never more than half of the workers at once. Off by
            default (survivors absorbing a dead worker's calls can look like outliers for a moment).
        outlier_latency: the latency ratio (0: latency never ejects).
        outlier_errors: the error rate (0: errors never eject).
        settings: a ``pyrorpc.Settings``; keyword arguments (also ``secret=``, ``tls_ca=``...) override it.
        outbox: a SQLite file: ``pool.m.enqueue(...)`` keeps calls there until a worker accepted them
            (``pyrorpc.Outbox``).

    Raises:
        NameServerUnavailableError: the name server cannot be reached when the pool is created.
    """

    _method_class = PoolMethod

    def __init__(self, service: str, *, ns: Any = None, strategy: "str | Strategy" = "least-loaded",
                 timeout: float | None = None, max_in_flight: int | None = None, refresh: float | None = None,
                 retries: int = 3, cooldown: float = 2.0, hedge: bool | float | None = None,
                 hedge_budget: float = 0.1, outlier_ejection: bool = False, outlier_latency: float = 5.0,
                 outlier_errors: float = 0.2, settings: Settings | None = None,
                 outbox: str | os.PathLike[str] | None = None, **options: Any) -> None:
        try:
            check_service_name(service)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        if not isinstance(retries, int) or retries < 0:
            raise ValueError(f"`retries` must be a non-negative integer, got {retries!r}")
        if not isinstance(cooldown, (int, float)) or cooldown < 0:
            raise ValueError(f"`cooldown` must be non-negative, got {cooldown!r}")
        hedging = _hedging(service, hedge, hedge_budget)
        if not isinstance(outlier_latency, (int, float)) or not (outlier_latency == 0 or 1 < outlier_latency < 1e6):
            raise ValueError(f"`outlier_latency` must be 0 (off) or a ratio over 1, got {outlier_latency!r}")
        if not isinstance(outlier_errors, (int, float)) or not 0 <= outlier_errors < 1:
            raise ValueError(f"`outlier_errors` must be 0 (off) to under 1, got {outlier_errors!r}")
        super().__init__(resolve(settings, ns=ns, timeout=timeout, max_in_flight=max_in_flight, refresh=refresh,
                                 **options))
        self._service = service
        self._strategy = make_strategy(strategy)
        self._retries = retries
        self._cooldown = float(cooldown)
        self._naming = NameServerClient(self._settings)
        self._members: dict[str, _Member] = {}
        self._healthy: tuple[tuple[_Member, ...], float] = ((), 0.0)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._refresh_now = threading.Event()
        self._stop = threading.Event()
        self.refreshed_at = 0.0
        self._version: Any = None  # of the membership, from the name server (watch_service)
        self._stats = PoolStats()  # attempts, retries, failovers, ejections (pyrorpc.metrics reads them)
        self._hedging = hedging
        self._outliers = (float(outlier_latency), float(outlier_errors)) if outlier_ejection else None
        self._since_evaluated = 0
        self._evaluating = threading.Lock()
        self._refresh()  # raises NameServerUnavailableError at once if the name server is down
        # The refresher holds the pool weakly, and a finalizer stops it: a pool dropped without close() is
        # collected, and its thread and connections go with it.
        self._finalizer = weakref.finalize(self, _release, self._stop, self._refresh_now, self._lock, self._members,
                                           self._naming)
        self._refresher = threading.Thread(
            target=_refresh_loop, args=(weakref.ref(self), self._stop, self._refresh_now, self._settings.refresh,
                                        self._naming, service),
            name=f"pool-{service}-refresh", daemon=True)
        self._refresher.start()
        if hedging is not None:
            weakref.finalize(self, hedging.close)
        track_pool(self)
        self._outbox = None
        if outbox is not None:
            from .outbox import Outbox  # (the outbox sends through pools)
            self._outbox = Outbox(outbox, service=service, settings=self._settings, pools={service: self})

    def _enqueue(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        if self._outbox is None:
            return super()._enqueue(method, args, kwargs)
        return self._outbox.enqueue(method, args, kwargs)

    def __getattr__(self, name: str) -> PoolMethod:
        return super().__getattr__(name)  # type: ignore[return-value]

    def method(self, name: str) -> PoolMethod:
        """The remote method ``name`` (with ``.map`` and ``.broadcast``); use it when the name collides
        with one of the Pool's own methods."""
        return super().method(name)  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"<pyrorpc.Pool {self._service!r} {len(self._members)} workers>"

    # membership
    def _refresh(self) -> None:
        """Fetch the membership now (with its version where the name server has them)."""
        if self._naming.can_watch:
            version, infos = self._naming.watch_service(self._service, None, 0)
            self._apply(infos, version)
        else:
            self._apply(self._naming.service_workers(self._service))

    def _apply(self, infos: list[WorkerInfo], version: Any = None) -> None:
        """Make the members those of ``infos``: new workers join, departed ones are closed."""
        with self._lock:
            if self._stop.is_set():
                return  # closed (or collected) meanwhile: open nothing new
            seen = set()
            for info in infos:
                seen.add(info.name)
                member = self._members.get(info.name)
                if member is None or member.info.uri != info.uri or member.endpoint.closed:
                    capacity = min(self._settings.max_in_flight, info.threads or self._settings.max_in_flight)
                    if member is not None:
                        member.endpoint.close()
                    member = self._members[info.name] = _Member(
                        info, Endpoint(info.uri, self._settings, info.name, capacity))
                else:
                    member.info = info
                member.suspect = _missed_heartbeats(info)
            for name in [n for n in self._members if n not in seen]:
                gone = self._members.pop(name)
                # A worker that deregistered (SIGTERM) finishes its calls in flight; one whose lease ran
                # out after its heartbeats stopped (hung, partitioned) never will: cut those calls off now
                # so idempotent ones go elsewhere instead of waiting for their timeout.
                gone.endpoint.close(abort=gone.suspect)
            self.refreshed_at = time.monotonic()
            self._version = version
            self._invalidate()
            self._changed.notify_all()
        self._window.wake()

    def _capacity(self) -> int:
        return sum(m.endpoint.capacity for m in list(self._members.values()))

    def _eject(self, member: _Member) -> None:
        self._stats.ejected(member.name)
        with self._lock:
            member.strikes += 1
            member.ejected_until = time.monotonic() + self._cooldown * 2 ** min(member.strikes - 1, 5)
            self._invalidate()
        self._refresh_now.set()

    def _healthy_members(self) -> tuple[_Member, ...]:
        """Members neither ejected nor suspect, cached until the next membership or ejection change (or
        the end of the earliest cooldown)."""
        cached, valid_until = self._healthy
        now = time.monotonic()
        if now < valid_until:
            return cached
        with self._lock:
            members = list(self._members.values())
            healthy = tuple(m for m in members if m.ejected_until <= now and not m.suspect)
            cooling = [m.ejected_until for m in members if m.ejected_until > now]
            self._healthy = (healthy, min(cooling, default=float("inf")))
        return healthy

    def _invalidate(self) -> None:
        self._healthy = ((), 0.0)

    def _choose(self, exclude: set[str], deadline: float, handle: CallHandle | None = None) -> _Member:
        if not exclude:
            healthy = self._healthy_members()
            if healthy:
                return self._strategy.choose(healthy)  # type: ignore[return-value]
        with self._lock:
            while True:
                member = self._pick(exclude, deadline, handle)
                if member is not None:
                    return member
                self._refresh_now.set()
                self._changed.wait(min(deadline - time.monotonic(), 0.25))

    async def _achoose(self, exclude: set[str], deadline: float) -> _Member:
        """``_choose`` for a coroutine: while there is no worker it polls (0.05 s) instead of blocking."""
        if not exclude:
            healthy = self._healthy_members()
            if healthy:
                return self._strategy.choose(healthy)  # type: ignore[return-value]
        while True:
            with self._lock:
                member = self._pick(exclude, deadline)
            if member is not None:
                return member
            self._refresh_now.set()
            await asyncio.sleep(max(0.0, min(deadline - time.monotonic(), 0.05)))

    def _pick(self, exclude: set[str], deadline: float, handle: CallHandle | None = None) -> _Member | None:
        """One look for a worker (lock held): one chosen by the strategy among the healthy, else the best of
        those cooling down or suspect; None while there is none (wait for the membership to change).

        Raises:
            NoWorkersError: none by ``deadline``.
        """
        if self._closed:
            raise self._closed_error()
        if handle is not None and handle.cancelled:
            raise Abandoned()
        now = time.monotonic()
        members = [m for m in self._members.values() if m.name not in exclude]
        ready = [m for m in members if m.ejected_until <= now and not m.suspect]
        if ready:
            return self._strategy.choose(ready)  # type: ignore[return-value]
        if members:  # every candidate is cooling down or suspect: better a probe than a failure
            return min(members, key=lambda m: (m.suspect, m.ejected_until))
        if deadline - now <= 0:
            raise NoWorkersError(f"no live worker for service {self._service!r} "
                                 f"(name server {self._settings.ns})")
        return None

    def _failed(self, member: _Member, method: str, exc: Exception, tried: set[str], retries: int) -> int:
        """An attempt on ``member`` failed with ``exc``: eject the worker if it is at fault, and return the
        retries left if the call is to go to another worker (not sent; or lost and idempotent), else raise.
        The one place every call mode (sync, aio, streams) decides this."""
        if isinstance(exc, NotSent):
            if self._closed:  # close() closed the endpoint we were waiting for
                raise self._closed_error() from None
            log.info("pool %s: %s unreachable (%s); trying another worker", self._service, member.name, exc.cause)
            self._eject(member)
            tried.add(member.name)
            self._stats.failed_over()
            return retries
        if isinstance(exc, WorkerLostError):
            if remote_traceback(exc) is not None:
                raise exc  # the method's own error (a service it called was lost): not this worker's fault
            self._eject(member)
            if method in member.endpoint.idempotent and retries > 0:
                tried.add(member.name)
                if all(name in tried for name in list(self._members)):
                    raise exc  # nobody left to retry on: say what happened now, not NoWorkersError later
                self._stats.retried()
                return retries - 1
            raise exc
        if isinstance(exc, CallTimeoutError) and not isinstance(exc, SlotsBusy) and remote_traceback(exc) is None:
            self._eject(member)  # hung or overloaded: leave it out for a while (a method's own timeout: fine)
        raise exc

    def _observe(self, member: _Member, started: float, failed: bool) -> None:
        """An attempt on ``member`` that began at ``started`` ended; every ``EVALUATE_EVERY`` of them the
        outlier rule runs (in the caller's thread: no sort per call, no thread of its own)."""
        if self._outliers is None:
            return
        member.health.record(time.monotonic() - started, failed)
        since = self._since_evaluated + 1  # (racing threads may lose a count: the evaluation comes a call later)
        if since < EVALUATE_EVERY:
            self._since_evaluated = since
            return
        self._since_evaluated = 0
        if len(self._members) > 1:
            self._eject_outliers()

    def _eject_outliers(self) -> None:
        """Leave out the workers standing far from their peers (``outliers``), keeping at least half of them;
        an ejected worker's samples are forgotten, so after its cooldown it is judged on fresh calls (a probe)
        and ejected again, for twice as long (up to 8x), if it still is an outlier."""
        assert self._outliers is not None
        if not self._evaluating.acquire(blocking=False):
            return  # another thread is at it
        try:
            now = time.monotonic()
            members = list(self._members.values())
            out = sum(1 for m in members if m.ejected_until > now or m.suspect)
            room = len(members) // 2 - out
            if room <= 0:
                return
            judged = {m.name: m.health.summary() for m in members if m.ejected_until <= now and not m.suspect}
            latency, errors = self._outliers
            found = set(outliers(judged, latency=latency, errors=errors, limit=room))
            for m in members:
                if m.name in found:
                    factor = min(2 ** m.health.ejections, MAX_COOLDOWN_FACTOR)
                    m.health.ejections += 1
                    m.health.reset()
                    log.info("pool %s: %s is an outlier (median latency %.1f ms, errors %.0f%%); left out for %g s",
                             self._service, m.name, judged[m.name][0] * 1000,  # type: ignore[index]
                             judged[m.name][1] * 100, self._cooldown * factor)  # type: ignore[index]
                    self._stats.ejected(m.name)
                    with self._lock:
                        m.ejected_until = max(m.ejected_until, now + self._cooldown * factor)
                        self._invalidate()
                elif judged.get(m.name) is not None:
                    m.health.ejections = 0  # judged on enough fresh calls, and fine
        finally:
            self._evaluating.release()

    def _succeeded(self, member: _Member) -> None:
        if member.strikes:
            with self._lock:
                member.strikes = 0
                member.ejected_until = 0.0
                self._invalidate()

    # the one call path
    def _call(self, method: str, args: Any, kwargs: dict[str, Any] | None, timeout: float | None,
              oneway: bool, handle: CallHandle | None = None, batch: bool = False) -> Any:
        """Send one call (or one batch) to a worker chosen by the strategy, with failover and retries."""
        if self._closed:
            raise self._closed_error()
        if self._hedging is not None and handle is None and not (oneway or batch) \
                and self._hedging.wants(self, method):
            return self._hedging.call(self, method, args, kwargs, timeout)  # its attempts come back with a handle
        timeout = timeout or self._settings.timeout
        deadline = time.monotonic() + timeout
        tried: set[str] = set()
        retries = self._retries
        while True:
            member = self._choose(tried, deadline, handle)
            left = deadline - time.monotonic()
            if left <= 0:
                raise CallTimeoutError(f"{self._service}.{method}: no reply within {timeout:g}s")
            started = time.monotonic()
            try:
                result = member.endpoint.call(method, args, kwargs, left, oneway, batch=batch, handle=handle)
            except (NotSent, WorkerLostError, CallTimeoutError) as exc:
                self._stats.attempt(member.name, _outcome(exc), started)
                if self._outliers is not None and not isinstance(exc, (NotSent, SlotsBusy)):
                    self._observe(member, started, True)
                retries = self._failed(member, method, exc, tried, retries)
                continue
            except Exception as exc:
                self._stats.attempt(member.name, ERROR, started)
                if self._outliers is not None and not isinstance(exc, Abandoned):
                    self._observe(member, started, True)
                raise
            self._stats.attempt(member.name, OK, started)
            if self._outliers is not None:
                self._observe(member, started, False)
            self._succeeded(member)
            return result

    async def _acall(self, method: str, args: Any, kwargs: dict[str, Any], timeout: float | None,
                     oneway: bool = False, ack: Ack | None = None, *, attempt: Attempt | None = None) -> Any:
        """``_call`` on the caller's event loop: the same choice, failover, retries and ejections, over each
        worker's multiplexed connection. NoMux (nothing sent) when the chosen worker does not multiplex.
        ``attempt``: one attempt of a hedged call (which it tells the worker chosen)."""
        if self._closed:
            raise self._closed_error()
        if self._hedging is not None and attempt is None and not oneway and ack is None \
                and self._hedging.wants(self, method):
            return await self._hedging.acall(self, method, args, kwargs, timeout)
        timeout = timeout or self._settings.timeout
        deadline = time.monotonic() + timeout
        tried: set[str] = set()
        retries = self._retries
        while True:
            member = await self._achoose(tried, deadline)
            if attempt is not None:
                attempt.worker = member.name
            left = deadline - time.monotonic()
            if left <= 0:
                raise CallTimeoutError(f"{self._service}.{method}: no reply within {timeout:g}s")
            started = time.monotonic()
            try:
                result = await member.endpoint.acall(method, args, kwargs, left, oneway, ack=ack)
            except (NotSent, WorkerLostError, CallTimeoutError) as exc:
                self._stats.attempt(member.name, _outcome(exc), started)
                if self._outliers is not None and not isinstance(exc, (NotSent, SlotsBusy)):
                    self._observe(member, started, True)
                retries = self._failed(member, method, exc, tried, retries)
                continue
            except Exception as exc:
                self._stats.attempt(member.name, ERROR, started)
                if self._outliers is not None and not isinstance(exc, NoMux):
                    self._observe(member, started, True)
                raise
            self._stats.attempt(member.name, OK, started)
            if self._outliers is not None:
                self._observe(member, started, False)
            self._succeeded(member)
            return result

    def _stream(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                timeout: float | None) -> Iterator[Any]:
        """One worker per stream, chosen like a call's; a stream that could not be started goes to another
        worker, one that delivered items is never restarted."""
        if self._closed:
            raise self._closed_error()
        timeout = timeout or self._settings.timeout
        deadline = time.monotonic() + timeout
        tried: set[str] = set()
        while True:
            member = self._choose(tried, deadline)
            items: Generator[Any, None, None] | None = None
            try:
                items = member.endpoint.stream(method, args, kwargs, timeout)
                first = next(items, _END)
            except (NotSent, WorkerLostError, CallTimeoutError) as exc:
                if items is not None:
                    items.close()
                self._failed(member, method, exc, tried, 0)
                continue
            break
        try:
            if first is not _END:
                yield first
                yield from items
        except (WorkerLostError, CallTimeoutError) as exc:
            self._failed(member, method, exc, tried, 0)
        finally:
            items.close()
        self._succeeded(member)

    async def _astream(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                       timeout: float | None) -> AsyncIterator[Any]:
        if self._closed:
            raise self._closed_error()
        timeout = timeout or self._settings.timeout
        deadline = time.monotonic() + timeout
        tried: set[str] = set()
        while True:
            member = await self._achoose(tried, deadline)
            items = member.endpoint.astream(method, args, kwargs, timeout)
            try:
                first = await anext(items, _END)
            except (NotSent, WorkerLostError, CallTimeoutError) as exc:
                await items.aclose()
                self._failed(member, method, exc, tried, 0)
                continue
            break
        try:
            if first is not _END:
                yield first
                async for item in items:
                    yield item
        except (WorkerLostError, CallTimeoutError) as exc:
            self._failed(member, method, exc, tried, 0)
        finally:
            await items.aclose()
        self._succeeded(member)

    def _call_batch(self, method: str, arg_tuples: list[tuple[Any, ...]], timeout: float | None) -> list[Any]:
        """Run ``method`` once per argument tuple in as few batches as failures allow; a failed item's
        slot holds a ``_Failed``. Items after a failing one never ran on the worker, so they are sent
        again (to any worker) whatever the method."""
        results: list[Any] = [None] * len(arg_tuples)
        todo = list(range(len(arg_tuples)))
        while todo:
            try:
                out = self._call(method, [arg_tuples[i] for i in todo], None, timeout, False, None, batch=True)
            except Exception as exc:  # lost, timed out, no workers: every item not yet done fails so
                for i in todo:
                    results[i] = _Failed(exc)
                break
            done = 0
            for i, value in zip(todo, out, strict=False):
                if is_exception_wrapper(value):
                    if not isinstance(unwrap_exception(value), WorkerDrainingError):
                        results[i] = _Failed(unwrap_exception(value))
                        done += 1
                    break
                results[i] = value
                done += 1
            todo = todo[done:]
        return results

    def _map(self, method: str, iterable: Iterable[Any], window: int | None, timeout: float | None) -> Iterator[Any]:
        """Results of ``method`` over ``iterable`` in order, batching calls per worker.

        At most ``window`` batches (default: the pool's capacity) are in flight. A batch grows while items
        are quick (about 20 ms of work per batch, at most 256 items) and stays a single call for slow
        methods, so slow work still spreads over every worker."""
        limit = window or max(1, self._capacity())
        pending: deque[concurrent.futures.Future[tuple[list[Any], float]]] = deque()
        size = 1
        per_item: float | None = None  # seconds per item, moving average over finished batches
        buf: list[tuple[Any, ...]] = []

        def run(method: str, arg_tuples: list[tuple[Any, ...]], timeout: float | None) -> tuple[list[Any], float]:
            started = time.monotonic()
            values = self._call_batch(method, arg_tuples, timeout)
            return values, (time.monotonic() - started) / len(arg_tuples)

        def collect() -> list[Any]:
            nonlocal size, per_item
            values, took = pending.popleft().result()
            per_item = took if per_item is None else 0.7 * per_item + 0.3 * took
            size = max(1, min(256, int(0.02 / max(per_item, 1e-6))))
            return values

        try:
            for item in iterable:
                buf.append(item if isinstance(item, tuple) else (item,))
                if len(buf) >= size:
                    pending.append(self._submit(method, list(buf), None, timeout, call=run))
                    buf.clear()
                    while len(pending) >= limit:
                        yield from _unwrap(collect())
            if buf:
                pending.append(self._submit(method, list(buf), None, timeout, call=run))
            while pending:
                yield from _unwrap(collect())
        finally:
            for fut in pending:
                fut.cancel()

    def _broadcast(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                   timeout: float | None) -> dict[str, Any]:
        timeout = timeout or self._settings.timeout
        members = list(self._members.values())
        if not members:
            raise NoWorkersError(f"no live worker for service {self._service!r}")

        def one(member: _Member) -> Any:
            try:
                return member.endpoint.call(method, args, kwargs, timeout)
            except NotSent as exc:
                return WorkerLostError(f"cannot reach {member.name}: {exc.cause}")
            except Exception as exc:
                return exc

        with concurrent.futures.ThreadPoolExecutor(min(32, len(members))) as ex:
            # each thread runs in a copy of the caller's context: call_metadata() and a deadline go along
            caller = contextvars.copy_context()
            results = list(ex.map(lambda m: caller.copy().run(one, m), members))
        return {m.name: r for m, r in zip(members, results, strict=True)}

    def workers(self) -> list[WorkerInfo]:
        """The live workers this pool knows, with this pool's calls in flight and ejection state."""
        now = time.monotonic()
        out = []
        for m in list(self._members.values()):
            info = WorkerInfo(**{**m.info.__dict__})
            info.client_in_flight = m.in_flight
            info.ejected = m.ejected_until > now or m.suspect
            out.append(info)
        return sorted(out, key=lambda w: w.name)

    def _in_flight_by_worker(self) -> dict[str, int]:
        """This pool's calls in flight per worker (for metrics)."""
        return {m.name: m.in_flight for m in list(self._members.values())}

    def _closed_error(self) -> RuntimeError:
        return RuntimeError(f"pool {self._service!r} is closed")

    def close(self) -> None:
        """Stop refreshing and close every connection; wait for submitted futures.

        Calls waiting for a worker, a call slot or the in-flight window fail at once with RuntimeError
        ("pool ... is closed"); calls already sent finish (their connections close after them)."""
        if self._outbox is not None:
            self._outbox.close()  # (what it could not deliver stays in its journal)
        self._shut()
        with self._lock:
            self._changed.notify_all()  # callers waiting for a worker to appear
            members = list(self._members.values())
        for m in members:
            m.endpoint.close()  # callers waiting for a call slot
        self._stop.set()
        self._refresh_now.set()
        super().close()  # waits for futures in flight
        if self._hedging is not None:
            self._hedging.close()
        self._finalizer()
        with self._lock:
            self._invalidate()


def _hedging(service: str, hedge: Any, budget: Any) -> Hedging | None:
    """The pool's Hedging for its ``hedge`` and ``hedge_budget`` options (None: off).

    Raises:
        ValueError: naming the bad option.
    """
    if not isinstance(budget, (int, float)) or isinstance(budget, bool) or not 0 < budget <= 1:
        raise ValueError(f"`hedge_budget` must be over 0 and at most 1, got {budget!r}")
    if hedge is None or hedge is False:
        return None
    if hedge is True:
        return Hedging(service, None, float(budget))
    if not isinstance(hedge, (int, float)) or not 0 < hedge < 3600:
        raise ValueError(f"`hedge` must be True, False, None or a delay in seconds (0-3600), got {hedge!r}")
    return Hedging(service, float(hedge), float(budget))


def _outcome(exc: Exception) -> int:
    """A failed attempt's outcome for PoolStats: not sent, timed out, lost, or the method's own error."""
    if isinstance(exc, NotSent):
        return NOT_SENT
    if isinstance(exc, CallTimeoutError):
        return TIMEOUT
    return ERROR if remote_traceback(exc) is not None else LOST


def _refresh_loop(pool_ref: "weakref.ref[Pool]", stop: threading.Event, refresh_now: threading.Event,
                  period: float, naming: NameServerClient, service: str) -> None:
    """The refresher thread: holds its pool only while applying a membership to it, so an unreferenced pool
    is collected. Against pyrorpc's name server it keeps a watch going (each one returns at a membership
    change, or after ``period`` with the current one: a full refresh); against a stock Pyro5 one it polls
    every ``period`` seconds, and at once when a caller asks (``refresh_now``)."""
    while not stop.is_set():
        pause = 0.0
        try:
            if naming.can_watch:
                pool = pool_ref()
                version = pool._version if pool is not None else None
                del pool
                version, infos = naming.watch_service(service, version, period)
                if stop.is_set():
                    return
                pool = pool_ref()
                if pool is None:
                    return
                pool._apply(infos, version)
                del pool
                continue
            refresh_now.wait(period)
            if stop.is_set():
                return
            refresh_now.clear()
            pool = pool_ref()
            if pool is None:
                return
            pool._refresh()
            del pool
        except NameServerUnavailableError as exc:
            if stop.is_set():
                return
            log.debug("pool %s: keeping the workers it knows: %s", service, exc)
            pause = min(1.0, period)
        except Exception:  # pragma: no cover - never let the refresher die
            log.exception("pool %s: membership refresh failed", service)
            pause = period
        pool = None  # (not held while pausing)
        if pause:
            stop.wait(pause)


def _release(stop: threading.Event, refresh_now: threading.Event, lock: threading.Lock,
             members: dict[str, _Member], naming: NameServerClient) -> None:
    """Finalizer of a Pool (close() or garbage collection): stop its refresher, close its connections."""
    stop.set()
    refresh_now.set()
    naming.close()  # (ends a watch under way at once)
    with lock:
        gone = list(members.values())
        members.clear()
    for m in gone:
        m.endpoint.close()

"""Hedged calls and outlier ejection for a Pool: latency rings, the hedge budget, delay and timer, the race.

A hedged call (``Pool(hedge=...)``, ``@idempotent`` methods only) runs its first attempt as usual; if it has
no reply after the hedge delay, a second copy goes to another healthy worker with a free slot, the first
outcome wins (a transport failure of one attempt waits for the other) and the loser is cancelled through its
``CallHandle`` (its slot is freed and its connection cut off; the worker's copy is bounded by the deadline it
was sent with). Hedges spend tokens of a budget that each eligible call refills by ``ratio``, so they never
exceed that share of the calls, however slow the workers get.

Outlier ejection keeps the last ``WINDOW`` attempts of every worker in a ring (latency, failed) and, every
``EVALUATE_EVERY`` calls, leaves out a worker whose median latency is ``latency`` times its peers' median, or
whose error rate is over ``errors`` and twice its peers'.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import itertools
import math
import statistics
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from .compat import remote_traceback
from .endpoint import Abandoned, CallHandle, NoMux, NotSent, SlotsBusy
from .errors import CallTimeoutError, NoWorkersError, WorkerLostError
from .stats import ERROR, LOST, NOT_SENT, OK, TIMEOUT

if TYPE_CHECKING:
    from .pool import Pool, _Member

__all__ = ["Attempt", "Budget", "Delays", "Health", "Hedger", "Hedging", "outliers"]

WINDOW = 50  # attempts per worker the outlier rule looks at...
MIN_SAMPLES = 10  # ...once it has at least this many fresh ones
_LAST = WINDOW - 1
EVALUATE_EVERY = 50  # calls of the pool between two evaluations
MIN_OUTLIER_P50 = 0.001  # a worker whose median is under 1 ms is never a latency outlier (noise, not a problem)
MAX_COOLDOWN_FACTOR = 8  # an outlier ejected again and again stays out cooldown x 1, 2, 4, 8 (then 8)
MIN_DELAY = 0.001  # a hedge never goes out sooner than this after its call
DELAY_RING = 64  # latencies per (method, worker) behind the adaptive delay
DELAY_MIN_SAMPLES = 8  # per worker, before its p95 counts
MAX_METHODS = 256  # methods with an adaptive delay (more are simply not hedged)
MAX_WORKERS = 64  # workers per method behind the adaptive delay
BUDGET_WINDOW = 10.0  # seconds of calls whose share of hedge tokens may be saved up...
MIN_BURST = 10.0  # ...but at least this many
RECHECKS = 3  # a call late at the delay with no token (or no worker) for a hedge looks again at 2x, 4x, 8x


# outlier ejection ---------------------------------------------------------------------------------------

class Health:
    """A worker's last ``WINDOW`` attempts (latency, failed) in a ring. Written without a lock: two threads
    racing may lose a sample, which a statistic over fifty does not feel."""

    __slots__ = ("latency", "failed", "index", "count", "ejections")

    def __init__(self) -> None:
        self.latency = [0.0] * WINDOW
        self.failed = bytearray(WINDOW)
        self.index = 0
        self.count = 0
        self.ejections = 0  # outlier ejections in a row (the cooldown grows with them)

    def record(self, seconds: float, failed: bool) -> None:
        i = self.index
        self.latency[i] = seconds
        self.failed[i] = failed
        self.index = 0 if i == _LAST else i + 1
        self.count += 1

    def reset(self) -> None:
        """Forget every sample (an ejected worker is judged on what it does after its cooldown)."""
        self.count = 0
        self.index = 0

    def summary(self) -> tuple[float, float] | None:
        """``(median latency, error rate)`` of the samples, or None with fewer than ``MIN_SAMPLES``."""
        n = min(self.count, WINDOW)
        if n < MIN_SAMPLES:
            return None
        values = sorted(self.latency[:n])
        return values[n // 2], sum(self.failed[:n]) / n


def outliers(samples: Mapping[str, tuple[float, float] | None], *, latency: float, errors: float,
             limit: int) -> list[str]:
    """The workers standing far from their peers, worst first, at most ``limit``.

    ``samples`` maps each worker to its ``(median latency, error rate)`` (None: too few samples, and not a
    peer either). An outlier has a median over ``latency`` times the median of its peers' medians (and over
    1 ms), or an error rate over ``errors`` and over twice its peers' median rate (a method failing
    everywhere ejects nobody). ``latency`` or ``errors`` 0 turns that test off.
    """
    ready = {name: s for name, s in samples.items() if s is not None}
    if len(ready) < 2 or limit <= 0:
        return []
    found: list[tuple[float, str]] = []
    for name, (p50, rate) in ready.items():
        peers = [s for other, s in ready.items() if other != name]
        peer_p50 = statistics.median(p for p, _ in peers)
        peer_rate = statistics.median(r for _, r in peers)
        if latency and p50 >= MIN_OUTLIER_P50 and p50 > latency * peer_p50:
            found.append((p50 / max(peer_p50, 1e-9), name))
        elif errors and rate > errors and rate > 2 * peer_rate:
            found.append((rate / max(peer_rate, 1e-3), name))
    found.sort(reverse=True)
    return [name for _, name in found[:limit]]


# hedging ------------------------------------------------------------------------------------------------

class Budget:
    """A token bucket: each eligible call adds ``ratio`` of a token, a hedge spends one, so hedges never exceed
    ``ratio`` of the calls. Unspent tokens are capped at ``ratio`` of the calls of about the last 10 s (at least
    ``MIN_BURST``), as Finagle's retry budget: a quiet spell does not save up a burst that could swamp workers."""

    __slots__ = ("ratio", "tokens", "calls", "hedges", "_recent", "_at", "_lock")

    def __init__(self, ratio: float) -> None:
        self.ratio = ratio
        self.tokens = 0.0
        self.calls = 0
        self.hedges = 0
        self._recent = 0.0  # calls of about the last 10 s (decaying)
        self._at = time.monotonic()
        self._lock = threading.Lock()

    def earn(self) -> None:
        now = time.monotonic()
        with self._lock:
            self.calls += 1
            self._recent = self._recent * math.exp((self._at - now) / BUDGET_WINDOW) + 1.0
            self._at = now
            self.tokens = min(max(MIN_BURST, self.ratio * self._recent), self.tokens + self.ratio)

    def spend(self) -> bool:
        with self._lock:
            if self.tokens < 1.0:
                return False
            self.tokens -= 1.0
            self.hedges += 1
            return True


class _Ring:
    __slots__ = ("values", "index", "count")

    def __init__(self) -> None:
        self.values = [0.0] * DELAY_RING
        self.index = 0
        self.count = 0


class Delays:
    """The hedge delay of each method: ``fixed`` seconds, or (``fixed`` None) the p95 of that method's latency
    on a typical worker: the median over workers of each one's p95 (the slow worker hedging is for does
    not set the delay), refreshed every 16 calls of the method; None until some worker has 8 samples."""

    def __init__(self, fixed: float | None) -> None:
        self.fixed = fixed
        self._rings: dict[str, dict[str, _Ring]] = {}
        self._delay: dict[str, float] = {}
        self._since: dict[str, int] = {}
        self._lock = threading.Lock()

    def delay(self, method: str) -> float | None:
        if self.fixed is not None:
            return self.fixed
        return self._delay.get(method)

    def record(self, method: str, worker: str, seconds: float) -> None:
        if self.fixed is not None:
            return
        with self._lock:
            rings = self._rings.get(method)
            if rings is None:
                if len(self._rings) >= MAX_METHODS:
                    return
                rings = self._rings[method] = {}
            ring = rings.get(worker)
            if ring is None:
                if len(rings) >= MAX_WORKERS:  # (workers come and go: forget the longest known)
                    del rings[next(iter(rings))]
                ring = rings[worker] = _Ring()
            ring.values[ring.index] = seconds
            ring.index = (ring.index + 1) % DELAY_RING
            ring.count += 1
            since = self._since.get(method, 0) + 1
            if since < 16 and method in self._delay:
                self._since[method] = since
                return
            self._since[method] = 0
            p95s = []
            for r in rings.values():
                n = min(r.count, DELAY_RING)
                if n >= DELAY_MIN_SAMPLES:
                    p95s.append(sorted(r.values[:n])[min(n - 1, int(n * 0.95))])
            if p95s:
                p95s.sort()
                self._delay[method] = max(MIN_DELAY, p95s[(len(p95s) - 1) // 2])

    def forget(self, worker: str) -> None:
        """``worker`` left the pool."""
        with self._lock:
            for rings in self._rings.values():
                rings.pop(worker, None)


class _Timer:
    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn: Callable[[], None] | None = fn


class Hedger:
    """One thread per pool (started on first use) that runs callbacks at their due times, from a heap; a
    cancelled entry is dropped when it comes up. The thread holds no pool."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._heap: list[tuple[float, int, _Timer]] = []
        self._cond = threading.Condition(threading.Lock())
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def schedule(self, delay: float, fn: Callable[[], None]) -> _Timer | None:
        """Run ``fn`` in the hedger thread ``delay`` seconds from now; None once stopped."""
        timer = _Timer(fn)
        due = time.monotonic() + delay
        with self._cond:
            if self._stopped:
                return None
            heapq.heappush(self._heap, (due, next(self._seq), timer))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"pool-{self._name}-hedger", daemon=True)
                self._thread.start()
            elif self._heap[0][2] is timer:
                self._cond.notify()
        return timer

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._heap.clear()
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopped:
                        return
                    if not self._heap:
                        self._cond.wait()
                        continue
                    due, _seq, timer = self._heap[0]
                    left = due - time.monotonic()
                    if left > 0:
                        self._cond.wait(left)
                        continue
                    heapq.heappop(self._heap)
                    fn, timer.fn = timer.fn, None
                    if fn is not None:
                        break
            try:
                fn()
            except Exception:  # pragma: no cover - a hedge that cannot start leaves its call as it was
                pass


class Attempt:
    """Where an attempt is: the worker its pool chose last (set by ``Pool._acall``)."""

    __slots__ = ("worker",)

    def __init__(self) -> None:
        self.worker: str | None = None


def _transport(exc: BaseException) -> bool:
    """The attempt's worker failed (not sent, lost, timed out, none at all): wait for the other attempt.
    Anything else (the method's own error, a closed pool) is the call's outcome."""
    return isinstance(exc, (NotSent, WorkerLostError, CallTimeoutError, NoWorkersError, NoMux)) \
        and remote_traceback(exc) is None


def _outcome(exc: BaseException) -> int:
    if isinstance(exc, NotSent):
        return NOT_SENT
    if isinstance(exc, CallTimeoutError):
        return TIMEOUT
    return ERROR if remote_traceback(exc) is not None else LOST


class _Race:
    """The two attempts of one sync hedged call; fields guarded by ``lock``."""

    __slots__ = ("lock", "first", "second", "timer", "winner", "ok", "value", "running", "done")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.first = CallHandle()
        self.second: CallHandle | None = None
        self.timer: _Timer | None = None
        self.winner = 0  # 1 or 2 once decided
        self.ok = False
        self.value: Any = None
        self.running = False  # the second attempt was launched and has not finished
        self.done = threading.Event()  # set when the second attempt finished (or never will run)

    def result(self) -> Any:
        if self.ok:
            return self.value
        raise self.value


class Hedging:
    """A pool's hedging: its budget, delays and timer thread, and the hedged call in both modes. Holds no
    reference to the pool (each method is given it)."""

    def __init__(self, service: str, delay: float | None, ratio: float) -> None:
        self.budget = Budget(ratio)
        self.delays = Delays(delay)
        self.hedger = Hedger(service)

    def wants(self, pool: Pool, method: str) -> bool:
        """Hedge this call: ``method`` is ``@idempotent`` on every healthy worker that told us its methods (in
        a rolling upgrade one version may not say so: then it is not hedged), and there is more than one."""
        healthy = pool._healthy_members()
        known = [m for m in healthy if m.endpoint.methods is not None]
        return len(healthy) > 1 and bool(known) and all(method in m.endpoint.idempotent for m in known)

    def close(self) -> None:
        self.hedger.stop()

    def _target(self, pool: Pool, exclude: str | None) -> _Member | None:
        """A healthy worker other than ``exclude`` with a free call slot, chosen by the pool's strategy."""
        if exclude is None or pool._closed:
            return None
        candidates = [m for m in pool._healthy_members()
                      if m.name != exclude and m.endpoint.in_flight < m.endpoint.capacity and not m.endpoint.closed]
        if not candidates:
            return None
        return pool._strategy.choose(candidates)  # type: ignore[return-value]

    # sync (and future(): the same, in an executor thread)
    def call(self, pool: Pool, method: str, args: Any, kwargs: dict[str, Any] | None, timeout: float | None) -> Any:
        """The first attempt in this thread; the hedger starts the second on the pool's executor."""
        timeout = timeout or pool._settings.timeout
        started = time.monotonic()
        deadline = started + timeout
        self.budget.earn()
        delay = self.delays.delay(method)
        race = _Race()
        if delay is not None and delay < timeout:
            context = contextvars.copy_context()  # call_metadata() and the deadline go with the second attempt
            race.timer = self.hedger.schedule(
                delay, lambda: self._launch(pool, race, context, method, args, kwargs, started, deadline))
        try:
            value = pool._call(method, args, kwargs, timeout, False, race.first)
        except Abandoned:
            with race.lock:
                if race.winner != 2:
                    raise
            # the second attempt won and cut this one off: its worker took at least this long (left out, the
            # tails of the workers' latencies would shrink with every hedge won, and the delay with them)
            endpoint = race.first.endpoint
            if endpoint is not None:
                self.delays.record(method, endpoint.name, time.monotonic() - started)
            return race.result()
        except Exception as exc:
            with race.lock:
                if race.winner == 2:
                    return race.result()
                wait = _transport(exc) and race.running
                if not wait:
                    race.winner = 1
                    second, timer = race.second, race.timer
            if not wait:
                if timer is not None:
                    timer.fn = None
                if second is not None:
                    second.cancel()
                raise
            race.done.wait(max(0.0, deadline - time.monotonic()) + 1.0)
            with race.lock:
                if race.winner == 2:
                    return race.result()
                race.winner = 1
            raise
        with race.lock:
            if race.winner == 2:
                return race.result()
            race.winner = 1
            second, timer = race.second, race.timer
        if timer is not None:
            timer.fn = None
        if second is not None:
            second.cancel()  # the loser: its slot is freed, its connection cut off
        endpoint = race.first.endpoint
        if endpoint is not None:
            self.delays.record(method, endpoint.name, time.monotonic() - started)
        return value

    def _launch(self, pool: Pool, race: _Race, context: contextvars.Context, method: str, args: Any,
                kwargs: dict[str, Any] | None, started: float, deadline: float, checks: int = 0) -> None:
        """In the hedger thread, at the delay: send the second copy, budget and a worker permitting. Without
        either, look again at twice the time so far (up to ``RECHECKS`` times): the tokens then go to the
        calls that are late the longest, not to those a little over the delay."""
        endpoint = race.first.endpoint
        target = self._target(pool, endpoint.name if endpoint is not None else None)
        with race.lock:
            if race.winner:
                return
            if target is None or not self.budget.spend():
                now = time.monotonic()
                if checks < RECHECKS and endpoint is not None and 2 * now - started < deadline:
                    race.timer = self.hedger.schedule(now - started, lambda: self._launch(
                        pool, race, context, method, args, kwargs, started, deadline, checks + 1))
                return
            race.second = CallHandle()
            race.running = True
        try:
            pool._get_executor().submit(context.run, self._second, pool, race, target, method, args, kwargs,
                                        deadline)
        except RuntimeError:  # the pool was closed meanwhile
            with race.lock:
                race.running = False
            race.done.set()

    def _second(self, pool: Pool, race: _Race, member: _Member, method: str, args: Any,
                kwargs: dict[str, Any] | None, deadline: float) -> None:
        assert race.second is not None
        started = time.monotonic()
        outcome: tuple[bool, Any] | None = None  # None: given up (the first attempt won)
        try:
            left = deadline - started
            if left <= 0:
                raise CallTimeoutError(f"{pool._service}.{method}: no time left for a hedge")
            outcome = True, member.endpoint.call(method, args, kwargs, left, wait=0.0, handle=race.second)
        except Abandoned:
            pass
        except Exception as exc:
            outcome = False, exc
            pool._stats.attempt(member.name, _outcome(exc), started)
            pool._observe(member, started, True)
            if _transport(exc) and not isinstance(exc, SlotsBusy) and not pool._closed:
                pool._eject(member)
        else:
            pool._stats.attempt(member.name, OK, started)
            pool._succeeded(member)
            pool._observe(member, started, False)
            self.delays.record(method, member.name, time.monotonic() - started)
        cut_first = False
        with race.lock:
            race.running = False
            if not race.winner and outcome is not None and (outcome[0] or not _transport(outcome[1])):
                race.winner = 2
                race.ok, race.value = outcome
                cut_first = True
        race.done.set()
        if cut_first:
            race.first.cancel()  # the loser: its slot is freed, its connection cut off

    # aio
    async def acall(self, pool: Pool, method: str, args: Any, kwargs: dict[str, Any],
                    timeout: float | None) -> Any:
        """Two tasks: the first attempt at once, the second at the delay; the first outcome wins (a transport
        failure waits for the other), the loser is cancelled."""
        timeout = timeout or pool._settings.timeout
        started = time.monotonic()
        deadline = started + timeout
        self.budget.earn()
        delay = self.delays.delay(method)
        attempt = Attempt()
        first = asyncio.ensure_future(pool._acall(method, args, kwargs, timeout, False, attempt=attempt))
        tasks = [first]
        try:
            wait = delay if delay is not None and delay < timeout else None
            checks = 0
            while wait is not None:  # (as _launch: without a token or a worker, look again at twice the time)
                await asyncio.wait(tasks, timeout=wait)
                if first.done():
                    break
                target = self._target(pool, attempt.worker)
                if target is not None and self.budget.spend():
                    tasks.append(asyncio.ensure_future(self._asecond(pool, target, method, args, kwargs, deadline)))
                    break
                now = time.monotonic()
                checks += 1
                wait = now - started if checks <= RECHECKS and 2 * now - started < deadline else None
            pending = set(tasks)
            failure: BaseException | None = None
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(done, key=tasks.index):
                    exc = task.exception()
                    if exc is None or not _transport(exc):
                        if attempt.worker is not None and (exc is None or task is not first):
                            # (the first attempt's latency, or at least this long if the hedge beat it)
                            self.delays.record(method, attempt.worker, time.monotonic() - started)
                        return task.result()
                    if failure is None or task is first:
                        failure = exc
            assert failure is not None
            raise failure
        finally:
            losers = [t for t in tasks if not t.done()]
            for task in losers:
                task.cancel()  # its slot is free at once and the worker is told to cancel it
            if losers:
                await asyncio.wait(losers)

    async def _asecond(self, pool: Pool, member: _Member, method: str, args: Any, kwargs: dict[str, Any],
                       deadline: float) -> Any:
        started = time.monotonic()
        try:
            left = deadline - started
            if left <= 0:
                raise CallTimeoutError(f"{pool._service}.{method}: no time left for a hedge")
            value = await member.endpoint.acall(method, args, kwargs, left)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            pool._stats.attempt(member.name, _outcome(exc), started)
            pool._observe(member, started, True)
            if _transport(exc) and not isinstance(exc, (SlotsBusy, NoMux)):
                pool._eject(member)
            raise
        pool._stats.attempt(member.name, OK, started)
        pool._succeeded(member)
        pool._observe(member, started, False)
        self.delays.record(method, member.name, time.monotonic() - started)
        return value

"""Server statistics, always on and cheap: calls in flight, calls by method and outcome, latency histograms.

``ServerStats`` is what the server core counts for every request: a call is in flight from its request to
its reply (``enter``/``leave``, which also refuse calls once draining), and when it ends ``record`` adds it
to its ``(service, method)`` entry: a count per outcome (``ok``, ``error``, ``timeout``, ``refused``), a
latency histogram with fixed buckets (``BUCKETS``), their sum and a ring of the last ``RECENT`` latencies
(what ``p50_ms``/``p99_ms`` are computed from: the recent calls, not the whole lifetime). Plain integer
increments under one lock, no allocation on the hot path beyond a tuple key; snapshots copy under the lock
and do the arithmetic outside it. Prometheus endpoints (``pyrorpc.metrics``) and ``Pyro.Daemon.stats()``
read these numbers at scrape time.
"""

from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_left
from collections import deque
from typing import Any

__all__ = ["BUCKETS", "ERROR", "OK", "OUTCOMES", "POOL_OUTCOMES", "RECENT", "REFUSED", "TIMEOUT", "MethodStats",
           "PoolStats", "ServerStats", "quantile"]

call_log = logging.getLogger("pyrorpc.calls")  # one line per failed call (INFO; timeouts WARNING)

OK, ERROR, TIMEOUT, REFUSED = 0, 1, 2, 3
OUTCOMES = ("ok", "error", "timeout", "refused")
LOST, NOT_SENT = 3, 4  # a Pool's outcomes: OK, ERROR, TIMEOUT as a server's, then these
POOL_OUTCOMES = ("ok", "error", "timeout", "lost", "not_sent")
# upper bounds in seconds (a call of exactly a bound counts in its bucket); one more bucket above the last
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RECENT = 512  # latencies kept per method for p50/p99
_MAX_REASON = 500  # characters of an error's message in a failed call's log line
MAX_METHODS = 1000  # (service, method) entries; past it new names count under "<other>" (names come from peers)
OTHER = "<other>"
_INF = float("inf")
_MONOTONIC = time.monotonic
_TIME = time.time


class MethodStats:
    """The counts of one ``(service, method)``: per outcome, per latency bucket, their sum, recent latencies."""

    __slots__ = ("counts", "buckets", "total", "recent")

    def __init__(self, outcomes: int = 4) -> None:
        self.counts = [0] * outcomes  # by outcome: OK, ERROR, TIMEOUT, REFUSED (a Pool's: POOL_OUTCOMES)
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.total = 0.0  # seconds, all calls
        self.recent: deque[float] = deque(maxlen=RECENT)


def quantile(sorted_values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of sorted values, nearest rank; 0.0 for none."""
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


class ServerStats:
    """Calls in flight (request read .. reply written), completed and failed, and per method by outcome;
    refuses calls once draining. ``service`` names what a worker serves (in log lines)."""

    __slots__ = ("_lock", "_idle", "in_flight", "calls", "errors", "draining", "methods", "oneway_queued",
                 "started", "name")

    def __init__(self, name: str = "server") -> None:
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self.in_flight = 0
        self.calls = 0
        self.errors = 0
        self.draining = False
        self.methods: dict[tuple[str, str], MethodStats] = {}
        self.oneway_queued = 0  # oneway calls waiting for a call thread
        self.started = _TIME()
        self.name = name  # the worker's name, for log lines

    def enter(self) -> bool:
        """Count a call in; False once draining (the call must be refused)."""
        with self._lock:
            if self.draining:
                return False
            self.in_flight += 1
            return True

    def leave(self, failed: bool) -> None:
        with self._lock:
            self.in_flight -= 1
            self.calls += 1
            if failed:
                self.errors += 1
            if self.draining and not self.in_flight:
                self._idle.notify_all()

    def add(self, calls: int, errors: int) -> None:
        """Count calls that ran inside one request (a batch) besides the request itself."""
        with self._lock:
            self.calls += calls
            self.errors += errors

    def record(self, service: str, method: Any, outcome: int, started: float, deadline: float | None = None,
               exc: BaseException | None = None, leave: bool | None = None) -> None:
        """A call of ``service.method`` ended with ``outcome`` (``OK``...); ``started`` is its request's
        ``time.monotonic()``. An ``OK`` call that ended after its ``deadline`` (``time.time()`` based) counts
        as ``TIMEOUT``: its caller had given up. Failed calls are logged (``pyrorpc.calls``), with ``exc``.
        With ``leave`` (its ``failed``) it is also what ``leave()`` does, under the same lock."""
        seconds = _MONOTONIC() - started
        if outcome == OK:
            if deadline is not None and _TIME() > deadline:
                outcome = TIMEOUT
        if type(method) is not str:
            method = OTHER
        key = (service, method)
        with self._lock:
            entry = self.methods.get(key)
            if entry is None:
                entry = self._new_entry(key)
            entry.counts[outcome] += 1
            entry.buckets[bisect_left(BUCKETS, seconds)] += 1
            entry.total += seconds
            entry.recent.append(seconds)
            if leave is not None:
                self.in_flight -= 1
                self.calls += 1
                if leave:
                    self.errors += 1
                if self.draining and not self.in_flight:
                    self._idle.notify_all()
        if outcome != OK:
            self._log_failure(service, method, outcome, seconds, exc)

    def _new_entry(self, key: tuple[str, str]) -> MethodStats:
        if len(self.methods) >= MAX_METHODS:
            key = (key[0], OTHER)
            entry = self.methods.get(key)
            if entry is not None:
                return entry
        entry = self.methods[key] = MethodStats()
        return entry

    def _log_failure(self, service: str, method: str, outcome: int, seconds: float,
                     exc: BaseException | None) -> None:
        level = logging.WARNING if outcome == TIMEOUT else logging.INFO
        if not call_log.isEnabledFor(level):
            return
        what = OUTCOMES[outcome]
        reason = f": {type(exc).__name__}: {exc}" if exc is not None else ""
        if len(reason) > _MAX_REASON:  # (a peer's 5 MB method name is in the message of its error)
            reason = reason[:_MAX_REASON] + f"... ({len(reason):,} characters)"
        call_log.log(level, "%s: call %s.%s %s after %.1f ms%s", self.name, service, method, what, seconds * 1000,
                     reason, extra={"service": service, "worker": self.name, "method": method, "outcome": what,
                                    "duration_ms": round(seconds * 1000, 3)})

    def oneway_queue(self, delta: int) -> None:
        with self._lock:
            self.oneway_queued += delta

    def begin_drain(self) -> None:
        """Refuse new calls from now on."""
        with self._lock:
            self.draining = True

    def drain(self, timeout: float) -> bool:
        """Refuse new calls and wait until none is in flight; False if ``timeout`` ran out first."""
        with self._idle:
            self.draining = True
            return self._idle.wait_for(lambda: self.in_flight == 0, timeout)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"in_flight": self.in_flight, "calls": self.calls, "errors": self.errors}

    def method_counts(self, recent: bool = True) -> list[tuple[str, str, list[int], list[int], float, list[float]]]:
        """Copies of every entry: ``(service, method, counts, buckets, total_seconds, recent)`` (``recent``
        empty unless asked for: copying 512 latencies a method under the lock every call takes is what a
        scrape of many methods must not do)."""
        with self._lock:
            if not recent:
                return [(svc, m, list(e.counts), list(e.buckets), e.total, []) for (svc, m), e in self.methods.items()]
            return [(svc, m, list(e.counts), list(e.buckets), e.total, list(e.recent))
                    for (svc, m), e in self.methods.items()]

    def methods_snapshot(self) -> dict[str, dict[str, dict[str, Any]]]:
        """``{service: {method: {"ok", "error", "timeout", "refused", "p50_ms", "p99_ms", "sum_ms",
        "buckets"}}}``: counts since start, p50/p99 of the last ``RECENT`` calls, ``buckets`` the calls per
        latency bucket (bounds ``BUCKETS``, then one above the last)."""
        return self.full_snapshot()[0]

    def full_snapshot(self) -> tuple[dict[str, dict[str, dict[str, Any]]], dict[str, dict[str, Any]]]:
        """``methods_snapshot()`` and, per service, its methods together: ``{service: {"ok", "error",
        "timeout", "refused", "p50_ms", "p99_ms"}}`` (p50/p99 over the recent calls of all its methods)."""
        methods: dict[str, dict[str, dict[str, Any]]] = {}
        services: dict[str, tuple[list[int], list[float]]] = {}
        for svc, method, counts, buckets, total, recent in self.method_counts():
            per_service = services.setdefault(svc, ([0] * len(OUTCOMES), []))
            per_service[1].extend(recent)
            for i, n in enumerate(counts):
                per_service[0][i] += n
            recent.sort()
            row: dict[str, Any] = dict(zip(OUTCOMES, counts, strict=True))
            row.update(p50_ms=round(quantile(recent, 0.5) * 1000, 3), p99_ms=round(quantile(recent, 0.99) * 1000, 3),
                       sum_ms=round(total * 1000, 3), buckets=buckets)
            methods.setdefault(svc, {})[method] = row
        totals: dict[str, dict[str, Any]] = {}
        for svc, (counts, recent) in services.items():
            recent.sort()
            totals[svc] = dict(zip(OUTCOMES, counts, strict=True), p50_ms=round(quantile(recent, 0.5) * 1000, 3),
                               p99_ms=round(quantile(recent, 0.99) * 1000, 3))
        return methods, totals


class PoolStats:
    """A Pool's side: attempts per worker by outcome (``POOL_OUTCOMES``) with their latency, retries of lost
    idempotent calls, failovers of calls that could not be sent, ejections per worker."""

    __slots__ = ("_lock", "workers", "retries", "failovers", "ejections")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.workers: dict[str, MethodStats] = {}
        self.retries = 0
        self.failovers = 0
        self.ejections: dict[str, int] = {}

    def attempt(self, worker: str, outcome: int, started: float) -> None:
        """An attempt on ``worker`` ended with ``outcome`` (OK, ERROR, TIMEOUT, LOST, NOT_SENT)."""
        seconds = _MONOTONIC() - started
        with self._lock:
            entry = self.workers.get(worker)
            if entry is None:
                if len(self.workers) >= MAX_METHODS:
                    worker = OTHER
                    entry = self.workers.get(worker)
                if entry is None:
                    entry = self.workers[worker] = MethodStats(len(POOL_OUTCOMES))
            entry.counts[outcome] += 1
            entry.buckets[bisect_left(BUCKETS, seconds)] += 1
            entry.total += seconds

    def retried(self) -> None:
        with self._lock:
            self.retries += 1

    def failed_over(self) -> None:
        with self._lock:
            self.failovers += 1

    def ejected(self, worker: str) -> None:
        with self._lock:
            if worker in self.ejections or len(self.ejections) < MAX_METHODS:
                self.ejections[worker] = self.ejections.get(worker, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        """``{"retries", "failovers", "ejections": {worker: n}, "workers": [(worker, counts, buckets,
        total_seconds)]}``, copied."""
        with self._lock:
            return {"retries": self.retries, "failovers": self.failovers, "ejections": dict(self.ejections),
                    "workers": [(w, list(e.counts), list(e.buckets), e.total) for w, e in self.workers.items()]}

"""A service whose latency a test sets per worker at run time (hedging and outlier ejection tests)."""

from __future__ import annotations

import os
import threading
import time

import pyrorpc


@pyrorpc.service("tunable")
class Tunable:
    """``work`` (``@idempotent``) and ``plain`` (not) sleep ``base`` seconds, plus ``late`` on every
    ``late_every``-th call; ``tune(...)`` sets those on the worker it reaches (call it through a proxy bound to
    the worker's name). Every method returns or counts per worker, so a test sees where calls ran."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.base = 0.0
        self.late = 0.0
        self.late_every = 0
        self.runs = 0
        self.fail_every = 0

    def tune(self, base: float = 0.0, late: float = 0.0, late_every: int = 0, fail_every: int = 0) -> int:
        with self._lock:
            self.base, self.late, self.late_every, self.fail_every = base, late, late_every, fail_every
        return os.getpid()

    def _run(self) -> None:
        with self._lock:
            self.runs += 1
            n = self.runs
            delay = self.base + (self.late if self.late_every and n % self.late_every == 0 else 0.0)
            fail = self.fail_every and n % self.fail_every == 0
        if delay:
            time.sleep(delay)
        if fail:
            raise ValueError(f"failing call {n}")

    @pyrorpc.idempotent
    def work(self, x: int) -> tuple[int, int]:
        self._run()
        return os.getpid(), x

    def plain(self, x: int) -> tuple[int, int]:
        self._run()
        return os.getpid(), x

    @pyrorpc.idempotent
    async def awork(self, x: int) -> tuple[int, int]:
        """``work`` on the worker's event loop."""
        import asyncio

        with self._lock:
            self.runs += 1
            n = self.runs
            delay = self.base + (self.late if self.late_every and n % self.late_every == 0 else 0.0)
        if delay:
            await asyncio.sleep(delay)
        return os.getpid(), x

    def count(self) -> int:
        """Calls run so far (``work``, ``plain``, ``awork``)."""
        with self._lock:
            return self.runs

    def reset(self) -> int:
        with self._lock:
            self.runs = 0
            self.base = self.late = 0.0
            self.late_every = self.fail_every = 0
        return os.getpid()

"""Supervisor: runs N worker processes, restarts crashed ones with backoff, passes SIGTERM on."""

from __future__ import annotations

import logging
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["Supervisor"]

log = logging.getLogger("pyrorpc.supervisor")


class _Child:
    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.failures = 0
        self.next_start = 0.0


class Supervisor:
    """Keeps ``processes`` copies of ``argv`` running until told to stop.

    A child that exits while the supervisor is running is restarted after a backoff that doubles on
    each quick failure (``backoff`` .. ``max_backoff`` seconds) and resets once a child has run for
    ``healthy_after`` seconds. ``stop()`` (SIGTERM/SIGINT inside ``run()``) sends SIGTERM to every child
    and waits ``grace`` seconds for them to drain before SIGKILL.
    """

    def __init__(self, argv: Sequence[str], processes: int, *, grace: float = 30.0, backoff: float = 0.5,
                 max_backoff: float = 30.0, healthy_after: float = 30.0, env: dict[str, str] | None = None,
                 echo: Callable[[str], None] = print) -> None:
        if processes < 1:
            raise ValueError(f"`processes` must be >= 1, got {processes}")
        self.argv = list(argv)
        self.env = env
        self.children = [_Child(i) for i in range(processes)]
        self.grace = grace
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.healthy_after = healthy_after
        self.echo = echo
        self.restarts = 0
        self._stop = threading.Event()

    def _spawn(self, child: _Child) -> None:
        child.proc = subprocess.Popen(self.argv, env=self.env)
        child.started = time.monotonic()

    def pids(self) -> list[int]:
        return [c.proc.pid for c in self.children if c.proc is not None and c.proc.poll() is None]

    def run(self, *, handle_signals: bool = True) -> int:
        """Supervise until stopped; returns 0 when every child drained and exited cleanly."""
        if handle_signals:
            def on_signal(_signo: int, _frame: Any) -> None:
                self._stop.set()
            signal.signal(signal.SIGTERM, on_signal)
            signal.signal(signal.SIGINT, on_signal)
        for child in self.children:
            self._spawn(child)
        while not self._stop.wait(0.2):
            now = time.monotonic()
            for child in self.children:
                proc = child.proc
                if proc is not None and proc.poll() is None:
                    if child.failures and now - child.started > self.healthy_after:
                        child.failures = 0
                    continue
                if proc is not None:
                    code = proc.returncode
                    child.proc = None
                    child.failures += 1
                    delay = min(self.max_backoff, self.backoff * 2 ** (child.failures - 1))
                    child.next_start = now + delay
                    self.echo(f"supervisor: worker {child.slot} (pid {proc.pid}) exited with {code}; "
                              f"restarting in {delay:.1f}s")
                if now >= child.next_start:
                    self._spawn(child)
                    self.restarts += 1
        return self._terminate()

    def stop(self) -> None:
        self._stop.set()

    def _terminate(self) -> int:
        procs = [c.proc for c in self.children if c.proc is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        status = 0
        for proc in procs:
            try:
                code = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            if code != 0:
                status = 1
        return status

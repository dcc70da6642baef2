"""The jobs service: runs a long job and reports progress to an object the caller passed by reference."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import Pyro5.errors

import pyrorpc

log = logging.getLogger("jobs")
STEP_SECONDS = float(os.environ.get("JOBS_STEP_SECONDS", "0.1"))


def _report(reporter: Any, method: str, *args: Any) -> bool:
    """Call the caller's reporter; False (and the job goes on) if the caller has gone away."""
    try:
        reporter.method(method).with_timeout(5)(*args)  # a stuck caller must not hang the job
        return True
    except Pyro5.errors.CommunicationError as exc:
        log.warning("reporter unreachable, job continues without progress reports: %s", exc)
        return False


@pyrorpc.service("jobs")
class Jobs:
    def run(self, job: str, steps: int, reporter: Any) -> dict[str, Any]:
        """Run ``job`` inside this call, calling ``reporter.progress(job, percent, note)`` after each step;
        returns the result. ``reporter`` arrives as a pyrorpc Proxy to the caller's object (thread safe)."""
        for step in range(1, steps + 1):
            time.sleep(STEP_SECONDS)  # the work
            _report(reporter, "progress", job, round(100 * step / steps), f"step {step}/{steps} on pid {os.getpid()}")
        return {"job": job, "steps": steps, "worker": os.getpid()}

    @pyrorpc.oneway  # the caller does not wait: the result comes back through reporter.done()
    def start(self, job: str, steps: int, reporter: Any) -> None:
        """Like ``run`` but fire-and-forget: progress and the result go to ``reporter``."""
        with reporter:  # closes the connection back to the caller at the end
            result = self.run(job, steps, reporter)
            _report(reporter, "done", job, result)

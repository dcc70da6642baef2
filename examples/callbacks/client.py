"""Passes a progress reporter to the jobs service by reference and prints the progress the worker reports.

The reporter lives in this process: it is registered with a ``pyrorpc.CallbackServer``, so the worker
gets a proxy to it instead of a copy (Ruby's DRbUndumped). The worker must be able to connect back to
``--callback-host``; the callback server uses the same secret and TLS settings as everything else.

    python client.py [--steps 5] [--callback-host 127.0.0.1] [--ns 127.0.0.1:9090]
"""

from __future__ import annotations

import argparse
import sys
import threading
from typing import Any

import pyrorpc


class ProgressReporter:
    """Called by the worker, on the callback server's call threads (so it is thread safe)."""

    def __init__(self) -> None:
        self.results: dict[str, Any] = {}
        self._done = threading.Condition()

    def progress(self, job: str, percent: int, note: str) -> None:
        bar = "#" * (percent // 5)
        print(f"  [{job}] {bar:<20} {percent:3d}%  {note}", flush=True)

    def done(self, job: str, result: dict[str, Any]) -> None:
        with self._done:
            self.results[job] = result
            self._done.notify_all()

    def wait(self, job: str, timeout: float) -> dict[str, Any] | None:
        with self._done:
            self._done.wait_for(lambda: job in self.results, timeout)
            return self.results.get(job)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--callback-host", default="127.0.0.1",
                        help="interface our callback server listens on (the worker connects back to it)")
    parser.add_argument("--ns", default=None, help="name server HOST:PORT (default: $PYRORPC_NS or 127.0.0.1:9090)")
    args = parser.parse_args()

    reporter = ProgressReporter()
    with pyrorpc.CallbackServer(host=args.callback_host) as callbacks:
        uri = callbacks.register(reporter)  # from now on `reporter` is passed by reference
        print(f"reporter served at {uri}")
        # a Pool rather than connect(): it waits (up to its timeout) for a worker that is still starting
        with pyrorpc.Pool("jobs", ns=args.ns) as jobs:
            print("run (we wait, progress arrives meanwhile):")
            result = jobs.run("report-1", args.steps, reporter)
            print(f"  result: {result}")

            print("start (oneway: returns at once, the result arrives through reporter.done):")
            jobs.start.oneway("report-2", args.steps, reporter)
            print("  start() returned; waiting for done()")
            result = reporter.wait("report-2", timeout=30)
            print(f"  done: {result}")
    return 0 if result is not None else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except pyrorpc.RpcError as exc:  # name server down, no worker...: one line, not a traceback
        sys.exit(f"error: {exc}")

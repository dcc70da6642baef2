"""Passes a progress reporter to the jobs service by reference and prints the progress the worker reports.

The reporter lives in this process: it is registered in a Pyro5 daemon of our own, so Pyro5 sends the
worker a proxy to it instead of a copy (Ruby's DRbUndumped). The worker must be able to connect back to
``--callback-host``.

    python client.py [--steps 5] [--callback-host 127.0.0.1] [--ns 127.0.0.1:9090]
"""

from __future__ import annotations

import argparse
import sys
import threading
from typing import Any

import Pyro5.api

import pyrorpc


@Pyro5.api.expose
class ProgressReporter:
    """Called by the worker, in this process's daemon threads."""

    def __init__(self) -> None:
        self.results: dict[str, Any] = {}
        self._done = threading.Condition()

    @Pyro5.api.callback  # an exception in here is also raised (and shown) on our side, not only the worker's
    def progress(self, job: str, percent: int, note: str) -> None:
        bar = "#" * (percent // 5)
        print(f"  [{job}] {bar:<20} {percent:3d}%  {note}", flush=True)

    @Pyro5.api.callback
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
                        help="interface our own daemon listens on (the worker connects back to it)")
    parser.add_argument("--ns", default=None, help="name server HOST:PORT (default: $PYRORPC_NS or 127.0.0.1:9090)")
    args = parser.parse_args()

    reporter = ProgressReporter()
    with Pyro5.api.Daemon(host=args.callback_host, port=0) as daemon:
        daemon.register(reporter)  # from now on `reporter` is passed by reference (an autoproxy)
        loop = threading.Thread(target=daemon.requestLoop, name="callbacks", daemon=True)
        loop.start()
        print(f"reporter served at {daemon.uriFor(reporter)}")
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
        daemon.shutdown()
        loop.join(5)
    return 0 if result is not None else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except pyrorpc.RpcError as exc:  # name server down, no worker...: one line, not a traceback
        sys.exit(f"error: {exc}")

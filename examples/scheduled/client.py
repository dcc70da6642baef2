"""The scheduler: fires the nightly newsletter batch on a cron expression, as pool calls to the newsletter
service. Start it on two machines for failover: only the holder of a lock in the name server fires.

    python client.py [--cron "0 2 * * *"] [--tz UTC] [--id NAME] [--lock-ttl 10] [--ns 127.0.0.1:9090]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

from croniter import croniter

import pyrorpc

LOCK = "scheduler.newsletter"
EDITION_FORMAT = "%Y-%m-%dT%H:%M:%SZ"  # the tick in UTC: sorts as text, one edition per tick


def say(owner: str, text: str) -> None:
    print(f"[{owner}] {text}", flush=True)


class Leadership:
    """Takes and keeps the lock ``LOCK`` in the name server (renewed every TTL/3), or waits for it.

    The lock is a lease: if the holder dies its renewals stop and another scheduler gets the lock one TTL
    later. Whoever cannot reach the name server assumes it is not the leader: better a skipped tick
    (caught up later) than two schedulers firing.
    """

    def __init__(self, naming: pyrorpc.NameServerClient, owner: str, ttl: float, changed: threading.Event):
        self.naming = naming
        self.owner = owner
        self.ttl = ttl
        self.changed = changed
        self.held: bool | None = None
        self._lock = threading.Lock()

    def check(self) -> bool:
        """Take or renew the lock now; True while this scheduler holds it."""
        try:
            held = self.naming.acquire_lock(LOCK, self.owner, self.ttl)
        except pyrorpc.NameServerUnavailableError as exc:
            held = False
            say(self.owner, f"cannot reach the name server ({exc}); not firing")
        with self._lock:
            changed, self.held = held != self.held, held
        if changed:
            if held:
                say(self.owner, f"leader: holding lock {LOCK!r} (TTL {self.ttl:g}s)")
            else:
                say(self.owner, f"standby: lock {LOCK!r} is held by another scheduler")
            self.changed.set()
        return held

    def keep(self, stop: threading.Event) -> None:
        while not stop.wait(self.ttl / 3):
            self.check()

    def release(self) -> None:
        try:
            if self.naming.release_lock(LOCK, self.owner):
                say(self.owner, f"released lock {LOCK!r}")
        except pyrorpc.NameServerUnavailableError:
            pass  # the lease runs out by itself


def ticks(cron: str, after: datetime, until: datetime) -> Iterator[datetime]:
    """The cron ticks t with after < t <= until."""
    it = croniter(cron, after)
    while (tick := it.get_next(datetime)) <= until:
        yield tick


def edition(tick: datetime) -> str:
    return tick.astimezone(timezone.utc).strftime(EDITION_FORMAT)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cron", default="0 2 * * *",
                        help='cron expression; a 6th field is seconds ("* * * * * */5": every 5 s)')
    parser.add_argument("--tz", default="UTC", help="time zone the cron expression is in, e.g. Europe/Berlin")
    parser.add_argument("--id", default=f"{socket.gethostname()}-{os.getpid()}", help="this scheduler's name")
    parser.add_argument("--lock-ttl", type=float, default=10.0, help="seconds a dead leader keeps the lock")
    parser.add_argument("--catch-up", type=float, default=300.0,
                        help="on taking over, fire ticks missed within this many seconds")
    parser.add_argument("--ns", default=None, help="name server HOST:PORT (default: $PYRORPC_NS or 127.0.0.1:9090)")
    args = parser.parse_args()
    if not croniter.is_valid(args.cron):
        parser.error(f"not a valid cron expression: {args.cron!r}")
    tz = ZoneInfo(args.tz)
    owner = args.id

    stop, wake = threading.Event(), threading.Event()

    def on_signal(_signo: int, _frame: Any) -> None:
        stop.set()
        wake.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    settings = pyrorpc.Settings.from_env(ns=args.ns)
    with pyrorpc.Pool("newsletter", settings=settings) as newsletter:

        def fire(tick: datetime) -> None:
            ed = edition(tick)

            def report(fut: Any) -> None:
                try:
                    r = fut.result()
                except Exception as exc:
                    say(owner, f"edition {ed} FAILED: {exc!r}")
                    return
                what = "already sent, ignored" if r["duplicate"] else f"sent to {r['recipients']} subscribers"
                say(owner, f"fired edition {ed}: {what} by worker {r['worker']}")

            newsletter.send_newsletter.future(ed, owner).add_done_callback(report)

        lead = Leadership(pyrorpc.NameServerClient(settings), owner, args.lock_ttl, wake)
        cursor = datetime.now(tz)  # ticks up to here are dealt with (fired, or not ours to fire)
        say(owner, f"cron {args.cron!r} ({args.tz}); next tick {croniter(args.cron, cursor).get_next(datetime)}")
        lead.check()
        threading.Thread(target=lead.keep, args=(stop,), daemon=True).start()
        leading = False
        while not stop.is_set():
            next_tick = croniter(args.cron, cursor).get_next(datetime)
            # sleep until the tick is due, or until leadership changes
            wake.wait(max(0.0, (next_tick - datetime.now(tz)).total_seconds()))
            wake.clear()
            if stop.is_set():
                break
            now = datetime.now(tz)
            if not lead.check():  # ask the name server right before firing, not only every TTL/3
                leading, cursor = False, now
                continue
            start = cursor
            if not leading:
                # just took over: fire what the previous leader missed while its lock ran out
                try:
                    last = newsletter.last_edition()
                except pyrorpc.RpcError as exc:
                    say(owner, f"newsletter service not answering ({exc}); will fire the ticks when it does")
                    stop.wait(1.0)
                    continue  # cursor stays: the ticks since then are fired once it answers
                leading = True
                if last is not None:
                    last_tick = datetime.strptime(last, EDITION_FORMAT).replace(tzinfo=timezone.utc)
                    start = max(last_tick.astimezone(tz), now - timedelta(seconds=args.catch_up))
                missed = [t for t in ticks(args.cron, start, now) if t <= cursor]
                if missed:
                    say(owner, f"catching up {len(missed)} missed tick(s) from {edition(missed[0])}")
            for tick in ticks(args.cron, start, now):
                fire(tick)
            cursor = now
        lead.release()
    say(owner, "stopped")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except pyrorpc.RpcError as exc:  # name server down...: one line, not a traceback
        sys.exit(f"error: {exc}")

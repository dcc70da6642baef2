"""``pyrorpc demo``: an embedded name server, worker processes of a demo service, and a Pool at work."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable

from .service import idempotent, oneway, service

__all__ = ["DemoService", "run_demo"]


@service("demo")
class DemoService:
    """A stand-in for expensive work: each call sleeps a few milliseconds and says who ran it."""

    def __init__(self) -> None:
        self._notes = 0
        self._lock = threading.Lock()

    def whoami(self) -> str:
        return f"{socket.gethostname().split('.')[0]}:{os.getpid()}"

    @idempotent
    def square(self, x: int, work_ms: float = 0.0) -> tuple[int, int]:
        """``(x * x, pid)`` after ``work_ms`` of pretend work; safe to re-run elsewhere."""
        if work_ms:
            time.sleep(work_ms / 1000)
        return x * x, os.getpid()

    @oneway
    def note(self, message: str) -> None:
        with self._lock:
            self._notes += 1

    def notes(self) -> int:
        with self._lock:
            return self._notes


def _bar(done: int, total: int, width: int = 30) -> str:
    filled = int(width * done / total) if total else width
    return "[" + "#" * filled + "." * (width - filled) + f"] {done}/{total}"


def run_demo(n_workers: int = 3, calls: int = 300, kill: bool = True, work_ms: float = 10.0,
             echo: Callable[[str], None] = print) -> int:
    """Run the demo; returns 0 when every call came back correct and in order."""
    from nameserver import NameServerDaemon

    from .pool import Pool
    from .testing import WorkerProcess

    spec = "pyrorpc.demo:DemoService"
    started = time.perf_counter()
    with NameServerDaemon("127.0.0.1", 0, lease_ttl=3.0) as daemon:
        daemon.start()
        ns = "{}:{}".format(*daemon.address)
        echo(f"name server   embedded on {ns} (lease TTL 3s)")
        with concurrent.futures.ThreadPoolExecutor(n_workers) as ex:
            workers = list(ex.map(lambda _i: WorkerProcess(spec, ns), range(n_workers)))
        try:
            for w in workers:
                echo(f"worker        {w.name}  pid {w.worker_pid}")
            with Pool("demo", ns=ns, timeout=15.0) as pool:
                echo("")
                echo(f"sync          pool.whoami()           -> {pool.whoami()}")
                echo(f"future        pool.square.future(7)   -> {pool.square.future(7).result()[0]}")
                echo(f"await         pool.square.aio(8)      -> {asyncio.run(pool.square.aio(8))[0]}")
                for i in range(30):
                    pool.note.oneway(f"hello {i}")
                echo("oneway        pool.note.oneway(...) x30 -> sent, nobody waited")
                seen = pool.notes.broadcast()
                echo("broadcast     pool.notes.broadcast()  -> "
                     + ", ".join(f"{name.split('.')[-2]}: {n}" for name, n in sorted(seen.items())))
                echo("")
                echo(f"map           {calls} x square(i) ({work_ms:g} ms of work each)"
                     + (", one worker SIGKILLed mid-run" if kill and n_workers > 1 else ""))
                victim = workers[0] if kill and n_workers > 1 else None
                per_pid: Counter[int] = Counter()
                wrong = 0
                t0 = time.perf_counter()
                tty = sys.stdout.isatty()
                for i, (value, pid) in enumerate(pool.square.map((i, work_ms) for i in range(calls))):
                    wrong += value != i * i
                    per_pid[pid] += 1
                    if victim is not None and i == calls * 2 // 5:
                        victim.kill()
                        echo(f"\n              killed {victim.name} (pid {victim.worker_pid}) with SIGKILL")
                    if tty:
                        print("\r              " + _bar(i + 1, calls), end="", flush=True)
                    elif (i + 1) % max(1, calls // 4) == 0 or i + 1 == calls:
                        echo("              " + _bar(i + 1, calls))
                elapsed = time.perf_counter() - t0
                if tty:
                    print()
                echo("")
                echo("calls per worker:")
                for w in workers:
                    n = per_pid.get(w.worker_pid, 0)
                    mark = "  (killed)" if w is victim else ""
                    echo(f"  pid {w.worker_pid:<8} {'#' * max(1, 40 * n // calls) if n else '':<40} {n:>5}{mark}")
                lost = calls - sum(per_pid.values())
                echo("")
                echo(f"throughput    {calls / elapsed:,.0f} calls/s over {len(workers)} workers "
                     f"({elapsed:.2f}s)")
                echo(f"results       {calls - wrong}/{calls} correct and in order, {lost} lost")
        finally:
            for w in workers:
                if w.alive():
                    w.terminate(15)
        echo(f"done in {time.perf_counter() - started:.1f}s; workers drained and stopped cleanly")
        return 0 if wrong == 0 and lost == 0 else 1

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


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _exit_text(status: int) -> str:
    return f"was ended by signal {-status}" if status < 0 else f"exited with status {status}"


def run_demo(n_workers: int = 3, calls: int = 300, kill: bool = True, work_ms: float = 10.0,
             echo: Callable[[str], None] = print, *, spec: str = "pyrorpc.demo:DemoService") -> int:
    """Run the demo; returns 0 when every call came back correct and in order and every worker that was
    not killed on purpose drained and exited 0.

    ``spec`` is the ``MODULE:CLASS`` the workers serve: DemoService or a subclass (a test hook).
    """
    from nameserver import NameServerDaemon

    from .pool import Pool
    from .testing import WorkerProcess

    started = time.perf_counter()
    with NameServerDaemon("127.0.0.1", 0, lease_ttl=3.0) as daemon:
        daemon.start()
        ns = "{}:{}".format(*daemon.address)
        echo(f"name server   embedded on {ns} (lease TTL 3s)")
        workers: list[WorkerProcess] = []
        with concurrent.futures.ThreadPoolExecutor(n_workers) as ex:
            starting = [ex.submit(WorkerProcess, spec, ns) for _ in range(n_workers)]
        try:
            workers.extend(f.result() for f in starting)
        finally:
            if len(workers) < n_workers:  # one did not start: stop the others, report the failure
                for f in starting:
                    if f.exception() is None:
                        f.result().kill()
        victim = workers[0] if kill and n_workers > 1 else None
        killed = False
        wrong = answered = 0
        failure: BaseException | None = None
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
                     + (", one worker SIGKILLed mid-run" if victim is not None else ""))
                per_pid: Counter[int] = Counter()
                # the kill comes early (a tenth of the results in, once the victim has answered): its calls
                # in flight then fail over, and the others visibly take over the rest of the run
                kill_at, kill_by = max(1, calls // 10), max(1, calls // 2)
                t0 = time.perf_counter()
                tty = sys.stdout.isatty()
                try:
                    for i, (value, pid) in enumerate(pool.square.map((i, work_ms) for i in range(calls))):
                        answered += 1
                        wrong += value != i * i
                        per_pid[pid] += 1
                        if victim is not None and not killed and (
                                (answered >= kill_at and per_pid[victim.worker_pid]) or answered >= kill_by):
                            victim.kill()
                            killed = True
                            echo(f"\n              killed {victim.name} (pid {victim.worker_pid}) with SIGKILL at "
                                 f"result {answered}/{calls}; its calls in flight fail over to the others")
                        if tty:
                            print("\r              " + _bar(answered, calls), end="", flush=True)
                        elif answered % max(1, calls // 4) == 0 or answered == calls:
                            echo("              " + _bar(answered, calls))
                except Exception as exc:  # map raises a call that did not come back in its place; no more follow
                    failure = exc
                elapsed = time.perf_counter() - t0
                if tty:
                    print()
                echo("")
                echo("calls per worker:")
                for w in workers:
                    n = per_pid.get(w.worker_pid, 0)
                    mark = "  (killed)" if w is victim and killed else ""
                    echo(f"  pid {w.worker_pid:<8} {'#' * max(1, 40 * n // calls) if n else '':<40} {n:>5}{mark}")
                lost = calls - answered
                echo("")
                echo(f"throughput    {answered / elapsed:,.0f} calls/s over {_plural(len(workers), 'worker')} "
                     f"({elapsed:.2f}s)")
                why = "" if failure is None else \
                    f" (square({answered}) raised {type(failure).__name__}: {failure}; the rest never ran)"
                echo(f"results       {answered - wrong}/{calls} correct and in order, {lost} lost{why}")
        finally:
            unclean = []
            for w in workers:
                status = w.terminate(15) if w.alive() else w.wait(5)
                if status != 0 and not (w is victim and killed):
                    unclean.append(f"worker {w.name} (pid {w.worker_pid}) {_exit_text(status)}")
        stopped = len(workers) - killed
        if unclean:
            echo(f"done in {time.perf_counter() - started:.1f}s; " + "; ".join(unclean))
        else:
            echo(f"done in {time.perf_counter() - started:.1f}s; {_plural(stopped, 'worker')} drained and "
                 "stopped cleanly (exit status 0)")
        return 0 if wrong == 0 and failure is None and answered == calls and not unclean else 1

"""Benchmark harness: server child processes that always get stopped, and the timing loops."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# child processes --------------------------------------------------------------------------------------

class Child:
    """A server process started from ``servers.py``; its output is drained by a thread."""

    def __init__(self, args: list[str], cpus: str | None) -> None:
        argv = [sys.executable, os.path.join(HERE, "servers.py"), *args]
        if cpus:
            argv += ["--cpus", cpus]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, ROOT, env.get("PYTHONPATH")) if p)
        self.name = args[0]
        # own session: a Ctrl-C in the terminal reaches run.py, which then stops the children in order
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True, cwd=ROOT, env=env)
        self.lines: list[str] = []
        self._ready: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            if line.startswith("READY "):
                self._ready.put(line[6:])
        self._ready.put(None)

    def wait_ready(self, timeout: float) -> list[str]:
        """The fields of the next ``READY`` line (kind first); raises if the process exits or times out."""
        try:
            line = self._ready.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"{self.name} server not ready within {timeout:g}s:\n" + "\n".join(self.lines[-20:])) \
                from None
        if line is None:
            raise RuntimeError(f"{self.name} server exited ({self.proc.wait()}):\n" + "\n".join(self.lines[-20:]))
        return line.split()

    def ask(self, command: str, timeout: float) -> list[str]:
        """Send one command line to a helper that answers each with a ``READY`` line; its fields."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.wait_ready(timeout)

    def stop(self) -> None:
        """Close stdin (the child exits at once); SIGKILL if it is still there after 3 s."""
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(3)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: only its process group
            self.proc.wait(5)


@contextmanager
def children(pids: list[int]) -> Iterator[Callable[[list[str], str | None], Child]]:
    """A factory of Child processes (their pids go to ``pids``); all of them are stopped when the block
    ends, however it ends."""
    made: list[Child] = []

    def start(args: list[str], cpus: str | None) -> Child:
        child = Child(args, cpus)
        made.append(child)
        pids.append(child.proc.pid)
        return child

    try:
        yield start
    finally:
        for child in reversed(made):
            child.stop()


def thread_count(pid: int) -> int:
    """Threads of process ``pid`` (entries of /proc/PID/task); Linux only."""
    return len(os.listdir(f"/proc/{pid}/task"))


def fd_count(pid: int) -> int:
    """Open file descriptors of process ``pid`` (entries of /proc/PID/fd); Linux only."""
    return len(os.listdir(f"/proc/{pid}/fd"))


@contextmanager
def idle_connections(helper: Child, n: int, server_pid: int) -> Iterator[float]:
    """``n`` idle connections to a server, opened for the block by ``helper`` (a ``servers.py idle``
    child): yields the seconds opening them took, once the server process ``server_pid`` holds all of
    them; then closes them and waits until the server has closed its side too, so that the next measure
    does not pay for it."""
    fds0 = fd_count(server_pid)
    reply = helper.ask(f"open {n}", 300)
    try:
        if reply[0] != "opened" or int(reply[1]) != n:
            raise RuntimeError(f"idle helper could not open {n} connections: {' '.join(reply)}")
        held = fd_count(server_pid) - fds0
        if held < n:
            raise RuntimeError(f"the server holds {held} descriptors more, not the {n} idle connections")
        yield float(reply[2])
    finally:
        helper.ask("close", 60)
        deadline = time.monotonic() + 30
        while (held := fd_count(server_pid) - fds0) > 8:  # a few may come and go meanwhile (lease renewals)
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server still holds {held} of the idle connections 30 s after closing")
            time.sleep(0.01)


# timing -----------------------------------------------------------------------------------------------

def percentile(sorted_values: list[int], q: float) -> float:
    """Nearest-rank percentile of a sorted sample."""
    rank = max(1, min(len(sorted_values), math.ceil(q / 100 * len(sorted_values))))
    return float(sorted_values[rank - 1])


@functools.cache
def _cpu_clock(pid: int) -> int:
    """The id of the kernel's CPU-time clock of process ``pid`` (POSIX ``clock_getcpuclockid``)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    clock = ctypes.c_int()
    err = libc.clock_getcpuclockid(pid, ctypes.byref(clock))
    if err:
        raise OSError(err, os.strerror(err))
    return clock.value


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) used so far by process ``pid``; Linux only.

    Read from the process's CPU-time clock (nanoseconds, what the scheduler counted); /proc/PID/stat's
    user + system time, sampled at clock ticks (10 ms) and so too coarse for a per-call figure, only
    where that clock is not available."""
    try:
        return time.clock_gettime(_cpu_clock(pid))
    except (OSError, AttributeError):
        pass
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sync_loop(call: Callable[[], Any], n: int, warmup: int, server_pid: int | None = None) -> dict[str, float]:
    """Call ``n`` times back to back; calls/s, latency percentiles (each call timed end to end) and the CPU
    time per call of this process and of the server process (both from CPU-time clocks)."""
    for _ in range(warmup):
        call()
    gc.collect()
    clock = time.perf_counter_ns
    lat = [0] * n
    cpu0 = time.process_time()
    srv0 = process_cpu(server_pid) if server_pid else math.nan
    start = prev = clock()
    for i in range(n):
        call()
        now = clock()
        lat[i] = now - prev
        prev = now
    total = (prev - start) / 1e9
    cpu = time.process_time() - cpu0
    srv = process_cpu(server_pid) - srv0 if server_pid else math.nan
    lat.sort()
    return {"calls_per_s": n / total, "seconds": total, "calls": n,
            "p50_us": percentile(lat, 50) / 1e3, "p90_us": percentile(lat, 90) / 1e3,
            "p99_us": percentile(lat, 99) / 1e3, "p999_us": percentile(lat, 99.9) / 1e3,
            "max_us": lat[-1] / 1e3, "mean_us": sum(lat) / n / 1e3,
            "client_cpu_us": cpu / n * 1e6, "server_cpu_us": srv / n * 1e6}


def threaded_run(prepare: Callable[[int], Callable[[], Any]], threads: int, n: int, warmup: int,
                 timeout: float = 300.0) -> dict[str, Any]:
    """``threads`` client threads each make ``warmup`` then ``n`` calls back to back; calls/s over all of them.

    Thread ``i`` gets its callable from ``prepare(i)``, called in that thread (a stock Pyro5 proxy must be
    claimed by the thread that uses it). The timed part starts when the last thread is done warming up
    (a barrier) and ends when the last thread is done. A call that raises, warm-up included, is counted in
    ``errors`` (the first one's text is kept) and the thread goes on; a run whose threads are not all done
    within ``timeout`` raises.
    """
    start = [0.0]
    ends = [math.nan] * threads
    lats: list[list[int]] = [[] for _ in range(threads)]
    errors = [0] * threads
    first_error: list[str] = []

    def failed(exc: BaseException, where: str = "") -> None:
        if not first_error:
            first_error.append(f"{where}{type(exc).__name__}: {exc}")

    def started() -> None:  # run by one thread once all are at the barrier, before any is released
        gc.collect()
        start[0] = time.perf_counter()

    barrier = threading.Barrier(threads, action=started)

    def client(i: int) -> None:
        try:
            call = prepare(i)
        except Exception as exc:
            failed(exc, "setup: ")
            barrier.abort()
            return
        for _ in range(warmup):
            try:
                call()
            except Exception as exc:
                errors[i] += 1
                failed(exc)
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            return
        clock = time.perf_counter_ns
        lat = [0] * n
        prev = clock()
        for k in range(n):
            try:
                call()
            except Exception as exc:
                errors[i] += 1
                failed(exc)
            now = clock()
            lat[k] = now - prev
            prev = now
        lats[i] = lat
        ends[i] = time.perf_counter()

    pool = [threading.Thread(target=client, args=(i,), name=f"bench-client-{i}", daemon=True)
            for i in range(threads)]
    for t in pool:
        t.start()
    deadline = time.monotonic() + timeout
    for t in pool:
        t.join(max(0.0, deadline - time.monotonic()))
    done = sum(not math.isnan(e) for e in ends)
    if done < threads:
        barrier.abort()  # let threads still waiting for the start go
        raise RuntimeError(f"only {done} of {threads} client threads finished within {timeout:g}s"
                           + (f" (first error: {first_error[0]})" if first_error else ""))
    elapsed = max(ends) - start[0]
    merged = sorted(x for lat in lats for x in lat)
    out: dict[str, Any] = {
        "calls_per_s": threads * n / elapsed, "seconds": elapsed, "calls": threads * n, "threads": threads,
        "errors": float(sum(errors)), "p50_us": percentile(merged, 50) / 1e3,
        "p99_us": percentile(merged, 99) / 1e3, "max_us": merged[-1] / 1e3}
    if first_error:
        out["first_error"] = first_error[0]
    return out


def oneway_run(send: Callable[[], Any], executed: Callable[[], int], n: int, warmup: int,
               timeout: float = 120.0) -> dict[str, float]:
    """Fire ``n`` oneway calls as fast as possible, then poll the worker's counter until all of them ran.

    The poll interval grows with the elapsed time (1% of it, at least 2 ms) so polling neither steals
    much CPU from the worker nor adds more than ~1% to the measured time.
    """
    def wait_until(goal: int, t0: float) -> float:
        deadline = t0 + timeout
        while True:
            if executed() >= goal:
                return time.perf_counter()
            now = time.perf_counter()
            if now > deadline:
                raise RuntimeError(f"only {executed() - (goal - n)} of {n} oneway calls executed in {timeout:g}s")
            time.sleep(max(0.002, 0.01 * (now - t0)))

    base = executed()
    for _ in range(warmup):
        send()
    wait_until(base + warmup, time.perf_counter())
    gc.collect()
    base = executed()
    t0 = time.perf_counter()
    for _ in range(n):
        send()
    t_sent = time.perf_counter()
    t_done = wait_until(base + n, t0)
    return {"executed_per_s": n / (t_done - t0), "sent_per_s": n / (t_sent - t0), "calls": n,
            "seconds": t_done - t0}


def timed_map(run: Callable[[int], list[Any]], n: int, warmup: int) -> dict[str, float]:
    run(warmup)
    gc.collect()
    t0 = time.perf_counter()
    out = run(n)
    elapsed = time.perf_counter() - t0
    if out != list(range(n)):
        raise RuntimeError("map returned wrong results")
    return {"calls_per_s": n / elapsed, "seconds": elapsed, "calls": n}


def futures_run(submit: Callable[[], Any], m: int, warmup: int) -> dict[str, float]:
    """Submit ``m`` futures as fast as the client lets us (it blocks while its window is full), wait for all."""
    for fut in [submit() for _ in range(warmup)]:  # opens one connection per worker before timing
        fut.result(60)
    gc.collect()
    t0 = time.perf_counter()
    futures = [submit() for _ in range(m)]
    for fut in futures:
        fut.result(60)
    elapsed = time.perf_counter() - t0
    return {"calls_per_s": m / elapsed, "seconds": elapsed, "calls": m}



"""Benchmark harness: server child processes that always get stopped, and the timing loops."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import gc
import math
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
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


def rss_kib(pid: int) -> int:
    """Resident set size of process ``pid`` in KiB (``VmRSS`` of /proc/PID/status); Linux only."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def connections_to(port: int) -> int:
    """Connected sockets of this process whose peer is on ``port`` (each of its descriptors that is a socket,
    asked ``getpeername`` through a duplicate): a few system calls per descriptor, cheap enough to sample
    often (reading /proc/net/tcp takes milliseconds here); Linux only."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:["):
                continue
            sock = socket.socket(fileno=os.dup(int(fd)))
        except OSError:  # closed meanwhile (or the listing's own descriptor)
            continue
        try:
            peer = sock.getpeername()
            if sock.type == socket.SOCK_STREAM and isinstance(peer, tuple) and peer[1] == port:
                count += 1
        except OSError:  # not connected (a listener)
            pass
        finally:
            sock.close()  # only the duplicate: the connection stays as it is
    return count


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


def _loop_figures(lat: list[int], total: float, cpu: float, srv: float) -> dict[str, float]:
    """The figures of ``n`` back-to-back calls timed end to end (``lat``: each one's ns, sorted here)."""
    n = len(lat)
    lat.sort()
    return {"calls_per_s": n / total, "seconds": total, "calls": n,
            "p50_us": percentile(lat, 50) / 1e3, "p90_us": percentile(lat, 90) / 1e3,
            "p99_us": percentile(lat, 99) / 1e3, "p999_us": percentile(lat, 99.9) / 1e3,
            "max_us": lat[-1] / 1e3, "mean_us": sum(lat) / n / 1e3,
            "client_cpu_us": cpu / n * 1e6, "server_cpu_us": srv / n * 1e6}


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
    return _loop_figures(lat, total, cpu, srv)


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


def multiplexed(client: Any) -> bool | None:
    """Whether ``aio()`` on ``client`` (a Proxy or a Pool) goes over multiplexed connections: False once a
    worker's handshake turned multiplexing down and the calls fall back to a thread each, which would make
    an aio figure measure something else (reads pyrorpc internals; None where they are not there)."""
    if hasattr(client, "_endpoint"):
        endpoints = [client._endpoint]
    else:
        endpoints = [m.endpoint for m in getattr(client, "_members", {}).values()]
    flags = [getattr(e, "mux", None) for e in endpoints]
    if any(f is False for f in flags):
        return False
    return True if flags and all(flags) else None


# asyncio: every coroutine runs on the one event loop the caller keeps for the whole run, so the
# multiplexed channels opened in warm-up are the ones timed ------------------------------------------

def async_loop(loop: asyncio.AbstractEventLoop, call: Callable[[], Awaitable[Any]], n: int, warmup: int,
               server_pid: int | None = None) -> dict[str, float]:
    """``sync_loop`` for a coroutine: one task awaits ``call()`` ``n`` times, one after another."""
    async def run() -> dict[str, float]:
        for _ in range(warmup):
            await call()
        gc.collect()
        clock = time.perf_counter_ns
        lat = [0] * n
        cpu0 = time.process_time()
        srv0 = process_cpu(server_pid) if server_pid else math.nan
        start = prev = clock()
        for i in range(n):
            await call()
            now = clock()
            lat[i] = now - prev
            prev = now
        total = (prev - start) / 1e9
        cpu = time.process_time() - cpu0
        srv = process_cpu(server_pid) - srv0 if server_pid else math.nan
        return _loop_figures(lat, total, cpu, srv)

    return loop.run_until_complete(run())


def async_concurrent(loop: asyncio.AbstractEventLoop, call: Callable[[], Awaitable[Any]], tasks: int, n: int,
                     warmup: int, timeout: float = 300.0) -> dict[str, Any]:
    """``threaded_run`` for coroutines: ``tasks`` tasks on one event loop each await ``warmup`` then ``n``
    calls one after another; calls/s over all of them. The timed part starts once every task is done
    warming up; a call that raises is counted in ``errors`` and its task goes on."""
    errors = [0]
    first_error: list[str] = []

    async def calls(count: int, lat: list[int] | None) -> None:
        clock = time.perf_counter_ns
        prev = clock()
        for k in range(count):
            try:
                await call()
            except Exception as exc:
                errors[0] += 1
                if not first_error:
                    first_error.append(f"{type(exc).__name__}: {exc}")
            if lat is not None:
                now = clock()
                lat[k] = now - prev
                prev = now

    async def run() -> tuple[float, list[int]]:
        await asyncio.wait_for(asyncio.gather(*[calls(warmup, None) for _ in range(tasks)]), timeout)
        gc.collect()
        lats = [[0] * n for _ in range(tasks)]
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*[calls(n, lat) for lat in lats]), timeout)
        return time.perf_counter() - t0, sorted(x for lat in lats for x in lat)

    elapsed, merged = loop.run_until_complete(run())
    out: dict[str, Any] = {
        "calls_per_s": tasks * n / elapsed, "seconds": elapsed, "calls": tasks * n, "tasks": tasks,
        "errors": float(errors[0]), "p50_us": percentile(merged, 50) / 1e3, "p99_us": percentile(merged, 99) / 1e3,
        "max_us": merged[-1] / 1e3}
    if first_error:
        out["first_error"] = first_error[0]
    return out


def gathered_run(loop: asyncio.AbstractEventLoop, call: Callable[[], Awaitable[Any]], n: int,
                 samplers: dict[str, Callable[[], int]], interval: float = 0.01,
                 timeout: float = 300.0) -> dict[str, Any]:
    """``asyncio.gather`` of ``n`` ``call()`` awaits at once; its wall time, and the peak of each sampler
    (``name`` -> a count such as a process's threads), read before, every ``interval`` seconds while the
    awaits run (from a task on the same loop) and once after. Results that raised count in ``errors``."""
    peaks = {name: 0 for name in samplers}

    def sample() -> None:
        for name, read in samplers.items():
            peaks[name] = max(peaks[name], read())

    async def sampler(stop: asyncio.Event) -> None:
        while not stop.is_set():
            sample()
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except asyncio.TimeoutError:
                pass

    async def run() -> tuple[float, list[Any]]:
        stop = asyncio.Event()
        sample()
        task = asyncio.ensure_future(sampler(stop))
        gc.collect()
        t0 = time.perf_counter()
        try:
            results = await asyncio.wait_for(asyncio.gather(*[call() for _ in range(n)], return_exceptions=True),
                                             timeout)
            return time.perf_counter() - t0, results
        finally:
            stop.set()
            await task
            sample()

    cpu0 = time.process_time()
    elapsed, results = loop.run_until_complete(run())
    cpu = time.process_time() - cpu0
    failed = [r for r in results if isinstance(r, BaseException)]
    out: dict[str, Any] = {"seconds": elapsed, "calls": n, "calls_per_s": n / elapsed, "errors": float(len(failed)),
                           "client_cpu_s": cpu, **{f"peak_{name}": float(v) for name, v in peaks.items()}}
    if failed:
        out["first_error"] = f"{type(failed[0]).__name__}: {failed[0]}"
    return out


# streams ----------------------------------------------------------------------------------------------

def _check_items(count: int, last: Any, n: int) -> None:
    if count != n or (n and last != n - 1):
        raise RuntimeError(f"stream gave {count} items ending with {last!r}, expected 0..{n - 1}")


def stream_run(items: Callable[[int], Iterable[Any]], n: int, warmup: int) -> dict[str, float]:
    """Iterate ``items(n)`` (a remote generator yielding ``0 .. n-1``) to its end; items/s from the call
    to the last item received (after a warm-up stream of ``warmup`` items)."""
    for _ in items(warmup):
        pass
    gc.collect()
    count, last = 0, None
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    for item in items(n):
        count += 1
        last = item
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    _check_items(count, last, n)
    return {"items_per_s": n / elapsed, "seconds": elapsed, "items": n, "client_cpu_us": cpu / n * 1e6}


def astream_run(loop: asyncio.AbstractEventLoop, items: Callable[[int], AsyncIterator[Any]], n: int,
                warmup: int) -> dict[str, float]:
    """``stream_run`` with ``async for`` on ``loop``."""
    async def drain(k: int) -> tuple[int, Any]:
        count, last = 0, None
        async for item in items(k):
            count += 1
            last = item
        return count, last

    async def run() -> dict[str, float]:
        await drain(warmup)
        gc.collect()
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        count, last = await drain(n)
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        _check_items(count, last, n)
        return {"items_per_s": n / elapsed, "seconds": elapsed, "items": n, "client_cpu_us": cpu / n * 1e6}

    return loop.run_until_complete(run())


def stream_memory(items: Iterable[Any], n: int, server_pid: int, every: int) -> dict[str, float]:
    """Iterate ``items`` (a started stream of ``0 .. n-1``) reading the server's and this process's VmRSS
    before the first item, every ``every`` items, at the last item (the stream still open) and after its
    end; growth is at the last item minus before, in KiB."""
    me = os.getpid()
    gc.collect()
    srv0, own0 = rss_kib(server_pid), rss_kib(me)
    peak = srv0
    count, last = 0, None
    t0 = time.perf_counter()
    srv_end = own_end = 0
    for item in items:
        count += 1
        last = item
        if count % every == 0 or count == n:
            srv_end, own_end = rss_kib(server_pid), rss_kib(me)
            peak = max(peak, srv_end)
    elapsed = time.perf_counter() - t0
    _check_items(count, last, n)
    return {"rss_growth_kib": srv_end - srv0, "rss_peak_growth_kib": peak - srv0, "rss_before_kib": srv0,
            "rss_end_kib": srv_end, "rss_after_kib": rss_kib(server_pid), "client_rss_growth_kib": own_end - own0,
            "items_per_s": n / elapsed, "seconds": elapsed, "items": n, "samples_every": every}

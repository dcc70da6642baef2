"""The name server at scale: its CPU per lease renewal, the share of a core N workers need, lookup latency.

A real name server (``python -m nameserver``, a child process pinned to one CPU, ``--cpu``, default 0) holds
``--workers`` leased registrations (``--services`` services of ten workers by default). Client processes
(``--procs``, pinned to the other CPUs) play the workers: each simulated worker owns a
``pyrorpc.NameServerClient`` and renews through ``NameServerClient.lease``, the call ``WorkerHost``'s
heartbeat makes, with the same metadata and load report, over its own kept connection (as many
connections as workers, as in production). Phases:

1. register every worker (one lease each; the handshakes happen here);
2. paced: every worker renews once per TTL/3, so ``workers / (ttl / 3)`` renewals per second, for
   ``--duration`` seconds: the name server's CPU over the phase (``/proc/PID/stat``, all its threads, lease
   sweeper included) is the share of one core N workers at that TTL need, and CPU / renewals the cost of
   one renewal;
3. lookups: ``service_workers`` of one service (ten workers among all the registrations) over one kept
   connection, every 5 ms, for ``--lookup-seconds``: p50 / p99 with the name server otherwise idle (right
   after registering) and while the paced renewals go on;
4. saturated (``--saturate`` seconds, 0 to skip): the clients renew as fast as they can: the most renewals
   per second the pinned name server sustains, and its CPU per renewal then.

``--storage`` is handed to the name server (``memory``, ``PATH.sqlite``, ``etcd://HOST:PORT,...``);
``--watch-pid PID`` (repeatable) also reports the CPU share of other processes over the paced phase (the
etcd members, say). Prints a markdown table; ``--json PATH`` writes the numbers.

    python benchmarks/ns_scale.py                      # 10,000 workers, TTL 10 s, memory storage
    python benchmarks/ns_scale.py --workers 1000 --ttl 3 --storage etcd://127.0.0.1:2379
    python benchmarks/ns_scale.py --smoke              # a few seconds, for the test suite
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import multiprocessing.connection
import os
import platform
import re
import subprocess
import sys
import threading
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pyrorpc  # noqa: E402
from pyrorpc.naming import SERVICE_TAG, NameServerClient  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")
REGISTER_TTL = 3600.0
_READY = re.compile(r"^NS running on (\S+)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=10_000, help="leased workers (default 10000)")
    parser.add_argument("--ttl", type=float, default=10.0, help="lease TTL in seconds (default 10): renewals "
                        "every TTL/3")
    parser.add_argument("--storage", default="memory", help="name server storage: memory (default), "
                        "PATH.sqlite or etcd://HOST:PORT[,HOST:PORT...]")
    parser.add_argument("--services", type=int, default=None, help="services the workers belong to "
                        "(default: workers / 10)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of paced renewals measured "
                        "(default 10)")
    parser.add_argument("--lookup-seconds", type=float, default=5.0, help="seconds of lookups under the paced "
                        "load (default 5)")
    parser.add_argument("--saturate", type=float, default=5.0, help="seconds of renewals as fast as possible "
                        "(default 5; 0 skips)")
    parser.add_argument("--procs", type=int, default=4, help="client processes (default 4)")
    parser.add_argument("--threads", type=int, default=8, help="renewing threads per client process (default 8)")
    parser.add_argument("--shared-connections", action="store_true", help="the workers of a client thread "
                        "share one connection (as if one process renewed for all of them) instead of one each")
    parser.add_argument("--batch", type=int, default=1, help="renew this many workers per request "
                        "(NameServerClient.lease_many, as one process renewing for several would; default 1)")
    parser.add_argument("--cpu", type=int, default=0, help="the CPU the name server is pinned to (default 0)")
    parser.add_argument("--same-cpu", action="store_true", help="pin the client processes to the name server's "
                        "CPU too (how the project measures CPU costs: on this 2-vCPU VM a reply that wakes a client "
                        "on the other CPU costs the sender an inter-processor interrupt, which loopback puts on "
                        "the name server's bill and a real network does not)")
    parser.add_argument("--unpinned", action="store_true", help="pin nothing")
    parser.add_argument("--watch-pid", type=int, action="append", default=[], metavar="PID",
                        help="also report this process's CPU share over the paced phase (repeatable)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--smoke", action="store_true", help="fast mode: 200 workers, TTL 2 s, short phases")
    args = parser.parse_args(argv)
    if args.smoke:
        args.workers, args.ttl, args.duration, args.lookup_seconds, args.saturate = 200, 2.0, 2.0, 1.0, 1.0
        args.procs, args.threads = 2, 2
    if args.services is None:
        args.services = max(1, args.workers // 10)
    for option in ("workers", "services", "procs", "threads", "batch"):
        if getattr(args, option) < 1:
            parser.error(f"--{option} must be at least 1")
    if args.services > args.workers:
        parser.error("--services must not exceed --workers")
    if not 0.2 <= args.ttl <= 86400:
        parser.error("--ttl must be 0.2-86400 seconds")
    if args.duration <= 0 or args.lookup_seconds < 0 or args.saturate < 0:
        parser.error("--duration must be positive, --lookup-seconds and --saturate non-negative")
    cpus = sorted(os.sched_getaffinity(0))
    if not args.unpinned and (args.cpu not in cpus or (len(cpus) < 2 and not args.same_cpu)):
        parser.error(f"--cpu {args.cpu}: needs that CPU and another one for the clients (have {cpus}); "
                     "or --unpinned")
    return args


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (every thread)."""
    user, system = cpu_times(pid)
    return user + system


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process so far (every thread)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS  # utime, stime (fields 14 and 15)


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


# the client processes ---------------------------------------------------------------------------------

class SimWorker:
    """One simulated worker: what WorkerHost sends with each heartbeat, over a client of its own."""

    __slots__ = ("name", "uri", "metadata", "load", "client")

    def __init__(self, proc: int, index: int, service: str, settings: pyrorpc.Settings,
                 client: NameServerClient | None = None) -> None:
        host = f"bench{proc}"
        pid = 100_000 + proc * 100_000 + index
        self.name = f"{service}.{host}.{pid}.w{index:05d}"
        self.uri = f"PYRO:{self.name}@10.{proc}.{index // 250 % 250}.{index % 250 + 1}:{20000 + index % 40000}"
        started = int(time.time())
        self.metadata = {SERVICE_TAG + service, f"pyrorpc.host:{host}", f"pyrorpc.pid:{pid}",
                         "pyrorpc.threads:64", f"pyrorpc.started:{started}"}
        self.load: dict[str, Any] = {"in_flight": 0, "calls": 0, "errors": 0, "connections": 1, "host": host,
                                     "pid": pid, "threads": 64, "started": float(started)}
        self.client = client if client is not None else NameServerClient(settings)

    def renew(self, ttl: float) -> None:
        self.load["calls"] += 1
        self.client.lease(self.name, self.uri, self.metadata, self.load, ttl)


def client_main(conn: multiprocessing.connection.Connection, proc: int, indices: list[int], services: int,
                ns: str, ttl: float, threads: int, cpus: set[int] | None, shared: bool, batch: int) -> None:
    """A client process: builds its simulated workers, then runs the phases the parent asks for."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    settings = pyrorpc.Settings(ns=ns, connect_timeout=30)
    clients = [NameServerClient(settings) for _ in range(threads)] if shared else [None] * threads
    workers = [SimWorker(proc, i, f"svc{i % services}", settings, clients[n % threads])
               for n, i in enumerate(indices)]
    slices = [workers[t::threads] for t in range(threads)]
    while True:
        command = conn.recv()
        kind = command[0]
        if kind == "stop":
            for w in workers:
                w.client.close()
            for c in clients:
                if c is not None:
                    c.close()
            conn.send(("stopped",))
            return
        started = time.monotonic()
        if kind == "register":
            for w in workers:  # a long lease first: registering all of them may take longer than the TTL
                w.renew(REGISTER_TTL)
            conn.send(("registered", len(workers), time.monotonic() - started))
            continue
        _kind, start_at, duration, paced, window = command
        phase = Phase(start_at, duration, paced, ttl, threads, window)
        pool = [threading.Thread(target=phase.run, args=(t, s, batch)) for t, s in enumerate(slices)]
        for th in pool:
            th.start()
        for th in pool:
            th.join()
        sample = sorted(x for lat in phase.latencies for x in lat)
        conn.send(("done", sum(phase.counts), max(phase.lags), sample[:: max(1, len(sample) // 2000)],
                   sum(phase.in_window)))


class Phase:
    """One renewal phase of a client process: each thread renews its slice of workers round robin, paced
    (each worker once per TTL/3, the threads' schedules interleaved) or as fast as it can."""

    def __init__(self, start_at: float, duration: float, paced: bool, ttl: float, threads: int,
                 window: tuple[float, float]) -> None:
        self.start_at, self.end, self.paced, self.ttl, self.threads = start_at, start_at + duration, paced, ttl, threads
        self.window = window
        self.counts = [0] * threads
        self.in_window = [0] * threads  # renewals that started inside the parent's CPU window
        self.lags = [0.0] * threads
        self.latencies: list[list[float]] = [[] for _ in range(threads)]

    def run(self, t: int, workers: list[SimWorker], batch: int = 1) -> None:
        if not workers:
            return
        mine = [workers[j:j + batch] for j in range(0, len(workers), batch)]  # one request each
        step = self.ttl / 3 / len(mine)
        due = self.start_at + t * step / self.threads
        end, ttl, paced, latencies = self.end, self.ttl, self.paced, self.latencies[t]
        clock = time.monotonic
        i = 0
        while True:
            now = clock()
            if paced:
                if due >= end:
                    break
                if due > now:
                    time.sleep(due - now)
                else:
                    self.lags[t] = max(self.lags[t], now - due)
            elif now >= end:
                break
            t0 = clock()
            group = mine[i]
            if len(group) == 1:
                group[0].renew(ttl)
            else:
                renew_together(group, ttl)
            latencies.append(clock() - t0)
            self.counts[t] += len(group)
            if self.window[0] <= t0 < self.window[1]:
                self.in_window[t] += len(group)
            i = (i + 1) % len(mine)
            due += step


def renew_together(group: list[SimWorker], ttl: float) -> None:
    """Renew several workers' leases in one request (``lease_many``), over the first one's connection."""
    for w in group:
        w.load["calls"] += 1
    replies = group[0].client.lease_many([(w.name, w.uri, w.metadata, w.load, ttl) for w in group])
    refused = [r for r in replies if isinstance(r, Exception)]
    if refused:
        raise refused[0]


# the parent ---------------------------------------------------------------------------------------------

def start_nameserver(args: argparse.Namespace) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "PYRORPC_MAX_CONNECTIONS": str(args.workers + 1000), "PYTHONUNBUFFERED": "1"}
    env.pop("PYRORPC_NS", None)
    cpu = args.cpu

    def pin() -> None:  # in the child before exec: every thread it ever starts inherits the affinity
        if not args.unpinned:
            os.sched_setaffinity(0, {cpu})

    proc = subprocess.Popen([sys.executable, "-m", "nameserver", "--host", "127.0.0.1", "--port", "0",
                             "--storage", args.storage, "--lease-ttl", f"{args.ttl:g}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                            preexec_fn=pin)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        match = _READY.match(line)
        if match:
            threading.Thread(target=lambda: [None for _ in proc.stdout or ()], daemon=True).start()  # drain
            return proc, match.group(1)
    proc.wait()
    raise SystemExit("the name server did not start:\n" + "".join(lines))


def timed_lookups(client: NameServerClient, service: str, seconds: float) -> list[float]:
    """Milliseconds of each ``service_workers(service)``, one every 5 ms for ``seconds``; sorted."""
    out: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end or len(out) < 3:
        t = time.perf_counter()
        client.service_workers(service)
        out.append((time.perf_counter() - t) * 1000)
        time.sleep(0.005)
    return sorted(out)


def run(args: argparse.Namespace) -> dict[str, Any]:
    client_cpus = None if args.unpinned else {args.cpu} if args.same_cpu else set(os.sched_getaffinity(0)) - {args.cpu}
    if client_cpus:
        os.sched_setaffinity(0, client_cpus)
    ns_proc, ns = start_nameserver(args)
    ctx = multiprocessing.get_context("fork")
    links: list[multiprocessing.connection.Connection] = []
    children = []
    try:
        for p in range(args.procs):
            parent_end, child_end = ctx.Pipe()
            indices = list(range(p, args.workers, args.procs))
            child = ctx.Process(target=client_main, args=(child_end, p, indices, args.services, ns, args.ttl,
                                                          args.threads, client_cpus, args.shared_connections,
                                                          args.batch),
                                daemon=True)
            child.start()
            links.append(parent_end)
            children.append(child)

        def ask(command: tuple[Any, ...]) -> list[Any]:
            for link in links:
                link.send(command)
            return [link.recv() for link in links]

        t0 = time.monotonic()
        ask(("register",))
        register_s = time.monotonic() - t0
        lookup_client = NameServerClient(pyrorpc.Settings(ns=ns, connect_timeout=30))
        listed = lookup_client.service_workers("svc0")
        expected = len(range(0, args.workers, args.services))
        if len(listed) != expected:
            raise SystemExit(f"service_workers('svc0') listed {len(listed)} workers, expected {expected}")
        target = f"svc{args.services // 2}"
        idle_lookups = timed_lookups(lookup_client, target, args.lookup_seconds)

        # paced renewals: one renewal period of warm-up (each lease takes the measured TTL: one write each, as
        # a re-registration), then the CPU of the measured window only (the lookups come after it)
        target_rate = args.workers / (args.ttl / 3)
        lead = 0.5
        start_at = time.monotonic() + lead
        warmup = args.ttl / 3
        total = warmup + args.duration + args.lookup_seconds
        window = (start_at + warmup, start_at + warmup + args.duration)
        for link in links:
            link.send(("renew", start_at, total, True, window))
        time.sleep(max(0.0, window[0] - time.monotonic()))
        cpu0, watched0, w0 = cpu_times(ns_proc.pid), [cpu_seconds(p) for p in args.watch_pid], time.monotonic()
        time.sleep(max(0.0, window[1] - time.monotonic()))
        cpu1, watched1, w1 = cpu_times(ns_proc.pid), [cpu_seconds(p) for p in args.watch_pid], time.monotonic()
        lookups = timed_lookups(lookup_client, target, args.lookup_seconds)
        paced = [link.recv() for link in links]
        renewals = sum(r[1] for r in paced)
        wall = w1 - w0
        ns_cpu = sum(cpu1) - sum(cpu0)
        ns_sys = cpu1[1] - cpu0[1]
        achieved_rate = renewals / total
        window_renewals = sum(r[4] for r in paced)
        paced_latency = sorted(x for r in paced for x in r[3])

        saturated: dict[str, Any] | None = None
        if args.saturate > 0:
            start_at = time.monotonic() + lead
            for link in links:
                link.send(("renew", start_at, args.saturate, False, (start_at, start_at + args.saturate)))
            time.sleep(max(0.0, start_at - time.monotonic()))
            s0, sw0 = cpu_seconds(ns_proc.pid), time.monotonic()
            results = [link.recv() for link in links]
            s1, sw1 = cpu_seconds(ns_proc.pid), time.monotonic()
            count = sum(r[1] for r in results)
            sat_latency = sorted(x for r in results for x in r[3])
            saturated = {
                "renewals": count, "seconds": round(sw1 - sw0, 3), "renewals_per_s": round(count / args.saturate, 1),
                "ns_cpu_share": round((s1 - s0) / (sw1 - sw0), 4),
                "ns_cpu_us_per_renewal": round((s1 - s0) / count * 1e6, 1) if count else None,
                "latency_ms_p50": round(percentile(sat_latency, 50) * 1000, 3),
                "latency_ms_p99": round(percentile(sat_latency, 99) * 1000, 3),
            }
        lookup_client.close()
        ask(("stop",))
    finally:
        for child in children:
            child.join(10)
            if child.is_alive():
                child.kill()
        ns_proc.terminate()
        try:
            ns_proc.wait(10)
        except subprocess.TimeoutExpired:
            ns_proc.kill()
    return {
        "benchmark": "ns_scale",
        "config": {"workers": args.workers, "ttl": args.ttl, "storage": args.storage, "services": args.services,
                   "duration": args.duration, "lookup_seconds": args.lookup_seconds, "saturate": args.saturate,
                   "procs": args.procs, "threads": args.threads, "shared_connections": args.shared_connections,
                   "batch": args.batch,
                   "ns_cpu": None if args.unpinned else args.cpu, "same_cpu": args.same_cpu,
                   "smoke": args.smoke},
        "environment": {"python": platform.python_version(), "platform": platform.platform(),
                        "cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg()},
        "register_seconds": round(register_s, 3),
        "paced": {
            "target_renewals_per_s": round(target_rate, 1),
            "renewals_per_s": round(achieved_rate, 1),
            "window_renewals_per_s": round(window_renewals / wall, 1),
            "max_lag_s": round(max(r[2] for r in paced), 3),
            "ns_cpu_share": round(ns_cpu / wall, 4),
            "ns_cpu_system_share": round(ns_sys / wall, 4),
            "ns_cpu_us_per_renewal": round(ns_cpu / window_renewals * 1e6, 1) if window_renewals else None,
            "latency_ms_p50": round(percentile(paced_latency, 50) * 1000, 3),
            "latency_ms_p99": round(percentile(paced_latency, 99) * 1000, 3),
            "watched_cpu_share": {str(p): round((b - a) / wall, 4)
                                  for p, a, b in zip(args.watch_pid, watched0, watched1, strict=True)},
        },
        "lookup": {"service": target, "workers": expected, "calls": len(lookups),
                   "p50_ms": round(percentile(lookups, 50), 3), "p99_ms": round(percentile(lookups, 99), 3),
                   "idle_p50_ms": round(percentile(idle_lookups, 50), 3),
                   "idle_p99_ms": round(percentile(idle_lookups, 99), 3)},
        "saturated": saturated,
    }


def table(report: dict[str, Any]) -> str:
    cfg, paced, lookup, sat = report["config"], report["paced"], report["lookup"], report["saturated"]
    pinned = f"pinned to CPU {cfg['ns_cpu']}" if cfg["ns_cpu"] is not None else "unpinned"
    if cfg.get("same_cpu"):
        pinned += ", the clients on the same CPU"
    if cfg["batch"] > 1:
        pinned += f", {cfg['batch']} renewals per request (lease_many)"
    lines = [
        f"### Name server at scale: {cfg['workers']:,} leased workers, TTL {cfg['ttl']:g} s, {cfg['storage']} "
        f"storage, name server {pinned}",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| renewals/s needed (workers / (TTL/3)) | {paced['target_renewals_per_s']:,.0f} |",
        f"| renewals/s achieved (paced; in the measured window) | {paced['renewals_per_s']:,.0f}; "
        f"{paced['window_renewals_per_s']:,.0f} |",
        f"| **name server CPU, share of one core** | **{paced['ns_cpu_share'] * 100:.1f}%** "
        f"(kernel {paced['ns_cpu_system_share'] * 100:.1f}%) |",
        f"| name server CPU per renewal | {paced['ns_cpu_us_per_renewal']} µs |",
        f"| renewal latency p50 / p99 (client) | {paced['latency_ms_p50']:.3f} / {paced['latency_ms_p99']:.3f} ms |",
        f"| lookup p50 / p99 (service_workers, {lookup['workers']} of {cfg['workers']:,}), name server idle | "
        f"**{lookup['idle_p50_ms']:.3f}** / {lookup['idle_p99_ms']:.3f} ms |",
        f"| lookup p50 / p99, under the paced renewals | **{lookup['p50_ms']:.3f}** / {lookup['p99_ms']:.3f} ms |",
    ]
    for pid, share in paced["watched_cpu_share"].items():
        lines.append(f"| CPU share of process {pid} (paced) | {share * 100:.1f}% |")
    if sat is not None:
        lines += [
            f"| saturated: renewals/s | {sat['renewals_per_s']:,.0f} |",
            f"| saturated: name server CPU share / per renewal | {sat['ns_cpu_share'] * 100:.0f}% / "
            f"{sat['ns_cpu_us_per_renewal']} µs |",
            f"| saturated: renewal latency p50 / p99 | {sat['latency_ms_p50']:.3f} / {sat['latency_ms_p99']:.3f} ms |",
        ]
    load = report["environment"]["loadavg_at_end"]
    lines += ["", f"Registering {cfg['workers']:,} workers (one connection + handshake each) took "
              f"{report['register_seconds']:.1f} s. Load average at the end: {load[0]:.2f} / {load[1]:.2f} / "
              f"{load[2]:.2f}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    print(table(report), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

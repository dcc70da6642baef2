"""Hedged calls (issue 14): the tail latency of an idempotent method with one worker of four answering late.

Starts a name server and four worker processes of ``LateService`` (this file), makes one of them answer
``--late`` seconds late on every fifth call (20% of its calls), and measures ``get()`` through a Pool without
hedging and with ``hedge=True`` (delay: the observed p95) and a fixed ``hedge=`` delay, in interleaved rounds
(one fresh round-robin pool per mode and round, warmed up first). Prints a markdown table of medians over the rounds:
p50, p99, p99 against no hedging, and the extra calls the workers ran (their own counts).

    python benchmarks/hedging.py                       # 5 rounds of 2,000 calls per mode
    python benchmarks/hedging.py --rounds 3 --calls 1000 --threads 4

Run pinned to one CPU (``taskset -c 0 python benchmarks/hedging.py``) on a busy machine: the children inherit it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import statistics
import sys
import threading
import time
from typing import Any

import pyrorpc
from pyrorpc.testing import NameServerProcess, WorkerProcess

HERE = os.path.dirname(os.path.abspath(__file__))


@pyrorpc.service("hedgebench")
class LateService:
    """``get`` sleeps ``base`` seconds, plus ``late`` on every ``every``-th call once ``tune``d so."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.runs = 0
        self.base = 0.0
        self.late = 0.0
        self.every = 0

    def tune(self, base: float, late: float, every: int) -> None:
        with self._lock:
            self.base, self.late, self.every = base, late, every

    @pyrorpc.idempotent
    def get(self, x: Any) -> Any:
        with self._lock:
            self.runs += 1
            late = self.late if self.every and self.runs % self.every == 0 else 0.0
        delay = self.base + late
        if delay:
            time.sleep(delay)
        return x

    def count(self) -> int:
        with self._lock:
            return self.runs


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(ns: str, hedge: Any, calls: int, threads: int, warmup: int) -> dict[str, float]:
    """One round of one mode: a fresh pool, ``warmup`` calls, then ``calls`` timed calls from ``threads``.

    Round robin, so the late worker gets its quarter of the calls in every mode (least-loaded, with one caller,
    would leave out for seconds whichever workers last reported a call in flight in their heartbeats)."""
    with pyrorpc.Pool("hedgebench", ns=ns, hedge=hedge, strategy="round-robin") as pool:
        pool.count.broadcast()  # connect to all four (and learn that get() is idempotent)
        for i in range(warmup):
            pool.get(i)
        before = sum(v for v in pool.count.broadcast().values() if isinstance(v, int))

        def run(n: int) -> list[float]:
            out = []
            for i in range(n):
                t0 = time.perf_counter()
                pool.get(i)
                out.append(time.perf_counter() - t0)
            return out

        with concurrent.futures.ThreadPoolExecutor(threads) as ex:
            parts = list(ex.map(run, [calls // threads] * threads))
        latencies = [x for part in parts for x in part]
        after = sum(v for v in pool.count.broadcast().values() if isinstance(v, int))
    n = len(latencies)
    return {"p50": quantile(latencies, 0.5), "p99": quantile(latencies, 0.99), "extra": (after - before - n) / n}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2000, help="timed calls per mode and round")
    parser.add_argument("--threads", type=int, default=1, help="caller threads sharing the pool")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--base", type=float, default=0.001, help="seconds every call takes on the worker")
    parser.add_argument("--late", type=float, default=0.050, help="extra seconds of the late worker's late calls")
    parser.add_argument("--fixed", type=float, default=0.005, help="the fixed hedge delay measured too")
    args = parser.parse_args(argv)
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    ns = NameServerProcess(env=env)
    workers: list[WorkerProcess] = []
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            workers = list(ex.map(lambda _i: WorkerProcess("hedging:LateService", ns.ns, env=env, cwd=HERE),
                                  range(4)))
        for i, w in enumerate(workers):
            with pyrorpc.connect(w.name, ns=ns.ns) as proxy:
                proxy.tune(args.base, args.late if i == 0 else 0.0, 5 if i == 0 else 0)
        modes: list[tuple[str, Any]] = [("no hedging", None), ("hedge=True (p95)", True),
                                        (f"hedge={args.fixed:g}", args.fixed)]
        results: dict[str, list[dict[str, float]]] = {label: [] for label, _ in modes}
        for r in range(args.rounds):
            for label, hedge in modes[r % len(modes):] + modes[:r % len(modes)]:
                results[label].append(measure(ns.ns, hedge, args.calls, args.threads, args.warmup))
                print(f"round {r + 1} {label}: " + ", ".join(f"{k} {v:.4f}" for k, v in results[label][-1].items()),
                      file=sys.stderr)
    finally:
        for w in workers:
            w.kill()
        ns.kill()
    base_p99 = statistics.median(x["p99"] for x in results["no hedging"])
    print(f"4 workers, one answering {args.late * 1000:g} ms late on 20% of its calls; `get()` takes "
          f"{args.base * 1000:g} ms; {args.calls} calls from {args.threads} thread(s) per mode and round; "
          f"median of {args.rounds} rounds\n")
    print("| pool | p50 | p99 | p99 vs no hedging | extra calls |")
    print("|---|---:|---:|---:|---:|")
    for label, _ in modes:
        rows = results[label]
        p50 = statistics.median(x["p50"] for x in rows)
        p99 = statistics.median(x["p99"] for x in rows)
        extra = statistics.median(x["extra"] for x in rows)
        print(f"| {label} | {p50 * 1000:.2f} ms | {p99 * 1000:.2f} ms | {p99 / base_p99:.2f}× | {extra:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Delivery benchmarks (issue 14): the durable outbox's enqueue (rate, p50/p99, group commit) and send()'s
latency next to oneway(), a pyrorpc sync call and a stock Pyro5 sync call; prints a markdown table.

    taskset -c 0 python benchmarks/delivery.py                 # everything on CPU 0, 5 rounds
    python benchmarks/delivery.py --rounds 3 --calls 5000 --enqueues 20000

Each figure is the median over ``--rounds`` interleaved rounds. Servers (name server, one pyrorpc worker, a
stock Pyro5 daemon) are child processes pinned to the same CPU as this one (``--cpu``) unless ``--unpinned``.
The outbox is a fresh SQLite file per round (WAL, ``synchronous=normal``: an enqueue survives the process
being killed); enqueue is measured without a sender (the journal alone), from one thread and from
``--threads`` threads at once (their commits are shared: group commit).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import Pyro5.api  # noqa: E402
from harness import children, percentile, sync_loop  # noqa: E402

import pyrorpc  # noqa: E402


def enqueue_run(path: str, n: int, threads: int, rate: float = 0.0) -> dict[str, float]:
    """``n`` enqueues from ``threads`` threads at once (n / threads each): rate and latency percentiles. With
    ``rate`` the threads together enqueue that many per second (each on its own schedule, interleaved), the
    way web requests arrive, instead of as fast as they can (a saturated CPU, where latency is queueing)."""
    with pyrorpc.Outbox(path, service="bench", send=False) as outbox:
        for _ in range(200):  # warm-up
            outbox.enqueue("ping")
        per = n // threads
        lat: list[list[int]] = [[] for _ in range(threads)]
        start = threading.Barrier(threads + 1)

        def run(i: int) -> None:
            clock = time.perf_counter_ns
            mine = lat[i]
            step = threads / rate if rate else 0.0
            start.wait()
            due = time.perf_counter() + i * step / threads
            for _ in range(per):
                if step:
                    wait = due - time.perf_counter()
                    if wait > 0:
                        time.sleep(wait)
                    due += step
                t0 = clock()
                outbox.enqueue("ping", ("user@example.com",))
                mine.append(clock() - t0)

        workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
        for w in workers:
            w.start()
        start.wait()
        began = time.perf_counter()
        for w in workers:
            w.join()
        total = time.perf_counter() - began
    every = sorted(x for chunk in lat for x in chunk)
    return {"per_s": len(every) / total, "p50_us": percentile(every, 50) / 1e3, "p99_us": percentile(every, 99) / 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=5000, help="calls per latency figure and round")
    parser.add_argument("--enqueues", type=int, default=20000, help="enqueues per figure and round")
    parser.add_argument("--threads", type=int, default=8, help="threads of the group-commit figure")
    parser.add_argument("--paced-rate", type=float, default=10_000.0,
                        help="enqueues per second of the paced figure, from --threads threads (default 10000)")
    parser.add_argument("--cpu", default="0", help="the CPU everything is pinned to")
    parser.add_argument("--unpinned", action="store_true")
    args = parser.parse_args()
    cpus = None if args.unpinned else args.cpu
    if cpus:
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
    results: dict[str, list[dict[str, float]]] = {}
    pids: list[int] = []
    with children(pids) as start, tempfile.TemporaryDirectory() as tmp:
        ns = start(["ns"], cpus).wait_ready(30)[1]
        worker = start(["worker", "--ns", ns, "--service", "bench"], cpus)
        worker.wait_ready(30)
        stock_uri = start(["pyro"], cpus).wait_ready(30)[1]
        proxy = pyrorpc.connect("bench", ns=ns)
        stock = Pyro5.api.Proxy(stock_uri)
        server_pid = pids[1]
        figures: dict[str, Any] = {
            "stock Pyro5 sync call": (lambda: stock.ping(), pids[2]),
            "pyrorpc sync call": (lambda: proxy.ping(), server_pid),
            "pyrorpc oneway()": (lambda: proxy.hit.oneway(), server_pid),
            "pyrorpc send()": (lambda: proxy.ping.send(), server_pid),
        }
        for r in range(args.rounds):
            for name, (call, pid) in figures.items():
                results.setdefault(name, []).append(sync_loop(call, args.calls, min(500, args.calls), pid))
            for threads in (1, args.threads):
                path = os.path.join(tmp, f"outbox-{r}-{threads}.sqlite")
                results.setdefault(f"enqueue x{threads}", []).append(enqueue_run(path, args.enqueues, threads))
            path = os.path.join(tmp, f"outbox-{r}-paced.sqlite")
            results.setdefault("enqueue paced", []).append(enqueue_run(path, args.enqueues, args.threads,
                                                                       args.paced_rate))
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
        proxy.close()
        stock._pyroRelease()

    def med(name: str, key: str) -> float:
        return statistics.median(x[key] for x in results[name])

    pinned = f"pinned to CPU {cpus}" if cpus else "unpinned"
    print(f"\n### Delivery ({pinned}, median of {args.rounds} rounds)\n")
    print("| what | per second | p50 | p99 |")
    print("|---|---|---|---|")
    for name in ("stock Pyro5 sync call", "pyrorpc sync call", "pyrorpc oneway()", "pyrorpc send()"):
        print(f"| {name} | {med(name, 'calls_per_s'):,.0f} | {med(name, 'p50_us'):.0f} µs | "
              f"{med(name, 'p99_us'):.0f} µs |")
    for threads in (1, args.threads):
        name = f"enqueue x{threads}"
        label = "outbox enqueue(), 1 thread" if threads == 1 else f"outbox enqueue(), {threads} threads (group commit)"
        print(f"| {label} | {med(name, 'per_s'):,.0f} | {med(name, 'p50_us'):.0f} µs | {med(name, 'p99_us'):.0f} µs |")
    name = "enqueue paced"
    print(f"| outbox enqueue(), {args.threads} threads, {args.paced_rate:,.0f}/s together (paced) | "
          f"{med(name, 'per_s'):,.0f} | {med(name, 'p50_us'):.0f} µs | {med(name, 'p99_us'):.0f} µs |")


if __name__ == "__main__":
    main()

"""Service lookup latency: stock Pyro5 name server vs pyrorpc's, over the network, 10,000 registrations.

Both name servers run in threads of this process on 127.0.0.1 (ephemeral ports) and hold the same
registry: SERVICES services x WORKERS workers, each tagged ``pyrorpc.service:svcN``. One reused Pyro5
proxy per server then measures, in interleaved rounds:

- ``stock yplookup``    stock server, ``yplookup(meta_all={"pyrorpc.service:svcT"})`` (scans the registry)
- ``pyrorpc yplookup``  our server, the same call (answered from the service index)
- ``pyrorpc service_workers``  our server, ``service_workers("svcT")`` (index + lease/load data)

The process is pinned to CPU 0 by default (client and server threads share it, as on a busy host);
``--unpinned`` skips that. Prints a markdown table (median over rounds of each round's percentile, and
the min-max spread of the per-round p50); ``--json PATH`` also writes the raw numbers.

    python benchmarks/ns_lookup.py            # full: 10,000 entries, 5 rounds x 200 calls
    python benchmarks/ns_lookup.py --smoke    # a few calls, for the test suite
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import Pyro5
import Pyro5.api
import Pyro5.nameserver

import nameserver

SERVICE_TAG = nameserver.SERVICE_TAG


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=1000, help="services in the registry (default 1000)")
    parser.add_argument("--workers", type=int, default=10, help="workers per service (default 10)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5, at least 3)")
    parser.add_argument("--calls", type=int, default=200, help="calls per measure per round (default 200)")
    parser.add_argument("--warmup", type=int, default=50, help="untimed calls per measure first (default 50)")
    parser.add_argument("--unpinned", action="store_true", help="do not pin the process to CPU 0")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--smoke", action="store_true", help="fast mode: small registry, 3 rounds x 5 calls")
    args = parser.parse_args(argv)
    if args.smoke:
        args.services, args.rounds, args.calls, args.warmup = 100, 3, 5, 2
    for option in ("services", "workers", "calls"):
        if getattr(args, option) < 1:
            parser.error(f"--{option} must be at least 1")
    if args.rounds < 3:
        parser.error("--rounds must be at least 3")
    if args.warmup < 0:
        parser.error("--warmup must be non-negative")
    return args


def entries(services: int, workers: int) -> list[tuple[str, str, str]]:
    """(name, uri, service tag) of every registration; URIs never dialled, so any host:port will do."""
    return [(f"svc{s}.host{w}.{1000 + w}.w{s:04d}{w:02d}", f"PYRO:obj_{s}_{w}@10.1.{s % 250}.{w}:{9000 + s}",
             f"{SERVICE_TAG}svc{s}")
            for s in range(services) for w in range(workers)]


def serve(daemon: Any) -> threading.Thread:
    thread = threading.Thread(target=daemon.requestLoop, name=f"bench-{type(daemon).__name__}", daemon=True)
    thread.start()
    return thread


def percentile(sorted_ms: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sample."""
    if not sorted_ms:
        return float("nan")
    rank = max(1, min(len(sorted_ms), round(q / 100 * len(sorted_ms) + 0.5)))
    return sorted_ms[rank - 1]


def timed(call: Callable[[], Any], n: int) -> list[float]:
    out = []
    clock = time.perf_counter_ns
    for _ in range(n):
        t0 = clock()
        call()
        out.append((clock() - t0) / 1e6)
    return out


def summarize(rounds: list[dict[str, float]]) -> dict[str, Any]:
    p50s = [r["p50"] for r in rounds]
    return {
        "p50": statistics.median(p50s),
        "p90": statistics.median(r["p90"] for r in rounds),
        "p99": statistics.median(r["p99"] for r in rounds),
        "p50_min": min(p50s),
        "p50_max": max(p50s),
        "rounds": rounds,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    if not args.unpinned:
        # before any thread starts, so every server thread inherits the affinity
        os.sched_setaffinity(0, {0})
    registry = entries(args.services, args.workers)
    target = f"svc{args.services // 2}"
    target_tag = SERVICE_TAG + target

    stock_uri, stock_daemon, _bc = Pyro5.nameserver.start_ns(host="127.0.0.1", port=0, enableBroadcast=False)
    ours_daemon = nameserver.NameServerDaemon("127.0.0.1", 0, lease_ttl=3600)
    assert ours_daemon.nameserver is not None
    ours_ns, stock_ns = ours_daemon.nameserver, stock_daemon.nameserver
    t0 = time.perf_counter()
    for name, uri, tag in registry:
        # ours the way pyrorpc workers register (a lease), stock the way a plain Pyro5 server would
        ours_ns.lease(name, uri, {tag}, {"in_flight": 0, "calls": 0}, 3600)
        stock_ns.register(name, uri, metadata={tag})
    fill_s = time.perf_counter() - t0
    stock_thread = serve(stock_daemon)
    ours_daemon.start()  # serves in its own thread

    stock = Pyro5.api.Proxy(stock_uri)
    ours = Pyro5.api.Proxy(ours_daemon.uri)
    results: dict[str, Any] = {}
    try:
        for proxy in (stock, ours):
            proxy._pyroTimeout = 30
            proxy._pyroBind()
        measures: dict[str, Callable[[], Any]] = {
            "stock yplookup": lambda: stock.yplookup(meta_all={target_tag}),
            "pyrorpc yplookup": lambda: ours.yplookup(meta_all={target_tag}),
            "pyrorpc service_workers": lambda: ours.service_workers(target),
            # the name server's own work, without the network round trip every remote call pays
            # (the end-to-end ratio is bounded by that floor: about 0.12 ms here)
            "stock yplookup, server side": lambda: stock_ns.yplookup(meta_all={target_tag}),
            "pyrorpc service_workers, server side": lambda: ours_ns.service_workers(target),
        }
        for label, call in measures.items():
            found = call()
            if len(found) != args.workers:
                raise SystemExit(f"{label} returned {len(found)} entries, expected {args.workers}")
            timed(call, args.warmup)
        per_round: dict[str, list[dict[str, float]]] = {label: [] for label in measures}
        labels = list(measures)
        for r in range(args.rounds):
            # rotate the order each round so no measure always runs first (or right after another)
            for label in labels[r % len(labels):] + labels[:r % len(labels)]:
                sample = sorted(timed(measures[label], args.calls))
                per_round[label].append({"p50": percentile(sample, 50), "p90": percentile(sample, 90),
                                         "p99": percentile(sample, 99), "mean": statistics.fmean(sample)})
        results = {label: summarize(rounds) for label, rounds in per_round.items()}
    finally:
        stock._pyroRelease()
        ours._pyroRelease()
        stock_daemon.shutdown()
        stock_thread.join(5)
        stock_daemon.close()
        ours_daemon.__exit__(None, None, None)  # shutdown, join its thread, close
    return {
        "benchmark": "ns_lookup",
        "config": {"services": args.services, "workers": args.workers, "entries": len(registry),
                   "target": target, "rounds": args.rounds, "calls": args.calls, "warmup": args.warmup,
                   "pinned": not args.unpinned, "smoke": args.smoke},
        "environment": {"python": platform.python_version(), "pyro5": Pyro5.__version__,
                        "platform": platform.platform(), "cpus": os.cpu_count(),
                        "serializer": Pyro5.config.SERIALIZER, "servertype": Pyro5.config.SERVERTYPE},
        "fill_seconds": round(fill_s, 3),
        "results": results,
    }


def table(report: dict[str, Any]) -> str:
    cfg = report["config"]
    stock_p50 = report["results"]["stock yplookup"]["p50"]
    lines = [
        f"### Service lookup, {cfg['entries']:,} entries ({cfg['services']:,} services x {cfg['workers']} workers), "
        f"target {cfg['target']}; {cfg['rounds']} rounds x {cfg['calls']} calls, "
        f"{'pinned to CPU 0' if cfg['pinned'] else 'unpinned'}",
        "",
        "| measure | p50 ms | p90 ms | p99 ms | p50 spread (min-max over rounds) | p50 vs stock |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, res in report["results"].items():
        lines.append(f"| {label} | {res['p50']:.3f} | {res['p90']:.3f} | {res['p99']:.3f} | "
                     f"{res['p50_min']:.3f}-{res['p50_max']:.3f} | {stock_p50 / res['p50']:.1f}x |")
    lines.append("")
    lines.append("Percentiles are the median over rounds of each round's nearest-rank percentile.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    print(table(report), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
            fh.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

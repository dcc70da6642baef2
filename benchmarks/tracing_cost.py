"""What tracing costs on the sync call path: ``Proxy.ping()`` calls/s and CPU per call (client and worker),
client and worker each a process of their own pinned to a CPU, with tracing in four states on both sides:

    off       as without the otel extra (``pyrorpc.tracing.INSTALLED`` False: no check beyond that flag)
    no-sdk    opentelemetry-api imported, no provider set (the default: installed, nothing configured)
    sdk-drop  the SDK's TracerProvider with no span processor: spans are made and dropped
    sdk-batch the SDK's TracerProvider with a BatchSpanProcessor and an exporter that discards (a real set-up,
              less the network)

Rounds interleave the states; each figure is the median over rounds. Prints a markdown table.

    python benchmarks/tracing_cost.py [--calls 20000] [--rounds 5] [--cpus 0,1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MODES = ("off", "no-sdk", "sdk-drop", "sdk-batch")


def _setup(mode: str) -> None:
    """Put this process's tracing in ``mode`` (before any call)."""
    from pyrorpc import tracing
    if mode == "off":
        tracing.INSTALLED = False
        return
    from opentelemetry import trace
    if mode == "no-sdk":
        return
    from opentelemetry.sdk.trace import TracerProvider
    provider = TracerProvider()
    if mode == "sdk-batch":
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

        class Discard(SpanExporter):
            def export(self, spans: Any) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        provider.add_span_processor(BatchSpanProcessor(Discard()))
    trace.set_tracer_provider(provider)


class Bench:
    def ping(self) -> None:
        pass


def serve(mode: str) -> None:
    import pyrorpc
    _setup(mode)
    cls = pyrorpc.service("tbench")(Bench)
    with pyrorpc.WorkerHost(cls, register=False) as host:
        print(f"READY {host.uri} {os.getpid()}", flush=True)
        sys.stdin.read()  # until the parent closes it


def client(mode: str, uri: str, pid: int, calls: int) -> None:
    sys.path.insert(0, HERE)
    from harness import sync_loop

    import pyrorpc
    _setup(mode)
    with pyrorpc.connect(uri) as proxy:
        out = sync_loop(proxy.ping, calls, max(calls // 10, 200), pid)
    print(json.dumps(out), flush=True)


def _pinned(cpu: str | None, argv: list[str]) -> list[str]:
    return ["taskset", "-c", cpu, *argv] if cpu else argv


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cpus", default="0,1", help="client CPU,worker CPU ('' to leave unpinned)")
    args = parser.parse_args(argv)
    cpus = args.cpus.split(",") if args.cpus else [None, None]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    me = [sys.executable, os.path.abspath(__file__)]
    figures: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    workers = {}
    try:
        for mode in MODES:
            proc = subprocess.Popen(_pinned(cpus[1], [*me, "serve", mode]), stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True, env=env)
            assert proc.stdout is not None
            _ready, uri, pid = proc.stdout.readline().split()
            workers[mode] = (proc, uri, pid)
        for _ in range(args.rounds):
            for mode in MODES:
                _proc, uri, pid = workers[mode]
                out = subprocess.run(_pinned(cpus[0], [*me, "client", mode, uri, pid, str(args.calls)]),
                                     capture_output=True, text=True, env=env, check=True, timeout=600)
                figures[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    finally:
        for proc, _uri, _pid in workers.values():
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(10)
    base = statistics.median(r["calls_per_s"] for r in figures["off"])
    print(f"{args.calls:,} sync Proxy.ping() calls x {args.rounds} rounds, medians (client CPU {cpus[0]}, "
          f"worker CPU {cpus[1]})\n")
    print("| tracing | calls/s | vs off | p50 µs | client CPU µs/call | worker CPU µs/call |")
    print("|---|---|---|---|---|---|")
    for mode in MODES:
        rows = figures[mode]
        rate = statistics.median(r["calls_per_s"] for r in rows)
        print(f"| {mode} | {rate:,.0f} | {rate / base:.3f}× | {statistics.median(r['p50_us'] for r in rows):.1f} | "
              f"{statistics.median(r['client_cpu_us'] for r in rows):.1f} | "
              f"{statistics.median(r['server_cpu_us'] for r in rows):.1f} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(sys.argv[2])
    elif len(sys.argv) > 1 and sys.argv[1] == "client":
        client(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()

"""Benchmark results: per-round series, targets, and their markdown table, JSON and optional PNG chart."""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import statistics
from typing import Any

# figure id -> (title, unit, higher is better)
FIGURES: dict[str, tuple[str, str, bool]] = {
    "sync_calls": ("sync calls/s (ping)", "calls/s", True),
    "sync_p50": ("sync latency p50", "µs", False),
    "sync_p99": ("sync latency p99", "µs", False),
    "sync_cpu_client": ("sync CPU per call, client", "µs", False),
    "sync_cpu_server": ("sync CPU per call, server", "µs", False),
    "oneway_executed": ("oneway calls executed/s", "calls/s", True),
    "oneway_sent": ("oneway calls sent/s (returned to caller)", "calls/s", True),
    "map": ("map throughput (echo)", "calls/s", True),
    "threads_calls": ("client threads × sync calls/s (ping)", "calls/s", True),
    "threads_errors": ("client threads × sync: errors", "errors", False),
    "idle_calls": ("sync calls/s, worker with idle connections", "calls/s", True),
    "idle_threads": ("worker threads (/proc/PID/task)", "threads", False),
    "idle_fds": ("worker open descriptors (/proc/PID/fd)", "fds", False),
    "sleep": ("sleep-bound 10 ms futures", "calls/s", True),
    "async_calls": ("aio vs sync calls/s, one at a time", "calls/s", True),
    "async_p50": ("aio vs sync latency p50, one at a time", "µs", False),
    "async_cpu_client": ("aio vs sync CPU per call, client", "µs", False),
    "async_cpu_server": ("aio vs sync CPU per call, server", "µs", False),
    "async_concurrent": ("aio vs sync calls/s, many callers at once", "calls/s", True),
    "stream_rate": ("stream items/s vs sync calls/s", "items/s", True),
    "stream_rss": ("worker RSS growth over a long stream (VmRSS)", "KiB", False),
    "concurrent_seconds": ("concurrent awaits of a sleep: wall time", "s", False),
    "concurrent_client_threads": ("concurrent awaits: client threads (peak)", "threads", False),
    "concurrent_worker_threads": ("concurrent awaits: worker threads (peak)", "threads", False),
    "concurrent_connections": ("concurrent awaits: connections to the worker (peak)", "connections", False),
    "metrics_calls": ("sync calls/s (Pool.ping), metrics on vs off", "calls/s", True),
    "metrics_cpu_server": ("sync CPU per call, worker, metrics on vs off", "µs", False),
    "ns_lookup_p50": ("service lookup p50 (ns_lookup.py)", "ms", False),
    "ns_lookup_p99": ("service lookup p99 (ns_lookup.py)", "ms", False),
}

# the contender every other row of a figure is compared with
BASELINES = {"sync_calls": "pyro", "sync_p50": "pyro", "sync_p99": "pyro", "sync_cpu_client": "pyro",
             "sync_cpu_server": "pyro", "oneway_sent": "pyro",
             "oneway_executed": "pyro", "map": "pyro_loop", "threads_calls": "pyro", "idle_calls": "none",
             "idle_threads": "none", "ns_lookup_p50": "stock yplookup",
             "ns_lookup_p99": "stock yplookup", "async_calls": "sync", "async_p50": "sync",
             "async_cpu_client": "sync", "async_cpu_server": "sync", "async_concurrent": "threads",
             "stream_rate": "sync", "metrics_calls": "off", "metrics_cpu_server": "off"}


@dataclasses.dataclass
class Series:
    """One contender's value of one figure, one entry per round (NaN where a round failed)."""

    figure: str
    contender: str
    label: str
    values: list[float] = dataclasses.field(default_factory=list)
    ideal: float | None = None  # sleep-bound rows: the calls/s a perfect pool would reach
    details: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def finite(self) -> list[float]:
        return [v for v in self.values if not math.isnan(v)]

    @property
    def median(self) -> float:
        vals = self.finite
        return statistics.median(vals) if vals else math.nan

    @property
    def spread(self) -> float:
        """(max - min) / median over rounds; NaN with fewer than two rounds."""
        vals = self.finite
        if len(vals) < 2 or not self.median:
            return math.nan
        return (max(vals) - min(vals)) / self.median


@dataclasses.dataclass
class Target:
    """``figure/contender`` compared with a reference row (``ratio``: value/ref, ``speedup``: ref/value),
    with a constant (``absolute``: the median; ``total``: the sum over rounds, a failed round making it
    infinite) or with the row's ideal (``ideal``: value/ideal)."""

    text: str
    figure: str
    contender: str
    kind: str  # ratio | speedup | absolute | total | ideal
    op: str  # >= | <=
    threshold: float
    ref: str | None = None  # reference contender in the same figure (ratio, speedup)
    measured: float = math.nan
    rounds: list[float] = dataclasses.field(default_factory=list)

    @property
    def status(self) -> str:
        if math.isnan(self.measured):
            return "n/a"
        ok = self.measured >= self.threshold if self.op == ">=" else self.measured <= self.threshold
        return "pass" if ok else "miss"

    def show(self) -> str:
        if self.kind == "total" and math.isinf(self.measured):
            return "a round failed"
        if self.kind in ("absolute", "total"):
            return f"{self.measured:.3g} {FIGURES[self.figure][1]}"
        if self.kind == "ideal":
            return f"{self.measured:.0%} of ideal"
        return f"{self.measured:.2f}×"


# every ratio is the median of per-round ratios of the same run (see Results.ratio)
TARGETS = [
    Target("connect() ≥ 1.25× RPyC", "sync_calls", "connect", "ratio", ">=", 1.25, ref="rpyc"),
    Target("connect() ≥ 1.4× stock Pyro5", "sync_calls", "connect", "ratio", ">=", 1.4, ref="pyro"),
    Target("Pool ≥ 1.2× RPyC", "sync_calls", "pool", "ratio", ">=", 1.2, ref="rpyc"),
    Target("Pool p99 ≤ stock Pyro5 p99", "sync_p99", "pool", "ratio", "<=", 1.0, ref="pyro"),
    Target("connect() server CPU/call ≤ 0.7× stock Pyro5", "sync_cpu_server", "connect", "ratio", "<=", 0.7,
           ref="pyro"),
    Target("Pool oneway executed ≥ 1.0× RPyC async_", "oneway_executed", "pool", "ratio", ">=", 1.0, ref="rpyc"),
    Target("Pool oneway executed ≥ 2.5× stock Pyro5", "oneway_executed", "pool", "ratio", ">=", 2.5, ref="pyro"),
    Target("Pool map ≥ 5× stock Pyro5 sync loop", "map", "pool", "ratio", ">=", 5.0, ref="pyro_loop"),
    Target("shared Pool ≥ 1.2× stock Pyro5 thread server", "threads_calls", "pool", "ratio", ">=", 1.2,
           ref="pyro"),
    Target("shared Pool: 0 errors", "threads_errors", "pool", "total", "<=", 0.0),
    Target("idle connections open ≥ 0.9× none", "idle_calls", "idle", "ratio", ">=", 0.9, ref="none"),
    Target("8 workers ≥ 85% of ideal 800/s", "sleep", "pool_k8", "ideal", ">=", 0.85),
    Target("connect() aio ≥ 0.8× sync", "async_calls", "aio", "ratio", ">=", 0.8, ref="sync"),
    Target("Pool aio ≥ 0.8× sync", "async_calls", "pool_aio", "ratio", ">=", 0.8, ref="pool_sync"),
    Target("aio at once ≥ 0.8× threads", "async_concurrent", "aio", "ratio", ">=", 0.8, ref="threads"),
    Target("aio at once ≥ 0.8× future()", "async_concurrent", "aio", "ratio", ">=", 0.8, ref="futures"),
    Target("stream() ≥ 10× sync calls/s", "stream_rate", "stream", "ratio", ">=", 10.0, ref="sync"),
    Target("astream() ≥ 10× sync calls/s", "stream_rate", "astream", "ratio", ">=", 10.0, ref="sync"),
    Target("metrics on ≥ 0.9× off", "metrics_calls", "on", "ratio", ">=", 0.9, ref="off"),
    Target("p50 ≤ 2 ms", "ns_lookup_p50", "pyrorpc service_workers", "absolute", "<=", 2.0),
    Target("≥ 10× faster than stock yplookup", "ns_lookup_p50", "pyrorpc service_workers", "speedup", ">=", 10.0,
           ref="stock yplookup"),
]


class Results:
    """Every series of a run, in the order they were first measured, plus the run's metadata."""

    def __init__(self, meta: dict[str, Any]) -> None:
        self.meta = meta
        self.series: dict[tuple[str, str], Series] = {}
        self.notes: list[str] = []
        self.targets = [dataclasses.replace(t) for t in TARGETS]

    def add(self, figure: str, contender: str, label: str, value: float, *, ideal: float | None = None,
            details: dict[str, Any] | None = None) -> None:
        key = (figure, contender)
        s = self.series.get(key)
        if s is None:
            s = self.series[key] = Series(figure, contender, label, ideal=ideal)
        s.values.append(float(value))
        if details:
            s.details.append(details)

    def get(self, figure: str, contender: str) -> Series | None:
        return self.series.get((figure, contender))

    def ratio(self, figure: str, contender: str, ref: str, invert: bool = False) -> tuple[float, list[float]]:
        """Median of per-round ratios value/ref (ref/value with ``invert``): rounds pair up as measured."""
        a, b = self.get(figure, contender), self.get(figure, ref)
        if a is None or b is None:
            return math.nan, []
        per_round = []
        for x, y in zip(a.values, b.values, strict=False):
            if math.isnan(x) or math.isnan(y) or not x or not y:
                continue
            per_round.append(y / x if invert else x / y)
        return (statistics.median(per_round) if per_round else math.nan), per_round

    def evaluate(self) -> None:
        for t in self.targets:
            row = self.get(t.figure, t.contender)
            if row is None:
                continue
            if t.kind == "absolute":
                t.measured, t.rounds = row.median, list(row.values)
            elif t.kind == "total":
                t.rounds = list(row.values)
                t.measured = math.inf if any(math.isnan(v) for v in t.rounds) else sum(t.rounds)
            elif t.kind == "ideal":
                assert row.ideal
                t.rounds = [v / row.ideal for v in row.finite]
                t.measured = statistics.median(t.rounds) if t.rounds else math.nan
            else:
                assert t.ref is not None
                t.measured, t.rounds = self.ratio(t.figure, t.contender, t.ref, invert=t.kind == "speedup")

    # output
    def ordered(self) -> list[Series]:
        """Series grouped by figure (in FIGURES order), contenders in the order first measured."""
        rank = {f: i for i, f in enumerate(FIGURES)}
        return sorted(self.series.values(), key=lambda s: rank[s.figure])  # stable: keeps contender order

    def table(self) -> str:
        lines = ["| figure | contender | median | spread | vs baseline | target | result |",
                 "|---|---|---:|---:|---:|---|---|"]
        for s in self.ordered():
            figure, contender = s.figure, s.contender
            title, unit, _higher = FIGURES[figure]
            base = BASELINES.get(figure)
            if s.ideal:
                vs = f"{s.median / s.ideal:.0%} of {s.ideal:,.0f}/s"
            elif base == contender:
                vs = "baseline"
            elif base is not None and self.get(figure, base) is not None:
                r, _ = self.ratio(figure, contender, base)
                vs = "—" if math.isnan(r) else f"{r:.2f}×"
            else:
                vs = ""
            mine = [t for t in self.targets if t.figure == figure and t.contender == contender]
            target = "; ".join(t.text for t in mine)
            result = "; ".join(f"**{t.status}** ({t.show()})" if t.status != "n/a" else "n/a" for t in mine)
            spread = "—" if math.isnan(s.spread) else f"{s.spread:.0%}"
            lines.append(f"| {title} | {s.label} | {fmt(s.median, unit)} | {spread} | {vs} | {target} | {result} |")
        return "\n".join(lines)

    def summary(self) -> str:
        counts = {"pass": 0, "miss": 0, "n/a": 0}
        for t in self.targets:
            counts[t.status] += 1
        misses = [t.text for t in self.targets if t.status == "miss"]
        line = f"targets: {counts['pass']} pass, {counts['miss']} miss, {counts['n/a']} not measured"
        return line + (f" (missed: {'; '.join(misses)})" if misses else "")

    def as_json(self) -> dict[str, Any]:
        return {
            "meta": self.meta,
            "figures": {
                figure: {
                    s.contender: {"label": s.label, "unit": FIGURES[figure][1], "values": s.values,
                                  "median": s.median, "min": min(s.finite, default=math.nan),
                                  "max": max(s.finite, default=math.nan), "spread": s.spread,
                                  "ideal": s.ideal, "details": s.details}
                    for (fig, _c), s in self.series.items() if fig == figure
                }
                for figure in FIGURES if any(fig == figure for fig, _c in self.series)
            },
            "targets": [{"target": t.text, "figure": t.figure, "contender": t.contender, "kind": t.kind,
                         "op": t.op, "threshold": t.threshold, "ref": t.ref, "measured": t.measured,
                         "rounds": t.rounds, "status": t.status} for t in self.targets],
            "notes": self.notes,
        }

    def write_json(self, path: str) -> None:
        with open(path, "w") as fh:
            # NaN is not JSON: write null for rounds that failed or figures not measured
            json.dump(_nan_to_none(self.as_json()), fh, indent=2, ensure_ascii=False)
            fh.write("\n")

    def write_png(self, path: str) -> bool:
        """A 3x3 chart of the throughput figures; False when matplotlib is not installed."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return False
        panels = [("sync_calls", "sync calls/s"), ("oneway_executed", "oneway executed/s"),
                  ("map", "map / sync loop calls/s"),
                  ("threads_calls", f"{self.meta.get('threads')} client threads × sync calls/s"),
                  ("idle_calls", f"sync calls/s, {self.meta.get('idle_connections', 0):,} idle connections vs none"),
                  ("sleep", "sleep-bound 10 ms calls/s vs ideal"),
                  ("async_calls", "aio vs sync calls/s, one at a time"),
                  ("async_concurrent", f"aio vs sync calls/s, {self.meta.get('threads')} callers at once"),
                  ("stream_rate", "stream items/s vs sync calls/s (log scale)")]
        fig, axes = plt.subplots(3, 3, figsize=(18, 12))
        for ax, (figure, title) in zip(axes.flat, panels, strict=False):
            rows = [s for (f, _c), s in self.series.items() if f == figure]
            ax.set_title(title)
            if not rows:
                ax.text(0.5, 0.5, "not measured", ha="center", va="center")
                continue
            meds = [s.median for s in rows]
            err = [[s.median - min(s.finite, default=s.median) for s in rows],
                   [max(s.finite, default=s.median) - s.median for s in rows]]
            pos = range(len(rows))
            bars = ax.bar(pos, meds, yerr=err, capsize=3, color="#4c72b0")
            ax.bar_label(bars, labels=[f"{m:,.0f}" for m in meds], fontsize=7, padding=2)
            ideals = [s.ideal for s in rows]
            if any(ideals):
                ax.plot(pos, ideals, "r_", markersize=30, mew=2, label="ideal")
                ax.legend()
            if figure == "stream_rate":
                ax.set_yscale("log")  # streams run ~20x the calls they are compared with
            ax.set_xticks(list(pos))
            ax.set_xticklabels([s.label for s in rows], rotation=20, ha="right", fontsize=8)
        fig.suptitle(f"pyrorpc benchmarks ({'pinned to one CPU' if self.meta.get('pinned') else 'unpinned'}, "
                     f"median of {self.meta.get('rounds')} round(s), bars = min-max)")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return True


def command_line(argv: list[str]) -> str:
    return "python benchmarks/run.py" + "".join(" " + shlex.quote(a) for a in argv)


def markdown_report(results: Results, argv: list[str]) -> str:
    meta = results.meta
    m = meta["machine"]
    conc, nap = meta.get("concurrent", 0), meta.get("concurrent_sleep", 1.0)
    lines = [
        "# pyrorpc benchmarks",
        "",
        "Reproduce (from the repository root, after `python -m pip install -e .`; `pip install rpyc matplotlib` "
        "adds the optional RPyC contender and the chart):",
        "",
        "```bash",
        command_line(argv),
        "```",
        "",
        f"Machine: {m['cpu']}, {m['cpus']} CPUs, {m['platform']}; "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v) + ".",
        f"Run: {meta['date']}, {meta['rounds']} interleaved rounds, {meta['calls']} calls per contender per round, "
        + (f"every process pinned to CPU {meta['cpu']}." if meta["pinned"] else "unpinned.")
        + f" Took {meta['seconds']:.0f} s."
        + (f" Load average (1/5/15 min) {_load(meta['loadavg_start'])} at the start, {_load(meta['loadavg_end'])} at "
           "the end (this run's own processes count too: about 1 while it runs)." if "loadavg_end" in meta else ""),
        "",
        results.table(),
        "",
        results.summary(),
        "",
        "How to read it:",
        "",
        "- *median* is over rounds; *spread* is (max - min) / median over rounds (noise here is ~15%, more",
        "  when other work shares the machine);",
        "  *vs baseline* is the median of per-round ratios to the figure's baseline row (rounds pair up as",
        "  measured, so drift cancels). Targets are checked on those ratios, also those against RPyC.",
        "- sync: back-to-back `ping()` calls on one reused connection, each timed end to end. The raw TCP",
        "  floor is a 64-byte send + 64-byte receive on a socket with TCP_NODELAY, no serialization.",
        "  *CPU per call* is user + system time of the client process and of the server process over the",
        "  timed loop (their CPU-time clocks, ns resolution); pinned, client + server CPU is about the wall",
        "  time of a call.",
        "- oneway: N `hit()` oneway calls fired as fast as possible, then the worker's `count()` is polled",
        "  until all N ran; executed/s = N / time until the last one ran. *sent/s* is how fast they returned",
        "  to the caller. Stock Pyro5 starts a thread per oneway call; RPyC's `async_` is not fire-and-forget",
        "  (a reply comes back unread) and is shown for scale.",
        "- map: `list(pool.echo.map((i,) for i in range(N)))` against a stock Pyro5 loop of N `echo(i)`.",
        f"- client threads: {meta.get('threads')} threads call `ping()` {meta.get('thread_calls')} times each, "
        "back to back,",
        "  all starting together; calls/s = all calls / time until the last thread is done. pyrorpc: the",
        "  threads share one Pool of 1 worker (default `max_in_flight`). Stock Pyro5: each thread has its own",
        "  proxy to a stock thread-server daemon of its own, its `THREADPOOL_SIZE` raised to "
        f"{meta.get('pyro_threadpool', '—')}",
        "  (a connection holds a server thread). *errors* counts calls that raised, warm-up included.",
        f"- idle connections: {meta.get('idle_connections', 0):,} idle connections (TCP + pyrorpc handshake each, held",
        "  by a helper process) are opened to a worker of its own before a measure and closed after it;",
        "  sync `ping()` through `connect()` is timed with them open and without. Threads and descriptors",
        "  are the worker process's (`/proc/PID/task`, `/proc/PID/fd`) at the end of the timed loop.",
        "- sleep-bound: M futures of a method sleeping 10 ms through a Pool of k worker processes with",
        "  `max_in_flight=1` (one call per worker at a time), so the ideal is k x 100 calls/s; M is about 2",
        "  seconds' worth. It stays pinned like everything else: it is not CPU-bound up to 8 workers, and",
        "  at 16 workers the client's per-call CPU cost on the one pinned CPU starts to show.",
        "- aio one at a time: one task awaits `aping.aio()` (an `async def` method, run on the worker's event",
        "  loop) back to back on one event loop kept for the whole run, against `ping()` (plain `def`, run on a",
        "  worker thread) called back to back on the same client object and worker process, in the same round;",
        "  `ping.aio()` (a plain method through the multiplexed connection) shows the client path alone. CPU",
        "  per call as for sync.",
        f"- aio at once: {meta.get('threads')} tasks each await `aping.aio()` {meta.get('thread_calls')} times "
        "back to back on one event loop",
        f"  and one Pool (`max_in_flight={meta.get('threads')}`), against {meta.get('threads')} threads calling "
        "`ping()` on that Pool and",
        f"  {meta.get('threads')} `ping.future()` calls in flight (the same number of calls); calls/s = all "
        "calls / time until the last is done.",
        f"- stream: items/s of `items(n)` (a generator yielding the ints 0..n-1, n = {meta.get('stream_items', 0):,})",
        "  iterated with `stream()` (a connection of its own, opened by the call and counted in its time) and",
        "  `astream()` (the event loop's multiplexed connection), against sync `ping()` calls/s on the same",
        "  worker in the same round. Stock Pyro5 (its item streaming) and RPyC (a generator netref) iterate the",
        "  same generator with a round trip per item and are shown for scale.",
        f"  RSS: the worker's VmRSS (`/proc/PID/status`) read before a `stream()` of {meta.get('rss_items', 0):,} "
        "items and when",
        "  its last item arrives (the stream still open); *growth* is the difference (the JSON's details also",
        "  keep a reading every 5% of the items, the client's own growth, and items/s).",
        f"- concurrent: `asyncio.gather` of {conc:,} `asleep.aio({nap:g})` awaits (an `async def` method",
        f"  awaiting `asyncio.sleep`) through one `Pool(max_in_flight={conc})` on one worker process started",
        f"  with `--threads {meta.get('concurrent_threads', 4)}`, pinned like everything else; the ideal wall "
        f"time is {nap:g} s. Each measure follows a",
        "  warm-up gather of as many awaits without the sleep. The client is a process of its own",
        "  (`servers.py gather`, pinned too) holding that Pool across rounds, so its threads are the awaits'",
        "  alone. Threads are `/proc/PID/task` of that client and of the worker; connections are the",
        "  client's connected sockets to the worker's port (the worker's only client); each is the peak of",
        "  readings every 10 ms while the awaits run (and before and after).",
        "- service lookup: `benchmarks/ns_lookup.py` (its own interleaved rounds; stock `yplookup` scans",
        "  the registry, pyrorpc answers from its service index).",
    ]
    if results.notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in results.notes]
    return "\n".join(lines) + "\n"


def _load(values: list[float]) -> str:
    return "/".join(f"{v:.2f}" for v in values)


def fmt(value: float, unit: str) -> str:
    if math.isnan(value):
        return "—"
    if unit in ("calls/s", "items/s"):
        return f"{value:,.0f}/s"
    if unit == "s":
        return f"{value:.2f} s"
    if unit == "KiB":
        return f"{value:+,.0f} KiB"
    if unit == "µs":
        return f"{value:,.0f} µs"
    if unit == "ms":
        return f"{value:.3f} ms"
    if unit in ("errors", "threads", "fds", "connections"):
        return f"{value:,.0f} {unit}"
    return f"{value:.3g} {unit}"


def _nan_to_none(obj: Any) -> Any:
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    return obj

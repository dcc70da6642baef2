"""``pyrorpc dashboard``: a read-only web page of the fleet that updates live, from the standard library alone.

A ``Fleet`` polls once a second: the name server for its services and their workers (lease and load
reports), and every worker's ``Pyro.Daemon`` object for its own statistics (``stats()``: calls by outcome,
latency, in flight, draining) where the worker has them. A ``Dashboard`` serves the page (``/``), the
state as JSON (``/api/state``) and a health check (``/healthz``) over ``http.server`` on 127.0.0.1 by
default. The page fetches the state every second and draws it with a few lines of JavaScript: no
framework, nothing to build, nothing the server does but answer GETs.

Why the standard library: the page is read-only and small, so ``http.server`` (threaded) and plain
JavaScript are enough, and a web framework would be one more dependency for every user of the
``pyrorpc`` command. A worker gone from the registry stays on the page, marked gone, for ``GONE_FOR``
seconds. A fleet of more than ``MAX_STATS_WORKERS`` workers is shown from the name server's lease reports
alone (refreshed at each renewal, TTL/3), without a call to each worker every second.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import logging
import threading
import time
from typing import Any

from .config import Settings
from .errors import NameServerUnavailableError
from .httpd import BoundedHTTPServer, Response
from .naming import NameServerClient, WorkerInfo

__all__ = ["Dashboard", "Fleet"]

log = logging.getLogger("pyrorpc.dashboard")

HISTORY = 60  # points of each service's calls/s sparkline (one a poll)
GONE_FOR = 30.0  # seconds a departed worker stays on the page, marked gone
_STATS_TIMEOUT = 0.8  # seconds a worker may take to answer stats(); it is shown from its lease otherwise
MAX_STATS_WORKERS = 256  # a bigger fleet is shown from its lease reports alone (no call per worker a second)


class Fleet:
    """What the page shows, refreshed by ``poll()`` (``Dashboard`` calls it every ``interval`` seconds).

    ``state()`` is a JSON-ready dict: the name server (``address``, ``ok``, ``error``, ``registrations``),
    and per service its workers (from the name server's lease reports, overlaid with each worker's own
    ``stats()`` when it answers), calls/s and a calls/s history.
    """

    def __init__(self, settings: Settings, interval: float = 1.0) -> None:
        self.settings = settings
        self.interval = interval
        self._naming = NameServerClient(settings)
        self._lock = threading.Lock()
        self._state: dict[str, Any] = {"ns": {"address": str(settings.ns), "ok": False, "error": "not polled yet"},
                                       "services": [], "updated": None}
        # worker -> (time, calls, "stats" or "lease", the rate then)
        self._last_calls: dict[str, tuple[float, int, str, float | None]] = {}
        self._history: dict[str, collections.deque[float]] = {}
        self._gone: dict[str, tuple[float, dict[str, Any]]] = {}  # worker -> (when it left, its last row)
        self._known: dict[str, dict[str, Any]] = {}  # worker -> its last row
        self._proxies: dict[str, Any] = {}  # worker -> a Proxy to its Pyro.Daemon object
        self._no_stats: set[str] = set()  # workers without stats() (a stock or older worker)
        self._asking: dict[str, concurrent.futures.Future[Any]] = {}  # worker -> its stats() request under way
        self._backoff: dict[str, tuple[int, float]] = {}  # worker -> (failures in a row, ask again after)
        self._last_stats: dict[str, tuple[float, dict[str, Any]]] = {}  # worker -> (when, its last stats())
        self._latency: dict[str, tuple[float | None, float | None]] = {}  # worker -> its last p50, p99 shown
        self._pool = concurrent.futures.ThreadPoolExecutor(16, thread_name_prefix="dashboard-stats")

    def state(self) -> dict[str, Any]:
        with self._lock:
            return self._state

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for proxy in self._proxies.values():
            proxy.close()
        self._proxies.clear()
        self._naming.close()

    # polling ----------------------------------------------------------------------------------------
    def poll(self) -> None:
        now = time.time()
        ns: dict[str, Any] = {"address": str(self.settings.ns), "ok": True, "error": None}
        try:
            counts = self._naming.services()
            members = {svc: self._naming.service_workers(svc) for svc in sorted(counts)}
            ns["registrations"] = self._naming.count()
            ns["services"] = len(counts)
        except NameServerUnavailableError as exc:
            ns.update(ok=False, error=str(exc))
            with self._lock:  # what we knew stays on the page, the name server marked down
                self._state = dict(self._state, ns=ns, updated=now)
            return
        except Exception as exc:  # a stock or odd name server: say so, keep going
            ns.update(ok=False, error=f"{type(exc).__name__}: {exc}")
            with self._lock:
                self._state = dict(self._state, ns=ns, updated=now)
            return
        infos = [w for workers in members.values() for w in workers]
        stats = self._fetch_stats(infos)
        services = []
        alive = set()
        for svc, workers in members.items():
            rows = []
            total_rate = 0.0
            for info in workers:
                alive.add(info.name)
                row = self._row(info, stats.get(info.name), now)
                total_rate += row["calls_per_s"] or 0.0
                rows.append(row)
            history = self._history.setdefault(svc, collections.deque(maxlen=HISTORY))
            history.append(round(total_rate, 1))
            services.append({"name": svc, "workers": rows, "calls_per_s": round(total_rate, 1),
                             "history": list(history)})
        self._forget(alive, now, services)
        with self._lock:
            self._state = {"ns": ns, "services": services, "updated": now, "interval": self.interval}

    def _fetch_stats(self, infos: list[WorkerInfo]) -> dict[str, dict[str, Any]]:
        """Each worker's ``stats()``, asked in parallel; a worker that does not answer in time is left out."""
        if len(infos) > MAX_STATS_WORKERS:
            return {}
        now = time.monotonic()
        for name, future in list(self._asking.items()):
            if future.done():
                del self._asking[name]
        # a worker still answering the last poll (busy, hung) is not asked again meanwhile, and one that
        # failed is asked again after a backoff: a few slow workers cannot hold up the page for the others
        wanted = [w for w in infos if w.name not in self._no_stats and w.name not in self._asking
                  and self._backoff.get(w.name, (0, 0.0))[1] <= now]
        futures = {self._pool.submit(self._stats_of, w): w.name for w in wanted}
        self._asking.update((name, future) for future, name in futures.items())
        done, _late = concurrent.futures.wait(futures, timeout=_STATS_TIMEOUT + 0.2)
        result = {}
        for future in done:
            name = futures[future]
            value = future.result()
            if isinstance(value, dict):
                result[name] = value
                self._backoff.pop(name, None)
            else:
                self._strike(name, now)
        for future in _late:
            self._strike(futures[future], now)
        return result

    def _strike(self, name: str, now: float) -> None:
        """``name`` did not answer stats(): ask it again after 2, 4, 8 ... (at most 30) seconds."""
        strikes = self._backoff.get(name, (0, 0.0))[0] + 1
        self._backoff[name] = (strikes, now + min(30.0, 2.0 ** strikes))

    def _stats_of(self, info: WorkerInfo) -> dict[str, Any] | None:
        import pyrorpc
        proxy = self._proxies.get(info.name)
        try:
            if proxy is None:
                location = info.uri.split("@", 1)[1]
                proxy = self._proxies[info.name] = pyrorpc.connect(
                    f"PYRO:Pyro.Daemon@{location}", settings=self.settings, timeout=_STATS_TIMEOUT)
            value = proxy.stats()
        except AttributeError:
            self._no_stats.add(info.name)  # no stats() there: its lease report is all we get
            return None
        except Exception as exc:  # the worker may just have died: its lease says the rest
            if "stats" in str(exc) and "unknown" in str(exc).lower():
                self._no_stats.add(info.name)
            log.debug("stats of %s: %s", info.name, exc)
            old = self._proxies.pop(info.name, None)
            if old is not None:
                old.close()
            return None
        return value if isinstance(value, dict) else None

    def _row(self, info: WorkerInfo, stats: dict[str, Any] | None, now: float) -> dict[str, Any]:
        live = stats is not None
        previous = self._last_stats.get(info.name)
        if stats is not None:
            self._last_stats[info.name] = (now, stats)
        else:
            last_stats = self._last_stats.get(info.name)
            if last_stats is not None and now - last_stats[0] < 15:
                stats = last_stats[1]  # (busy or slow to answer this time: its last figures, not a reset)
        calls, errors, in_flight = info.calls, info.errors, info.in_flight
        p50 = p99 = None
        draining = False
        if stats:
            calls = _int(stats.get("calls"), calls)
            errors = _int(stats.get("errors"), errors)
            in_flight = _int(stats.get("in_flight"), in_flight)
            draining = bool(stats.get("draining"))
            p50, p99 = self._recent_latencies(info.name, stats, previous[1] if live and previous else None,
                                              info.service)
        # calls/s from two polls of the same source (the worker's own count, or its lease report's)
        # (a lease report changes once a renewal, TTL/3: between two, its last rate stands)
        source = "stats" if stats else "lease"
        rate: float | None = None
        last = self._last_calls.get(info.name)
        if last is None or last[2] != source or calls < last[1] or now <= last[0]:
            self._last_calls[info.name] = (now, calls, source, None)
        elif calls > last[1] or (source == "stats" and live):
            rate = round((calls - last[1]) / (now - last[0]), 1)
            self._last_calls[info.name] = (now, calls, source, rate)
        else:
            rate = last[3]
        row = {"name": info.name, "service": info.service, "host": info.host, "pid": info.pid,
               "in_flight": in_flight, "calls": calls, "errors": errors, "calls_per_s": rate,
               "p50_ms": p50, "p99_ms": p99, "last_heartbeat": info.last_heartbeat, "ttl": info.ttl,
               "uptime": round(info.uptime, 1), "draining": draining, "live_stats": live,
               "gone": False}
        self._known[info.name] = row
        return row

    def _recent_latencies(self, name: str, stats: dict[str, Any], before: dict[str, Any] | None,
                          service: str) -> tuple[float | None, float | None]:
        """p50 and p99 (ms) of the calls a worker ended since the last poll (its latency histograms then and
        now), each call weighing the same whatever its method; without calls since, the last figures."""
        now_buckets = _service_buckets(stats, service)
        then_buckets = _service_buckets(before, service) if before is not None else None
        if now_buckets is not None and then_buckets is not None and len(now_buckets[1]) == len(then_buckets[1]):
            bounds, counts = now_buckets
            delta = [max(0, a - b) for a, b in zip(counts, then_buckets[1], strict=True)]
            if sum(delta):
                value = (_bucket_quantile(bounds, delta, 0.5), _bucket_quantile(bounds, delta, 0.99))
                self._latency[name] = value
                return value
            return self._latency.get(name, (None, None))
        if name in self._latency:
            return self._latency[name]
        return _latencies(stats, service)

    def _forget(self, alive: set[str], now: float, services: list[dict[str, Any]]) -> None:
        """Workers that left the registry: shown as gone for GONE_FOR seconds, then dropped."""
        for name in list(self._known):
            if name not in alive:
                row = self._known.pop(name)
                self._gone[name] = (now, dict(row, gone=True, in_flight=0, calls_per_s=None))
                self._last_calls.pop(name, None)
                self._last_stats.pop(name, None)
                self._latency.pop(name, None)
                self._backoff.pop(name, None)
                self._no_stats.discard(name)
                proxy = self._proxies.pop(name, None)
                if proxy is not None:
                    proxy.close()
        for name, (since, row) in list(self._gone.items()):
            if name in alive or now - since > GONE_FOR:
                del self._gone[name]
                continue
            entry = next((s for s in services if s["name"] == row["service"]), None)
            if entry is None:
                entry = {"name": row["service"], "workers": [], "calls_per_s": 0.0,
                         "history": list(self._history.get(row["service"], ()))}
                services.append(entry)
            entry["workers"].append(dict(row, gone_for=round(now - since, 1)))
        known = {s["name"] for s in services}
        for svc in list(self._history):
            if svc not in known:
                del self._history[svc]


def _latencies(stats: dict[str, Any], service: str) -> tuple[float | None, float | None]:
    """p50 and p99 (ms) of a worker's recent calls of ``service``, from its ``stats()`` (``services``: over
    each method's last calls); from an older worker's ``methods``, the latency histograms of the service's
    methods added up (``buckets_ms`` bounds, since the worker started), interpolated within a bucket as
    Prometheus' ``histogram_quantile`` does."""
    services = stats.get("services")
    entry = services.get(service) if isinstance(services, dict) else None
    if isinstance(entry, dict) and ("p50_ms" in entry or "p99_ms" in entry):
        return _number(entry.get("p50_ms")), _number(entry.get("p99_ms"))
    bounds = stats.get("buckets_ms")
    methods = stats.get("methods")
    if not isinstance(bounds, list) or not isinstance(methods, dict):
        return _number(stats.get("p50_ms")), _number(stats.get("p99_ms"))
    summed = _service_buckets(stats, service)
    if summed is None:
        return None, None
    bounds, total = summed
    return _bucket_quantile(bounds, total, 0.5), _bucket_quantile(bounds, total, 0.99)


def _service_buckets(stats: dict[str, Any], service: str) -> tuple[list[Any], list[int]] | None:
    """(bucket bounds in ms, calls per bucket) of ``service``'s methods added up, from a ``stats()``."""
    bounds = stats.get("buckets_ms")
    methods = stats.get("methods")
    per_method = methods.get(service) if isinstance(methods, dict) else None
    if not isinstance(bounds, list) or not isinstance(per_method, dict):
        return None
    total = [0] * (len(bounds) + 1)
    for entry in per_method.values():
        buckets = entry.get("buckets") if isinstance(entry, dict) else None
        if isinstance(buckets, list) and len(buckets) == len(total):
            for i, n in enumerate(buckets):
                if isinstance(n, int):
                    total[i] += n
    return bounds, total


def _bucket_quantile(bounds: list[Any], counts: list[int], q: float) -> float | None:
    count = sum(counts)
    if not count:
        return None
    rank = q * count
    seen = 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i >= len(bounds):
                return _number(bounds[-1])  # above the last bound: at least that
            low = float(bounds[i - 1]) if i else 0.0
            return _number(low + (float(bounds[i]) - low) * (rank - seen) / n)
        seen += n
    return _number(bounds[-1])


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default


def _number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and value >= 0:
        return round(float(value), 3)
    return None


class Dashboard:
    """Serve the live page of the fleet registered at the name server(s) of ``settings``.

    ``start()`` serves in background threads and returns (the socket is bound in the constructor:
    ``port=0`` picks a free one, see ``url``); ``serve_forever()`` blocks; ``close()`` stops both.
    """

    def __init__(self, settings: Settings | None = None, *, host: str = "127.0.0.1", port: int = 8080,
                 interval: float = 1.0) -> None:
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            raise ValueError(f"`port` must be 0-65535, got {port!r}")
        if not isinstance(interval, (int, float)) or not 0.1 <= interval <= 60:
            raise ValueError(f"`interval` must be 0.1-60 seconds, got {interval!r}")
        self.fleet = Fleet(settings if settings is not None else Settings.from_env(), interval)
        self.httpd = BoundedHTTPServer((host, port), self._route, name="dashboard", headers={
            "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'"})
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _route(self, path: str) -> Response | None:
        if path in ("/", "/index.html"):
            return 200, PAGE.encode(), "text/html; charset=utf-8"
        if path == "/api/state":
            return 200, json.dumps(self.fleet.state(), default=str).encode(), "application/json"
        if path == "/healthz":
            return 200, b"ok\n", "text/plain"
        return None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}/"

    def _poll_loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.fleet.poll()
            except Exception:  # pragma: no cover - the page must keep updating whatever one poll met
                log.exception("dashboard poll failed")
            self._stop.wait(max(0.05, self.fleet.interval - (time.monotonic() - started)))

    def start(self) -> "Dashboard":
        if not self._threads:
            poller = threading.Thread(target=self._poll_loop, name="dashboard-poll", daemon=True)
            poller.start()
            self._threads = [poller, self.httpd.serve_in_thread()]
        return self

    def serve_forever(self) -> None:
        """Serve until ``close()`` or KeyboardInterrupt."""
        self.start()
        try:
            while not self._stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            self.close()

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if self._threads:
            self.httpd.shutdown()
        self.httpd.server_close()
        self.fleet.close()

    def __enter__(self) -> "Dashboard":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>pyrorpc dashboard</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
 h1{font-size:1.3em;margin:0 0 .3em} h2{font-size:1.1em;margin:1.4em 0 .4em}
 #ns{margin-bottom:1em} .ok{color:#1a7f37} .bad{color:#c62828;font-weight:bold}
 table{border-collapse:collapse;background:#fff;min-width:60em}
 th,td{padding:.25em .7em;border-bottom:1px solid #e4e4e4;text-align:right;white-space:nowrap}
 th{background:#f0f0f0} td.l,th.l{text-align:left}
 tr.gone td{color:#999;text-decoration:line-through} tr.draining td{background:#fff6e0}
 .rate{font-weight:bold} svg{vertical-align:middle;margin-left:1em;background:#fff;border:1px solid #e4e4e4}
 #stamp{color:#777;font-size:.9em}
</style></head>
<body>
<h1>pyrorpc dashboard</h1>
<div id="ns">name server: <span id="ns-state">connecting...</span> <span id="stamp"></span></div>
<div id="services"></div>
<script>
"use strict";
function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}
function spark(points) {
  const ns = "http://www.w3.org/2000/svg", w = 180, h = 30, svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", w); svg.setAttribute("height", h); svg.setAttribute("class", "spark");
  const max = Math.max(1, ...points), step = w / Math.max(1, points.length - 1);
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("fill", "none"); line.setAttribute("stroke", "#1565c0"); line.setAttribute("stroke-width", "1.5");
  const xy = (p, i) => (i * step).toFixed(1) + "," + (h - 2 - (p / max) * (h - 4)).toFixed(1);
  line.setAttribute("points", points.map(xy).join(" "));
  svg.appendChild(line);
  return svg;
}
function fmt(v, unit) { return v === null || v === undefined ? "-" : v + (unit || ""); }
const COLUMNS = [["worker", "l"], ["host", "l"], ["pid"], ["in flight"], ["calls/s"], ["calls"], ["errors"],
                 ["p50"], ["p99"], ["last heartbeat"], ["state", "l"]];
function render(state) {
  const ns = state.ns || {}, nsEl = document.getElementById("ns-state");
  nsEl.textContent = (ns.address || "?") + (ns.ok ? " - up, " + fmt(ns.registrations) + " registrations, "
    + fmt(ns.services) + " services" : " - DOWN: " + (ns.error || "no answer"));
  nsEl.className = ns.ok ? "ok" : "bad";
  document.getElementById("stamp").textContent =
    state.updated ? "updated " + new Date(state.updated * 1000).toLocaleTimeString() : "";
  const root = document.getElementById("services");
  const box = document.createDocumentFragment();
  if (!(state.services || []).length) box.appendChild(el("p", {}, "No services registered."));
  for (const svc of state.services || []) {
    const section = el("section", {"class": "service", "data-service": svc.name});
    const title = el("h2", {}, svc.name + " ");
    title.appendChild(el("span", {"class": "rate"}, fmt(svc.calls_per_s, " calls/s")));
    title.appendChild(spark(svc.history || []));
    section.appendChild(title);
    const table = el("table"), head = el("tr");
    for (const [name, cls] of COLUMNS) head.appendChild(el("th", cls ? {"class": cls} : {}, name));
    table.appendChild(head);
    for (const w of svc.workers) {
      const stateText = w.gone ? "gone" : w.draining ? "draining" : "live";
      const tr = el("tr", {"class": "worker " + stateText, "data-worker": w.name, "data-state": stateText});
      const cells = [[w.name, "l"], [w.host, "l"], [w.pid], [w.in_flight], [fmt(w.calls_per_s)], [w.calls],
        [w.errors], [fmt(w.p50_ms, " ms")], [fmt(w.p99_ms, " ms")],
        [w.gone ? "gone " + fmt(w.gone_for, "s") + " ago" : fmt(w.last_heartbeat, "s ago")], [stateText, "l"]];
      for (const [text, cls] of cells) tr.appendChild(el("td", cls ? {"class": cls} : {}, text));
      table.appendChild(tr);
    }
    section.appendChild(table);
    box.appendChild(section);
  }
  root.replaceChildren(box);
}
async function tick() {
  try {
    const reply = await fetch("/api/state", {cache: "no-store"});
    render(await reply.json());
  } catch (e) {
    const nsEl = document.getElementById("ns-state");
    nsEl.textContent = "dashboard not answering: " + e; nsEl.className = "bad";
  }
  setTimeout(tick, 1000);
}
tick();
</script>
</body></html>
"""

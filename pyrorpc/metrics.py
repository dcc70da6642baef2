"""Prometheus metrics (the ``metrics`` extra): collectors that read pyrorpc's statistics at scrape time.

Nothing here runs per call. Servers count in ``pyrorpc.stats.ServerStats`` and pools in ``PoolStats``
(plain increments); a scrape turns those numbers into metric families:

* worker / name server (``ServerCollector``, one ``CollectorRegistry`` per endpoint, never the global one):
  ``pyrorpc_calls_total{service,method,outcome}`` (ok, error, timeout, refused),
  ``pyrorpc_call_duration_seconds{service,method}`` (histogram), ``pyrorpc_calls_in_flight``,
  ``pyrorpc_oneway_queue_depth``, ``pyrorpc_connections``, ``pyrorpc_draining``, ``pyrorpc_uptime_seconds``;
* name server (``NameServerCollector``): ``pyrorpc_ns_leases``, ``pyrorpc_ns_registrations_total``,
  ``pyrorpc_ns_renewals_total``, ``pyrorpc_ns_lookups_total``, ``pyrorpc_ns_expiries_total``,
  ``pyrorpc_ns_workers{service}``;
* client (``PoolCollector``, in prometheus_client's default ``REGISTRY``, covering every live Pool of the
  process, held weakly): ``pyrorpc_pool_calls_total{service,worker,outcome}`` (ok, error, timeout, lost,
  not_sent), ``pyrorpc_pool_call_duration_seconds{service,worker}``, ``pyrorpc_pool_retries_total{service}``,
  ``pyrorpc_pool_failovers_total{service}``, ``pyrorpc_pool_ejections_total{service,worker}``,
  ``pyrorpc_pool_in_flight{service,worker}``.

``MetricsServer`` serves one registry over HTTP (``/metrics``) from a daemon thread.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from .errors import ConfigurationError
from .httpd import BoundedHTTPServer, Response
from .stats import BUCKETS, OUTCOMES, POOL_OUTCOMES, ServerStats

__all__ = ["MetricsServer", "NameServerCollector", "PoolCollector", "ServerCollector", "require_prometheus",
           "serve_metrics", "track_pool"]

_MISSING = ("metrics need prometheus_client: install the extra with pip install 'pyrorpc[metrics]'")


def require_prometheus() -> Any:
    """The ``prometheus_client`` module.

    Raises:
        ConfigurationError: it is not installed (the message says how to install it).
    """
    try:
        import prometheus_client
    except ImportError:
        raise ConfigurationError(_MISSING) from None
    return prometheus_client


def check_port(port: Any, what: str = "metrics_port") -> int | None:
    """``port`` if it is None or 0-65535, and prometheus_client is there when it is not None.

    Raises:
        ConfigurationError: a bad port, or the extra is missing.
    """
    if port is None:
        return None
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ConfigurationError(f"`{what}` must be 0-65535, got {port!r}")
    require_prometheus()
    return port


def _histogram(buckets: list[int], total: float) -> tuple[list[tuple[str, float]], float]:
    """Prometheus buckets (cumulative, ``le`` labels) from per-bucket counts."""
    out: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip((*BUCKETS, float("inf")), buckets, strict=True):
        running += count
        out.append(("+Inf" if bound == float("inf") else repr(bound), running))
    return out, total


class ServerCollector:
    """The server core's statistics: calls by service, method and outcome, latency, in flight, connections."""

    def __init__(self, stats: ServerStats, connections: Callable[[], int]) -> None:
        self.stats = stats
        self.connections = connections

    def describe(self) -> list[Any]:
        return []  # (families are only known at scrape time)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
        stats = self.stats
        calls = CounterMetricFamily("pyrorpc_calls", "Calls served, by service, method and outcome "
                                    "(ok, error, timeout: ended after the caller's deadline, refused: draining)",
                                    labels=["service", "method", "outcome"])
        latency = HistogramMetricFamily("pyrorpc_call_duration_seconds", "Call latency on the server, from "
                                        "request read to reply", labels=["service", "method"])
        for svc, method, counts, buckets, total, _recent in stats.method_counts(recent=False):
            for outcome, count in zip(OUTCOMES, counts, strict=True):
                calls.add_metric([svc, method, outcome], count)
            hist, total = _histogram(buckets, total)
            latency.add_metric([svc, method], hist, total)
        yield calls
        yield latency
        snap = stats.snapshot()
        yield GaugeMetricFamily("pyrorpc_calls_in_flight", "Calls in flight (request read, reply not yet written)",
                                value=snap["in_flight"])
        yield GaugeMetricFamily("pyrorpc_oneway_queue_depth", "Oneway calls waiting for a call thread",
                                value=stats.oneway_queued)
        yield GaugeMetricFamily("pyrorpc_connections", "Client connections open", value=max(0, self.connections()))
        yield GaugeMetricFamily("pyrorpc_draining", "1 while the server drains (refusing new calls)",
                                value=1 if stats.draining else 0)
        yield GaugeMetricFamily("pyrorpc_uptime_seconds", "Seconds since the server started",
                                value=time.time() - stats.started)


class NameServerCollector:
    """A name server's registry: leases, renewals, lookups, expiries, workers per service."""

    def __init__(self, nameserver: Any) -> None:
        self.nameserver = weakref.ref(nameserver)

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        ns = self.nameserver()
        if ns is None:
            return
        counts = dict(ns.counts)
        yield GaugeMetricFamily("pyrorpc_ns_leases", "Leased registrations", value=len(ns.leases))
        for key, text in (("registrations", "Leases created (a worker registered)"),
                          ("renewals", "Lease renewals"),
                          ("lookups", "Service lookups (service_workers and watch_service replies)"),
                          ("expiries", "Leases that expired (not renewed within their TTL)")):
            yield CounterMetricFamily(f"pyrorpc_ns_{key}", text, value=counts.get(key, 0))
        workers = GaugeMetricFamily("pyrorpc_ns_workers", "Registered workers per service", labels=["service"])
        for svc, n in sorted(ns.services().items()):
            workers.add_metric([svc], n)
        yield workers


class PoolCollector:
    """Every live Pool of this process (held weakly): calls, retries, failovers, ejections, latency."""

    def __init__(self) -> None:
        self.pools: weakref.WeakSet[Any] = weakref.WeakSet()

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
        calls = CounterMetricFamily("pyrorpc_pool_calls", "Attempts a Pool made, by worker and outcome (ok, "
                                    "error, timeout, lost: after sending, not_sent)",
                                    labels=["service", "worker", "outcome"])
        latency = HistogramMetricFamily("pyrorpc_pool_call_duration_seconds", "Attempt latency seen by the Pool",
                                        labels=["service", "worker"])
        retries = CounterMetricFamily("pyrorpc_pool_retries", "Idempotent calls retried on another worker "
                                      "after being lost", labels=["service"])
        failovers = CounterMetricFamily("pyrorpc_pool_failovers", "Calls sent to another worker because they "
                                        "could not be sent", labels=["service"])
        ejections = CounterMetricFamily("pyrorpc_pool_ejections", "Times a worker was left out for a cooldown",
                                        labels=["service", "worker"])
        in_flight = GaugeMetricFamily("pyrorpc_pool_in_flight", "Calls in flight from this process per worker",
                                      labels=["service", "worker"])
        # two pools of one service add up (their series would collide otherwise)
        totals: dict[tuple[str, str], list[Any]] = {}
        per_service: dict[str, list[int]] = {}
        ejected: dict[tuple[str, str], int] = {}
        flying: dict[tuple[str, str], int] = {}
        for pool in list(self.pools):
            service = pool._service
            snap = pool._stats.snapshot()
            svc = per_service.setdefault(service, [0, 0])
            svc[0] += snap["retries"]
            svc[1] += snap["failovers"]
            for worker, n in snap["ejections"].items():
                ejected[(service, worker)] = ejected.get((service, worker), 0) + n
            for worker, counts, buckets, total in snap["workers"]:
                entry = totals.setdefault((service, worker), [[0] * len(POOL_OUTCOMES), [0] * len(buckets), 0.0])
                entry[0] = [a + b for a, b in zip(entry[0], counts, strict=True)]
                entry[1] = [a + b for a, b in zip(entry[1], buckets, strict=True)]
                entry[2] += total
            for worker, n in pool._in_flight_by_worker().items():
                flying[(service, worker)] = flying.get((service, worker), 0) + n
        for (service, worker), (counts, buckets, total) in sorted(totals.items()):
            for outcome, count in zip(POOL_OUTCOMES, counts, strict=True):
                calls.add_metric([service, worker, outcome], count)
            hist, total = _histogram(buckets, total)
            latency.add_metric([service, worker], hist, total)
        for service, (r, f) in sorted(per_service.items()):
            retries.add_metric([service], r)
            failovers.add_metric([service], f)
        for (service, worker), n in sorted(ejected.items()):
            ejections.add_metric([service, worker], n)
        for (service, worker), n in sorted(flying.items()):
            in_flight.add_metric([service, worker], n)
        yield from (calls, latency, retries, failovers, ejections, in_flight)


_pool_collector: PoolCollector | None = None
_pool_lock = threading.Lock()


def track_pool(pool: Any) -> None:
    """Have ``pool`` in the default registry's ``PoolCollector`` (registered there on first use) when
    prometheus_client is installed; otherwise nothing."""
    global _pool_collector
    if _pool_collector is None:
        with _pool_lock:
            if _pool_collector is None:
                try:
                    from prometheus_client import REGISTRY
                except ImportError:
                    return
                collector = PoolCollector()
                REGISTRY.register(collector)
                _pool_collector = collector
    _pool_collector.pools.add(pool)


class MetricsServer:
    """Serves ``registry`` in Prometheus' text format on ``http://host:port/metrics`` from a daemon thread;
    bound when constructed (``port`` 0: any free port, then ``port`` is the real one).

    Raises:
        ConfigurationError: prometheus_client is missing, or the port cannot be bound (in use...).
    """

    def __init__(self, registry: Any, host: str = "127.0.0.1", port: int = 0) -> None:
        prometheus_client = require_prometheus()

        def route(path: str) -> Response | None:
            if path not in ("/metrics", "/"):
                return None
            return 200, prometheus_client.generate_latest(registry), prometheus_client.CONTENT_TYPE_LATEST

        try:
            # (not prometheus_client.start_http_server: a thread per connection, no timeout, no cap, so idle
            # connections could use up this process's file descriptors and stop it accepting RPC clients)
            self._httpd = BoundedHTTPServer((host, port), route, name="metrics")
            self._thread = self._httpd.serve_in_thread()
        except OSError as exc:
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            raise ConfigurationError(f"cannot serve metrics on {where}: {exc.strerror or exc}") from None
        self.host = host
        self.port: int = self._httpd.server_address[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(2)

    def __enter__(self) -> "MetricsServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def serve_metrics(server: Any, host: str, port: int, *extra: Any) -> MetricsServer:
    """A MetricsServer for a pyrorpc ``Server`` (its ServerStats and connections), plus ``extra`` collectors,
    in a registry of its own.

    Raises:
        ConfigurationError: prometheus_client is missing, or the port cannot be bound.
    """
    prometheus_client = require_prometheus()
    registry = prometheus_client.CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(server.stats, server.connection_count))
    for collector in extra:
        registry.register(collector)
    return MetricsServer(registry, host, port)

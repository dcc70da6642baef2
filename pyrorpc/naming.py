"""Name-server client: registration, leases, service lookups; works with pyrorpc's and stock Pyro5's server."""

from __future__ import annotations

import builtins
import dataclasses
import math
import time
from typing import Any

import Pyro5.core
import Pyro5.errors

from .compat import remote_traceback
from .config import Address, Settings
from .errors import AuthenticationError, NameServerUnavailableError
from .security import open_connection
from .wire import invoke

SERVICE_TAG = "pyrorpc.service:"
LEASE_TAG = "pyrorpc.lease:"
MAX_THREADS = 1_000_000  # as the name server checks it (nameserver.registry)
_MAX_COUNT = 2**63 - 1
_MAX_HOST_LENGTH = 255


@dataclasses.dataclass
class WorkerInfo:
    """One worker of a service as the name server (and, in a Pool, this client) sees it.

    What a worker reports is clamped on arrival, whoever registered it (a stock name server checks
    nothing): ``threads`` is 0 when not reported and otherwise 1-MAX_THREADS; counts and ``pid`` are
    never negative; ``started`` is a finite time >= 0 (0.0 = unknown); ``host`` is at most 255
    characters; ``last_heartbeat`` is >= 0 and ``ttl`` positive, or None.
    """

    name: str
    uri: str
    service: str
    host: str = ""
    pid: int = 0
    threads: int = 0  # 0: not reported (a client then uses its own max_in_flight)
    in_flight: int = 0
    calls: int = 0
    errors: int = 0
    connections: int = 0
    started: float = 0.0
    last_heartbeat: float | None = None  # seconds ago; None where the name server keeps no leases
    ttl: float | None = None
    metadata: tuple[str, ...] = ()
    client_in_flight: int = 0  # calls in flight from this Pool (Pool.workers() only)
    ejected: bool = False  # in a failure cooldown (Pool.workers() only)

    def __post_init__(self) -> None:
        self.threads = _clamp(self.threads, 0, MAX_THREADS)
        self.pid = _clamp(self.pid, 0, 2**32 - 1)
        self.in_flight = _clamp(self.in_flight, 0, _MAX_COUNT)
        self.calls = _clamp(self.calls, 0, _MAX_COUNT)
        self.errors = _clamp(self.errors, 0, _MAX_COUNT)
        self.connections = _clamp(self.connections, 0, _MAX_COUNT)
        self.client_in_flight = _clamp(self.client_in_flight, 0, _MAX_COUNT)
        self.started = _float(self.started)
        if not 0.0 <= self.started < 1e12:  # as the name server checks it
            self.started = 0.0
        self.host = str(self.host)[:_MAX_HOST_LENGTH]
        if self.last_heartbeat is not None:
            self.last_heartbeat = max(0.0, _float(self.last_heartbeat))
        if self.ttl is not None:
            ttl = _float(self.ttl)
            self.ttl = ttl if ttl > 0 else None

    @property
    def uptime(self) -> float:
        return max(0.0, time.time() - self.started) if self.started else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["uptime"] = round(self.uptime, 1)
        return d

    @classmethod
    def from_record(cls, name: str, uri: str, metadata: Any, load: dict[str, Any] | None = None,
                    age: float | None = None, ttl: float | None = None,
                    service: str | None = None) -> "WorkerInfo":
        tags = _tags(metadata)
        load = load if isinstance(load, dict) else {}
        # a service name may have dots ("reports.daily"): the tag or the caller knows it, the name does not
        # worker names are SERVICE.host.pid.id
        service = service or tags.get("service") or (name.rsplit(".", 3)[0] if name.count(".") >= 3
                                                      else name.split(".")[0])
        return cls(
            name=name, uri=str(uri), service=service,
            host=str(load.get("host", tags.get("host", ""))),
            pid=_int(load.get("pid", tags.get("pid"))),
            threads=_threads(load.get("threads", tags.get("threads"))),
            in_flight=_int(load.get("in_flight")), calls=_int(load.get("calls")), errors=_int(load.get("errors")),
            connections=_int(load.get("connections")),
            started=_float(load.get("started", tags.get("started"))),
            last_heartbeat=age, ttl=ttl, metadata=tuple(sorted(t for t in metadata or () if isinstance(t, str))),
        )


def _tags(metadata: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for tag in metadata or ():
        if isinstance(tag, str) and tag.startswith("pyrorpc."):
            key, _, value = tag[len("pyrorpc."):].partition(":")
            out[key] = value
    return out


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):  # None, "x", nan, inf
        return 0


def _float(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return 0.0
    return number if math.isfinite(number) else 0.0


def _clamp(value: Any, low: int, high: int) -> int:
    return min(max(_int(value), low), high)


def _threads(value: Any) -> int:
    """A reported thread count, at least 1 (a worker runs at least one call); 0 when not reported."""
    if value is None or value == "":
        return 0
    return _clamp(value, 1, MAX_THREADS)


class NameServerClient:
    """Talks to one name server. Each operation uses its own short connection, so the client is thread
    safe and never pins a name-server thread; every operation has the ``connect_timeout``.

    Raises (from every operation):
        NameServerUnavailableError: the name server could not be reached or did not answer in time.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.address: Address = settings.ns
        self.uri = Pyro5.core.URI(f"PYRO:{Pyro5.core.NAMESERVER_NAME}@{self.address}")
        self._leasing: bool | None = None  # does the server speak pyrorpc's lease API?

    def __repr__(self) -> str:
        return f"<NameServerClient {self.address}>"

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            conn, meta = open_connection(self.uri, self.settings)
        except AuthenticationError as exc:
            raise AuthenticationError(self._about(exc)) from None
        except Pyro5.errors.CommunicationError as exc:
            raise NameServerUnavailableError(self._about(exc)) from None
        try:
            conn.set_timeout(self.settings.connect_timeout)
            if self._leasing is None:
                self._leasing = "lease" in (meta.get("methods") or ())
            try:
                return invoke(conn, method, args, kwargs)
            except Pyro5.errors.TimeoutError as exc:
                if remote_traceback(exc) is not None:
                    raise
                raise NameServerUnavailableError(f"name server at {self.address} did not answer within "
                                                 f"{self.settings.connect_timeout:g}s") from None
            except Pyro5.errors.CommunicationError as exc:
                if remote_traceback(exc) is not None:
                    raise
                raise NameServerUnavailableError(f"name server at {self.address}: connection lost: {exc}") \
                    from None
        finally:
            conn.close()

    def _about(self, exc: Exception) -> str:
        """``exc``'s message (which names the address) saying that the address is the name server's."""
        text, where = str(exc), str(self.address)
        if where in text:
            return text.replace(where, f"the name server at {where}", 1)
        return f"name server at {where}: {text}"

    @property
    def leasing(self) -> bool:
        """True when the server is pyrorpc's (leases, service index); False for a stock Pyro5 one."""
        if self._leasing is None:
            self.ping()
        return bool(self._leasing)

    def ping(self) -> None:
        self._call("ping")

    def count(self) -> int:
        return int(self._call("count"))

    def lookup(self, name: str) -> tuple[str, set[str]]:
        """``(uri, metadata)`` of a registered name. Raises Pyro5 NamingError for an unknown name."""
        uri, meta = self._call("lookup", name, return_metadata=True)
        return str(uri), set(meta or ())

    def list(self, prefix: str | None = None) -> dict[str, tuple[str, set[str]]]:
        result = self._call("list", prefix=prefix, return_metadata=True)
        return {name: (str(uri), set(meta or ())) for name, (uri, meta) in result.items()}

    def register(self, name: str, uri: str, metadata: Any = None) -> None:
        self._call("register", name, str(uri), metadata=sorted(metadata or ()))

    def remove(self, name: str) -> int:
        return int(self._call("remove", name))

    def lease(self, name: str, uri: str, metadata: Any, load: dict[str, Any], ttl: float | None) -> float | None:
        """Register-or-renew ``name``; returns the lease TTL, or None against a stock Pyro5 name server
        (where the name is re-registered if it went missing)."""
        if self.leasing:
            reply = self._call("lease", name, str(uri), sorted(metadata), load, ttl)
            return float(reply["ttl"])
        try:
            current, _meta = self.lookup(name)
        except Pyro5.errors.NamingError:
            current = None
        if current != str(uri):
            self.register(name, uri, metadata)
        return None

    def service_workers(self, service: str, with_metadata: bool = False) -> builtins.list[WorkerInfo]:
        """Live workers of ``service`` (O(its workers) on pyrorpc's name server); ``WorkerInfo.metadata``
        is filled only ``with_metadata``."""
        if self.leasing:
            records = self._call("service_workers", service, with_metadata)
            return [WorkerInfo.from_record(r["name"], r["uri"], r.get("metadata"), r.get("load"), r.get("age"),
                                           r.get("ttl"), service=service) for r in records]
        found = self._call("yplookup", meta_all=[SERVICE_TAG + service], return_metadata=True)
        return [WorkerInfo.from_record(name, uri, meta, service=service) for name, (uri, meta) in found.items()]

    def acquire_lock(self, name: str, owner: str, ttl: float) -> bool:
        """Take or renew the named lock for ``owner`` (pyrorpc's name server only); False if held by
        another owner. Renew it every TTL/3 while you hold it; it expires one TTL after the last renewal."""
        if not self.leasing:
            raise NameServerUnavailableError(f"name server at {self.address} is a stock Pyro5 one: no locks")
        return bool(self._call("acquire_lock", name, owner, ttl))

    def release_lock(self, name: str, owner: str) -> bool:
        return bool(self._call("release_lock", name, owner))

    def services(self) -> dict[str, int]:
        if self.leasing:
            return dict(self._call("services"))
        counts: dict[str, int] = {}
        for _name, (_uri, meta) in self.list().items():
            svc = _tags(meta).get("service")
            if svc:
                counts[svc] = counts.get(svc, 0) + 1
        return counts

"""Name-server client: registration, leases, service lookups; works with pyrorpc's and stock Pyro5's server."""

from __future__ import annotations

import builtins
import dataclasses
import logging
import math
import socket
import threading
import time
import weakref
from typing import Any

import Pyro5.core
import Pyro5.errors

from .compat import remote_traceback
from .config import Address, Addresses, Settings
from .errors import AuthenticationError, MessageTooLargeError, NameServerUnavailableError
from .security import open_connection
from .wire import LimitedConnection, invoke

log = logging.getLogger("pyrorpc.naming")

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


# Operations that may run twice with the same outcome: after a connection is lost mid-call they are sent
# again (on a fresh connection, or to the next name server). ``remove`` and ``release_lock`` would answer
# differently the second time, so they are not.
IDEMPOTENT = frozenset({"ping", "count", "lookup", "list", "yplookup", "register", "set_metadata", "lease",
                        "lease_many", "renew", "service_workers", "services", "watch_service", "acquire_lock"})
MAX_WATCH = 30.0  # seconds a watch_service call may wait on the name server (it caps it the same way)
_MAX_IDLE = 4  # idle connections kept per name server and kind (plain, multiplexed)
_BACKOFF = (1.0, 30.0)  # seconds a name server that failed is tried after the others: first, at most


def _infos(records: Any, service: str) -> builtins.list[WorkerInfo]:
    return [WorkerInfo.from_record(r["name"], r["uri"], r.get("metadata"), r.get("load"), r.get("age"), r.get("ttl"),
                                   service=service) for r in records]


def _ns_uri(address: Address) -> Pyro5.core.URI:
    return Pyro5.core.URI(f"PYRO:{Pyro5.core.NAMESERVER_NAME}@{address}")


def _about(address: Address, exc: Exception) -> str:
    """``exc``'s message (which names the address) saying that the address is the name server's."""
    text, where = str(exc), str(address)
    if where in text:
        return text.replace(where, f"the name server at {where}", 1)
    return f"name server at {where}: {text}"


class _Unreachable(Exception):
    """One name server did not answer (internal): ``sent`` when the request may have reached it."""

    def __init__(self, message: str, sent: bool, timed_out: bool = False) -> None:
        super().__init__(message)
        self.sent = sent
        self.timed_out = timed_out  # no answer in time: hung or overloaded, not a connection found closed


class _Connections:
    """The idle connections of one NameServerClient, per (address, multiplexed); a finalizer closes them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.idle: dict[tuple[Address, bool], list[LimitedConnection]] = {}
        self.busy: set[LimitedConnection] = set()
        self.closed = False
        self.closings = 0  # how many times close() ran: an operation it cut short is not sent again

    def take(self, key: tuple[Address, bool]) -> LimitedConnection | None:
        """An idle connection that is still open (a server that closed it, or is draining, made it
        readable), or None."""
        while True:
            with self.lock:
                idle = self.idle.get(key)
                if not idle:
                    return None
                conn = idle.pop()
                self.busy.add(conn)
            if conn.idle_and_alive():
                return conn
            self.drop(conn)

    def opened(self, conn: LimitedConnection) -> None:
        with self.lock:
            self.busy.add(conn)

    def give(self, key: tuple[Address, bool], conn: LimitedConnection) -> None:
        with self.lock:
            self.busy.discard(conn)
            idle = self.idle.setdefault(key, [])
            if not (self.closed or conn.broken or conn.draining or len(idle) >= _MAX_IDLE):
                idle.append(conn)
                return
        conn.close()

    def drop(self, conn: LimitedConnection) -> None:
        with self.lock:
            self.busy.discard(conn)
        conn.close()

    def close(self) -> None:
        """Close the idle connections; cut the busy ones short (a call waiting on one fails at once)."""
        with self.lock:
            self.closed = True
            self.closings += 1
            idle = [c for conns in self.idle.values() for c in conns]
            self.idle.clear()
            busy = list(self.busy)
        for conn in idle:
            conn.close()
        for conn in busy:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


_ABSENT: Any = object()  # (no such field; as a delta: take a whole lease)


class _Held:
    """A lease this client holds: what its ``lease`` carried and the token a ``renew`` shows."""

    __slots__ = ("token", "uri", "tags", "ttl", "load")

    def __init__(self, token: int, uri: str, tags: list[str], ttl: float | None, load: dict[str, Any]) -> None:
        self.token, self.uri, self.tags, self.ttl, self.load = token, uri, tags, ttl, load

    def delta(self, uri: str, tags: list[str], load: dict[str, Any] | None, ttl: float | None) -> Any:
        """When a lease of ``uri``, ``tags``, ``load``, ``ttl`` renews this one: the load fields that changed
        (None if none did); ``_ABSENT`` when it takes a whole lease (another URI, tags, TTL or load fields)."""
        if uri != self.uri or tags != self.tags or ttl != self.ttl or (load or {}).keys() != self.load.keys():
            return _ABSENT
        return {k: v for k, v in load.items() if self.load.get(k, _ABSENT) != v} if load else None


class NameServerClient:
    """Talks to a name server, or to the first that answers of several (``Settings.ns`` may list them).

    Operations go over long-lived authenticated connections (one handshake, then one round trip per
    operation), kept idle between operations; threads share the client safely, each operation on a
    connection of its own. A connection found closed is replaced, and an operation whose connection broke
    is sent again once on a fresh one when running it twice is harmless (``IDEMPOTENT``). When a name
    server fails the client moves on to the next in the list and stays with the one that answers; a
    failed one is tried again, after the others, once its backoff has passed. Every operation has the
    ``connect_timeout``. ``close()`` (or a ``with`` block) closes the connections; the client can still be
    used afterwards, with a connection per operation.

    Raises (from every operation):
        NameServerUnavailableError: no name server could be reached or answered in time (the message
            names each one tried).
        AuthenticationError: a name server refused our credentials.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.addresses: Addresses = settings.ns
        self._current = self.addresses[0]
        self._failures: dict[Address, tuple[int, float]] = {}  # address -> (strikes, retry after)
        self._state_lock = threading.Lock()
        self._conns = _Connections()
        self._finalizer = weakref.finalize(self, self._conns.close)
        self._methods: frozenset[str] | None = None  # what the server's handshake listed
        self._leasing: bool | None = None  # does the server speak pyrorpc's lease API?
        self._held: dict[str, _Held] = {}  # name -> the lease we hold (renewed with ``renew``)

    def __repr__(self) -> str:
        return f"<NameServerClient {self.addresses}>"

    def __enter__(self) -> "NameServerClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close the kept connections (an operation under way on one fails with NameServerUnavailableError)."""
        self._conns.close()

    @property
    def address(self) -> Address:
        """The name server in use: the last one that answered (the first listed until one did)."""
        return self._current

    @property
    def uri(self) -> Pyro5.core.URI:
        return _ns_uri(self._current)

    # the one call path -----------------------------------------------------------------------------------
    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self._call_with(method, args, kwargs)

    def _call_with(self, method: str, args: Any, kwargs: Any, *, timeout: float | None = None,
                   mux: bool = False) -> Any:
        """Run ``method`` on the first name server that answers, starting with the one in use."""
        failed: list[str] = []
        refused: AuthenticationError | None = None
        refusals = 0
        closings = self._conns.closings
        candidates = self._candidates()
        for address in candidates:
            try:
                result = self._call_at(address, method, args, kwargs, timeout, mux)
            except Pyro5.errors.NamingError as exc:
                # a name server whose storage is away (it lost etcd) says so: the next one may have it
                if len(candidates) == 1 or method not in IDEMPOTENT or "etcd" not in str(exc):
                    raise
                self._failed(address)
                failed.append(f"name server at {address}: {exc}")
                continue
            except AuthenticationError as exc:
                if len(candidates) == 1:
                    raise
                # this one refuses our credentials (another cluster?): another name server may take them
                refused = refused or exc
                refusals += 1
                self._failed(address)
                failed.append(str(exc))
                continue
            except _Unreachable as exc:
                if self._conns.closings != closings:
                    raise NameServerUnavailableError(f"{exc} (the client was closed)") from None
                self._failed(address)
                failed.append(str(exc))
                if exc.sent and method not in IDEMPOTENT:
                    break  # it may have run: running it on another name server could do it twice
                continue
            self._answered(address)
            return result
        if refused is not None and refusals == len(failed):
            raise refused  # every one that answered refused us: a credentials problem, not an outage
        if len(candidates) == 1 or len(failed) == 1:
            raise NameServerUnavailableError(failed[0])
        tried = ", ".join(str(a) for a in candidates[:len(failed)])
        raise NameServerUnavailableError(f"no name server answered ({tried}): " + "; ".join(failed))

    def _candidates(self) -> list[Address]:
        """The name server in use first, then the others in order; those in their backoff last."""
        now = time.monotonic()
        with self._state_lock:
            current = self._current
            others = [a for a in self.addresses if a != current]
            ready = [a for a in others if self._failures.get(a, (0, 0.0))[1] <= now]
            waiting = sorted((a for a in others if a not in ready), key=lambda a: self._failures[a][1])
        return [current, *ready, *waiting]

    def _failed(self, address: Address) -> None:
        if len(self.addresses) == 1:
            return
        with self._state_lock:
            strikes = self._failures.get(address, (0, 0.0))[0] + 1
            backoff = min(_BACKOFF[1], _BACKOFF[0] * 2 ** min(strikes - 1, 8))
            self._failures[address] = (strikes, time.monotonic() + backoff)

    def _answered(self, address: Address) -> None:
        if address != self._current or self._failures:
            with self._state_lock:
                self._failures.pop(address, None)
                if address != self._current:
                    log.info("name server %s answers; using it (was %s)", address, self._current)
                    self._current = address

    def _call_at(self, address: Address, method: str, args: Any, kwargs: Any, timeout: float | None,
                 mux: bool) -> Any:
        """One operation on the name server at ``address``, over a kept connection if there is one; sent
        again once on a fresh connection if a kept one broke and the operation is idempotent."""
        key = (address, mux)
        conn = self._conns.take(key)
        if conn is not None:
            try:
                return self._invoke(key, conn, method, args, kwargs, timeout)
            except _Unreachable as exc:
                # a kept connection found closed is worth one fresh one; a name server that did not answer
                # in time (hung) is not asked again here: the next one in the list is (a worker's lease must
                # not wait out two timeouts on a hung name server)
                if (exc.sent and method not in IDEMPOTENT) or exc.timed_out or self._conns.closed:
                    raise
                log.debug("name server %s: kept connection lost (%s); reconnecting", address, exc)
        return self._invoke(key, self._connect(address, mux, timeout), method, args, kwargs, timeout)

    def _connect(self, address: Address, mux: bool, timeout: float | None = None) -> LimitedConnection:
        try:
            conn, meta = open_connection(_ns_uri(address), self.settings, mux=mux, timeout=timeout)
        except AuthenticationError as exc:
            raise AuthenticationError(_about(address, exc)) from None
        except Pyro5.errors.CommunicationError as exc:
            raise _Unreachable(_about(address, exc), sent=False) from None
        methods = meta.get("methods")
        self._methods = frozenset(m for m in methods if isinstance(m, str)) \
            if isinstance(methods, (set, frozenset, list, tuple)) else frozenset()
        self._leasing = "lease" in self._methods
        self._conns.opened(conn)
        return conn

    def _invoke(self, key: tuple[Address, bool], conn: LimitedConnection, method: str, args: Any, kwargs: Any,
                timeout: float | None) -> Any:
        address = key[0]
        wait = self.settings.connect_timeout if timeout is None else timeout
        try:
            conn.set_timeout(wait)
            result = invoke(conn, method, args, kwargs)
        except Pyro5.errors.TimeoutError as exc:
            if remote_traceback(exc) is not None:
                self._conns.give(key, conn)
                raise
            self._conns.drop(conn)
            raise _Unreachable(f"name server at {address} did not answer within {wait:g}s", sent=True,
                               timed_out=True) from None
        except Pyro5.errors.CommunicationError as exc:
            if remote_traceback(exc) is not None:
                self._conns.give(key, conn)
                raise
            self._conns.drop(conn)
            raise _Unreachable(f"name server at {address}: connection lost: {exc}", sent=True) from None
        except BaseException as exc:
            if remote_traceback(exc) is not None or isinstance(exc, MessageTooLargeError):
                self._conns.give(key, conn)  # the name server's own answer: the connection is fine
            else:
                self._conns.drop(conn)
            raise
        self._conns.give(key, conn)
        return result

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
        self._held.pop(name, None)
        return int(self._call("remove", name))

    def lease(self, name: str, uri: str, metadata: Any, load: dict[str, Any], ttl: float | None,
              timeout: float | None = None) -> float | None:
        """Register-or-renew ``name``; returns the lease TTL, or None against a stock Pyro5 name server
        (where the name is re-registered if it went missing). ``timeout``: how long one name server may take
        to answer before the next in the list is asked (default ``connect_timeout``; a worker passes a third
        of its TTL, so that a hung name server does not cost it its lease)."""
        if self._leasing is None:
            self._call_with("ping", (), {}, timeout=timeout)  # (what kind of name server: in the same time)
        if self.leasing:
            uri, tags = str(uri), sorted(metadata)
            held = self._held.get(name)
            delta = _ABSENT if held is None else held.delta(uri, tags, load, ttl)
            if held is not None and delta is not _ABSENT:
                # a heartbeat: the lease's token and the load fields that changed (a few dozen bytes). A name
                # server that does not know the token (another one, restarted, expired) answers None
                try:
                    renewed = self._call_with("renew", (name, held.token, delta), {}, timeout=timeout)
                except BaseException:
                    self._held.pop(name, None)  # it may or may not have arrived: the next one is a whole lease
                    raise
                if renewed is not None:
                    if delta:
                        held.load = {**held.load, **delta}
                    return float(renewed)
                self._held.pop(name, None)
            reply = self._call_with("lease", (name, uri, tags, load, ttl), {}, timeout=timeout)
            token = reply.get("token")
            if isinstance(token, int) and "renew" in (self._methods or ()):
                self._held[name] = _Held(token, uri, tags, ttl, dict(load or {}))
            else:
                self._held.pop(name, None)
            return float(reply["ttl"])
        try:
            current, _meta = self.lookup(name)
        except Pyro5.errors.NamingError:
            current = None
        if current != str(uri):
            self.register(name, uri, metadata)
        return None

    def lease_many(self, leases: Any, timeout: float | None = None) -> builtins.list[float | ValueError]:
        """Register-or-renew several names at once (pyrorpc's name server only): ``leases`` is an iterable of
        ``(name, uri, metadata, load, ttl)``, as ``lease`` takes them. Returns, in order, each lease's TTL,
        or a ValueError carrying the name server's reason for one it refused (the others still apply).

        As ``lease`` does one by one: the leases this client holds go as one ``renew_many`` (tokens and
        changed load fields), the others, and those the name server no longer knows, as one ``lease_many``.
        Two requests at most instead of one per worker: what a supervisor renewing for its children saves
        the name server. ``timeout`` as for ``lease``.

        Raises:
            NameServerUnavailableError: also against a stock Pyro5 name server (no leases there).
        """
        items = [[name, str(uri), sorted(metadata or ()), load, ttl] for name, uri, metadata, load, ttl in leases]
        if self._leasing is None:
            self._call_with("ping", (), {}, timeout=timeout)
        if not self.leasing or "lease_many" not in (self._methods or ()):
            raise NameServerUnavailableError(f"name server at {self.address} cannot renew several leases at once")
        results: list[float | ValueError | None] = [None] * len(items)
        renewals: list[tuple[int, dict[str, Any] | None, _Held]] = []
        if "renew_many" in (self._methods or ()):
            for i, (name, uri, tags, load, ttl) in enumerate(items):
                held = self._held.get(name)
                delta = _ABSENT if held is None else held.delta(uri, tags, load, ttl)
                if held is not None and delta is not _ABSENT:
                    renewals.append((i, delta, held))
        if renewals:
            flat = [x for i, delta, held in renewals for x in (items[i][0], held.token, delta)]
            try:
                answers = self._call_with("renew_many", tuple(flat), {}, timeout=timeout)
            except BaseException:
                for i, _delta, _held in renewals:
                    self._held.pop(items[i][0], None)
                raise
            for (i, delta, held), answer in zip(renewals, answers, strict=True):
                if isinstance(answer, (int, float)) and not isinstance(answer, bool):
                    if delta:
                        held.load = {**held.load, **delta}
                    results[i] = float(answer)
                else:
                    self._held.pop(items[i][0], None)
                    if isinstance(answer, dict):
                        results[i] = ValueError(answer.get("error"))
        whole = [i for i, r in enumerate(results) if r is None]
        if whole:
            renew = "renew" in (self._methods or ())
            for i, reply in zip(whole, self._call_with("lease_many", ([items[i] for i in whole],), {},
                                                                timeout=timeout),
                                strict=True):
                name = items[i][0]
                if isinstance(reply, dict) and "ttl" in reply:
                    results[i] = float(reply["ttl"])
                    token = reply.get("token")
                    if renew and isinstance(token, int):
                        self._held[name] = _Held(token, items[i][1], items[i][2], items[i][4], dict(items[i][3] or {}))
                    else:
                        self._held.pop(name, None)
                else:
                    self._held.pop(name, None)
                    results[i] = ValueError(reply.get("error") if isinstance(reply, dict) else repr(reply))
        return [r if r is not None else ValueError("no answer") for r in results]

    def service_workers(self, service: str, with_metadata: bool = False) -> builtins.list[WorkerInfo]:
        """Live workers of ``service`` (O(its workers) on pyrorpc's name server); ``WorkerInfo.metadata``
        is filled only ``with_metadata``."""
        if self.leasing:
            return _infos(self._call("service_workers", service, with_metadata), service)
        found = self._call("yplookup", meta_all=[SERVICE_TAG + service], return_metadata=True)
        return [WorkerInfo.from_record(name, uri, meta, service=service) for name, (uri, meta) in found.items()]

    @property
    def can_renew_many(self) -> bool:
        """True when the name server last connected to renews several leases by token (``renew_many``): what a
        supervisor renewing for its workers needs (pyrorpc.heartbeats)."""
        return "renew_many" in (self._methods or ())

    @property
    def can_watch(self) -> bool:
        """True when the server pushes membership changes (``watch_service``): False for a stock Pyro5 one."""
        if self._methods is None:
            # asked over the multiplexed connection a watch uses anyway: a pool keeps one connection, not two
            self._call_with("ping", (), {}, mux=True)
        return "watch_service" in (self._methods or ())

    def watch_service(self, service: str, version: Any = None, timeout: float = 10.0,
                      with_metadata: bool = False) -> tuple[Any, builtins.list[WorkerInfo]]:
        """``(version, workers)`` of ``service`` as soon as its membership version differs from ``version``
        (at once for None or a version of another name server), else after ``timeout`` seconds (at most
        MAX_WATCH); ``workers`` as ``service_workers`` gives them. The name server bumps the version on every
        registration, removal and expiry of a worker of the service (not on a lease renewal), so a caller
        that passes back the version it got learns of each change within a round trip.

        The call waits on the name server's event loop, over a multiplexed connection of its own: a waiting
        watch holds no thread there. pyrorpc's name server only (see ``can_watch``).
        """
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout >= 0:
            raise ValueError(f"`timeout` must be a number of seconds >= 0, got {timeout!r}")
        timeout = min(float(timeout), MAX_WATCH)
        reply = self._call_with("watch_service", (service, version, timeout, with_metadata), {},
                                timeout=timeout + self.settings.connect_timeout, mux=True)
        return reply["version"], _infos(reply["workers"], service)

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

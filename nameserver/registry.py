"""The name server object: Pyro5's NameServer plus leases, load reports and a per-service index."""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from typing import Any

import Pyro5.core
import Pyro5.errors
import Pyro5.nameserver
import Pyro5.server

from pyrorpc.context import current_call

log = logging.getLogger("pyrorpc.nameserver")

SERVICE_TAG = "pyrorpc.service:"
LEASE_TAG = "pyrorpc.lease:"
LOCK_TAG = "pyrorpc.lock:"
LOCK_URI = "PYRO:pyrorpc.lock@localhost:1"  # locks point nowhere; the registry needs a valid URI
MIN_TTL = 0.2
MAX_TTL = 86400.0
MAX_THREADS = 1_000_000
MAX_COUNT = 2**63 - 1
MAX_HOST_LENGTH = 255
MAX_STARTED = 1e12  # a Unix time (year 33658): clients read anything later as "unknown"
MAX_WATCH = 30.0  # seconds a watch_service call waits at most
MAX_LEASE_MANY = 1000  # leases one lease_many call may carry
_MAX_LOAD_KEYS = 32

Entry = tuple[str, frozenset[str]]


def services_of(metadata: Any) -> tuple[str, ...]:
    """Every service named by a ``pyrorpc.service:S`` tag in ``metadata``."""
    return tuple(t[len(SERVICE_TAG):] for t in metadata or () if isinstance(t, str) and t.startswith(SERVICE_TAG))


def lease_ttl_of(metadata: Any) -> float | None:
    """The TTL recorded by a ``pyrorpc.lease:TTL`` tag, or None."""
    for tag in metadata or ():
        if isinstance(tag, str) and tag.startswith(LEASE_TAG):
            try:
                return float(tag[len(LEASE_TAG):])
            except ValueError:
                return None
    return None


class IndexedStorage(MutableMapping):  # type: ignore[type-arg]
    """Wraps a Pyro5 storage (memory or SQLite) and keeps a service -> {name: (uri, metadata)} index.

    Every mutation of the registry goes through this mapping, so the index stays exact whichever
    NameServer method (inherited or ours) changed it. ``on_forget(name)`` is called for every name that
    is removed or overwritten, so the owner can drop its lease; ``on_change(services)`` for every change of
    a service's membership (set it after construction; the NameServer bumps that service's version).
    """

    on_change: Callable[[Iterable[str]], None] | None = None

    def __init__(self, inner: Any, on_forget: Callable[[str], None]) -> None:
        self.inner = inner
        self.on_forget = on_forget
        self.by_service: dict[str, dict[str, Entry]] = {}
        self.service_by_name: dict[str, tuple[str, ...]] = {}
        for name, (uri, meta) in inner.everything(return_metadata=True).items():
            self._index(name, str(uri), meta)

    # index upkeep
    def _index(self, name: str, uri: str, metadata: Any) -> None:
        services = services_of(metadata)
        if services:
            entry = (uri, frozenset(metadata))
            for svc in services:
                self.by_service.setdefault(svc, {})[name] = entry
            self.service_by_name[name] = services
            if self.on_change is not None:
                self.on_change(services)

    def _unindex(self, name: str) -> None:
        services = self.service_by_name.pop(name, ())
        for svc in services:
            members = self.by_service.get(svc)
            if members is not None:
                members.pop(name, None)
                if not members:
                    del self.by_service[svc]
        if services and self.on_change is not None:
            self.on_change(services)

    def changed(self, key: str, value: Entry | None) -> None:
        """``key`` changed in the inner storage by another way than this mapping (an etcd watch: another
        name server wrote it, or its lease ran out); ``value`` is its new ``(uri, metadata)`` or None."""
        if value is not None:
            uri, metadata = value
            services = services_of(metadata)
            if services and all(self.by_service.get(svc, {}).get(key) == (uri, frozenset(metadata))
                                for svc in services) and self.service_by_name.get(key) == services:
                return  # the same registration (a new load report): no membership change
        self._unindex(key)
        if value is not None:
            self._index(key, value[0], value[1] or ())

    # MutableMapping
    def __getitem__(self, key: str) -> Any:
        return self.inner[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.inner[key] = value
        self._unindex(key)
        self.on_forget(key)
        uri, metadata = value
        self._index(key, str(uri), metadata or ())

    def __delitem__(self, key: str) -> None:
        del self.inner[key]
        self._unindex(key)
        self.on_forget(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.inner)

    def __len__(self) -> int:
        return len(self.inner)

    def __contains__(self, key: object) -> bool:
        return key in self.inner

    def clear(self) -> None:
        names = list(self.inner)
        self.inner.clear()
        services = list(self.by_service)
        self.by_service.clear()
        self.service_by_name.clear()
        for name in names:
            self.on_forget(name)
        if services and self.on_change is not None:
            self.on_change(services)

    # the optional storage protocol of Pyro5's NameServer
    def optimized_prefix_list(self, prefix: str, return_metadata: bool = False) -> Any:
        return self.inner.optimized_prefix_list(prefix, return_metadata)

    def optimized_regex_list(self, regex: str, return_metadata: bool = False) -> Any:
        return self.inner.optimized_regex_list(regex, return_metadata)

    def optimized_metadata_search(self, metadata_all: Any = None, metadata_any: Any = None,
                                  return_metadata: bool = False) -> Any:
        if metadata_all:
            wanted = frozenset(metadata_all)
            services = [t[len(SERVICE_TAG):] for t in wanted if isinstance(t, str) and t.startswith(SERVICE_TAG)]
            if services:
                # O(workers of the service) instead of a scan of the whole registry
                members = self.by_service.get(services[0], {})
                return {name: ((uri, set(meta)) if return_metadata else uri)
                        for name, (uri, meta) in members.items() if wanted <= meta}
        return self.inner.optimized_metadata_search(metadata_all, metadata_any, return_metadata)

    def everything(self, return_metadata: bool = False) -> Any:
        return self.inner.everything(return_metadata)

    def remove_items(self, items: Any) -> None:
        items = list(items)
        self.inner.remove_items(items)
        for name in items:
            self._unindex(name)
            self.on_forget(name)

    def close(self) -> None:
        self.inner.close()


class Lease:
    """One leased registration: its TTL, when it was last renewed, and the load its worker reported."""

    __slots__ = ("ttl", "renewed", "load", "uri", "token")

    def __init__(self, ttl: float, uri: str, load: dict[str, Any] | None = None) -> None:
        self.ttl = ttl
        self.uri = uri
        self.renewed = time.monotonic()
        self.load: dict[str, Any] = load or {}
        self.token = secrets.randbits(62)  # what ``renew`` must show: given to the lease's holder only

    def expired(self, now: float) -> bool:
        return now - self.renewed > self.ttl


@Pyro5.server.expose
class NameServer(Pyro5.nameserver.NameServer):
    """Pyro5's name server with leases and a service index; a drop-in with the same constructor.

    Inherited methods (``lookup``, ``register``, ``list``, ``yplookup``, ``remove``, ...) keep their
    behaviour; ``yplookup(meta_all={"pyrorpc.service:S"})`` is answered from the service index. Added:
    ``lease`` (register-or-renew with a load report), ``service_workers``, ``services``, ``expire``,
    ``acquire_lock`` / ``release_lock`` (a leased mutex, e.g. for "only one scheduler fires"),
    ``watch_service`` (a long poll: a service's workers as soon as its membership changes), ``lease_many``
    (several leases in one request).
    """

    default_lease_ttl = 10.0
    # what the name server's I/O thread runs itself (Server.register(inline=)): microseconds each, no waiting
    INLINE = ("renew", "renew_many", "service_workers", "ping")
    INLINE_WORKERS = 64  # a service_workers reply of more workers is built on a call thread (_inline_ok)

    def __init__(self, storageProvider: Any = None) -> None:  # noqa: N803 - Pyro5's signature
        inner = storageProvider if storageProvider is not None else Pyro5.nameserver.MemoryStorage()
        # a storage that keeps leases itself (etcd) takes the lease and lock calls, and its ``leases`` mapping
        # stands for ours; memory and SQLite leases live in this process
        self._backend: Any = inner if getattr(type(inner), "keeps_leases", False) else None
        self.leases: dict[str, Lease] = {} if self._backend is None else self._backend.leases
        self._leasing = threading.local()
        # membership versions: "EPOCH:N", N from one counter for every service, EPOCH random per name server,
        # so a version is never reused, not even by another name server or after a restart
        self._epoch = secrets.token_hex(4)
        self._version_count = 0
        self._versions: dict[str, str] = {}
        # service -> the futures its watches wait on (a dict: a watch that ends removes itself in O(1))
        self._watchers: dict[str, dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]] = {}
        self._watch_lock = threading.Lock()
        self._watch_replies: dict[tuple[str, bool], tuple[str, float, list[Any]]] = {}  # shared for a moment
        self._watches_released = False  # the server is stopping: watches answer at once
        # since start, for metrics (pyrorpc.metrics.NameServerCollector): plain increments
        self.counts = {"registrations": 0, "renewals": 0, "lookups": 0, "expiries": 0}
        super().__init__(IndexedStorage(inner, self._forget))
        self.storage.on_change = self._membership_changed
        if self._backend is not None:
            self._backend.attach(self.lock, self.storage.changed)
            return
        # leases restart their clock on load: a persisted worker that does not come back expires
        for wname, (uri, meta) in inner.everything(return_metadata=True).items():
            ttl = lease_ttl_of(meta)
            if ttl is not None:
                self.leases[wname] = Lease(ttl, str(uri))

    def _inline_ok(self, method: str, args: Any) -> bool:
        """Whether the server's I/O thread may run this call of an INLINE method itself (it takes
        microseconds): not a lookup of a big service, whose reply takes a while to build."""
        if method == "service_workers":
            members = self.storage.by_service.get(args[0]) if args and isinstance(args[0], str) else None
            return members is None or len(members) <= self.INLINE_WORKERS
        return True

    def set_metadata(self, name: str, metadata: Any) -> None:
        """Pyro5's set_metadata; a leased entry keeps its lease (and so still expires if not renewed)."""
        if self._backend is not None:
            if not isinstance(name, str):
                raise TypeError("name must be a str")
            if isinstance(metadata, str):
                raise TypeError("metadata should not be a str, but another iterable (set, list, etc)")
            with self.lock:
                self._backend.set_metadata(name, set(metadata) if metadata is not None else None)
            return
        self._leasing.active = True
        try:
            super().set_metadata(name, metadata)
        finally:
            self._leasing.active = False

    def _membership_changed(self, services: Iterable[str]) -> None:
        """A service's membership changed (any thread): bump its version, wake its watchers."""
        woken: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        with self._watch_lock:
            for svc in services:
                self._version_count += 1
                self._versions[svc] = f"{self._epoch}:{self._version_count}"
                woken.extend(self._watchers.pop(svc, {}).values())
                if svc not in self.storage.by_service:
                    # no worker left: forget its version (a watch then sees "EPOCH:0", a change all the same),
                    # so services that come and go leave nothing behind
                    del self._versions[svc]
        self._wake_all(woken)

    @staticmethod
    def _wake_all(woken: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        for loop, fut in woken:
            by_loop.setdefault(loop, []).append(fut)
        for loop, futures in by_loop.items():
            try:
                loop.call_soon_threadsafe(_wake_many, futures)  # (one wake-up of the loop for all of them)
            except RuntimeError:  # its loop closed (the server is shutting down)
                pass

    def release_watches(self) -> None:
        """The server is stopping: every watch under way answers now (its caller can move on to another
        name server at once), and new ones answer at once."""
        with self._watch_lock:
            self._watches_released = True
            woken = [w for waiting in self._watchers.values() for w in waiting.values()]
            self._watchers.clear()
        self._wake_all(woken)

    def membership_version(self, service: str) -> str:
        """The current membership version of ``service`` (it changes whenever one of its workers is
        registered, re-registered, removed or expires; not on a lease renewal)."""
        with self._watch_lock:
            return self._versions.get(service, f"{self._epoch}:0")

    async def watch_service(self, service: str, version: Any = None, timeout: float = 10.0,
                            with_metadata: bool = False) -> dict[str, Any]:
        """A long poll: ``{"version": v, "workers": [...]}`` (records as ``service_workers`` gives them) as
        soon as the membership version of ``service`` differs from ``version`` (at once for None, or a
        version from another name server or an earlier run), else after ``timeout`` seconds (capped at
        MAX_WATCH). Runs on the server's event loop: a waiting watch holds no call thread when its caller
        uses a multiplexed connection.

        Raises:
            TypeError, ValueError: a bad argument, naming it.
        """
        if not isinstance(service, str):
            raise TypeError("service must be a str")
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout >= 0:
            raise ValueError(f"timeout must be a number of seconds >= 0, got {timeout!r}")
        call = current_call()
        if call is not None and call.holds_thread:
            timeout = 0  # a plain connection (a stock Pyro5 proxy): a call thread waits for us, so no waiting
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(float(timeout), MAX_WATCH)
        while True:
            with self._watch_lock:
                current = self._versions.get(service, f"{self._epoch}:0")
                left = deadline - loop.time()
                if current != version or left <= 0 or self._watches_released:
                    break
                future = loop.create_future()
                self._watchers.setdefault(service, {})[id(future)] = (loop, future)
            try:
                await asyncio.wait_for(future, left)
            except asyncio.TimeoutError:
                pass
            finally:
                with self._watch_lock:
                    waiting = self._watchers.get(service)
                    if waiting is not None and waiting.pop(id(future), None) is not None and not waiting:
                        del self._watchers[service]
        return self._watch_reply(service, with_metadata)

    def _watch_reply(self, service: str, with_metadata: bool) -> dict[str, Any]:
        """The reply of a watch: the version and the records of one moment (index changes happen under the
        registry lock). The watches one change wakes share one list of records, built once within 0.1 s."""
        key = (service, with_metadata)
        now = time.monotonic()
        with self.lock:
            version = self.membership_version(service)
            cached = self._watch_replies.get(key)
            if cached is not None and cached[0] == version and now - cached[1] < 0.1:
                return {"version": version, "workers": cached[2]}
            workers = self.service_workers(service, with_metadata)
            if len(self._watch_replies) > 1000:
                self._watch_replies.clear()
            self._watch_replies[key] = (version, now, workers)
        return {"version": version, "workers": workers}

    def _forget(self, name: str) -> None:
        if not getattr(self._leasing, "active", False):
            self.leases.pop(name, None)

    def lease(self, name: str, uri: str, metadata: Any = None, load: Any = None,
              ttl: float | None = None) -> dict[str, Any]:
        """Register ``name`` with a lease, or renew its lease; returns ``{"ttl": s, "created": bool}``.

        The entry is (re)written only when it is missing or its URI or metadata changed, so a renewal
        costs no storage write. ``load`` is a small dict the worker reports; its known fields are checked
        (see ``check_load``) and a lease carrying a bad one is refused whole, so no client ever sees
        ``threads=-1``; other keys are kept only when they are short strings or numbers. Without ``ttl``
        the server's default lease TTL applies.

        Raises:
            TypeError, ValueError: a bad argument, naming it; nothing is registered or renewed then.
        """
        if not isinstance(name, str) or not name or name == Pyro5.core.NAMESERVER_NAME:
            raise TypeError("name must be a non-empty str")
        if isinstance(uri, Pyro5.core.URI):
            uri = str(uri)
        if not isinstance(uri, str):
            raise TypeError("uri must be a str")
        Pyro5.core.URI(uri)  # validates
        if ttl is None:
            ttl = self.default_lease_ttl
        if not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or not MIN_TTL <= ttl <= MAX_TTL:
            raise ValueError(f"ttl must be between {MIN_TTL} and {MAX_TTL} seconds")
        ttl = float(ttl)
        if metadata is None:
            metadata = ()
        if isinstance(metadata, str):
            raise TypeError("metadata should not be a str, but another iterable (set, list, etc)")
        tags = {t for t in metadata if isinstance(t, str) and not t.startswith(LEASE_TAG)}
        tags.add(f"{LEASE_TAG}{ttl:g}")
        clean_load = check_load(load)
        if self._backend is not None:
            result = dict(self._backend.lease(name, uri, tags, clean_load, ttl))
            self._leased(name, tags, bool(result.get("created")))
            return result
        with self.lock:
            current = self.leases.get(name)
            try:
                old_uri, old_meta = self.storage[name]
            except KeyError:
                old_uri, old_meta = None, None
            created = old_uri is None
            if created or str(old_uri) != uri or set(old_meta or ()) != tags:
                self._leasing.active = True
                try:
                    self.storage[name] = uri, tags
                finally:
                    self._leasing.active = False
                current = None
            if current is None or current.ttl != ttl:
                current = self.leases[name] = Lease(ttl, uri)
            current.renewed = time.monotonic()
            current.load = clean_load
            token = current.token
        self._leased(name, tags, created)
        return {"ttl": ttl, "created": created, "token": token}

    def renew(self, name: str, token: int, load: Any = None) -> float | None:
        """Renew the lease ``name`` cheaply (what a worker's heartbeat sends once it holds the lease): ``token``
        is the one the lease's last ``lease`` reply carried, ``load`` only the load report's fields that
        changed since (merged into the report; checked as ``lease`` checks it; a field the report does not
        have yet takes a whole lease). Returns the lease TTL, or None when this name server has no such lease
        under that token (it expired, the name server restarted, another name server holds it) or wants the
        whole lease: the holder then sends a whole ``lease``.

        It runs on the name server's I/O thread (no call thread, no registry lock): it only touches the lease.

        Raises:
            TypeError, ValueError: a bad ``load``; nothing is renewed then.
        """
        clean = check_load(load) if load else None
        if self._backend is not None:
            ttl = self._backend.renew(name, token, clean)
        else:
            lease = self.leases.get(name) if type(name) is str else None
            now = time.monotonic()
            if lease is None or lease.token != token or lease.expired(now):
                return None  # (an expired lease the sweep has not removed yet is not revived: a whole lease is)
            if clean and not clean.keys() <= lease.load.keys():
                return None  # a field the lease's report does not have: a whole lease sets the report anew
            lease.renewed = now
            if clean:
                lease.load = {**lease.load, **clean}
            if self.leases.get(name) is not lease:
                return None  # (the sweep removed it meanwhile)
            ttl = lease.ttl
        if ttl is not None:
            self.counts["renewals"] += 1
        return ttl

    def _leased(self, name: str, tags: set[str], created: bool) -> None:
        if not created:
            self.counts["renewals"] += 1
            return
        self.counts["registrations"] += 1
        services = services_of(tags)
        if services:  # (a lock is a lease too)
            log.info("lease registered: %s", name, extra={"event": "registered", "worker": name,
                                                          "service": services[0]})

    def renew_many(self, *renewals: Any) -> list[float | None]:
        """Several ``renew`` calls in one request (a supervisor renewing for its children): the arguments are
        ``name, token, load`` triples one after the other (a flat argument list decodes fastest); returns each
        one's ``renew`` answer in order: the TTL, None (send a whole lease), or ``{"error": "..."}`` for one
        refused (the others still apply).

        Raises:
            TypeError, ValueError: not triples, or more than MAX_LEASE_MANY; nothing is renewed then.
        """
        if len(renewals) % 3:
            raise TypeError("renew_many takes name, token, load triples")
        if len(renewals) > 3 * MAX_LEASE_MANY:
            raise ValueError(f"at most {MAX_LEASE_MANY} renewals per call, got {len(renewals) // 3}")
        replies: list[Any] = []
        for i in range(0, len(renewals), 3):
            try:
                replies.append(self.renew(*renewals[i:i + 3]))
            except (TypeError, ValueError, Pyro5.errors.PyroError) as exc:
                replies.append({"error": f"{type(exc).__name__}: {exc}"})
        return replies

    def lease_many(self, leases: Any) -> list[dict[str, Any]]:
        """Several ``lease`` calls in one request (one process renewing for several workers): ``leases`` is a
        list of ``[name, uri, metadata, load, ttl]`` (at most MAX_LEASE_MANY); returns, in order, each one's
        ``lease`` reply, or ``{"error": "TypeError: ..."}`` for one refused (the others still apply).

        Raises:
            TypeError, ValueError: ``leases`` is not such a list, or too long; nothing is renewed then.
        """
        if not isinstance(leases, (list, tuple)):
            raise TypeError("leases must be a list of [name, uri, metadata, load, ttl]")
        if len(leases) > MAX_LEASE_MANY:
            raise ValueError(f"at most {MAX_LEASE_MANY} leases per call, got {len(leases)}")
        replies: list[dict[str, Any]] = []
        for item in leases:
            try:
                if not isinstance(item, (list, tuple)) or len(item) != 5:
                    raise TypeError("each lease must be [name, uri, metadata, load, ttl]")
                replies.append(self.lease(*item))
            except (TypeError, ValueError, Pyro5.errors.PyroError) as exc:
                replies.append({"error": f"{type(exc).__name__}: {exc}"})
        return replies

    def acquire_lock(self, name: str, owner: str, ttl: float) -> bool:
        """Take or renew the lock ``name`` for ``owner`` for ``ttl`` seconds; False while another owner
        holds it. A lock is a leased registration (tag ``pyrorpc.lock:OWNER``), so it expires like one:
        a holder that dies without unlocking loses it one TTL later."""
        if not isinstance(owner, str) or not owner or len(owner) > 200:
            raise TypeError("owner must be a non-empty str of at most 200 characters")
        if self._backend is not None:
            return bool(self._backend.acquire_lock(name, owner, ttl))
        tag = LOCK_TAG + owner
        with self.lock:
            now = time.monotonic()
            try:
                _uri, meta = self.storage[name]
            except KeyError:
                meta = None
            if meta is not None:
                holder = next((t for t in meta if isinstance(t, str) and t.startswith(LOCK_TAG)), None)
                current = self.leases.get(name)
                if holder is None and current is None:
                    raise ValueError(f"{name!r} is a plain registration, not a lock")
                if holder != tag and current is not None and not current.expired(now):
                    return False
            self.lease(name, LOCK_URI, [tag], None, ttl)
            return True

    def release_lock(self, name: str, owner: str) -> bool:
        """Release the lock ``name`` if ``owner`` holds it; returns whether it did."""
        if self._backend is not None:
            return bool(self._backend.release_lock(name, owner))
        with self.lock:
            try:
                _uri, meta = self.storage[name]
            except KeyError:
                return False
            if LOCK_TAG + owner not in meta:
                return False
            del self.storage[name]
            return True

    def service_workers(self, service: str, with_metadata: bool = False) -> list[dict[str, Any]]:
        """The registrations of one service, with lease and load data; costs O(its workers).

        Metadata tags are included with ``with_metadata`` and for registrations without a lease (whose
        load report is empty), to keep the frequent reply small."""
        if not isinstance(service, str):
            raise TypeError("service must be a str")
        now = time.monotonic()
        result = []
        self.counts["lookups"] += 1
        # no registry lock: it runs on the I/O thread (see INLINE), and a writer may hold the lock through a
        # storage write (SQLite, etcd); copying a dict of str keys is one step under the GIL, a consistent view
        members = list(self.storage.by_service.get(service, {}).items())
        leases = self.leases
        for name, (uri, meta) in members:
            lease = leases.get(name)
            if lease is not None and lease.expired(now):
                continue
            record: dict[str, Any] = {"name": name, "uri": uri, "load": lease.load if lease else {},
                                      "ttl": lease.ttl if lease else None,
                                      "age": round(now - lease.renewed, 3) if lease else None}
            if with_metadata or lease is None or not lease.load:
                record["metadata"] = sorted(meta)
            result.append(record)
        return result

    def services(self) -> dict[str, int]:
        """Every service in the index with its number of registrations."""
        with self.lock:
            return {svc: len(members) for svc, members in self.storage.by_service.items()}

    def expire(self) -> list[str]:
        """Drop every registration whose lease was not renewed within its TTL; returns their names."""
        if self._backend is not None:
            dead = list(self._backend.expire())
            self._expired({name: () for name in dead})
            return dead
        now = time.monotonic()
        with self.lock:
            dead = [name for name, lease in self.leases.items() if now - lease.renewed > lease.ttl]  # (Lease.expired)
            services = {name: self.storage.service_by_name.get(name, ()) for name in dead}
            if dead:
                self.storage.remove_items([n for n in dead if n in self.storage])
                for name in dead:
                    self.leases.pop(name, None)
        self._expired(services)
        return dead

    def _expired(self, services: dict[str, tuple[str, ...]]) -> None:
        self.counts["expiries"] += len(services)
        for name, svcs in services.items():
            log.info("lease expired: %s", name, extra={"event": "expired", "worker": name,
                                                       "service": svcs[0] if svcs else None})



def _wake_many(futures: list["asyncio.Future[None]"]) -> None:
    for fut in futures:
        if not fut.done():
            fut.set_result(None)


def _count(key: str, low: int, high: int) -> Callable[[Any], Any]:
    def check(value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ValueError(f"load[{key!r}] must be an integer {low}-{high}, got {value!r}")
        return value
    return check


def _host(value: Any) -> str:
    if not isinstance(value, str) or len(value) > MAX_HOST_LENGTH:
        raise ValueError(f"load['host'] must be a str of at most {MAX_HOST_LENGTH} characters, got {value!r:.80}")
    return value


def _started(value: Any) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < MAX_STARTED:
        raise ValueError(f"load['started'] must be a Unix time (0 <= started < {MAX_STARTED:g}), got {value!r}")
    return float(value)


# The fields of a worker's load report that clients act on (Pool capacity, balancing, `pyrorpc workers`).
LOAD_FIELDS: dict[str, Callable[[Any], Any]] = {
    "threads": _count("threads", 1, MAX_THREADS),
    "in_flight": _count("in_flight", 0, MAX_COUNT),
    "calls": _count("calls", 0, MAX_COUNT),
    "errors": _count("errors", 0, MAX_COUNT),
    "connections": _count("connections", 0, MAX_COUNT),
    "pid": _count("pid", 0, 2**32 - 1),
    "host": _host,
    "started": _started,
}


def check_load(load: Any) -> dict[str, Any]:
    """The load report a lease may carry: None (nothing) or a dict whose known fields are well formed.

    Known fields: ``threads`` an int 1-MAX_THREADS; ``in_flight``, ``calls``, ``errors``, ``connections``
    ints >= 0; ``pid`` an int 0-2**32-1; ``host`` a str of at most MAX_HOST_LENGTH characters; ``started``
    a Unix time 0 <= started < MAX_STARTED (kept as a float). Any other key is kept when it is a str of at most 64
    characters whose value is a number or a str of at most 256 characters, up to 32 keys; the rest is
    dropped.

    Raises:
        TypeError: ``load`` is neither None nor a dict.
        ValueError: a known field has the wrong type or is out of range (the message names it).
    """
    if load is None:
        return {}
    if not isinstance(load, dict):
        raise TypeError(f"load must be a dict or None, got {type(load).__name__}")
    clean: dict[str, Any] = {}
    for key, value in load.items():
        check = LOAD_FIELDS.get(key) if isinstance(key, str) else None
        if check is not None:
            clean[key] = check(value)
    extras = 0
    for key, value in load.items():
        if extras >= _MAX_LOAD_KEYS:
            break
        if isinstance(key, str) and key not in LOAD_FIELDS and len(key) <= 64 \
                and isinstance(value, (int, float, str)) and not isinstance(value, bool) \
                and (not isinstance(value, str) or len(value) <= 256):
            clean[key] = value
            extras += 1
    return clean

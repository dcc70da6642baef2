"""etcd storage for the name server: one registry, its leases and locks in etcd, shared by several name servers.

Keys live under a prefix (``/pyrorpc/ns/`` unless the URL names another: ``etcd://h:p,h:p/myapp``):
``reg/NAME`` holds the JSON ``{"uri", "metadata": [...], "ttl": s|null, "load": {...}, "lease": id}``.

Leased registrations are owned by the name server their worker renews through: it writes them under its own
etcd lease (one per name server, kept alive every second or so, ``owner_ttl`` long), keeps each one's renewal
clock in memory and deletes the key (a transaction "if still mine") once a worker misses its TTL. So a renewal
costs no etcd request: only a changed load report is written, at once when a fixed field such as ``threads``
changed, and at most every ``load_interval`` seconds when only the counters did (those go with the others due,
one transaction a second). A worker that renews through another name server
moves its registration there with one write. If a name server dies, its registrations outlive it by at most
``owner_ttl``, in which its workers move to another name server, which takes them over.

A lock is a registration under an etcd lease of its own (``ceil(ttl)`` seconds; etcd's minimum is 2 s with its
default timing), created by a transaction "if absent" and renewed (a keepalive) only while its key is still the
holder's, so two name servers over one etcd never both grant it, and a dead holder's lock expires in etcd.

Every name server keeps the whole ``reg/`` range in memory: one read at start, then a prefix watch from that
revision; lookups and the service index are local reads. Writes go to etcd (concurrent ones together, in one
transaction: see etcd_client) and into the copy at once, tagged with their revision, so an older watch event
never undoes them. If the member it talks to fails, the name server moves to the next endpoint of the URL and
resumes the watch from the last revision it saw (a full read if etcd compacted that away); reads are served
from the copy meanwhile. ``Pyro5.NameServer`` (each name server's own address) is kept locally, never shared.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any

import Pyro5.core
import Pyro5.errors

from .etcd_client import (
    DEFAULT_PREFIX,
    MAX_BATCH,
    EtcdClient,
    EtcdError,
    _b64,
    _detail,
    _range_end,
    etcd_ttl,
    parse_url,
)

log = logging.getLogger("pyrorpc.nameserver.etcd")

LOCAL_NAMES = frozenset({Pyro5.core.NAMESERVER_NAME})  # each name server's own, never shared
LEASE_TAG = "pyrorpc.lease:"
LOCK_TAG = "pyrorpc.lock:"
LOCK_URI = "PYRO:pyrorpc.lock@localhost:1"
COUNTERS = frozenset({"in_flight", "calls", "errors", "connections"})  # load fields that change all the time
MIN_TTL, MAX_TTL = 0.2, 86400.0

Entry = tuple[str, frozenset[str]]
Listener = Callable[[str, "Entry | None"], None]


class Record:
    """One registration as this name server has it, with what the service index and leases need to know.

    ``renewed`` is when this name server last saw it written or renewed (``time.monotonic()``), ``seen`` when
    this version was written or first read; ``load`` is the freshest report this name server has (on its
    owner, newer than ``written``, the one in etcd). ``expired()`` is False: the owner deletes expired ones.
    """

    __slots__ = ("uri", "metadata", "ttl", "load", "written", "lease", "rev", "renewed", "seen")

    def __init__(self, uri: str, metadata: frozenset[str], ttl: float | None, load: dict[str, Any],
                 lease: int, rev: int) -> None:
        self.uri, self.metadata, self.ttl, self.lease, self.rev = uri, metadata, ttl, lease, rev
        self.load = self.written = load
        self.renewed = self.seen = time.monotonic()

    def expired(self, now: float) -> bool:
        return False

    def encode(self) -> bytes:
        return json.dumps({"uri": self.uri, "metadata": sorted(self.metadata), "ttl": self.ttl,
                           "load": self.written, "lease": self.lease}, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, value: bytes, rev: int) -> "Record":
        """Raises ValueError/TypeError/KeyError for a value pyrorpc did not write."""
        d = json.loads(value)
        ttl = d.get("ttl")
        load = d.get("load") or {}
        if not isinstance(load, dict):
            raise TypeError("load")
        return cls(str(d["uri"]), frozenset(str(t) for t in d.get("metadata") or ()),
                   None if ttl is None else float(ttl), load, int(d.get("lease") or 0), rev)


class LeaseView(Mapping):  # type: ignore[type-arg]
    """The leased registrations of an EtcdStorage, as the NameServer's ``leases`` mapping (name -> Record).

    Leases end in etcd, so ``pop`` (the NameServer forgetting one) changes nothing here."""

    def __init__(self, entries: dict[str, Record]) -> None:
        self._entries = entries

    def __getitem__(self, name: str) -> Record:
        rec = self._entries[name]
        if rec.ttl is None:
            raise KeyError(name)
        return rec

    def __iter__(self) -> Iterator[str]:
        return (name for name, rec in list(self._entries.items()) if rec.ttl is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def pop(self, name: str, default: Any = None) -> Any:
        return default


class EtcdStorage(MutableMapping):  # type: ignore[type-arg]
    """A Pyro5 name-server storage kept in etcd (see the module docstring), and the NameServer's lease backend
    (``lease``, ``set_metadata``, ``acquire_lock``, ``release_lock``, ``leases``).

    The constructor reads the registry once and takes this name server's owner lease; ``attach(lock,
    listener)`` starts the watch, which applies changes under ``lock`` and calls ``listener(name, (uri,
    metadata) or None)`` for every change not made through this mapping (so the NameServer's service index
    follows registrations made elsewhere), and the owner lease's keepalive (every ``check_interval``, at
    most a third of ``owner_ttl``), which is also the health check of the member in use.

    Raises:
        ValueError: etcd3gw is missing or no endpoint answered.
    """

    keeps_leases = True  # the NameServer hands it leases and locks (SqlStorage fails any getattr: a class flag)

    def __init__(self, endpoints: list[tuple[str, int]], prefix: str = DEFAULT_PREFIX, *,
                 owner_ttl: float = 10.0, load_interval: float = 10.0, timeout: float = 3.0, retry_for: float = 6.0,
                 check_interval: float = 1.0) -> None:
        self.etcd = EtcdClient(endpoints, timeout=timeout, retry_for=retry_for)
        self.prefix = prefix.encode() + b"reg/"
        self.end = _range_end(self.prefix)
        self.load_interval = load_interval
        self.timeout = timeout
        self.owner_ttl = etcd_ttl(owner_ttl)
        self.check_interval = min(check_interval, self.owner_ttl / 3)
        self.entries: dict[str, Record] = {}
        self.local: dict[str, Entry] = {}
        self.leases = LeaseView(self.entries)
        self.revision = 0  # every change up to this revision is in `entries`
        self._tombstones: dict[str, int] = {}  # name -> revision of a delete applied ahead of the watch
        self._lock: Any = threading.RLock()
        self._listener: Listener | None = None
        self._closed = threading.Event()
        self._watch_resp: Any = None
        self._watch_client: Any = None
        self._threads: list[threading.Thread] = []
        try:
            self._resync(notify=False)
            self.owner = self.etcd.grant(self.owner_ttl)  # the lease this name server's registrations live by
        except EtcdError as exc:
            self.etcd.close()
            raise ValueError(f"cannot read the registry from etcd: {exc}") from None
        self._owner_alive = time.monotonic()  # the last time etcd confirmed the owner lease
        self._dirty: dict[str, Record] = {}  # load reports to write with the next flush
        self._dirty_lock = threading.Lock()
        self._tokens: dict[str, int] = {}  # name -> what ``renew`` must show (its holder's, from ``lease``)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> "EtcdStorage":
        endpoints, prefix = parse_url(url)
        return cls(endpoints, prefix, **options)

    def attach(self, lock: Any, listener: Listener | None) -> None:
        """Share the NameServer's ``lock`` and start following etcd (watch + endpoint health check)."""
        self._lock, self._listener = lock, listener
        for target, name in ((self._watch_loop, "ns-etcd-watch"), (self._check_loop, "ns-etcd-check")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    # keys and the local copy ---------------------------------------------------------------------------
    def _key(self, name: str) -> bytes:
        return self.prefix + name.encode()

    def _name(self, key: bytes) -> str | None:
        if not key.startswith(self.prefix):
            return None
        try:
            name = key[len(self.prefix):].decode()
        except UnicodeDecodeError:
            return None
        return None if name in LOCAL_NAMES else name

    def _apply(self, name: str, rec: Record | None, rev: int, notify: bool) -> None:
        """Put etcd's state of ``name`` at revision ``rev`` into the copy, unless the copy is newer."""
        with self._lock:
            cur = self.entries.get(name)
            if rev <= (cur.rev if cur is not None else self._tombstones.get(name, 0)):
                return
            if rec is None:
                self._tombstones[name] = rev
                if cur is None:
                    return
                del self.entries[name]
                self._tokens.pop(name, None)
            else:
                self._tombstones.pop(name, None)
                self.entries[name] = rec
            if notify and self._listener is not None:
                self._listener(name, None if rec is None else (rec.uri, rec.metadata))

    def _decode(self, kv: dict[str, Any]) -> tuple[str, Record] | None:
        name = self._name(base64.b64decode(kv["key"]))
        if name is None:
            return None
        try:
            return name, Record.decode(base64.b64decode(kv.get("value", "")), int(kv["mod_revision"]))
        except (ValueError, TypeError, KeyError):
            log.warning("etcd key for %r does not hold a pyrorpc registration; ignored", name)
            return None

    def _resync(self, notify: bool) -> None:
        """Read the whole registry (at start, and when the watch lost history to a compaction)."""
        reply = self.etcd.range(self.prefix, self.end)
        rev = int(reply["header"]["revision"])
        fresh = dict(filter(None, (self._decode(kv) for kv in reply.get("kvs", ()))))
        with self._lock:
            for name in [n for n in self.entries if n not in fresh]:
                self._apply(name, None, rev, notify)
            for name, rec in fresh.items():
                self._apply(name, rec, rec.rev, notify)
            self.revision = max(self.revision, rev)
            self._tombstones = {n: r for n, r in self._tombstones.items() if r > self.revision}

    # the Pyro5 storage protocol ------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Entry:
        local = self.local.get(name)
        if local is not None:
            return local
        rec = self.entries[name]
        return rec.uri, rec.metadata

    def __setitem__(self, name: str, value: Any) -> None:
        uri, metadata = value
        meta = frozenset(metadata or ())
        if name in LOCAL_NAMES:
            self.local[name] = (str(uri), meta)
            return
        old = self.entries.get(name)
        rec = Record(str(uri), meta, None, {}, 0, 0)  # a plain registration: no lease
        rec.rev = self.etcd.put(self._key(name), rec.encode())
        self._apply(name, rec, rec.rev, notify=False)
        if old is not None:
            self._revoke_lock_lease(old)

    def __delitem__(self, name: str) -> None:
        if name in self.local:
            del self.local[name]
            return
        old = self.entries[name]
        self._apply(name, None, self.etcd.delete(self._key(name)), notify=False)
        self._revoke_lock_lease(old)

    def __iter__(self) -> Iterator[str]:
        return iter([*self.local, *self.entries])

    def __len__(self) -> int:
        return len(self.local) + len(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.local or name in self.entries

    def clear(self) -> None:
        self.local.clear()
        rev = self.etcd.delete(self.prefix, self.end)
        with self._lock:
            for name in list(self.entries):
                self._apply(name, None, rev, notify=False)

    def optimized_prefix_list(self, prefix: str, return_metadata: bool = False) -> Any:
        return None

    def optimized_regex_list(self, regex: str, return_metadata: bool = False) -> Any:
        return None

    def optimized_metadata_search(self, metadata_all: Any = None, metadata_any: Any = None,
                                  return_metadata: bool = False) -> Any:
        return None

    def everything(self, return_metadata: bool = False) -> Any:
        with self._lock:
            items = [*self.local.items(), *((n, (r.uri, r.metadata)) for n, r in self.entries.items())]
        return {n: (uri, set(meta)) if return_metadata else uri for n, (uri, meta) in items}

    def remove_items(self, items: Any) -> None:
        for name in list(items):
            if name in self:
                del self[name]

    def close(self) -> None:
        self._closed.set()
        self._kick_watch()
        for thread in self._threads:
            thread.join(2.0)
        self.etcd.close()

    # leases ------------------------------------------------------------------------------------------
    def lease(self, name: str, uri: str, tags: Any, load: dict[str, Any], ttl: float) -> dict[str, Any]:
        """Register ``name`` under this name server's owner lease, or renew it: in memory, plus a write when
        its load report is due or it was another name server's (see the module docstring). The NameServer
        checked the arguments.

        Raises:
            Pyro5.errors.NamingError: etcd is unreachable (a renewal must not look fine when it is not)."""
        if time.monotonic() - self._owner_alive > self.owner_ttl:
            raise EtcdError(f"this name server lost etcd ({', '.join(self.etcd.names)}) for over "
                            f"{self.owner_ttl} s; try another name server")
        tags = frozenset(tags)
        rec = self.entries.get(name)
        if rec is not None and rec.lease == self.owner and rec.uri == uri and rec.metadata == tags \
                and rec.ttl == ttl:
            rec.renewed = time.monotonic()
            rec.load = load
            self._loaded(name, rec)
            return {"ttl": ttl, "created": False, "token": self._token(name)}
        # new, changed, or owned by another name server (its worker renews here now): write it as ours
        if not self._put_leased(name, uri, tags, ttl, load, self.owner):
            self._owner_lost()
            if not self._put_leased(name, uri, tags, ttl, load, self.owner):
                raise EtcdError(f"etcd lost this name server's lease again while registering {name!r}")
        return {"ttl": ttl, "created": rec is None, "token": self._token(name)}

    def _token(self, name: str) -> int:
        token = self._tokens.get(name)
        if token is None:
            token = self._tokens[name] = secrets.randbits(62)
        return token

    def _loaded(self, name: str, rec: Record) -> None:
        """A renewal changed ``rec.load``: a changed fixed field is written now, counters with the next flush
        once the last write is ``load_interval`` old."""
        if self._fixed_fields_changed(rec):
            self._put_leased(name, rec.uri, rec.metadata, rec.ttl, rec.load, self.owner)
        elif rec.load != rec.written and rec.renewed - rec.seen >= self.load_interval:
            with self._dirty_lock:  # written with the others due by the next flush, in one transaction
                self._dirty[name] = rec

    def renew(self, name: str, token: int, load: dict[str, Any] | None) -> float | None:
        """NameServer.renew: the lease's TTL, or None unless this name server holds ``name`` under ``token``
        (in memory; a load report is written as ``lease`` writes it).

        Raises:
            Pyro5.errors.NamingError: etcd is unreachable (as for ``lease``)."""
        if time.monotonic() - self._owner_alive > self.owner_ttl:
            raise EtcdError(f"this name server lost etcd ({', '.join(self.etcd.names)}) for over "
                            f"{self.owner_ttl} s; try another name server")
        rec = self.entries.get(name) if type(name) is str else None
        now = time.monotonic()
        if rec is None or rec.lease != self.owner or rec.ttl is None:
            self._tokens.pop(name, None)
            return None
        if self._tokens.get(name) != token or now - rec.renewed > rec.ttl:
            return None
        merged = {**rec.load, **load} if load else None
        if merged is not None and (not load.keys() <= rec.load.keys()  # type: ignore[union-attr]
                                   or any(merged.get(k) != rec.written.get(k) for k in merged.keys() - COUNTERS)):
            return None  # a new or fixed field changed: a whole lease (its etcd write on a call thread)
        rec.renewed = now
        if merged is not None:
            rec.load = merged
            self._loaded(name, rec)  # (counters only: a write with the next flush, if one is due)
        return rec.ttl

    def expire(self) -> list[str]:
        """Delete the registrations this name server owns whose worker missed its TTL; returns their names.
        A registration another name server took over meanwhile is left alone (the delete is conditional)."""
        now = time.monotonic()
        owner = self.owner
        dead = [name for name, rec in list(self.entries.items())
                if rec.lease == owner and rec.ttl is not None and now - rec.renewed > rec.ttl]
        gone = []
        for name in dead:
            ok, rev, _current = self._txn_key(name, {"target": "LEASE", "lease": owner},
                                              [{"request_delete_range": {"key": _b64(self._key(name))}}])
            if ok:
                self._apply(name, None, rev, notify=True)
                gone.append(name)
        return gone

    @staticmethod
    def _fixed_fields_changed(rec: Record) -> bool:
        load, written = rec.load, rec.written
        return load != written and any(load.get(k) != written.get(k) for k in (set(load) | set(written)) - COUNTERS)

    def _flush_loads(self) -> None:
        """Write the load reports that are due, MAX_BATCH to a transaction (one alone costs etcd 1.4 ms of
        CPU and us 1 ms; one of a hundred, 0.1 ms in all)."""
        with self._dirty_lock:
            dirty, self._dirty = self._dirty, {}
        due = [(name, rec) for name, rec in dirty.items() if self.entries.get(name) is rec and rec.lease == self.owner]
        for start in range(0, len(due), MAX_BATCH):
            fresh = [(name, old, Record(old.uri, old.metadata, old.ttl, dict(old.load), old.lease, 0))
                     for name, old in due[start:start + MAX_BATCH]]
            try:
                _ok, reply = self.etcd.txn([], [op for name, _old, rec in fresh for op in self._put_op(name, rec)], [])
            except EtcdError as exc:  # the owner lease is gone (the keepalive sees to it) or etcd is away
                log.info("load reports not written: %s", exc)
                return
            rev = int(reply["header"]["revision"])
            for name, old, rec in fresh:
                rec.rev, rec.renewed = rev, old.renewed
                self._apply(name, rec, rev, notify=True)

    def _put_leased(self, name: str, uri: str, tags: frozenset[str], ttl: float | None, load: dict[str, Any],
                    lease: int) -> bool:
        """Write a registration under ``lease``; False if etcd no longer has that lease."""
        rec = Record(uri, tags, ttl, dict(load), lease, 0)
        try:
            rec.rev = self.etcd.put(self._key(name), rec.encode(), lease)
        except EtcdError as exc:
            if "lease not found" in str(exc):
                return False
            raise
        self._apply(name, rec, rec.rev, notify=True)
        return True

    def _revoke_lock_lease(self, rec: Record) -> None:
        """A lock's own lease goes with it (a registration's is its owner name server's: never revoked)."""
        if rec.lease and any(t.startswith(LOCK_TAG) for t in rec.metadata):
            self._revoke_quietly(rec.lease)

    def _owner_lost(self) -> None:
        """etcd dropped the owner lease (and our registrations with it: unreachable for longer than its TTL):
        take a new one; each worker's next renewal writes its registration again."""
        old, self.owner = self.owner, self.etcd.grant(self.owner_ttl)
        self._owner_alive = time.monotonic()
        log.warning("etcd dropped this name server's lease %x; registrations are written again as workers renew",
                    old)

    def _revoke_quietly(self, lease: int) -> None:
        try:
            self.etcd.revoke(lease)
        except EtcdError as exc:  # it runs out by itself
            log.info("could not revoke etcd lease %x: %s", lease, exc)

    def set_metadata(self, name: str, metadata: Any) -> None:
        """Pyro5's set_metadata; a leased registration keeps its lease.

        Raises:
            Pyro5.errors.NamingError: unknown name."""
        rec = self.entries.get(name)
        if rec is None:
            if name in self.local:
                self.local[name] = (self.local[name][0], frozenset(metadata or ()))
                return
            raise Pyro5.errors.NamingError("unknown name: " + name)
        meta = frozenset(metadata or ())
        if not rec.lease or not self._put_leased(name, rec.uri, meta, rec.ttl, rec.load, rec.lease):
            self[name] = rec.uri, meta
            if self._listener is not None:
                self._listener(name, (rec.uri, meta))

    # locks -------------------------------------------------------------------------------------------
    def _read(self, name: str) -> Record | None:
        """etcd's current registration of ``name`` (a linearizable read, not the local copy)."""
        return self._first(self.etcd.range(self._key(name)).get("kvs"))

    def _first(self, kvs: Any) -> Record | None:
        if not kvs:
            return None
        found = self._decode(kvs[0])
        if found is None:
            raise EtcdError("the registration in etcd was not written by pyrorpc")
        return found[1]

    def _txn_key(self, name: str, compare: dict[str, Any], success: list[dict[str, Any]]
                 ) -> tuple[bool, int, Record | None]:
        """A transaction on ``name``'s key: (succeeded, revision, the key's record when it failed)."""
        key = _b64(self._key(name))
        ok, reply = self.etcd.txn([{"key": key, "result": "EQUAL", **compare}], success,
                                  [{"request_range": {"key": key}}])
        current = None if ok else self._first(reply["responses"][0]["response_range"].get("kvs"))
        return ok, int(reply["header"]["revision"]), current

    def _put_op(self, name: str, rec: Record) -> list[dict[str, Any]]:
        return [{"request_put": {"key": _b64(self._key(name)), "value": _b64(rec.encode()), "lease": rec.lease}}]

    def acquire_lock(self, name: str, owner: str, ttl: float) -> bool:
        """Take or renew the lock ``name`` for ``owner`` (see NameServer.acquire_lock), atomically in etcd.

        Raises:
            ValueError: a bad ``ttl``, or ``name`` is a plain registration."""
        if not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or not MIN_TTL <= ttl <= MAX_TTL:
            raise ValueError(f"ttl must be between {MIN_TTL} and {MAX_TTL} seconds")
        ttl = float(ttl)
        tag = LOCK_TAG + owner
        cur = self._read(name)
        for _attempt in range(5):
            if cur is not None:
                holder = next((t for t in cur.metadata if t.startswith(LOCK_TAG)), None)
                if holder is None and not cur.lease:
                    raise ValueError(f"{name!r} is a plain registration, not a lock")
                if holder != tag:
                    return False
                if cur.ttl == ttl and self.etcd.keepalive(cur.lease) > 0:
                    # renewed; it is ours if the key is still the version we read (not removed, not retaken)
                    ok, _rev, cur = self._txn_key(name, {"target": "MOD", "mod_revision": cur.rev}, [])
                    if ok:
                        return True
                    continue
            old = cur
            rec = Record(LOCK_URI, frozenset({tag, f"{LEASE_TAG}{ttl:g}"}), ttl, {}, self.etcd.grant(etcd_ttl(ttl)),
                         0)
            compare = ({"target": "CREATE", "create_revision": 0} if old is None
                       else {"target": "MOD", "mod_revision": old.rev})
            ok, rec.rev, cur = self._txn_key(name, compare, self._put_op(name, rec))
            if ok:
                self._apply(name, rec, rec.rev, notify=True)
                if old is not None and old.lease:
                    self._revoke_quietly(old.lease)
                return True
            self._revoke_quietly(rec.lease)
        return False

    def release_lock(self, name: str, owner: str) -> bool:
        """Release the lock ``name`` if ``owner`` holds it; returns whether it did."""
        cur = self._read(name)
        if cur is None or LOCK_TAG + owner not in cur.metadata:
            return False
        ok, rev, _cur = self._txn_key(name, {"target": "MOD", "mod_revision": cur.rev},
                                      [{"request_delete_range": {"key": _b64(self._key(name))}}])
        if not ok:
            return False
        self._apply(name, None, rev, notify=True)
        if cur.lease:
            self._revoke_quietly(cur.lease)
        return True

    # following etcd ----------------------------------------------------------------------------------
    def _watch_loop(self) -> None:
        while not self._closed.is_set():
            client = self.etcd.current()
            try:
                why = self._watch(client)
            except Exception as exc:  # a broken stream, a member gone, garbage: move on, never stop
                why = f"{type(exc).__name__}: {_detail(exc)}"
            if self._closed.is_set():
                return
            if why:
                self.etcd.failed(client, why)
            self._closed.wait(0.05)

    def _watch(self, client: Any) -> str | None:
        """Follow the registry on ``client``'s member until its stream ends; returns why, or None to go on."""
        body = {"create_request": {"key": _b64(self.prefix), "range_end": _b64(self.end),
                                   "start_revision": self.revision + 1}}
        resp = client.session.post(client.get_url("/watch"), json=body, stream=True, timeout=(self.timeout, None))
        self._watch_resp, self._watch_client = resp, client
        try:
            if resp.status_code != 200:
                return f"watch refused: HTTP {resp.status_code}"
            if self.etcd.current() is not client:
                return None  # moved on meanwhile
            for line in resp.iter_lines(chunk_size=None):
                if self._closed.is_set():
                    return None
                if not line.strip():
                    continue
                result = json.loads(line).get("result")
                if result is None:
                    return f"watch error: {line[:200]!r}"
                if int(result.get("compact_revision") or 0) > 0 or result.get("canceled"):
                    log.warning("etcd watch from revision %d lost history; reading the registry again",
                                self.revision + 1)
                    self._resync(notify=True)
                    return None
                self._on_events(result.get("events") or ())
            return "watch stream ended"
        finally:
            self._watch_resp = self._watch_client = None
            resp.close()

    def _on_events(self, events: Any) -> None:
        with self._lock:
            for event in events:
                kv = event["kv"]
                rev = int(kv["mod_revision"])
                if event.get("type") == "DELETE":
                    name = self._name(base64.b64decode(kv["key"]))
                    if name is not None:
                        self._apply(name, None, rev, notify=True)
                else:
                    found = self._decode(kv)
                    if found is not None:
                        self._apply(found[0], found[1], rev, notify=True)
                self.revision = max(self.revision, rev)
            if self._tombstones:
                self._tombstones = {n: r for n, r in self._tombstones.items() if r > self.revision}

    def _kick_watch(self) -> None:
        """End the watch's blocking read (it then reconnects to the current member, or stops when closed)."""
        resp = self._watch_resp
        conn = getattr(getattr(resp, "raw", None), "connection", None)
        sock = getattr(conn, "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _check_loop(self) -> None:
        """Keep the owner lease alive every ``check_interval`` (a request the leader answers: a health check
        too). A member that fails it, or a watch left on another member, makes the watch move to the current
        one; a lease etcd no longer has is replaced."""
        while not self._closed.wait(self.check_interval):
            client = self.etcd.current()
            try:
                reply = client.post(client.get_url("/lease/keepalive"), json={"ID": self.owner})
                if int(reply["result"].get("TTL", -1)) > 0:
                    self._owner_alive = time.monotonic()
                else:
                    self._owner_lost()
            except Exception as exc:  # this member failed: the next check (and every request) uses another
                self.etcd.failed(client, _detail(exc))
            watching = self._watch_client
            if watching is not None and watching is not self.etcd.current():
                self._kick_watch()
            try:
                self._flush_loads()
            except Exception:  # pragma: no cover - never stop keeping the lease alive
                log.exception("writing load reports failed")

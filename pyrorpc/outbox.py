"""Outbox: calls kept in a local SQLite journal (WAL, group commit) and delivered with send() semantics by a
background sender, across crashes and restarts of the process that made them.

An entry is ``pending`` until a sender claims it (``in_flight``, under that sender's lease), then
``accepted`` once a worker acknowledged it, and deleted once the worker finished it. It ends ``failed``
(with its error) when the worker refused it (no such method, arguments it does not take) or the method
raised, and ``lost`` when the worker was lost after accepting it (it may or may not have run: an
``@idempotent`` method is re-sent instead, and is never lost). A sender that dies leaves its claims to
expire: ``in_flight`` entries go out again, and so do ``accepted`` ones (shown as ``unconfirmed`` until then):
each to the worker it went to, which remembers the ids it accepted (600 s) and answers a re-send with the
first run's outcome instead of running it again. An entry first sent over 540 s before is not re-sent: ``lost``.

Each claimed entry is given its worker in the claim's transaction, before anything is sent, and keeps it
until it is known not to have reached that worker. A re-send (the sender died, or the connection broke before
the acknowledgement came) goes to that same worker, whose memory of accepted ids keeps it from running twice;
if that worker is gone, the entry is ``lost`` (it may or may not have run), except for an ``@idempotent``
method, which goes to another worker.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import threading
import time
import urllib.parse
import uuid
from typing import TYPE_CHECKING, Any

import Pyro5.errors

from .acks import Ack
from .codec import dumps, loads
from .compat import remote_traceback
from .config import Settings, resolve
from .endpoint import NotSent
from .errors import CallTimeoutError, ConfigurationError, WorkerLostError
from .proxy import NoMux, send_loop

if TYPE_CHECKING:
    from .pool import Pool

__all__ = ["Outbox", "outbox_status"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    service TEXT NOT NULL,
    method TEXT NOT NULL,
    payload BLOB NOT NULL,
    created REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    owner TEXT,
    lease_until REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL DEFAULT 0,
    error TEXT,
    worker TEXT,
    sent_at REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS entries_state ON entries (state, seq);
"""
_INSERT = "INSERT INTO entries (id, service, method, payload, created) VALUES (?, ?, ?, ?, ?)"
_MAX_BACKOFF = 2.0
_CHECKPOINT_EVERY = 1.0  # seconds between checkpoints of the journal's write-ahead log, at most
_WAL_CHECKPOINT = 4 << 20  # bytes of write-ahead log that call for a checkpoint at once
_WAL_LIMIT = 16 << 20  # bytes the write-ahead log file is cut back to after a checkpoint
_WAL_RESTART = 32 << 20  # bytes of write-ahead log past which a checkpoint starts it over (writers wait)
_REMEMBERED = 540.0  # seconds after its first send an entry may go to its worker again (it remembers ids 600 s)


def _connect(path: str, sync: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={sync}")
    db.execute("PRAGMA busy_timeout=30000")
    # no checkpoint inside a commit: its fsync stalled every enqueue waiting on that commit for 5-10 ms (the
    # p99 of 8 threads enqueueing 10,000/s together went from 5.7 ms to 0.2 ms); Outbox's checkpointer does it
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute(f"PRAGMA journal_size_limit={_WAL_LIMIT}")  # (a log that grew in a burst shrinks back)
    return db


def _retryable(exc: BaseException) -> bool:
    """Worth sending again later (nobody to take it now, or the attempt did not get through); otherwise the
    entry failed for good (the worker refused it, or the method raised)."""
    if remote_traceback(exc) is not None:
        return False
    return isinstance(exc, Pyro5.errors.CommunicationError) and not isinstance(exc, Pyro5.errors.SerializeError) \
        or isinstance(exc, (Pyro5.errors.NamingError, RuntimeError))


def _process_gone(exc: BaseException | None) -> bool:
    """The connection was refused: no process listens at the worker's address any more."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, ConnectionRefusedError):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class Outbox:
    """A durable outbox: ``enqueue()`` appends a call to the SQLite journal at ``path`` and returns once it
    is committed (several threads' calls share a commit); a background sender delivers the entries to
    the workers of their service with ``send()`` semantics, oldest first, ``in_flight`` at a time, again
    and again (backing off up to 2 s) while no worker is up. Several processes may open the same file: each
    sender claims the entries it sends under a lease, renewed while it runs.

    Args:
        path: the journal file (created if missing).
        ns: name server ``HOST:PORT`` for the pools the sender makes.
        service: the default service of ``enqueue``.
        in_flight: entries the sender has outstanding at once (sent and not finished).
        lease: seconds a claim lasts without renewal (another process takes over a dead sender's entries
            after it).
        sync: SQLite's ``synchronous`` for the journal: ``"normal"`` (default; an enqueue survives the
            process being killed, not a power cut) or ``"full"`` (survives both; slower).
        send: run the background sender (False: only enqueue here; another process delivers).
        settings: a ``pyrorpc.Settings``; other keyword arguments (``timeout=``, ``secret=``...) override it.
        pools: internal: ``{service: Pool}`` to send through (a Pool made with ``outbox=``).
    """

    def __init__(self, path: str | os.PathLike[str], *, ns: Any = None, service: str | None = None,
                 in_flight: int = 64, lease: float = 10.0, sync: str = "normal", send: bool = True,
                 settings: Settings | None = None, pools: dict[str, Pool] | None = None, **options: Any) -> None:
        if not isinstance(in_flight, int) or in_flight < 1:
            raise ConfigurationError(f"`in_flight` must be a positive integer, got {in_flight!r}")
        if not isinstance(lease, (int, float)) or lease <= 0:
            raise ConfigurationError(f"`lease` must be positive, got {lease!r}")
        if sync not in ("normal", "full"):
            raise ConfigurationError(f"`sync` must be 'normal' or 'full', got {sync!r}")
        self.path = os.fspath(path)
        self.service = service
        self._settings = resolve(settings, ns=ns, **options)
        self._in_flight_limit = in_flight
        self._lease = float(lease)
        self._owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        try:
            self._db = _connect(self.path, sync.upper())
            self._db.executescript(_SCHEMA)
            self._migrate()
        except sqlite3.Error as exc:
            raise ConfigurationError(f"cannot open the outbox {self.path!r}: {exc}") from None
        self._sync = sync.upper()
        self._queue: list[list[Any]] = []  # rows waiting for the next commit (group commit: see enqueue)
        self._committed = threading.Condition(threading.Lock())
        self._committing = False
        self._pools: dict[str, Pool] = dict(pools or {})
        self._services: set[str] = set(self._pools)  # services that may have entries (see _ready_services)
        self._services_due = 0.0
        self._own_pools: list[Pool] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        # (seq, what happened, error, worker): for the sender thread to write down
        self._outcomes: list[tuple[int, str, str | None, str | None]] = []
        self._outcomes_lock = threading.Lock()
        self._active = 0  # entries claimed by this sender and not finished
        self._assigned: dict[str, int] = {}  # worker -> entries this sender gave it that are not finished
        self._waiting = False  # the sender has room and workers, and waits for entries
        self._idle = threading.Condition(threading.Lock())
        self._closed = False
        self._sender: threading.Thread | None = None
        if send:
            self._sender = threading.Thread(target=self._run, name="pyrorpc-outbox", daemon=True)
            self._sender.start()
        self._checkpointer = threading.Thread(target=self._checkpoint, name="pyrorpc-outbox-checkpoint", daemon=True)
        self._checkpointer.start()

    def __repr__(self) -> str:
        return f"<pyrorpc.Outbox {self.path!r}>"

    def _migrate(self) -> None:
        """An outbox of the version before entries had their worker: add the columns (once, whichever of the
        processes opening it comes first), and report what it left accepted as lost (which worker took them
        is not known, so asking again could run them twice)."""
        db = self._db
        if {"worker", "sent_at"} <= {row[1] for row in db.execute("PRAGMA table_info(entries)")}:
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            columns = {row[1] for row in db.execute("PRAGMA table_info(entries)")}  # (again, under the lock)
            if "worker" not in columns:
                db.execute("ALTER TABLE entries ADD COLUMN worker TEXT")
                db.execute("UPDATE entries SET state = 'lost', owner = NULL, error = 'accepted by a worker under an "
                           "older pyrorpc that did not record which: its outcome is unknown' WHERE state = 'accepted'")
            if "sent_at" not in columns:
                db.execute("ALTER TABLE entries ADD COLUMN sent_at REAL NOT NULL DEFAULT 0")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # enqueue: group commit ----------------------------------------------------------------------------
    def enqueue(self, method: str, args: tuple[Any, ...] | list[Any] = (), kwargs: dict[str, Any] | None = None,
                *, service: str | None = None) -> str:
        """Append a call of ``service.method(*args, **kwargs)`` to the journal; returns its entry id once
        it is committed (durable). Delivered later, exactly once unless its worker is lost mid-run (then
        ``lost``, or re-sent for an ``@idempotent`` method).

        Raises:
            ConfigurationError: no service given and no default, or a bad method name.
            TypeError: arguments serpent cannot write (nothing is stored).
        """
        service = service or self.service
        if not service:
            raise ConfigurationError("enqueue() needs a service: Outbox(service=...) or service=")
        if not isinstance(method, str) or not method or method.startswith("_"):
            raise ConfigurationError(f"not a callable remote method name: {method!r}")
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        payload = dumps((tuple(args), dict(kwargs or {})))
        entry_id = uuid.uuid4().hex
        slot: list[Any] = [(entry_id, service, method, payload, time.time()), False, None]
        with self._committed:
            self._queue.append(slot)
            while not slot[1] and self._committing:  # a commit is under way: the next one takes ours along
                self._committed.wait()
            batch: list[list[Any]] = []
            if not slot[1]:  # we commit every row queued so far (the others find theirs done)
                self._committing = True
                batch, self._queue = self._queue, []
        if batch:
            error: BaseException | None = None
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany(_INSERT, [s[0] for s in batch])
                self._db.execute("COMMIT")
            except BaseException as exc:
                error = exc
                try:
                    self._db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            with self._committed:
                for s in batch:
                    s[1], s[2] = True, error
                self._committing = False
                self._committed.notify_all()
        if slot[2] is not None:
            raise RuntimeError(f"{self.path}: the entry could not be stored: {slot[2]}") from slot[2]
        if service not in self._services:
            self._services.add(service)
        if self._waiting:
            self._wake.set()  # (only a sender with room and workers waits for new entries)
        return entry_id

    # status --------------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Counts of the entries by state (``pending``, ``in_flight``, ``accepted``, ``unconfirmed``,
        ``failed``, ``lost``) and the failed and lost entries themselves (``entries``)."""
        return outbox_status(self.path)

    def wait(self, timeout: float) -> bool:
        """Wait until no entry is pending, in flight or awaiting its outcome (accepted; with a sender here, also
        unconfirmed ones, which it settles); True if so."""
        deadline = time.monotonic() + timeout
        while True:
            counts = outbox_status(self.path)
            if not (counts["pending"] or counts["in_flight"] or counts["accepted"]
                    or (self._sender is not None and counts["unconfirmed"])):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)

    # the sender ----------------------------------------------------------------------------------------
    def _pool(self, service: str) -> Pool | None:
        pool = self._pools.get(service)
        if pool is None:
            from .pool import Pool
            try:
                pool = Pool(service, settings=self._settings)
            except Pyro5.errors.PyroError:
                return None  # the name server is not there (yet): later
            self._pools[service] = pool
            self._own_pools.append(pool)
        return pool

    def _ready_services(self, db: sqlite3.Connection) -> list[str]:
        """Services that may have entries due and have a live worker: those enqueued here, and those in the
        journal (looked up at most every half second: it reads every entry)."""
        if time.monotonic() >= self._services_due:
            self._services_due = time.monotonic() + 0.5
            self._services.update(row[0] for row in db.execute(
                "SELECT DISTINCT service FROM entries WHERE state IN ('pending', 'inflight', 'accepted')"))
        ready = []
        for service in sorted(self._services):
            pool = self._pool(service)
            if pool is not None and pool.workers():
                self._learn_methods(pool)
                ready.append(service)
        return ready

    @staticmethod
    def _learn_methods(pool: Pool) -> None:
        """Make sure one worker of ``pool`` told us its methods (which are ``@idempotent`` decides the fate of
        an entry whose worker is gone: ``_assign``): one handshake, the first time."""
        members = list(pool._members.values())
        if any(m.endpoint.methods is not None for m in members):
            return
        for member in members:
            try:
                member.endpoint._connect(timeout=2.0).close()
                return
            except Exception:  # (that one is not answering: the next)
                continue

    def _claim(self, db: sqlite3.Connection, services: list[str], n: int) -> list[tuple[Any, ...]]:
        """Take up to ``n`` entries of ``services``, oldest first: pending ones that are due, and those whose
        sender's lease ran out before they were accepted. (Two queries, each walking the state index.)"""
        now = time.time()
        marks = ",".join("?" * len(services))
        columns = "seq, id, service, method, payload, worker, sent_at"
        db.execute("BEGIN IMMEDIATE")
        try:
            rows = db.execute(
                f"SELECT {columns} FROM entries WHERE state = 'pending' AND next_try <= ? AND service IN ({marks}) "
                "ORDER BY seq LIMIT ?", (now, *services, n)).fetchall()
            # in flight or accepted under a sender that is gone: sent again to the same worker, which has the id
            # (it answers with the first run's outcome, without running it again)
            rows += db.execute(
                f"SELECT {columns} FROM entries WHERE (state = 'inflight' OR (state = 'accepted' AND worker IS NOT "
                f"NULL)) AND lease_until < ? AND service IN ({marks}) ORDER BY seq LIMIT ?",
                (now, *services, n)).fetchall()
            claimed, lost = [], []
            for seq, entry_id, service, method, payload, before, sent_at in sorted(rows)[:n]:
                worker, reason = self._assign(service, method, before, now - sent_at)
                if reason is not None:
                    lost.append((reason, seq))
                elif worker is not None:
                    claimed.append((seq, entry_id, service, method, payload, worker, worker == before))
            db.executemany("UPDATE entries SET state = 'inflight', owner = ?, lease_until = ?, worker = ?, "
                           "sent_at = CASE WHEN worker IS ? THEN sent_at ELSE ? END, attempts = attempts + 1 "
                           "WHERE seq = ?",
                           [(self._owner, now + self._lease, row[5], row[5], now, row[0]) for row in claimed])
            db.executemany("UPDATE entries SET state = 'lost', owner = NULL, error = ? WHERE seq = ?", lost)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        for row in claimed:
            self._assigned[row[5]] = self._assigned.get(row[5], 0) + 1
        return claimed

    def _assign(self, service: str, method: str, worker: str | None, age: float = 0.0) -> tuple[str | None, str | None]:
        """The worker an entry goes to: ``(worker, None)``; ``(None, reason)`` when it is lost; ``(None, None)``
        when there is no worker now. An entry that may have reached a worker already (``worker`` set, ``age``
        seconds ago) goes to that one again, or, if it is gone or may have forgotten it, is lost unless its
        method is ``@idempotent`` (on every worker that told us: then any worker may have it)."""
        pool = self._pools.get(service)
        members = dict(pool._members) if pool is not None else {}
        if worker is not None:
            known = [m for m in members.values() if m.endpoint.methods is not None]
            if not known:
                return None, None  # (nobody told us its methods yet: later)
            idempotent = all(method in m.endpoint.idempotent for m in known)
            if age > _REMEMBERED and not idempotent:
                return None, (f"its worker {worker} was sent it {age:.0f} s ago: a re-send could run it again, "
                              "after the worker forgot it; it may or may not have run")
            if worker in members and age <= _REMEMBERED:
                return worker, None
            if not idempotent:
                return None, (f"its worker {worker} is gone and may have taken it before: it may or may not have "
                              "run (not @idempotent: not sent again)")
        if not members:
            return None, None
        now = time.monotonic()
        ready = [m for m in members.values() if m.ejected_until <= now and not m.suspect] or list(members.values())
        return min(ready, key=lambda m: (self._assigned.get(m.name, 0), m.in_flight)).name, None

    def _outcome(self, seq: int, what: str, error: str | None = None, worker: str | None = None) -> None:
        """From the send loop: an entry's fate, for the sender thread to write down."""
        with self._outcomes_lock:
            self._outcomes.append((seq, what, error, worker))
        self._wake.set()

    def _apply(self, db: sqlite3.Connection) -> None:
        with self._outcomes_lock:
            outcomes, self._outcomes = self._outcomes, []
        if not outcomes:
            return
        now = time.time()
        finished = 0
        db.execute("BEGIN IMMEDIATE")
        try:
            owner = self._owner  # (an entry another sender claimed since, after our lease ran out, is its)
            for seq, what, error, _worker in outcomes:
                if what == "done":
                    db.execute("DELETE FROM entries WHERE seq = ? AND owner = ?", (seq, owner))
                elif what == "accepted":
                    db.execute("UPDATE entries SET state = 'accepted' WHERE seq = ? AND owner = ?", (seq, owner))
                    continue  # (still this sender's until its outcome comes)
                elif what in ("retry", "again"):  # again: it may have reached its worker: to that one only
                    db.execute("UPDATE entries SET state = 'pending', owner = NULL, error = ?, next_try = "
                               "? + MIN(?, 0.05 * (1 << MIN(attempts, 8))), worker = CASE WHEN ? THEN worker END "
                               "WHERE seq = ? AND owner = ?", (error, now, _MAX_BACKOFF, what == "again", seq, owner))
                else:  # failed, lost
                    db.execute("UPDATE entries SET state = ?, owner = NULL, error = ? WHERE seq = ? AND owner = ?",
                               (what, error, seq, owner))
                finished += 1
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            with self._outcomes_lock:
                self._outcomes[:0] = outcomes
            raise
        for _seq, what, _error, worker in outcomes:
            if what != "accepted" and worker is not None:
                left = self._assigned.get(worker, 0) - 1
                if left > 0:
                    self._assigned[worker] = left
                else:
                    self._assigned.pop(worker, None)
        with self._idle:
            self._active -= finished
            self._idle.notify_all()

    async def _deliver(self, pool: Pool, seq: int, entry_id: str, method: str, payload: bytes, worker: str,
                       pinned: bool) -> None:
        """Send one entry to its worker (``_assign``), never to another: a re-send must reach the worker that
        may have it already (``pinned``: an earlier attempt went there). Outcomes: ``done``/``accepted``/
        ``failed``/``lost``; ``retry`` when it surely reached no worker (any worker may have it next),
        ``again`` when it may have reached this one (that worker only)."""
        member = pool._members.get(worker)
        if member is None:  # gone since the claim: nothing was sent now; an earlier attempt may have reached it
            self._outcome(seq, "again" if pinned else "retry", f"its worker {worker} is gone", worker)
            return
        idempotent = method in member.endpoint.idempotent
        try:
            args, kwargs = loads(payload)
            ack = Ack(entry_id, on_done=lambda error, lost: self._outcome(
                seq, "lost" if lost else "failed" if error is not None else "done",
                "the worker was lost after accepting it: it may or may not have run" if lost
                else None if error is None else _error_text(error), worker))
            try:
                await member.endpoint.acall(method, tuple(args), kwargs, self._settings.timeout, False, ack=ack)
            except NoMux:  # a stock Pyro5 worker: a plain call (accepted = completed), through the pool
                try:
                    await asyncio.get_running_loop().run_in_executor(None, pool._call, method, tuple(args), kwargs,
                                                                     None, False)
                except (WorkerLostError, CallTimeoutError) as exc:
                    if idempotent:
                        raise
                    # it may have run, and a stock worker cannot tell a re-send from a new call: at most once
                    self._outcome(seq, "lost", f"{_error_text(exc)} (a stock Pyro5 worker: not sent again)", worker)
                    return
                ack.waited = True
        except NotSent as exc:  # not this time (refused while draining, no connection); an earlier attempt may have
            if pinned and not idempotent and _process_gone(exc.cause):
                # nothing listens where it was: it ran there before it died, or never will
                self._outcome(seq, "lost", f"its worker {worker} is gone (connection refused) and may have taken "
                                           "it before: it may or may not have run", worker)
                return
            self._outcome(seq, "again" if pinned and not idempotent else "retry", _error_text(exc.cause), worker)
            return
        except (WorkerLostError, CallTimeoutError) as exc:
            # sent, and no acknowledgement: it may be queued there. An @idempotent call may run again anywhere
            self._outcome(seq, "retry" if idempotent else "again", _error_text(exc), worker)
            return
        except Exception as exc:
            self._outcome(seq, "retry" if _retryable(exc) else "failed", _error_text(exc), worker)
            return
        self._outcome(seq, "done" if ack.waited else "accepted", None, worker)

    def _run(self) -> None:
        db = _connect(self.path, self._sync)
        renewed = time.monotonic()
        loop = send_loop()
        try:
            while not self._stop.is_set():
                self._wake.clear()
                try:
                    self._apply(db)
                    if time.monotonic() - renewed > self._lease / 3:
                        renewed = time.monotonic()
                        db.execute("UPDATE entries SET lease_until = ? WHERE owner = ? AND state IN "
                                   "('inflight', 'accepted')", (time.time() + self._lease, self._owner))
                    room = self._in_flight_limit - self._active
                    rows: list[tuple[Any, ...]] = []
                    services: list[str] = []
                    # (claims in batches: a quarter of the window at least, unless nothing is out)
                    if room >= max(1, self._in_flight_limit // 4) or (room > 0 and self._active == 0):
                        services = self._ready_services(db)
                        if services:
                            rows = self._claim(db, services, room)
                    self._waiting = bool(services) and not rows
                except sqlite3.Error:
                    rows = []  # (locked for longer than the busy timeout: next round)
                if rows:
                    with self._idle:
                        self._active += len(rows)
                    for seq, entry_id, service, method, payload, worker, pinned in rows:
                        pool = self._pools[service]
                        loop.submit(self._deliver(pool, seq, entry_id, method, payload, worker, pinned))
                    continue
                self._wake.wait(0.05)
            self._apply(db)
            # what this sender still holds unsent goes back at once (another sender may take it now)
            db.execute("UPDATE entries SET state = 'pending', owner = NULL WHERE owner = ? AND state = 'inflight'",
                       (self._owner,))
        except sqlite3.Error:
            pass
        finally:
            db.close()

    def _checkpoint(self) -> None:
        """Copy the journal's write-ahead log into the database file off the enqueue path: once it holds
        ``_WAL_CHECKPOINT`` bytes (looked at 20 times a second), at least every second, and once more at close.
        A passive checkpoint: writers go on meanwhile."""
        try:
            db = _connect(self.path, self._sync)
        except sqlite3.Error:
            return
        wal = self.path + "-wal"
        last = time.monotonic()
        try:
            while True:
                stopping = self._stop.wait(0.05)
                try:
                    size = os.path.getsize(wal)
                except OSError:
                    size = 0
                if stopping or size >= _WAL_CHECKPOINT or (size and time.monotonic() - last >= _CHECKPOINT_EVERY):
                    last = time.monotonic()
                    # a passive one never makes an enqueue wait, but under a steady stream of commits it never
                    # gets to start the log over: past _WAL_RESTART a restart does (a short wait, rarely)
                    mode = "RESTART" if size >= _WAL_RESTART or stopping else "PASSIVE"
                    try:
                        db.execute(f"PRAGMA wal_checkpoint({mode})")
                    except sqlite3.Error:
                        pass  # (busy: the next one)
                if stopping:
                    return
        finally:
            db.close()

    def close(self, timeout: float = 2.0) -> None:
        """Stop the sender: entries in flight get up to ``timeout`` seconds to be acknowledged; what is left
        stays in the journal for the next sender (this process or another)."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout
        with self._idle:
            self._idle.wait_for(lambda: self._active <= 0 or time.monotonic() >= deadline,
                                max(0.0, timeout))
        self._stop.set()
        self._wake.set()
        if self._sender is not None:
            self._sender.join(max(0.5, deadline - time.monotonic() + 0.5))
        self._checkpointer.join(5.0)
        for pool in self._own_pools:
            pool.close()
        self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def outbox_status(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What ``pyrorpc outbox status`` shows: counts by state and the failed, lost and unconfirmed entries
    (``id``, ``service``, ``method``, ``created``, ``attempts``, ``state``, ``error``).

    Raises:
        ConfigurationError: no outbox at ``path``.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ConfigurationError(f"no outbox at {path!r}")
    try:
        db = sqlite3.connect(f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=ro", uri=True, timeout=30.0)
    except sqlite3.Error as exc:
        raise ConfigurationError(f"cannot read the outbox {path!r}: {exc}") from None
    try:
        now = time.time()
        counts = {"pending": 0, "in_flight": 0, "accepted": 0, "unconfirmed": 0, "failed": 0, "lost": 0}
        for state, live, n in db.execute(
                "SELECT state, lease_until >= ?, COUNT(*) FROM entries GROUP BY state, lease_until >= ?", (now, now)):
            if state == "inflight":
                counts["in_flight" if live else "pending"] += n
            elif state == "accepted":
                counts["accepted" if live else "unconfirmed"] += n
            elif state in counts:
                counts[state] += n
        entries = [dict(zip(("id", "service", "method", "created", "attempts", "state", "error"), row, strict=True))
                   for row in db.execute(
                       "SELECT id, service, method, created, attempts, state, error FROM entries WHERE state IN "
                       "('failed', 'lost') OR (state = 'accepted' AND lease_until < ?) ORDER BY seq LIMIT 1000",
                       (now,))]
        for entry in entries:
            if entry["state"] == "accepted":
                entry["state"] = "unconfirmed"
                entry["error"] = "accepted by a worker; its sender stopped before the outcome came"
    except sqlite3.Error as exc:
        raise ConfigurationError(f"cannot read the outbox {path!r}: {exc}") from None
    finally:
        db.close()
    return dict(counts, entries=entries)


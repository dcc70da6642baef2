"""Acknowledged sends (``send()``): the ``PRAK`` annotation, the worker's memory of the ids it accepted, and
what a sender asks of the endpoint (docs/protocol.md, "Acknowledged sends")."""

from __future__ import annotations

import inspect
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

__all__ = ["ACK_KEY", "MAX_ID", "Ack", "SeenIds", "check_arguments", "seen_ids"]

ACK_KEY = "PRAK"  # request annotation: "acknowledge acceptance"; its value is the send's id (ASCII, <= MAX_ID)
MAX_ID = 128


class Ack:
    """What a ``send()`` asks for: acceptance of the call under ``id``.

    The endpoint waits for the worker's MSG_ACCEPTED, and for the result too when the method is
    ``@idempotent`` (then ``waited`` is True). For a call it did not wait for, ``on_done(error, lost)`` is
    called once the worker is done with it: ``error`` None for success, else the method's exception; ``lost``
    when the connection broke before the result came (the call may or may not have run). ``on_done`` runs on
    the event loop's thread and must not block.
    """

    __slots__ = ("id", "on_done", "waited")

    def __init__(self, send_id: str, on_done: Callable[[BaseException | None, bool], None] | None = None) -> None:
        if not isinstance(send_id, str) or not send_id or len(send_id) > MAX_ID or not send_id.isascii():
            raise ValueError(f"a send id must be 1-{MAX_ID} ASCII characters, got {send_id!r}")
        self.id = send_id
        self.on_done = on_done
        self.waited = False


RUNNING = object()  # SeenIds: the first run of this id is under way
MAX_KEPT = 1024  # bytes of a successful result kept for re-sends (a larger one is kept as None)
_EXCEPTION = 1 << 0  # protocol.FLAGS_EXCEPTION (acks.py has no protocol import: it is below it)
_NONE = b"# serpent utf-8 python3.2\nNone"


class SeenIds:
    """Ids of sends a worker accepted recently: the last ``limit`` of them, none older than ``ttl`` seconds,
    each with its outcome once its run ended (the reply's flags and body). A re-send of one of them (the
    sender never heard the acknowledgement, or restarted) is acknowledged again, not run: it gets the first
    run's outcome, at once or when that run ends."""

    MAX_WAITERS = 16  # re-sends of one id waiting for its run to end

    def __init__(self, limit: int = 100_000, ttl: float = 600.0) -> None:
        self.limit = limit
        self.ttl = ttl
        self._ids: OrderedDict[bytes, list[Any]] = OrderedDict()  # id -> [accepted at, outcome, waiters]
        self._lock = threading.Lock()

    def accept(self, send_id: bytes) -> bool:
        """Remember ``send_id``; False if it was accepted already (within the limits)."""
        return self.accept_or_outcome(send_id) is None

    def accept_or_outcome(self, send_id: bytes) -> Any:
        """None when ``send_id`` is new (remembered now, its run to come); for one accepted already, the
        ``(flags, body)`` outcome of its run if it ended, else RUNNING (``join`` to hear it)."""
        now = time.monotonic()
        ids = self._ids
        with self._lock:
            entry = ids.get(send_id)
            if entry is not None and (now - entry[0] < self.ttl or entry[1] is None):
                return RUNNING if entry[1] is None else entry[1]
            ids[send_id] = [now, None, []]
            ids.move_to_end(send_id)
            self._evict(now)
            return None

    def join(self, send_id: bytes, waiter: Any) -> Any:
        """Wait for the run of ``send_id`` (RUNNING before): its outcome if it ended meanwhile, None when
        ``waiter`` is kept (``finish`` returns it), False when it cannot wait (too many, or forgotten)."""
        with self._lock:
            entry = self._ids.get(send_id)
            if entry is None:
                return False
            if entry[1] is not None:
                return entry[1]
            if len(entry[2]) >= self.MAX_WAITERS:
                return False
            entry[2].append(waiter)
            return None

    def _evict(self, now: float) -> None:
        """Forget the oldest ids beyond the limit or the TTL, never one whose run is under way (its re-sends
        wait for it: forgetting it would let one run again)."""
        ids = self._ids
        turns = 0
        while ids and turns < 64:
            oldest_id, oldest = next(iter(ids.items()))
            if len(ids) <= self.limit and now - oldest[0] < self.ttl:
                break
            if oldest[1] is None:  # running: to the back of the line
                ids.move_to_end(oldest_id)
                turns += 1
                continue
            ids.popitem(last=False)

    def finish(self, send_id: bytes, flags: int, body: bytes) -> list[Any]:
        """The run of ``send_id`` ended with this reply: kept for later re-sends (a large result as None: a
        re-send's sender needs to know it ran, not what it returned); returns the waiters."""
        if not flags & _EXCEPTION and len(body) > MAX_KEPT:
            body = _NONE
        with self._lock:
            entry = self._ids.get(send_id)
            if entry is None:
                return []
            entry[1] = (flags, body)
            waiters, entry[2] = entry[2], []
            return waiters

    def __len__(self) -> int:
        return len(self._ids)


_seen_lock = threading.Lock()


def seen_ids(server: Any) -> SeenIds:
    """The accepted ids of ``server`` (made on first use)."""
    seen = getattr(server, "_pyrorpc_seen_ids", None)
    if seen is None:
        with _seen_lock:
            seen = getattr(server, "_pyrorpc_seen_ids", None)
            if seen is None:
                seen = SeenIds()
                server._pyrorpc_seen_ids = seen
    return seen


_signatures: dict[Any, inspect.Signature | None] = {}


def check_arguments(fn: Any, vargs: Any, kwargs: Any) -> None:
    """Raise TypeError, as calling would, if ``fn`` does not take these arguments: a send is refused before
    it is accepted rather than accepted and failing at once."""
    key = getattr(fn, "__func__", fn)
    try:
        sig = _signatures[key]
    except KeyError:
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):  # a builtin without a signature: let the call say it
            sig = None
        if len(_signatures) < 10_000:
            _signatures[key] = sig
    if sig is not None:
        sig.bind(*vargs, **kwargs)

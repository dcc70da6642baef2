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
        return self.accept_or_join(send_id, None) is None

    def accept_or_join(self, send_id: bytes, waiter: Any) -> Any:
        """None when ``send_id`` is new (it is remembered, its run to come). For one accepted already:
        ``(flags, body)``, the outcome of its run if it ended, else ``waiter`` is kept to hear it (``finish``
        returns it then) and True is returned (False when too many wait already: answer it as lost)."""
        now = time.monotonic()
        ids = self._ids
        with self._lock:
            entry = ids.get(send_id)
            if entry is not None and now - entry[0] < self.ttl:
                if entry[1] is not None:
                    return entry[1]
                if waiter is None or len(entry[2]) >= self.MAX_WAITERS:
                    return False
                entry[2].append(waiter)
                return True
            ids[send_id] = [now, None, []]
            ids.move_to_end(send_id)
            while len(ids) > self.limit:
                ids.popitem(last=False)
            while ids:  # (the oldest first: stop at the first young enough)
                oldest = next(iter(ids.values()))[0]
                if now - oldest < self.ttl:
                    break
                ids.popitem(last=False)
            return None

    def finish(self, send_id: bytes, flags: int, body: bytes) -> list[Any]:
        """The run of ``send_id`` ended with this reply: kept for later re-sends; returns the waiters."""
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

"""The call context: a call's deadline and metadata, carried from caller to worker and on to the services
that worker calls.

The client sends its remaining timeout and its metadata with every request, in Pyro5 annotations (stock
Pyro5 peers ignore them): ``PRDL`` is the remaining time in seconds (relative, so the clocks of the two
hosts need not agree), ``PRMD`` the metadata dict, serpent-encoded. Inside a method
``current_call()`` returns them as a ``CallInfo``. A call made while a call is being served (a service
calling another) gets at most the remaining time of the call it serves and its metadata, merged under
whatever ``call_metadata()`` adds: deadlines and request ids follow a workflow across services without
anyone passing them on.

Everything lives in context variables: it follows ``asyncio`` tasks, and the threads pyrorpc starts for
``future()``/``map()`` calls get a copy of the caller's context.
"""

from __future__ import annotations

import contextlib
import contextvars
import struct
import time
from collections.abc import Iterator
from typing import Any

from .codec import SERIALIZER, loads
from .protocol import pack_annotations

__all__ = ["CallInfo", "call_metadata", "current_call"]

DEADLINE_KEY = "PRDL"  # remaining seconds, ASCII decimal
METADATA_KEY = "PRMD"  # serpent-encoded dict
TRACE_KEY = "PRTC"  # W3C trace context, "name=value" lines (tracing.py)
_MAX_METADATA = 64 * 1024  # bytes of encoded metadata a request may carry


class CallInfo:
    """The call a method is serving: its ``deadline`` (absolute, ``time.time()`` based, or None), the
    caller's ``metadata`` (a dict), the caller's address (``caller``, ``(host, port)``) and ``method``.
    ``holds_thread`` is True while an ``async def`` method runs for a caller on a plain (not multiplexed)
    connection, a stock Pyro5 proxy's: a call thread of the worker waits for it, so it should not wait
    long (a long poll answers at once then)."""

    __slots__ = ("deadline", "metadata", "caller", "method", "holds_thread", "_trace", "_span")

    def __init__(self, deadline: float | None, metadata: dict[str, Any], caller: Any = None,
                 method: str | None = None) -> None:
        self.deadline = deadline
        self.metadata = metadata
        self.caller = caller
        self.method = method
        self.holds_thread = False
        self._trace: bytes | None = None  # the caller's trace context (PRTC), for the worker's span
        self._span: Any = None  # the worker's span of this call, while tracing (tracing.py)

    def remaining(self) -> float | None:
        """Seconds left until the deadline (negative once past it), or None without a deadline."""
        if self.deadline is None:
            return None
        return self.deadline - time.time()

    @property
    def expired(self) -> bool:
        return self.deadline is not None and time.time() >= self.deadline

    def __repr__(self) -> str:
        left = self.remaining()
        due = "no deadline" if left is None else f"{left:.3f}s left"
        return f"<CallInfo {self.method or '?'} from {self.caller} {due} metadata={self.metadata!r}>"


_CURRENT: contextvars.ContextVar[CallInfo | None] = contextvars.ContextVar("pyrorpc_current_call", default=None)
_METADATA: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("pyrorpc_call_metadata",
                                                                                 default=None)


def current_call() -> CallInfo | None:
    """The call being served by this thread or task (in a service method), else None."""
    return _CURRENT.get()


@contextlib.contextmanager
def call_metadata(**metadata: Any) -> Iterator[dict[str, Any]]:
    """Add ``metadata`` to every call made inside the block (nested blocks add to the outer ones; values
    must be serpent-serializable). Yields the metadata now in effect."""
    outer = _METADATA.get()
    merged = dict(outer) if outer else {}
    merged.update(metadata)
    try:
        SERIALIZER.dumps(merged)
    except Exception as exc:
        raise TypeError(f"call metadata must be serializable: {exc}") from None
    token = _METADATA.set(merged)
    try:
        yield merged
    finally:
        _METADATA.reset(token)


def outgoing_metadata() -> dict[str, Any] | None:
    """The metadata a call made now carries: the served call's, updated with ``call_metadata()``'s."""
    serving = _CURRENT.get()
    extra = _METADATA.get()
    if serving is not None and serving.metadata:
        metadata = dict(serving.metadata)
        if extra:
            metadata.update(extra)
        return metadata
    return extra


def outgoing(timeout: float) -> tuple[float, dict[str, bytes]]:
    """For a call about to be sent with ``timeout``: the timeout to use (no more than what is left of the
    call being served, if any) and the annotations that carry it and the metadata."""
    serving = _CURRENT.get()
    if serving is not None and serving.deadline is not None:
        left = serving.deadline - time.time()
        if left < timeout:
            timeout = max(left, 0.001)
    metadata = outgoing_metadata()
    annotations = {DEADLINE_KEY: b"%.6f" % timeout}
    if metadata:
        annotations[METADATA_KEY] = SERIALIZER.dumps(metadata)
    return timeout, annotations


def outgoing_bytes(timeout: float) -> tuple[float, bytes]:
    """``outgoing`` with the annotations packed for the wire."""
    if _CURRENT.get() is None and not _METADATA.get():  # the common case, on every call: no dict, no loop
        value = b"%.6f" % timeout
        return timeout, _ANN.pack(_DEADLINE_BYTES, len(value)) + value
    timeout, annotations = outgoing(timeout)
    return timeout, pack_annotations(annotations)


_ANN = struct.Struct("!4sI")
_DEADLINE_BYTES = DEADLINE_KEY.encode()


def incoming(annotations: dict[str, bytes] | None, caller: Any, method: str | None,
             arrived: float | None = None) -> CallInfo:
    """The CallInfo of a request from its annotations (bad values are ignored: a stock client's
    annotations are none of our business)."""
    deadline = None
    metadata: dict[str, Any] = {}
    if annotations:
        raw = annotations.get(DEADLINE_KEY)
        if raw is not None:
            try:
                left = float(raw)
                if left == left and left < 1e9:  # not NaN, not absurd
                    deadline = (arrived if arrived is not None else time.time()) + max(left, 0.0)
            except ValueError:
                pass
        raw = annotations.get(METADATA_KEY)
        if raw is not None and len(raw) <= _MAX_METADATA:
            try:
                value = loads(raw, fallback=False)
            except Exception:
                value = None
            if isinstance(value, dict):
                metadata = value
        info = CallInfo(deadline, metadata, caller, method)
        info._trace = annotations.get(TRACE_KEY)
        return info
    return CallInfo(deadline, metadata, caller, method)


def enter(info: CallInfo) -> contextvars.Token[CallInfo | None]:
    return _CURRENT.set(info)


def leave(token: contextvars.Token[CallInfo | None]) -> None:
    _CURRENT.reset(token)

"""Endpoint: pooled connections to one worker, with call slots, and the one place a call's failure is
classified: not sent (safe to send elsewhere), lost after sending, timed out, or the method's own error."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import Pyro5.core
import Pyro5.errors
from Pyro5 import protocol

from .compat import is_exception_wrapper, remote_traceback, unwrap_exception
from .config import Settings
from .errors import (
    AuthenticationError,
    CallTimeoutError,
    ConfigurationError,
    MessageTooLargeError,
    WorkerDrainingError,
    WorkerLostError,
)
from .security import open_connection
from .wire import LimitedConnection, invoke

__all__ = ["Abandoned", "CallHandle", "Endpoint", "NotSent", "SlotsBusy"]


class NotSent(Exception):
    """Internal: the call never reached the worker (connect failed, worker draining); safe to resend."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class SlotsBusy(CallTimeoutError):
    """Every call slot of the worker stayed busy until the timeout (the worker is not at fault)."""


class Abandoned(Exception):
    """Internal: the caller gave the call up (a cancelled ``aio()``); nobody waits for its outcome."""


class CallHandle:
    """A call its caller may give up (a cancelled ``aio()``).

    ``cancel()`` gives the call's slot back at once and cuts its connection off (a reply may still
    arrive on it, so it is never used again); the thread running the call then ends with ``Abandoned``,
    which costs the worker nothing (no ejection, no retry). Fields are guarded by the endpoint's lock.
    """

    __slots__ = ("cancelled", "endpoint", "holds", "sock")

    def __init__(self) -> None:
        self.cancelled = False
        self.endpoint: Endpoint | None = None  # where the call holds (or waits for) a slot
        self.holds = False  # it holds a slot of ``endpoint``
        self.sock: Any = None  # its connection's socket while the call is on the wire

    def cancel(self) -> None:
        # written before ``endpoint`` is read; the call writes ``endpoint`` before it reads ``cancelled``
        # (both under the endpoint's lock): one side always sees the other
        self.cancelled = True
        endpoint = self.endpoint
        if endpoint is not None:
            endpoint._abandon(self)


def _remote(exc: BaseException) -> bool:
    # Pyro5 marks exceptions raised by the remote method with their remote traceback
    return remote_traceback(exc) is not None


class Endpoint:
    """Connections to one worker, reused across calls and threads, at most ``capacity`` at once.

    ``call`` raises ``NotSent`` when the request never left (so any method may go elsewhere),
    ``WorkerLostError`` when the connection broke after sending, ``CallTimeoutError`` on timeout, and the
    remote method's own exception otherwise.
    """

    def __init__(self, uri: str, settings: Settings, name: str | None = None, capacity: int | None = None) -> None:
        self.uri = Pyro5.core.URI(uri)
        self.name = name or self.uri.object
        self.settings = settings
        self.capacity = capacity or settings.max_in_flight
        self.in_flight = 0
        self.calls = 0
        self.errors = 0
        self.idempotent: frozenset[str] = frozenset()
        self.oneway: frozenset[str] = frozenset()
        self.methods: frozenset[str] | None = None
        self.max_idle = float("inf")  # seconds a connection may rest before we retire it
        self._idle: list[LimitedConnection] = []
        self._busy: set[Any] = set()  # sockets with a call in flight (abort() shuts them down)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # for callers waiting for a free slot
        self._waiting = 0
        self._closed = False

    def __repr__(self) -> str:
        return f"<Endpoint {self.name} in_flight={self.in_flight}>"

    # connections
    def _connect(self) -> LimitedConnection:
        try:
            conn, meta = open_connection(self.uri, self.settings)
        except (AuthenticationError, ConfigurationError):
            raise  # our credentials or certificate files: no other worker would take them either
        except Pyro5.errors.PyroError as exc:
            raise NotSent(exc) from exc
        info = meta.get("pyrorpc") or {}
        idle = info.get("idle_timeout")
        if isinstance(idle, (int, float)) and idle > 0:
            # the worker closes connections idle that long: retire ours well before it can race a call
            self.max_idle = idle / 2
        if self.methods is None:
            self.idempotent = frozenset(info.get("idempotent", ()))
            self.oneway = frozenset(meta.get("oneway", ()))
            self.methods = frozenset(meta.get("methods", ()))
        return conn

    def _enter(self, method: str, wait: float, handle: CallHandle | None = None) -> LimitedConnection | None:
        """Take a call slot (waiting up to ``wait``) and an idle connection if there is one."""
        with self._lock:
            if handle is not None:
                handle.endpoint = self
                if handle.cancelled:
                    raise Abandoned()
            if self.in_flight < self.capacity and not self._closed:
                self.in_flight += 1
                if handle is not None:
                    handle.holds = True
                return self._idle.pop() if self._idle else None
        with self._cond:
            self._waiting += 1
            try:
                if not self._cond.wait_for(lambda: self.in_flight < self.capacity or self._closed
                                           or (handle is not None and handle.cancelled), wait):
                    raise SlotsBusy(f"{self.name}.{method}: all {self.capacity} call slots busy for {wait:g}s")
            finally:
                self._waiting -= 1
            if handle is not None and handle.cancelled:
                raise Abandoned()
            if self._closed:
                raise NotSent(Pyro5.errors.CommunicationError(f"{self.name}: endpoint closed"))
            self.in_flight += 1
            if handle is not None:
                handle.holds = True
            return self._idle.pop() if self._idle else None

    def _leave(self, conn: LimitedConnection | None, failed: bool, keep: bool,
               handle: CallHandle | None = None) -> None:
        with self._lock:
            if handle is None or handle.holds:  # (a cancelled call gave its slot back already)
                self.in_flight -= 1
                self.calls += 1
                self.errors += failed
                if handle is not None:
                    handle.holds = False
                    handle.sock = None
            if conn is not None:
                self._busy.discard(conn.sock)
                if keep and not self._closed and not (handle is not None and handle.cancelled):
                    conn.last_used = time.monotonic()
                    self._idle.append(conn)
                    conn = None
            if self._waiting:
                self._cond.notify()
        if conn is not None:
            conn.close()

    def _abandon(self, handle: CallHandle) -> None:
        """``handle`` was cancelled: give its slot back now and cut its connection off (its thread wakes up
        with an error, and ``_leave`` closes the connection)."""
        with self._cond:
            if handle.endpoint is not self:
                return
            sock, handle.sock = handle.sock, None
            if handle.holds:
                handle.holds = False
                self.in_flight -= 1
                self.calls += 1
            if sock is not None:
                self._busy.discard(sock)
            self._cond.notify_all()  # a caller may take the slot; the abandoned call may be waiting for one
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _on_wire(self, sock: Any, handle: CallHandle | None) -> None:
        if handle is None:
            self._busy.add(sock)
            return
        with self._lock:
            if handle.cancelled:
                raise Abandoned()
            handle.sock = sock
            self._busy.add(sock)

    def _ready(self, conn: LimitedConnection | None) -> LimitedConnection:
        """A live connection: ``conn`` if it still is one, another idle one, or a new one (NotSent)."""
        while conn is not None:
            # An idle connection never has data waiting: readable means the worker closed it (died or
            # stopped). Dropping it here is what keeps a call to a dead worker from being "sent" at all.
            # One idle for half the worker's idle_timeout is retired before the worker closes it.
            if conn.idle_and_alive() and time.monotonic() - conn.last_used < self.max_idle:
                return conn
            conn.close()
            with self._lock:
                conn = self._idle.pop() if self._idle else None
        return self._connect()

    def call(self, method: str, args: Any, kwargs: dict[str, Any] | None, timeout: float,
             oneway: bool = False, wait: float | None = None, batch: bool = False,
             handle: CallHandle | None = None) -> Any:
        """One call: take a slot (waiting up to ``wait``, default ``timeout``) and a connection, invoke.

        With ``handle`` the caller may give the call up from another thread (``handle.cancel()``); it then
        raises ``Abandoned``.

        With ``batch`` ``args`` is a list of argument tuples for ``method``, sent as one Pyro5 batch
        message: the worker runs them in order and stops at the first exception; the result is the list
        of results so far (an exception as Pyro5's exception wrapper, see ``compat``). A batch refused whole by
        a draining worker raises NotSent. A request or reply over ``max_message_size`` (ours or the worker's)
        raises MessageTooLargeError: that call's failure, not the worker's."""
        conn = self._enter(method, timeout if wait is None else wait, handle)
        failed = True
        keep = False
        try:
            conn = self._ready(conn)
            if self._closed:
                # the worker said it is draining while we waited: it will close soon, so a call sent now
                # could be lost at that moment; this one never left, so it goes elsewhere
                raise NotSent(WorkerDrainingError(f"{self.name} is draining"))
            conn.set_timeout(timeout)
            self._on_wire(conn.sock, handle)
            flags = protocol.FLAGS_ONEWAY if (oneway or method in self.oneway) else 0
            try:
                if batch:
                    result = invoke(conn, "<batch>", [(method, a, {}) for a in args], None,
                                    flags | protocol.FLAGS_BATCH)
                    if result and is_exception_wrapper(result[0]) \
                            and isinstance(unwrap_exception(result[0]), WorkerDrainingError):
                        raise unwrap_exception(result[0])
                else:
                    result = invoke(conn, method, args, kwargs or {}, flags)
            except WorkerDrainingError as exc:
                # the worker is stopping: no further call goes there (it closes its connections soon, and
                # a call sent just then would be lost), the pool sends this one elsewhere
                self.close()
                raise NotSent(exc) from exc
            except MessageTooLargeError:
                # refused before sending, or by the worker, or a reply we would not read: the worker is fine;
                # the connection is too unless a message was cut off on it
                keep = not conn.broken
                raise
            except Pyro5.errors.TimeoutError as exc:
                if _remote(exc):
                    keep = True
                    raise
                if handle is not None and handle.cancelled:
                    raise Abandoned() from exc
                raise CallTimeoutError(f"{self.name}.{method}: no reply within {timeout:g}s") from exc
            except Pyro5.errors.SerializeError as exc:
                # our arguments could not be encoded (nothing sent), or the reply could not be decoded
                # (the call ran): either way not a lost worker
                keep = _remote(exc)
                raise
            except Pyro5.errors.CommunicationError as exc:
                if _remote(exc):
                    keep = True
                    raise
                if handle is not None and handle.cancelled:
                    raise Abandoned() from exc  # we cut it off ourselves
                raise WorkerLostError(f"{self.name}.{method}: connection lost after the call was sent ({exc})") \
                    from exc
            except Exception:
                keep = True  # the method's own exception: the connection is in step
                raise
            except BaseException:
                # KeyboardInterrupt and the like, mid-call: a reply may still arrive on this connection,
                # so it must never be used again
                keep = False
                raise
            keep = True
            failed = False
            return result
        finally:
            self._leave(conn, failed, keep, handle)

    @property
    def closed(self) -> bool:
        """Closed by ``close()`` or because the worker said it is draining: no further call goes out."""
        return self._closed

    def close(self, *, abort: bool = False) -> None:
        """Close idle connections (busy ones close as their calls end). With ``abort`` the calls in flight
        are cut off too: they fail with WorkerLostError (retried elsewhere when idempotent). For a worker
        known to be gone (lease expired), where waiting for them would only wait for the timeout."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            busy = list(self._busy) if abort else []
            self._cond.notify_all()
        for conn in idle:
            conn.close()
        for sock in busy:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass



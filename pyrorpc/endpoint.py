"""Endpoint: pooled connections to one worker, with call slots, and the one place a call's failure is
classified: not sent (safe to send elsewhere), lost after sending, timed out, or the method's own error."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncGenerator, Generator
from typing import Any

import Pyro5.core
import Pyro5.errors
from Pyro5 import protocol

from . import tracing
from .acks import ACK_KEY, Ack
from .aio import STREAM_WINDOW, BlockingStream, MuxChannel, NotWritten, decode_reply, open_blocking, open_channel
from .compat import is_exception_wrapper, remote_traceback, unwrap_exception
from .config import Settings
from .context import outgoing_bytes, outgoing_metadata
from .errors import (
    AuthenticationError,
    CallTimeoutError,
    ConfigurationError,
    MessageTooLargeError,
    WorkerDrainingError,
    WorkerLostError,
)
from .protocol import pack_annotations
from .security import open_connection
from .wire import LimitedConnection, invoke

__all__ = ["Abandoned", "CallHandle", "Endpoint", "NoMux", "NotSent", "SlotsBusy"]


class NotSent(Exception):
    """Internal: the call never reached the worker (connect failed, worker draining); safe to resend."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class SlotsBusy(CallTimeoutError):
    """Every call slot of the worker stayed busy until the timeout (the worker is not at fault)."""


class Abandoned(Exception):
    """Internal: the caller gave the call up (a cancelled ``aio()``); nobody waits for its outcome."""


class NoMux(Exception):
    """Internal: the worker does not multiplex (a stock Pyro5 daemon): ``aio()`` runs the call in a thread.
    Raised before anything was sent."""


_STREAM_REQUEST = pack_annotations({"PRST": b"%d" % STREAM_WINDOW})  # "stream the result" (mux only)
_CHANNEL_CALLS = 2048  # requests outstanding on one multiplexed channel before another one opens...
_MAX_CHANNELS = 8  # ...up to this many per event loop and worker


def _set_done(fut: "asyncio.Future[None]") -> None:
    if not fut.done():
        fut.set_result(None)


def _outcome(task: "asyncio.Task[Any]") -> None:
    """Raise what ended ``task`` (CancelledError if it was cancelled); return if it succeeded."""
    if task.cancelled():
        raise asyncio.CancelledError()
    exc = task.exception()
    if exc is not None:
        raise exc


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
        self.service: str | None = None  # as the worker's handshake says (traces name it)
        self.settings = settings
        self.capacity = capacity or settings.max_in_flight
        self.in_flight = 0
        self.calls = 0
        self.errors = 0
        self.idempotent: frozenset[str] = frozenset()
        self.oneway: frozenset[str] = frozenset()
        self.methods: frozenset[str] | None = None
        self.async_methods: frozenset[str] = frozenset()  # ``async def``: not held to capacity through aio()
        self.stream_methods: frozenset[str] = frozenset()
        self.async_in_flight = 0  # aio() calls of async def methods (bounded by max_in_flight only)
        self.mux: bool | None = None  # the worker multiplexes (None: not known yet)
        self.max_idle = float("inf")  # seconds a connection may rest before we retire it
        self._idle: list[LimitedConnection] = []
        self._busy: set[Any] = set()  # sockets with a call in flight (abort() shuts them down)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # for callers waiting for a free slot
        self._waiting = 0
        self._closed = False
        # aio(): one multiplexed channel per event loop, and coroutines waiting for a call slot (woken with
        # call_soon_threadsafe by whichever thread frees one)
        self._channels: dict[asyncio.AbstractEventLoop, list[MuxChannel]] = {}
        # streams running (close() ends them); weak, so a stream dropped unstarted is still collected (and
        # its __del__ cancels it)
        self._streams: weakref.WeakSet[Any] = weakref.WeakSet()
        self._opening: dict[asyncio.AbstractEventLoop, asyncio.Task[MuxChannel]] = {}
        # the coroutines waiting for an opening, each on a future of its own: cancelling one is O(1)
        # (many awaiting asyncio.shield(task) would each add a callback to the task and remove it: O(n))
        self._open_waiters: dict[asyncio.Task[MuxChannel], list[asyncio.Future[None]]] = {}
        self._slot_waiters: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = deque()
        self._async_waiters: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = deque()

    def __repr__(self) -> str:
        return f"<Endpoint {self.name} in_flight={self.in_flight}>"

    # connections
    def _connect(self, timeout: float | None = None) -> LimitedConnection:
        """A new connection; opening it takes at most ``connect_timeout``, or ``timeout`` (what the call
        has left) when that is shorter: a hung worker costs a call its own timeout, no more.

        Raises:
            NotSent: it could not be opened (nothing was sent).
        """
        try:
            conn, meta = open_connection(self.uri, self.settings, timeout=timeout)
        except (AuthenticationError, ConfigurationError):
            raise  # our credentials or certificate files: no other worker would take them either
        except Pyro5.errors.PyroError as exc:
            raise NotSent(exc) from exc
        self._learn(meta)
        return conn

    def _learn(self, meta: dict[str, Any]) -> None:
        """What the worker's handshake metadata says about its methods and connections."""
        info = meta.get("pyrorpc") or {}
        service = info.get("service")
        if isinstance(service, str):
            self.service = service
        idle = info.get("idle_timeout")
        if isinstance(idle, (int, float)) and idle > 0:
            # the worker closes connections idle that long: retire ours well before it can race a call
            self.max_idle = idle / 2
        if self.methods is None:
            self.idempotent = frozenset(info.get("idempotent", ()))
            self.oneway = frozenset(meta.get("oneway", ()))
            self.methods = frozenset(meta.get("methods", ()))
        names = info.get("async")
        if isinstance(names, (list, tuple, set, frozenset)):
            self.async_methods = frozenset(n for n in names if isinstance(n, str))
        names = info.get("streams")
        if isinstance(names, (list, tuple, set, frozenset)):
            self.stream_methods = frozenset(n for n in names if isinstance(n, str))

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
        draining = conn is not None and conn.draining
        if draining:
            keep = False  # the worker said it is draining (MSG_NOTICE): no further call goes there
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
            if self._slot_waiters:
                self._wake_one(self._slot_waiters)
        if conn is not None:
            conn.close()
        if draining:
            self.close()

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
            if self._slot_waiters:
                self._wake_one(self._slot_waiters)
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

    def _ready(self, conn: LimitedConnection | None, timeout: float | None = None) -> LimitedConnection:
        """A live connection: ``conn`` if it still is one, another idle one, or a new one (NotSent), opened
        within ``timeout``."""
        while conn is not None:
            # An idle connection never has data waiting: readable means the worker closed it (died or
            # stopped). Dropping it here is what keeps a call to a dead worker from being "sent" at all.
            # One idle for half the worker's idle_timeout is retired before the worker closes it.
            if not conn.draining and conn.idle_and_alive() and time.monotonic() - conn.last_used < self.max_idle:
                return conn
            conn.close()
            if conn.draining:
                # the worker said it is draining: nothing more goes there (this call never left)
                self.close()
                raise NotSent(WorkerDrainingError(f"{self.name} is draining"))
            with self._lock:
                conn = self._idle.pop() if self._idle else None
        return self._connect(timeout)

    def call(self, method: str, args: Any, kwargs: dict[str, Any] | None, timeout: float,
             oneway: bool = False, wait: float | None = None, batch: bool = False,
             handle: CallHandle | None = None, trace: bytes | None = None) -> Any:
        """One call: take a slot (waiting up to ``wait``, default ``timeout``) and a connection, invoke.

        With ``handle`` the caller may give the call up from another thread (``handle.cancel()``); it then
        raises ``Abandoned``. ``trace`` is internal: the ``PRTC`` annotation of the call's client span.

        With ``batch`` ``args`` is a list of argument tuples for ``method``, sent as one Pyro5 batch
        message: the worker runs them in order and stops at the first exception; the result is the list
        of results so far (an exception as Pyro5's exception wrapper, see ``compat``). A batch refused whole by
        a draining worker raises NotSent. A request or reply over ``max_message_size`` (ours or the worker's)
        raises MessageTooLargeError: that call's failure, not the worker's."""
        if trace is None and tracing.INSTALLED:
            found = tracing.tracer()
            if found is not None:
                kind = "batch" if batch else "oneway" if oneway or method in self.oneway else "call"
                span, trace = tracing.start_client(found, self, method, kind, outgoing_metadata(),
                                                   **({"batch_size": len(args)} if batch else {}))
                try:
                    result = self.call(method, args, kwargs, timeout, oneway, wait, batch, handle, trace)
                except BaseException as exc:
                    _end_span(span, exc)
                    raise
                tracing.end(span)
                return result
        conn = self._enter(method, timeout if wait is None else wait, handle)
        failed = True
        keep = False
        try:
            conn = self._ready(conn, timeout)
            if self._closed:
                # the worker said it is draining while we waited: it will close soon, so a call sent now
                # could be lost at that moment; this one never left, so it goes elsewhere
                raise NotSent(WorkerDrainingError(f"{self.name} is draining"))
            # the call context: deadline and metadata (for a pyrorpc worker; a stock Pyro5 daemon sees none)
            timeout, annotations = outgoing_bytes(timeout)
            if not conn.context:
                annotations = b""
            elif trace:
                annotations += trace
            conn.set_timeout(timeout)
            self._on_wire(conn.sock, handle)
            flags = protocol.FLAGS_ONEWAY if (oneway or method in self.oneway) else 0
            try:
                if batch:
                    result = invoke(conn, "<batch>", [(method, a, {}) for a in args], None,
                                    flags | protocol.FLAGS_BATCH, annotations)
                    if result and is_exception_wrapper(result[0]) \
                            and isinstance(unwrap_exception(result[0]), WorkerDrainingError):
                        raise unwrap_exception(result[0])
                else:
                    result = invoke(conn, method, args, kwargs or {}, flags, annotations)
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
            channels = [c for group in self._channels.values() for c in group]
            self._channels.clear()
            for waiters in (self._slot_waiters, self._async_waiters):
                while waiters:
                    self._wake_one(waiters)
        # streams never end by themselves: their consumers fail now, and the workers close the generators
        with self._lock:
            streams = list(self._streams)
        for stream in streams:
            stream.abort(RuntimeError(f"{self.name}: closed while the stream of {stream.method} was running"))
        for channel in channels:  # (each closes once its calls are answered, at once with abort)
            channel.close_from_any_thread(abort)
        for conn in idle:
            conn.close()
        for sock in busy:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # aio(): calls and streams on a multiplexed channel (aio.py), no thread per call -----------------
    def _take(self, unbounded: bool) -> bool:
        """Take a slot if there is room (lock held): an ``async def`` method's calls are bounded by
        ``max_in_flight`` only (the worker runs them on its event loop, not its threads), others by
        ``capacity`` like every sync call."""
        if unbounded:
            if self.async_in_flight < self.settings.max_in_flight:
                self.async_in_flight += 1
                return True
        elif self.in_flight < self.capacity:
            self.in_flight += 1
            return True
        return False

    def _room(self, unbounded: bool) -> bool:
        if unbounded:
            return self.async_in_flight < self.settings.max_in_flight
        return self.in_flight < self.capacity

    def _wake_one(self, waiters: "deque[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]") -> None:
        """Wake the first coroutine still waiting in ``waiters`` (lock held, any thread); it looks again."""
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        while waiters:
            loop, fut = waiters.popleft()
            if fut.done():  # timed out or cancelled meanwhile
                continue
            try:
                if loop is running:
                    loop.call_soon(_set_done, fut)
                else:
                    loop.call_soon_threadsafe(_set_done, fut)
            except RuntimeError:  # its event loop is closed: nobody waits there
                continue
            return

    async def _await_slot(self, method: str, unbounded: bool, wait: float) -> None:
        """Wait up to ``wait`` for a slot on the event loop (no thread), woken when one is freed.

        Raises:
            SlotsBusy: no slot within ``wait``.
            NotSent: the endpoint was closed meanwhile.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        waiters = self._async_waiters if unbounded else self._slot_waiters
        while True:
            fut = loop.create_future()
            with self._lock:
                if self._closed:
                    raise NotSent(Pyro5.errors.CommunicationError(f"{self.name}: endpoint closed"))
                if self._take(unbounded):
                    return
                if loop.time() >= deadline:
                    limit = self.settings.max_in_flight if unbounded else self.capacity
                    raise SlotsBusy(f"{self.name}.{method}: all {limit} call slots busy for {wait:g}s")
                waiters.append((loop, fut))
            timer = loop.call_at(deadline, _set_done, fut)
            try:
                await fut
            except asyncio.CancelledError:
                with self._lock:  # a slot freed for us goes to the next waiter
                    if waiters and self._room(unbounded):
                        self._wake_one(waiters)
                raise
            finally:
                timer.cancel()

    def _aleave(self, unbounded: bool, failed: bool) -> None:
        with self._lock:
            if unbounded:
                self.async_in_flight -= 1
                if self._async_waiters:
                    self._wake_one(self._async_waiters)
            else:
                self.in_flight -= 1
                if self._waiting:
                    self._cond.notify()
                if self._slot_waiters:
                    self._wake_one(self._slot_waiters)
            self.calls += 1
            self.errors += failed

    async def _channel(self, timeout: float | None = None) -> MuxChannel:
        """A channel of this event loop to the worker: the first with room (``_CHANNEL_CALLS`` outstanding
        requests; more, and another opens, up to ``_MAX_CHANNELS``), opened on first use (one opening shared
        by every coroutine that needs it). One idle for half the worker's idle timeout is retired first.
        Waiting for an opening takes at most ``timeout`` (what the call has left), if given.

        Raises:
            NotSent: the endpoint is closed or the worker cannot be reached.
            NoMux: the worker does not multiplex.
        """
        loop = asyncio.get_running_loop()
        looked = waited = False
        while True:
            retired: list[MuxChannel] = []
            with self._lock:
                if self._closed:
                    raise NotSent(Pyro5.errors.CommunicationError(f"{self.name}: endpoint closed (draining?)"))
                channels = self._channels.get(loop) or []
                channel = self._pick_channel(channels, loop.time(), retired) if channels else None
                wanted = channel is None or (not waited and len(channel.pending) >= _CHANNEL_CALLS
                                             and len(channels) < _MAX_CHANNELS)
                task = self._opening.get(loop)
                if wanted and task is None:
                    for other in [lp for lp in self._channels if lp.is_closed()]:
                        for old in self._channels.pop(other):  # an event loop that ended (asyncio.run)
                            old.close_from_any_thread()
                    task = self._opening[loop] = loop.create_task(self._open_channel(loop))
                    self._open_waiters[task] = []
                    task.add_done_callback(self._opened)
            for old in retired:
                old.close()  # (once its calls are answered)
            if wanted:
                assert task is not None
                waiter = loop.create_future()
                with self._lock:
                    waiters = self._open_waiters.get(task)
                    if waiters is not None:
                        waiters.append(waiter)
                try:
                    if waiters is None:
                        _outcome(task)  # it ended, and its waiters were woken already
                    elif timeout is None:
                        await waiter
                    else:
                        await asyncio.wait_for(waiter, timeout)
                except asyncio.TimeoutError:
                    if channel is None:
                        raise NotSent(Pyro5.errors.TimeoutError(
                            f"no connection within the call's {timeout:g}s")) from None
                    waited = True  # the full channel it is
                except Exception:
                    if channel is None:
                        raise
                    waited = True  # another channel could not be added: the full one it is
                continue
            assert channel is not None
            if channel.pending or looked or not channel.unread():
                return channel
            # idle, yet something waits to be read: the worker's end, or its draining notice. Let the loop
            # read it first (a few turns: the read, then connection_lost), so no request goes there.
            looked = True
            for _ in range(5):
                await asyncio.sleep(0)
                if channel.closed or not channel.unread():
                    break

    def _pick_channel(self, channels: list[MuxChannel], now: float, retired: list[MuxChannel]) -> MuxChannel | None:
        """The first channel with room, else the least busy (lock held); the unusable ones and those idle
        too long move to ``retired``."""
        best = None
        for channel in list(channels):
            if not channel.usable() or (not channel.pending and now - channel.last_active >= self.max_idle):
                channels.remove(channel)
                retired.append(channel)
            elif len(channel.pending) < _CHANNEL_CALLS:
                return channel
            elif best is None or len(channel.pending) < len(best.pending):
                best = channel
        return best

    def _opened(self, task: "asyncio.Task[MuxChannel]") -> None:
        """An opening ended (its loop's thread): wake every coroutine still waiting for it with its outcome."""
        with self._lock:
            waiters = self._open_waiters.pop(task, ())
        exc = None if task.cancelled() else task.exception()
        for waiter in waiters:
            if waiter.done():
                continue  # (its coroutine was cancelled)
            if task.cancelled():
                waiter.cancel()
            elif exc is not None:
                waiter.set_exception(exc)
            else:
                waiter.set_result(None)

    async def _open_channel(self, loop: asyncio.AbstractEventLoop) -> MuxChannel:
        try:
            channel, meta, mux = await open_channel(self.uri, self.settings, on_notice=self._heard_draining,
                                                    on_lost=self._channel_lost)
        except (AuthenticationError, ConfigurationError):
            raise
        except Pyro5.errors.PyroError as exc:
            raise NotSent(exc) from exc
        finally:
            with self._lock:
                self._opening.pop(loop, None)
        self._learn(meta)
        self.mux = mux
        if not mux:
            raise NoMux()
        worker_max = (meta.get("pyrorpc") or {}).get("max_message_size")
        if isinstance(worker_max, int) and not isinstance(worker_max, bool) and 1024 <= worker_max < channel.max_size:
            # a request the worker would refuse (it drops the connection) is refused here, nothing sent
            channel.max_size = worker_max
        with self._lock:
            if not self._closed:
                self._channels.setdefault(loop, []).append(channel)
                return channel
        channel.close()
        raise NotSent(Pyro5.errors.CommunicationError(f"{self.name}: endpoint closed"))

    def _heard_draining(self) -> None:
        self.close()  # MSG_NOTICE: nothing more goes to this worker (calls on the channel are still answered)

    def _channel_lost(self, channel: MuxChannel) -> None:
        with self._lock:
            channels = self._channels.get(channel.loop)
            if channels is not None and channel in channels:
                channels.remove(channel)
                if not channels:
                    del self._channels[channel.loop]  # (nothing keeps an ended event loop alive)

    async def acall(self, method: str, args: Any, kwargs: dict[str, Any] | None, timeout: float,
                    oneway: bool = False, trace: bytes | None = None, ack: Ack | None = None) -> Any:
        """``call`` for a coroutine, on this loop's multiplexed channel: no thread, and waiting for a slot
        takes none either. Cancelling the await gives the call up at once: its slot is free and the worker
        is told to cancel it (MSG_CANCEL); so is a call that times out.

        With ``ack`` (send()) it returns None once the worker accepted the call, or, for an ``@idempotent``
        method, its result once it ran (see ``Ack``); a worker that does not acknowledge (an older pyrorpc)
        gets a plain call.

        Raises as ``call`` does, and NoMux (before sending) when the worker does not multiplex.
        """
        if self.mux is False:
            raise NoMux()
        if trace is None and tracing.INSTALLED:
            found = tracing.tracer()
            if found is not None:
                span, trace = tracing.start_client(found, self, method, "aio", outgoing_metadata())
                try:
                    result = await self.acall(method, args, kwargs, timeout, oneway, trace, ack)
                except NoMux:
                    raise  # (its span is never ended, so never exported: the call runs in a thread, traced there)
                except BaseException as exc:
                    _end_span(span, exc)
                    raise
                tracing.end(span)
                return result
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        timeout, annotations = outgoing_bytes(timeout)  # (no more than the call being served has left)
        channel = await self._channel(timeout)
        unbounded = method in self.async_methods
        with self._lock:
            if self._closed:
                raise NotSent(Pyro5.errors.CommunicationError(f"{self.name}: endpoint closed (draining?)"))
            ready = self._take(unbounded)
        if not ready:
            await self._await_slot(method, unbounded, timeout)
        failed = True
        try:
            if not ready:
                timeout, annotations = outgoing_bytes(max(deadline - loop.time(), 0.001))
                if not channel.usable():
                    channel = await self._channel()
            flags = protocol.FLAGS_ONEWAY if (oneway or method in self.oneway) else 0
            if trace:
                annotations += trace
            try:
                if ack is not None and channel.acks:
                    result = await self._asend(channel, method, args, kwargs, annotations, timeout, ack)
                else:
                    result = await channel.call(method, args, kwargs or {}, flags, annotations, timeout)
            except (WorkerDrainingError, NotWritten) as exc:
                if isinstance(exc, WorkerDrainingError):
                    self.close()  # refused unrun: nothing more goes there, the pool sends this one elsewhere
                raise NotSent(exc) from exc
            except Pyro5.errors.TimeoutError as exc:
                if _remote(exc):
                    raise
                raise CallTimeoutError(f"{self.name}.{method}: no reply within {timeout:g}s") from exc
            except Pyro5.errors.SerializeError:
                raise  # our arguments (nothing sent) or the reply (the call ran): not a lost worker
            except Pyro5.errors.CommunicationError as exc:
                if _remote(exc):
                    raise
                raise WorkerLostError(f"{self.name}.{method}: connection lost after the call was sent ({exc})") \
                    from exc
            failed = False
            return result
        finally:
            self._aleave(unbounded, failed)

    async def _asend(self, channel: MuxChannel, method: str, args: Any, kwargs: dict[str, Any] | None,
                     annotations: bytes, timeout: float, ack: Ack) -> Any:
        """A send() on ``channel``: None once accepted; an idempotent method's result once it ran."""
        ack.waited = wait = method in self.idempotent
        annotations += pack_annotations({ACK_KEY: ack.id.encode("ascii")})
        reply, accepted = await channel.send(method, args, kwargs or {}, annotations, timeout, wait)
        if wait or not accepted:  # (not accepted: the reply came instead, a refusal most likely)
            flags, body = reply.result()
            result = decode_reply(flags, body, channel.max_size)
            ack.waited = True  # (answered in full: it ran, nothing more to hear)
            return result
        on_done = ack.on_done
        if on_done is not None:
            max_size = channel.max_size

            def done(fut: "asyncio.Future[tuple[int, bytes]]") -> None:
                if fut.cancelled() or fut.exception() is not None:
                    on_done(None, True)
                    return
                try:
                    decode_reply(*fut.result(), max_size)
                except BaseException as exc:
                    on_done(exc, False)
                else:
                    on_done(None, False)

            reply.add_done_callback(done)
        return None

    def stream(self, method: str, args: Any, kwargs: dict[str, Any] | None,
               timeout: float, trace: bytes | None = None) -> Generator[Any, None, None]:
        """Start a stream on a connection of its own (blocking, in the caller's thread): the request is sent
        now, items come as the returned iterator is consumed (``timeout``: the longest wait for the next
        one). Closing the iterator early cancels the stream at the worker and closes the connection.

        Raises:
            NotSent: here, or from the iterator before its first item (a draining worker refused it).
            WorkerLostError: the connection was lost mid-stream (after the items received).
            CallTimeoutError: no item within ``timeout`` (the stream is cancelled).
            Pyro5.errors.ProtocolError: the worker does not stream (a stock Pyro5 daemon).
        """
        if self._closed:
            raise NotSent(Pyro5.errors.CommunicationError(f"{self.name}: endpoint closed (draining?)"))
        if trace is None and tracing.INSTALLED:
            found = tracing.tracer()
            if found is not None:
                span, trace = tracing.start_client(found, self, method, "stream", outgoing_metadata())
                try:
                    items = self.stream(method, args, kwargs, timeout, trace)
                except BaseException as exc:
                    _end_span(span, exc)
                    raise
                return _traced_items(span, items)
        timeout, annotations = outgoing_bytes(timeout)
        try:
            conn, meta, mux = open_blocking(self.uri, self.settings)
        except (AuthenticationError, ConfigurationError):
            raise
        except Pyro5.errors.PyroError as exc:
            raise NotSent(exc) from exc
        self._learn(meta)
        if not mux:
            conn.close()
            raise _no_streams(self.name)
        try:
            stream = BlockingStream.start(conn, method, args, kwargs or {},
                                          annotations + (trace or b"") + _STREAM_REQUEST)
        except BaseException as exc:
            mapped = self._stream_error(exc, method, timeout, True)
            if mapped is exc:
                raise
            raise mapped from exc
        self._track(stream)
        return self._items(stream, method, timeout)

    def _items(self, stream: BlockingStream, method: str, timeout: float) -> Generator[Any, None, None]:
        taken = 0
        half = STREAM_WINDOW // 2
        received = False
        try:
            while True:
                try:
                    items = stream.next_items(timeout)
                except BaseException as exc:
                    if stream.aborted is not None:
                        raise stream.aborted from None
                    mapped = self._stream_error(exc, method, timeout, received)
                    if mapped is exc:
                        raise
                    raise mapped from exc
                if items is None:
                    return
                received = True
                for item in items:
                    yield item
                    taken += 1
                    if taken >= half:
                        stream.took(taken)
                        taken = 0
        finally:
            with self._lock:
                self._streams.discard(stream)
            stream.close()

    async def astream(self, method: str, args: Any, kwargs: dict[str, Any] | None,
                      timeout: float, trace: bytes | None = None) -> AsyncGenerator[Any, None]:
        """``stream`` for a coroutine, on this loop's multiplexed channel (the request is sent at the first
        ``__anext__``). Raises as ``stream`` does."""
        if self.mux is False:
            raise _no_streams(self.name)
        if trace is None and tracing.INSTALLED:
            found = tracing.tracer()
            if found is not None:
                span, trace = tracing.start_client(found, self, method, "astream", outgoing_metadata())
                inner = self.astream(method, args, kwargs, timeout, trace)
                try:
                    async for item in inner:
                        yield item
                except GeneratorExit:
                    raise  # the consumer stopped early: no error
                except BaseException as exc:
                    _end_span(span, exc)
                    span = None
                    raise
                finally:
                    await inner.aclose()
                    if span is not None:
                        tracing.end(span)
                return
        timeout, annotations = outgoing_bytes(timeout)
        try:
            channel = await self._channel()
        except NoMux:
            raise _no_streams(self.name) from None
        try:
            stream = await channel.open_stream(method, args, kwargs or {},
                                               annotations + (trace or b"") + _STREAM_REQUEST)
        except NotWritten as exc:
            raise NotSent(exc) from exc
        self._track(stream)
        taken = 0
        half = STREAM_WINDOW // 2
        received = False
        try:
            while True:
                try:
                    items = await stream.next_items(timeout)
                except asyncio.CancelledError:
                    raise
                except BaseException as exc:
                    mapped = self._stream_error(exc, method, timeout, received)
                    if mapped is exc:
                        raise
                    raise mapped from exc
                if items is None:
                    return
                received = True
                for item in items:
                    yield item
                    taken += 1
                    if taken >= half:
                        stream.took(taken)
                        taken = 0
        finally:
            with self._lock:
                self._streams.discard(stream)
            stream.close()

    def _track(self, stream: Any) -> None:
        """A stream just started: close() is to end it (one that starts while close() runs ends at once)."""
        with self._lock:
            closed = self._closed
            if not closed:
                self._streams.add(stream)
        if closed:
            stream.abort(RuntimeError(f"{self.name}: closed while the stream of {stream.method} was starting"))

    def _stream_error(self, exc: BaseException, method: str, timeout: float, received: bool) -> BaseException:
        """What a stream's failure means for its consumer (pyrorpc's errors, like ``call``)."""
        if isinstance(exc, WorkerDrainingError) and not received:
            self.close()
            return NotSent(exc)
        if _remote(exc) or not isinstance(exc, Pyro5.errors.CommunicationError) \
                or isinstance(exc, Pyro5.errors.SerializeError):
            return exc
        if isinstance(exc, Pyro5.errors.TimeoutError):
            return CallTimeoutError(f"{self.name}.{method}: no item within {timeout:g}s")
        return WorkerLostError(f"{self.name}.{method}: connection lost mid-stream ({exc})")


def _end_span(span: Any, exc: BaseException) -> None:
    """End a call's client span with what ended the call (a call never sent: its cause, flagged; one its
    caller gave up, a hedge that lost or a cancelled await: flagged, no error)."""
    if isinstance(exc, NotSent):
        tracing.end(span, exc.cause, not_sent=True)
    elif isinstance(exc, (Abandoned, asyncio.CancelledError)):
        tracing.end(span, abandoned=True)
    else:
        tracing.end(span, exc)


def _traced_items(span: Any, items: Generator[Any, None, None]) -> Generator[Any, None, None]:
    """A stream's items, its client span ended with the stream (a consumer that stops early is no error)."""
    try:
        yield from items
    except GeneratorExit:
        raise
    except BaseException as exc:
        _end_span(span, exc)
        span = None
        raise
    finally:
        items.close()
        if span is not None:
            tracing.end(span)


def _no_streams(name: str) -> Pyro5.errors.ProtocolError:
    return Pyro5.errors.ProtocolError(f"{name} does not stream results (a stock Pyro5 daemon?): iterate a "
                                      "list result instead")

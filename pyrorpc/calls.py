"""The server core's call half: the objects a server serves, and running one request against them.

``CallHandler`` is a mixin of ``Server``: it registers objects (an instance, or a class instantiated per
session or per call), answers ``Pyro.Daemon`` like every Pyro5 daemon, and runs a request: decode,
check that the method is exposed, call it, encode the result or the exception (with its remote
traceback) and write the reply. A call counts as in flight in ``ServerStats`` from its request to its
reply; a request that arrives while draining is answered with ``WorkerDrainingError``. Whatever a request
does wrong costs that request only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import inspect
import logging
import os
import socket
import time
import types
import uuid
from functools import partial
from typing import TYPE_CHECKING, Any

import Pyro5.errors
from Pyro5.callcontext import current_context

from . import compat, tracing
from .aloop import PeerGone, Raised, guarded, wait
from .codec import loads_call, loads_call_flat
from .connection import PENDING, Connection
from .context import CallInfo, current_call, incoming
from .context import enter as enter_call
from .context import leave as leave_call
from .errors import CallTimeoutError, RemoteError, WorkerDrainingError, make_portable
from .protocol import (
    FLAGS_BATCH,
    FLAGS_COMPRESSED,
    FLAGS_CORR_ID,
    FLAGS_EXCEPTION,
    FLAGS_ONEWAY,
    MSG_INVOKE,
    MSG_PING,
    MSG_RESULT,
    SERPENT_ID,
    ProtocolViolation,
    decompress,
    pack,
    parse_annotations,
)
from .stats import BUCKETS, ERROR, OK, OTHER, REFUSED, TIMEOUT, ServerStats
from .streams import StockStreams, stream_reply
from .wire import SERIALIZER

__all__ = ["DAEMON_NAME", "INSTANCE_MODES", "PENDING", "CallHandler", "DaemonObject", "ServerStats"]

log = logging.getLogger("pyrorpc.server")

DAEMON_NAME = "Pyro.Daemon"
INSTANCE_MODES = ("single", "session", "percall")
_PONG = b"pong"


class DaemonObject:
    """The ``Pyro.Daemon`` object every Pyro5 daemon serves: what stock clients ask for metadata and pings."""

    def __init__(self, server: Any) -> None:
        self._server = server  # the Server
        self._asked = 0  # stats() calls so far

    def registered(self) -> list[str]:
        """Names of every object served here."""
        return list(self._server.objects)

    def ping(self) -> None:
        """Does nothing: for testing the connection."""

    def info(self) -> str:
        s = self._server
        return (f"{DAEMON_NAME} bound on {s.location}, NAT None, {len(s.objects)} objects registered. "
                f"Servertype: pyrorpc.server (epoll, {s.threads} call threads)")

    def stats(self) -> dict[str, Any]:
        """This server's statistics (pyrorpc.stats), a plain dict: ``name``, ``host``, ``pid``, ``location``,
        ``started``, ``uptime`` (s), ``in_flight``, ``calls``, ``errors``, ``connections``, ``draining``,
        ``oneway_queue``, ``threads``, ``buckets_ms`` (latency bucket bounds), ``methods``:
        ``{service: {method: {"ok", "error", "timeout", "refused", "p50_ms", "p99_ms", "sum_ms", "buckets"}}}``
        (counts since start; p50/p99 of the method's last 512 calls; calls per bucket, one more than
        ``buckets_ms``) and ``services``: ``{service: {"ok", "error", "timeout", "refused", "p50_ms",
        "p99_ms"}}`` (its methods together). ``in_flight`` and ``calls`` leave out the ``stats()`` calls
        themselves, so a dashboard asking every second does not show up in what it shows."""
        s = self._server
        stats = s.stats
        self._asked += 1
        snap: dict[str, Any] = stats.snapshot()
        snap["in_flight"] = max(0, snap["in_flight"] - 1)  # (this call)
        snap["calls"] = max(0, snap["calls"] - (self._asked - 1))  # (the stats() calls before it)
        methods, services = stats.full_snapshot()
        snap.update(name=s.name, host=socket.gethostname().split(".")[0] or "localhost", pid=os.getpid(),
                    location=s.location, started=stats.started, uptime=round(time.time() - stats.started, 3),
                    connections=max(0, s.connection_count()), draining=stats.draining,
                    oneway_queue=stats.oneway_queued, threads=s.threads, buckets_ms=[b * 1000 for b in BUCKETS],
                    methods=methods, services=services)
        return snap

    def get_metadata(self, objectId: str) -> dict[str, Any]:  # noqa: N803 - Pyro5's name
        """Exposed methods, oneway methods and attributes of an object (plus pyrorpc's own extras)."""
        return self._server.metadata(objectId)

    def get_next_stream_item(self, streamId: str) -> Any:  # noqa: N803 - Pyro5's name
        """The next item of a stream of this connection (StopIteration at its end)."""
        return self._server.stock_streams.next_item(streamId, current_context.client)

    def close_stream(self, streamId: str) -> None:  # noqa: N803 - Pyro5's name
        """Close a stream the client stops iterating early (its generator's ``finally`` runs)."""
        self._server.stock_streams.close(streamId, current_context.client)


for _name in ("registered", "ping", "info", "stats", "get_metadata", "get_next_stream_item", "close_stream"):
    setattr(getattr(DaemonObject, _name), compat.EXPOSED_ATTR, True)


class _Target:
    """An object served under an id: an instance, or a class instantiated per session or per call."""

    __slots__ = ("obj", "cls", "mode", "methods", "oneway", "attrs", "extra", "async_methods", "stream_methods",
                 "label")

    def __init__(self, obj: Any, mode: str, only_exposed: bool, extra: dict[str, Any] | None,
                 label: str = "") -> None:
        self.obj = obj
        self.label = label  # the service its calls count under (ServerStats)
        self.cls = obj if isinstance(obj, type) else type(obj)
        self.mode = mode
        members = compat.exposed_members(self.cls, only_exposed)
        self.methods = members["methods"]
        self.oneway = members["oneway"]
        self.attrs = members["attrs"]
        self.extra = extra
        # async def methods run on the event loop; generator methods stream (mux.py)
        self.async_methods: frozenset[str] = frozenset(
            m for m in self.methods
            if inspect.iscoroutinefunction(getattr(self.cls, m, None)) or inspect.isasyncgenfunction(
                getattr(self.cls, m, None)))
        self.stream_methods: frozenset[str] = frozenset(
            m for m in self.methods
            if inspect.isgeneratorfunction(getattr(self.cls, m, None)) or inspect.isasyncgenfunction(
                getattr(self.cls, m, None)))


_PLAIN = frozenset((type(None), int, str, bytes, float, bool, tuple, list, dict, set, frozenset))


def _is_stream(value: Any) -> bool:
    if type(value) in _PLAIN:
        return False
    return isinstance(value, (types.GeneratorType, types.AsyncGeneratorType)) or (
        hasattr(value, "__next__") and hasattr(value, "__iter__") and not isinstance(value, (str, bytes)))


def _result(flags: int, header: Any, data: bytes) -> bytes:
    """A result frame for a request: its sequence number, and its correlation id when it had one."""
    if header.flags & FLAGS_CORR_ID:
        return pack(MSG_RESULT, flags | FLAGS_CORR_ID, header.seq, data, corr_id=header.corr_id)
    return pack(MSG_RESULT, flags, header.seq, data)


def _close_stream(result: Any) -> None:
    """Close a generator that will not be streamed (an async generator that never started has nothing
    to close)."""
    close = getattr(result, "close", None)
    if close is not None and not isinstance(result, types.AsyncGeneratorType):
        try:
            close()
        except Exception:
            pass


async def _in_context(ctx: contextvars.Context, coro: Any) -> Any:
    """Await ``coro`` as a task made in ``ctx`` (so the method sees its call's context); SystemExit,
    KeyboardInterrupt and GeneratorExit it raises come back as ``Raised`` (they would end the event loop)."""
    return await ctx.run(asyncio.ensure_future, guarded(coro))


def _unencodable(exc: BaseException) -> BaseException:
    """A stand-in for an exception that cannot be serialized: RemoteError naming its type and message."""
    try:
        message = str(exc)
    except Exception:
        message = repr(exc.args)
    err = RemoteError(message)
    err.remote_type = f"{type(exc).__module__}.{type(exc).__qualname__}"
    err.args_lost = True  # type: ignore[attr-defined]  # the caller must not rebuild the original class
    tb = compat.remote_traceback(exc)
    if tb is not None:
        compat.set_remote_traceback(err, [str(line) for line in tb])
    return err


class CallHandler:
    """Objects and request handling of a ``Server`` (a mixin: the attributes below are the server's)."""

    name: str
    location: str
    stats: ServerStats
    stock_streams: StockStreams
    objects: dict[str, _Target]
    inline: dict[bytes, frozenset[bytes]]
    metadata_extra: dict[str, Any] | None
    max_message_size: int
    idle_timeout: float
    threads: int
    _queued: int
    _oneway_limit: int
    _refused_oneways: int
    _last_refusal: float
    async_runner: Any

    if TYPE_CHECKING:  # provided by the Server (declared here for the type checker only)
        def _reply(self, conn: Connection, data: bytes) -> Any: ...

        def _hand_over_write(self, conn: Connection, failed: bool | None) -> None: ...

        def _submit(self, job: Any) -> None: ...

    # objects ------------------------------------------------------------------------------------
    def register(self, obj: Any, object_id: str | None = None, *, instance_mode: str = "single",
                 only_exposed: bool = True, extra: dict[str, Any] | None = None, label: str | None = None,
                 inline: Any = ()) -> str:
        """Serve ``obj`` (an instance, or a class with ``instance_mode`` ``session``/``percall``) under
        ``object_id`` (default: a unique one); returns its ``PYRO:`` URI. Its calls are counted (ServerStats)
        under the service name ``label`` (default: ``object_id``).

        ``inline`` names methods the I/O thread runs itself, with no hand-off to a call thread (the name
        server's lease renewals and lookups): only for methods that take microseconds and never wait on
        anything but a short lock, since every connection of the server waits while one runs."""
        if instance_mode not in INSTANCE_MODES:
            raise ValueError(f"`instance_mode` must be one of {', '.join(INSTANCE_MODES)}, got {instance_mode!r}")
        if instance_mode != "single" and not isinstance(obj, type):
            raise ValueError("instance_mode session/percall needs a class")
        if instance_mode == "single" and isinstance(obj, type):
            obj = obj()
        object_id = object_id or f"obj_{uuid.uuid4().hex}"
        if object_id in self.objects:
            raise ValueError(f"object id {object_id!r} is already registered")
        self.objects[object_id] = _Target(obj, instance_mode, only_exposed, extra, label or object_id)
        methods = frozenset(m.encode() for m in inline)
        if methods:
            self.inline[object_id.encode()] = methods
        return self.uri_for(object_id)

    def unregister(self, object_id: str) -> None:
        if object_id != DAEMON_NAME:
            self.objects.pop(object_id, None)
            self.inline.pop(object_id.encode(), None)

    def uri_for(self, object_id: str) -> str:
        return f"PYRO:{object_id}@{self.location}"

    def metadata(self, object_id: str) -> dict[str, Any]:
        target = self.objects.get(object_id)
        if target is None:
            raise Pyro5.errors.DaemonError("unknown object")
        meta: dict[str, Any] = {"methods": set(target.methods), "oneway": set(target.oneway),
                                "attrs": set(target.attrs)}
        extra = target.extra or self.metadata_extra
        if extra is not None or target.async_methods or target.stream_methods:
            meta["pyrorpc"] = dict(extra or {}, idle_timeout=self.idle_timeout, async_=set(target.async_methods),
                                   streams=set(target.stream_methods), max_message_size=self.max_message_size)
            meta["pyrorpc"]["async"] = meta["pyrorpc"].pop("async_")
        return meta

    def _handle(self, conn: Connection, header: Any, payload: bytes) -> Any:
        """Run one request and write its reply: True when done, ``PENDING`` when the I/O thread writes
        the rest of the reply (the call counts as in flight until then), False to close the connection."""
        msg_type, flags, seq = header.msg_type, header.flags, header.seq
        if msg_type == MSG_PING:
            return self._uncounted(conn, self._reply(conn, pack(MSG_PING, 0, seq, _PONG,
                                                                serializer_id=header.serializer_id)))
        oneway = flags & FLAGS_ONEWAY
        if msg_type != MSG_INVOKE or header.serializer_id != SERPENT_ID:
            exc: BaseException = Pyro5.errors.ProtocolError(
                f"message type {msg_type} / serializer {header.serializer_id} refused: "
                "only serpent invocations are accepted")
            if not oneway:
                self._reply(conn, pack(MSG_RESULT, FLAGS_EXCEPTION, seq, SERIALIZER.dumps(exc)))
            return False
        stats = self.stats
        if not stats.enter():
            self._last_refusal = time.monotonic()
            self._record_refused(conn, flags, payload[header.ann_size:])
            if not oneway:
                return self._uncounted(conn, self._reply(conn, self._error_frame(
                    WorkerDrainingError(f"{self.name} is shutting down; the call did not run"), seq, None)))
            self._refused_oneways += 1  # summed up in one log line at close
            return True
        failed = True
        counted = True
        status: Any = True
        object_id = None
        target: _Target | None = None
        info: Any = None
        err: BaseException | None = None
        try:
            ann_size = header.ann_size
            left: float | None = None
            if ann_size:
                if payload[:4] == b"PRDL" and int.from_bytes(payload[4:8], "big") + 8 == ann_size:
                    # what a pyrorpc client sends with every call: just its remaining time (the hot path)
                    annotations = None
                    try:
                        left = float(payload[8:ann_size])
                    except ValueError:
                        left = None
                else:
                    annotations = parse_annotations(payload[:ann_size])
                body = payload[ann_size:]
            else:
                annotations = None
                body = payload
            object_id, target, method, vargs, kwargs = self._decode_request(flags, body)
            context = current_context
            context.client = conn  # like Pyro5: .sock is the connection's socket
            context.client_sock_addr = conn.peer
            context.correlation_id = uuid.UUID(bytes=header.corr_id) if flags & FLAGS_CORR_ID else None
            context.annotations = annotations or {}
            # the call context; its deadline counts from the request's arrival (not from when a thread got it)
            now = time.time()
            if annotations is None:
                deadline = None
                if left is not None and 0.0 <= left < 1e9:
                    deadline = now - (time.monotonic() - conn.arrived) + left
                elif left is not None and left < 0.0:
                    deadline = now - (time.monotonic() - conn.arrived)
                info = CallInfo(deadline, {}, conn.peer, method if type(method) is str else None)
            else:
                info = incoming(annotations, conn.peer, method if type(method) is str else None,
                                now - (time.monotonic() - conn.arrived))
            if info.deadline is not None and now >= info.deadline:
                raise CallTimeoutError(f"{method}: its deadline passed before it could run; it did not run")
            if tracing.INSTALLED and object_id != DAEMON_NAME:
                tracing.start_server(self, target, info, vargs if flags & FLAGS_BATCH else None)
            if flags & FLAGS_BATCH:
                token = enter_call(info)
                active = tracing.activate(info) if info._span is not None else None
                try:
                    results, failed = self._run_batch(target, conn, vargs)
                finally:
                    if active is not None:
                        tracing.deactivate(active)
                    leave_call(token)
                if oneway:
                    return True
                data = SERIALIZER.dumps(results)
                status = self._reply(conn, _result(FLAGS_BATCH, header, data))
                return status
            if method == "__getattr__" or method == "__setattr__":
                result = self._attribute(target, conn, method, vargs)
            else:
                obj = self._instance(target, conn)
                fn = self._method(target, obj, method)
                if oneway:
                    counted = False  # the oneway run counts itself out
                    self._oneway((fn, vargs, kwargs, conn.peer, context.correlation_id, context.annotations, info,
                                  target, conn.arrived))
                    return True
                token = enter_call(info)
                active = tracing.activate(info) if info._span is not None else None
                try:
                    result = fn(*vargs, **kwargs)
                    if type(result) is types.CoroutineType:
                        # an async def method, called on a plain connection: it runs on the event loop, and
                        # this connection waits for it (multiplexed connections hold no thread: mux.py)
                        result = self._await_here(method, result, info, conn)
                finally:
                    if active is not None:
                        tracing.deactivate(active)
                    leave_call(token)
            if oneway:
                failed = False
                return True
            if _is_stream(result):
                if conn.notice:  # a pyrorpc client: it streams with stream()/astream() (mux.py), never this way
                    _close_stream(result)
                    raise TypeError(f"{method} streams its results: call it with stream() or astream()")
                # a stock Pyro5 proxy: Pyro5's item streaming, the client pulls the items (streams.py)
                failed = False
                status = self._reply(conn, stream_reply(header, self.stock_streams.open(conn, result)))
                return status
            data = self._encode_result(method, result)
            failed = False
            status = self._reply(conn, _result(0, header, data))
            return status
        except BaseException as exc:  # SystemExit, KeyboardInterrupt raised by a method: that call's error
            err = exc
            if counted and info is not None and info._span is not None:
                tracing.finish(info, exc)
            if oneway:
                log.warning("%s: oneway call failed: %s: %s", self.name, type(exc).__name__, exc)
                return True
            if isinstance(exc, ProtocolViolation):  # bad annotations or compressed payload: Pyro5's own error
                exc = Pyro5.errors.ProtocolError(str(exc))
            elif type(exc) is StopIteration and object_id == DAEMON_NAME:
                failed = False  # the end of a stock Pyro5 item stream is no failure
            status = self._reply(conn, self._error_frame(exc, seq, exc.__traceback__, header))
            return status
        finally:
            if counted and info is not None and info._span is not None:  # (a oneway call's run ends its span)
                tracing.finish(info, None, failed)
            if counted:
                recorded = target if not flags & FLAGS_BATCH else None  # (a batch counts its calls itself)
                if status is PENDING:
                    self._hand_over_write(conn, failed)
                elif recorded is not None:
                    self._record(recorded, method, failed, err, conn.arrived, info, True)  # (and out of flight)
                    recorded = None
                else:
                    stats.leave(failed)
                if recorded is not None:
                    self._record(recorded, method, failed, err, conn.arrived, info)

    def _handle_inline(self, conn: Connection, header: Any, payload: bytes) -> Any:
        """``_handle`` for a method registered ``inline``, run on the I/O thread (Server._inline): the same
        reply, errors and statistics, without a call context or a trace span (such methods read neither).
        None when the request carries annotations other than a deadline, a passed deadline, or comes while
        draining: then ``_handle`` takes it, for the same result as any call."""
        ann_size = header.ann_size
        if ann_size:
            if payload[:4] != b"PRDL" or int.from_bytes(payload[4:8], "big") + 8 != ann_size:
                return None
            try:
                left = float(payload[8:ann_size])
            except ValueError:
                return None
            if not 0.0 <= left < 1e9:
                return None
            body = payload[ann_size:]
        else:
            body = payload
        call = loads_call_flat(body)  # (bounded work; anything else is a call thread's to decode)
        if call is None:
            return None
        object_id, method, vargs, kwargs = call
        target = self.objects.get(object_id) if type(object_id) is str else None
        if target is None or type(vargs) is not tuple or type(kwargs) is not dict:
            return None  # (the call thread answers with the error, as for any call)
        ok = getattr(target.obj, "_inline_ok", None)  # the object may know this one would take long
        if ok is not None and not ok(method, vargs):
            return None
        if not self.stats.enter():
            return None
        failed = True
        err: BaseException | None = None
        status: Any = True
        try:
            result = self._method(target, self._instance(target, conn), method)(*vargs, **kwargs)
            if type(result) is types.CoroutineType:
                result.close()
                raise TypeError(f"{method} is registered inline but is a coroutine function")
            data = self._encode_result(method, result)
            failed = False
            status = self._reply(conn, _result(0, header, data))
        except Exception as exc:
            err = exc
            status = self._reply(conn, self._error_frame(exc, header.seq, exc.__traceback__, header))
        finally:
            if status is PENDING:
                self._hand_over_write(conn, failed)
                self._record(target, method, failed, err, conn.arrived, None)
            else:
                self._record(target, method, failed, err, conn.arrived, None, True)
        return status

    def _record(self, target: _Target, method: Any, failed: bool, err: BaseException | None, started: float,
                info: Any, leave: bool = False) -> None:
        """Count a call that reached ``target`` in ServerStats: its outcome, latency since ``started``; with
        ``leave`` it is out of flight too (``ServerStats.leave``, under the same lock)."""
        if type(method) is not str or method not in target.methods:
            method = OTHER  # (names come from the peer)
        outcome = OK if not failed else TIMEOUT if isinstance(err, CallTimeoutError) else ERROR
        self.stats.record(target.label, method, outcome, started, None if info is None else info.deadline, err,
                          failed if leave else None)

    def _record_refused(self, conn: Connection, flags: int, body: Any) -> None:
        """Count a request refused while draining under its method, if it can be decoded (rare: no hurry)."""
        try:
            _object_id, target, method, _vargs, _kwargs = self._decode_request(flags, bytes(body))
        except Exception:
            return
        if type(method) is not str or method not in target.methods:
            method = OTHER
        self.stats.record(target.label, method, REFUSED, conn.arrived)

    def _decode_request(self, flags: int, body: bytes) -> tuple[Any, _Target, Any, Any, Any]:
        """A request's body (after its annotations): ``(object_id, target, method, vargs, kwargs)``.

        Raises:
            ProtocolViolation: a bad compressed payload.
            Pyro5.errors.SerializeError: the body cannot be decoded.
            Pyro5.errors.DaemonError: no such object here.
        """
        if flags & FLAGS_COMPRESSED:
            body = decompress(body, self.max_message_size)
        try:
            object_id, method, vargs, kwargs = loads_call(body)
        except Exception as exc:
            raise Pyro5.errors.SerializeError(f"cannot decode the request: {exc}") from None
        target = self.objects.get(object_id)
        if target is None:
            raise Pyro5.errors.DaemonError("unknown object")
        return object_id, target, method, vargs, kwargs

    def _encode_result(self, method: str, result: Any) -> bytes:
        try:
            data = SERIALIZER.dumps(result)
        except Exception as exc:
            raise Pyro5.errors.SerializeError(
                f"cannot serialize the result of {method} ({type(result).__name__}): {exc}") from None
        if len(data) > self.max_message_size:
            raise Pyro5.errors.MessageTooLargeError(
                f"reply of {len(data):,} bytes exceeds the worker's max_message_size of "
                f"{self.max_message_size:,}; the call ran but its result cannot be sent")
        return data

    def _run_batch(self, target: _Target, conn: Connection, calls: Any) -> tuple[list[Any], bool]:
        """The calls of a batch in order, up to the first that raises (its exception wrapped as Pyro5 does)."""
        obj = self._instance(target, conn)
        results: list[Any] = []
        failed = False
        started = conn.arrived  # (each call's latency from the end of the one before)
        for call in calls:
            name, a, kw = call
            fn = self._method(target, obj, name)
            try:
                result = fn(*a, **kw)
                if type(result) is types.CoroutineType:  # an async def method: awaited here, like a call
                    result = self._await_here(name, result, current_call(), conn)
                results.append(result)
                self._record(target, name, False, None, started, None)
                started = time.monotonic()
            except BaseException as exc:  # SystemExit too: the caller's error, not the thread's end
                self._record(target, name, True, exc, started, None)
                self._note_remote(exc)
                results.append(compat.wrap_exception(exc))
                failed = True
                break
        if len(results) > 1:
            self.stats.add(len(results) - 1, 0)
        return results, failed

    def _await_here(self, method: str, coro: Any, info: Any, conn: Connection) -> Any:
        """Run a coroutine on the server's event loop and wait for it here (a call thread), cancelling it at
        its deadline, or when the caller closes ``conn`` meanwhile (its reply could not be delivered)."""
        ctx = contextvars.copy_context()  # (holds the call's CallInfo)
        if info is not None:
            info.holds_thread = True  # (a long poll, say, answers at once rather than pin this thread)
        future = self.async_runner.submit(_in_context(ctx, coro))
        try:
            return wait(future, None if info is None else info.remaining(), conn.peer_closed)
        except concurrent.futures.TimeoutError:
            if not future.cancelled():  # (the coroutine's own TimeoutError is raised by wait as it is)
                raise
            raise CallTimeoutError(f"{method}: cancelled on the worker at its deadline") from None
        except PeerGone:
            raise Pyro5.errors.ConnectionClosedError(
                f"{method}: the caller closed its connection; cancelled on the worker") from None

    def _uncounted(self, conn: Connection, status: Any) -> Any:
        """For replies that are no call (pings, refusals): a pending rest is written without counting."""
        if status is PENDING:
            self._hand_over_write(conn, None)
        return status

    def _note_remote(self, exc: BaseException) -> None:
        make_portable(type(exc))
        compat.set_remote_traceback(exc, compat.format_traceback())

    def _error_frame(self, exc: BaseException, seq: int, tb: Any, header: Any = None) -> bytes:
        make_portable(type(exc))
        if tb is not None:
            compat.set_remote_traceback(exc, compat.format_traceback())
        try:
            data = SERIALIZER.dumps(exc)
        except Exception:
            # arguments serpent cannot encode: the caller still learns the type and the message
            data = SERIALIZER.dumps(_unencodable(exc))
        if header is not None:
            return _result(FLAGS_EXCEPTION, header, data)
        return pack(MSG_RESULT, FLAGS_EXCEPTION, seq, data)

    def _instance(self, target: _Target, conn: Connection) -> Any:
        mode = target.mode
        if mode == "single":
            return target.obj
        if mode == "percall":
            return target.cls()
        instances = conn.instances
        if instances is None:
            instances = conn.instances = {}
        obj = instances.get(target.cls)
        if obj is None:
            obj = instances[target.cls] = target.cls()
        return obj

    def _method(self, target: _Target, obj: Any, name: Any) -> Any:
        if type(name) is not str or name not in target.methods:
            if isinstance(name, str) and not compat.is_private(name) and hasattr(target.cls, name):
                raise AttributeError(f"attempt to access unexposed attribute '{name}'")
            raise AttributeError(f"remote object has no exposed method {name!r}")
        return getattr(obj, name)

    def _attribute(self, target: _Target, conn: Connection, method: str, vargs: Any) -> Any:
        name = vargs[0] if vargs else None
        if type(name) is not str or name not in target.attrs:
            raise AttributeError(f"attempt to access unexposed or unknown remote attribute '{name}'")
        obj = self._instance(target, conn)
        if method == "__getattr__":
            return getattr(obj, name)
        setattr(obj, name, vargs[1])
        return None

    # oneway calls -------------------------------------------------------------------------------
    def _oneway(self, job: tuple[Any, ...]) -> None:
        """Queue a oneway call for the pool (counted in flight until it ran); with the queue full the
        connection's own thread runs it, which stops reading that connection: TCP backpressure."""
        if self._queued >= self._oneway_limit:
            self._run_oneway(*job)
        else:
            self.stats.oneway_queue(1)
            self._submit(job + (True,))

    def _run_oneway(self, fn: Any, vargs: Any, kwargs: Any, peer: Any, correlation_id: Any,
                    annotations: Any, info: Any = None, target: _Target | None = None, started: float = 0.0,
                    queued: bool = False) -> None:
        if queued:
            self.stats.oneway_queue(-1)
        failed = True
        counted = True
        err: BaseException | None = None
        name = getattr(fn, "__name__", fn)
        token = enter_call(info if info is not None else incoming(annotations, peer, None))
        if tracing.INSTALLED and info is not None and info._span is None:
            tracing.start_server(self, None, info)  # (when tracing is on; a plain connection's started it)
        active = tracing.activate(info) if info is not None and info._span is not None else None
        try:
            if info is not None and info.deadline is not None and info.expired:
                log.warning("%s: oneway call %s from %s not run: its deadline passed while it waited", self.name,
                            name, peer)
                return
            context = current_context  # the call's own context, not what this thread ran before
            context.client = None
            context.client_sock_addr = peer
            context.correlation_id = correlation_id
            context.annotations = annotations
            result = fn(*vargs, **kwargs)
            if type(result) is types.CoroutineType:
                # an async def method sent oneway: it runs on the event loop, counted out when it ends
                counted = False
                future = self.async_runner.submit(_in_context(contextvars.copy_context(), result))
                if active is not None:
                    future.add_done_callback(partial(tracing.finish_future, info))
                future.add_done_callback(partial(self._oneway_done, name, peer, target, started))
                return
            failed = False
        except BaseException as exc:
            err = exc
            log.warning("%s: oneway call %s from %s failed: %s: %s", self.name, name, peer, type(exc).__name__, exc)
            if counted and active is not None:
                tracing.finish(info, exc)
        finally:
            if active is not None:
                tracing.deactivate(active)
                if counted:
                    tracing.finish(info, None, failed)
            leave_call(token)
            if counted:
                self.stats.leave(failed)
                if target is not None:
                    self._record(target, name, failed, err, started, None)

    def _oneway_done(self, name: Any, peer: Any, target: _Target | None, started: float,
                     future: concurrent.futures.Future[Any]) -> None:
        exc = None if future.cancelled() else future.exception()
        if exc is None and not future.cancelled():
            value = future.result()
            if type(value) is Raised:  # SystemExit and the like, kept off the event loop
                exc = value.exc
        if exc is not None:
            log.warning("%s: oneway call %s from %s failed: %s: %s", self.name, name, peer, type(exc).__name__, exc)
        self.stats.leave(exc is not None or future.cancelled())
        if target is not None:
            self._record(target, name, exc is not None or future.cancelled(), exc, started, None)



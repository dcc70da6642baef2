"""OpenTelemetry traces of calls (the ``otel`` extra): a CLIENT span per call sent, a SERVER span per call a
worker runs, and the W3C trace context between them in the ``PRTC`` request annotation.

Tracing is on in a process once OpenTelemetry's API is imported there and a real ``TracerProvider`` is set
(``opentelemetry.trace.set_tracer_provider(...)``, or ``OTEL_PYTHON_TRACER_PROVIDER``); the API's default
provider (a proxy of the no-op one) and ``NoOpTracerProvider`` mean off. Nothing here imports OpenTelemetry:
whoever sets a provider has imported it already. The hot paths of calls test ``INSTALLED`` (False without
the extra: nothing more runs) and then ``tracer()`` (None while off, a dictionary look-up or two).

Span names are ``SERVICE/method`` (OpenTelemetry's RPC convention), with the attributes ``rpc.system``
(``pyrorpc``), ``rpc.service``, ``rpc.method``, ``net.peer.name``/``net.peer.port`` (the other end),
``pyrorpc.worker`` (the worker's name), ``pyrorpc.call`` on client spans (``call``, ``oneway``, ``batch``,
``aio``, ``stream``, ``astream``) and the call's metadata as ``pyrorpc.metadata.KEY``. A worker makes its
span current while the method runs, so the calls it makes are its children. A failed call's span has status
ERROR and the exception recorded.

A client span is one attempt: a Pool call that fails over has a span per worker tried (the ones that never
reached a worker say ``pyrorpc.not_sent``), siblings under the caller's current span; a stream's span lasts
until its consumer is done. Only calls to services are traced on the worker (not the name server's, not a
client's callback objects), and spans of a worker start when a call thread or the event loop takes the
request (those refused unrun while draining have none).

``PRTC``'s value is what the global propagator injects (``traceparent``, ``tracestate``, ``baggage``...),
one ``name=value`` a line, ASCII; it goes to pyrorpc workers only, like every call-context annotation.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

from .context import TRACE_KEY
from .protocol import pack_annotations

__all__ = ["INSTALLED", "TRACE_KEY", "activate", "deactivate", "end", "finish", "start_client", "start_server",
           "tracer"]

_MAX_TRACE = 8 * 1024  # bytes of trace context a request may carry


def _installed() -> bool:
    try:
        return importlib.util.find_spec("opentelemetry.trace") is not None
    except (ImportError, ValueError):
        return False


INSTALLED = _installed()  # opentelemetry-api is importable (the extra); without it tracing never starts
if INSTALLED and os.environ.get("OTEL_PYTHON_TRACER_PROVIDER"):
    import opentelemetry.trace  # noqa: F401 - a provider named in the environment: tracer() loads it

_api: Any = None  # opentelemetry.trace, once someone imported it (and it keeps the provider in _TRACER_PROVIDER)
_tracer: Any = None  # pyrorpc's Tracer once a real provider is set (OpenTelemetry sets the global one only once)
_off = False  # a real provider that hands out no-op tracers (OTEL_SDK_DISABLED): off for good
_UNSET = object()
# the parts of OpenTelemetry used once tracing is on (imported then)
_context: Any = None
_propagate: Any = None
_in_context: Any = None
_CLIENT: Any = None
_SERVER: Any = None
_Status: Any = None
_ERROR: Any = None


def tracer() -> Any:
    """pyrorpc's ``Tracer`` when tracing is on, else None."""
    found = _tracer
    if found is not None:
        return found
    api = _api
    if api is None:
        if "opentelemetry.trace" not in _modules:
            return None  # nobody imported OpenTelemetry: nobody set a provider
    elif api._TRACER_PROVIDER is None:
        return None  # imported, no provider set: the extra installed, nothing configured
    return _adopt()


_modules = sys.modules


def _adopt() -> Any:
    global _api, _tracer, _off, _context, _propagate, _in_context, _CLIENT, _SERVER, _Status, _ERROR
    if _off:
        return None
    api = sys.modules["opentelemetry.trace"]
    if _api is None:
        if os.environ.get(api.OTEL_PYTHON_TRACER_PROVIDER):
            api.get_tracer_provider()  # (it loads the provider the variable names)
        # read its global directly: get_tracer_provider() looks at os.environ on every call (0.8 us); without
        # that name (another OpenTelemetry version) every call takes the public way, here
        if hasattr(api, "_TRACER_PROVIDER"):
            _api = api
    provider: Any = getattr(api, "_TRACER_PROVIDER", _UNSET)
    if provider is _UNSET:
        provider = api.get_tracer_provider()
    if provider is None or isinstance(provider, (api.ProxyTracerProvider, api.NoOpTracerProvider)):
        return None
    from opentelemetry import context, propagate

    found = provider.get_tracer("pyrorpc", getattr(sys.modules.get("pyrorpc"), "__version__", None))
    if isinstance(found, api.NoOpTracer):
        _off = True
        return None
    _context, _propagate, _in_context = context, propagate, api.set_span_in_context
    _CLIENT, _SERVER = api.SpanKind.CLIENT, api.SpanKind.SERVER
    _Status, _ERROR = api.Status, api.StatusCode.ERROR
    _tracer = found
    return found


def _service_of(name: str) -> str:
    # worker names are SERVICE.host.pid.id; anything else (a stock Pyro5 object id) is taken whole
    return name.rsplit(".", 3)[0] if name.count(".") >= 3 else name


def _add_metadata(attributes: dict[str, Any], metadata: dict[str, Any]) -> None:
    for key, value in metadata.items():
        if not isinstance(value, (str, bool, int, float)):
            value = repr(value)
        attributes[f"pyrorpc.metadata.{key}"] = value


def _encode(carrier: dict[str, str]) -> bytes:
    lines = [f"{k}={v}" for k, v in carrier.items()
             if isinstance(k, str) and isinstance(v, str) and "=" not in k and "\n" not in k + v]
    value = "\n".join(lines).encode("ascii", "replace")
    return pack_annotations({TRACE_KEY: value}) if value and len(value) <= _MAX_TRACE else b""


def _decode(raw: bytes) -> dict[str, str] | None:
    if len(raw) > _MAX_TRACE:
        return None
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    carrier = {}
    for line in text.split("\n"):
        key, sep, value = line.partition("=")
        if sep:
            carrier[key] = value
    return carrier


# the caller's side ---------------------------------------------------------------------------------
def start_client(found: Any, endpoint: Any, method: str, call: str, metadata: dict[str, Any] | None,
                 **extra: Any) -> tuple[Any, bytes]:
    """Start the CLIENT span of a call of ``method`` on ``endpoint`` (a child of the current span; not made
    current). Returns it and the packed ``PRTC`` annotation that carries it."""
    service = endpoint.service or _service_of(endpoint.name)
    attributes: dict[str, Any] = {"rpc.system": "pyrorpc", "rpc.service": service, "rpc.method": method,
                                  "pyrorpc.worker": endpoint.name, "pyrorpc.call": call}
    uri = endpoint.uri
    if uri.host:
        attributes["net.peer.name"] = uri.host
        attributes["net.peer.port"] = uri.port
    for key, value in extra.items():
        attributes[f"pyrorpc.{key}"] = value
    if metadata:
        _add_metadata(attributes, metadata)
    span = found.start_span(f"{service}/{method}", kind=_CLIENT, attributes=attributes)
    carrier: dict[str, str] = {}
    _propagate.inject(carrier, context=_in_context(span))
    return span, _encode(carrier)


def end(span: Any, exc: BaseException | None = None, failed: bool = False, **extra: Any) -> None:
    """End ``span``; with ``exc`` (recorded) or ``failed`` its status is ERROR."""
    for key, value in extra.items():
        span.set_attribute(f"pyrorpc.{key}", value)
    if exc is not None:
        span.record_exception(exc)
        span.set_status(_Status(_ERROR, f"{type(exc).__name__}: {exc}"))
    elif failed:
        span.set_status(_Status(_ERROR))
    span.end()


# the worker's side ---------------------------------------------------------------------------------
def start_server(server: Any, target: Any, info: Any, batch: Any = None) -> None:
    """Start the SERVER span of the call ``info`` (a child of the caller's span when the request carried
    ``PRTC``, else a root) if tracing is on and the call is for a service (``target.extra`` or the server's
    ``metadata_extra`` names it, as a WorkerHost's does): kept in ``info._span`` until ``finish``. ``batch``:
    the calls of a batch request (named after its first)."""
    found = tracer()
    if found is None:
        return
    extra = getattr(target, "extra", None) or server.metadata_extra or {}
    service = extra.get("service")
    if not service:
        return  # not a service (the name server, a client's callback objects): not traced
    parent = _context.Context()  # never whatever this thread happens to have current
    raw = info._trace
    if raw is not None:
        carrier = _decode(raw)
        if carrier:
            parent = _propagate.extract(carrier, context=parent)
    worker = extra.get("name") or server.name
    method = info.method or "?"
    size = len(batch) if isinstance(batch, (list, tuple)) else 0
    if size and isinstance(batch[0], (list, tuple)) and batch[0] and isinstance(batch[0][0], str):
        method = batch[0][0]
    attributes: dict[str, Any] = {"rpc.system": "pyrorpc", "rpc.service": service, "rpc.method": method,
                                  "pyrorpc.worker": worker}
    if batch is not None:
        attributes["pyrorpc.batch_size"] = size
    caller = info.caller
    if isinstance(caller, tuple) and len(caller) >= 2:
        attributes["net.peer.name"] = str(caller[0])
        attributes["net.peer.port"] = caller[1]
    if info.metadata:
        _add_metadata(attributes, info.metadata)
    info._span = found.start_span(f"{service}/{method}", context=parent, kind=_SERVER, attributes=attributes)


def activate(info: Any) -> Any:
    """Make the call's span current (in this thread or context) while its method runs; a token for
    ``deactivate``."""
    return _context.attach(_in_context(info._span))


def deactivate(token: Any) -> None:
    _context.detach(token)


def finish(info: Any, exc: BaseException | None = None, failed: bool = False, **extra: Any) -> None:
    """End the call's span (once), as ``end``."""
    span = info._span
    if span is None:
        return
    info._span = None
    end(span, exc, failed, **extra)


def finish_future(info: Any, future: Any) -> None:
    """``finish`` for a call that ran as ``future`` (an ``async def`` method called oneway)."""
    if future.cancelled():
        finish(info, None, True)
    else:
        finish(info, future.exception())

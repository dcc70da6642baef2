"""Services and a client for test_tracing, each run in a process of its own.

With ``TRACE_SPANS=1`` in its environment a process that imports this module traces with OpenTelemetry's SDK
into an in-memory exporter; ``finished_spans()`` (a worker's ``spans()`` method) hands the spans back as
plain dicts. ``python tracing_app.py SCENARIO NS`` runs a client scenario and prints one JSON line:
``{"result": ..., "spans": [...]}``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

from Pyro5.callcontext import current_context

import pyrorpc

EXPORTER: Any = None


def install() -> None:
    """Trace this process from now on into ``EXPORTER``."""
    global EXPORTER
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    EXPORTER = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    trace.set_tracer_provider(provider)


if os.environ.get("TRACE_SPANS"):
    install()


def _span(s: Any) -> dict[str, Any]:
    return {"name": s.name, "kind": s.kind.name, "trace_id": format(s.context.trace_id, "032x"),
            "span_id": format(s.context.span_id, "016x"),
            "parent": format(s.parent.span_id, "016x") if s.parent is not None else None,
            "attributes": {k: v for k, v in (s.attributes or {}).items()},
            "status": s.status.status_code.name, "events": [e.name for e in s.events]}


def finished_spans() -> list[dict[str, Any]]:
    if EXPORTER is None:
        return []
    return [_span(s) for s in EXPORTER.get_finished_spans() if not s.name.endswith("/spans")]


@pyrorpc.service("trace_back")
class Back:
    def echo(self, value: Any) -> Any:
        return value

    async def aecho(self, value: Any) -> Any:
        await asyncio.sleep(0)
        return value

    def count(self, n: int) -> Any:
        yield from range(n)

    async def acount(self, n: int) -> Any:
        for i in range(n):
            await asyncio.sleep(0)
            yield i

    async def nap(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def fail(self) -> None:
        raise ValueError("boom")

    @pyrorpc.oneway
    def note(self, value: Any) -> None:
        pass

    def annotations(self) -> list[str]:
        """The annotation keys of this request."""
        return sorted(current_context.annotations or ())

    def spans(self) -> list[dict[str, Any]]:
        return finished_spans()


@pyrorpc.service("trace_front")
class Front:
    def relay(self, ns: str, value: Any) -> Any:
        """A service calling another: Back.echo through a Pool."""
        with pyrorpc.Pool("trace_back", ns=ns) as back:
            return back.echo(value)

    async def arelay(self, ns: str, value: Any) -> Any:
        """The same from an async method, with aio()."""
        with pyrorpc.Pool("trace_back", ns=ns) as back:
            return await back.aecho.aio(value)

    def relay_stream(self, ns: str, n: int) -> Any:
        """Items streamed from Back, streamed on."""
        with pyrorpc.Pool("trace_back", ns=ns) as back:
            yield from back.count.stream(n)

    def spans(self) -> list[dict[str, Any]]:
        return finished_spans()


def _scenario(name: str, ns: str) -> Any:
    with pyrorpc.Pool("trace_back", ns=ns) as back, pyrorpc.Pool("trace_front", ns=ns) as front:
        if name == "call":
            return back.echo(1)
        if name == "metadata":
            with pyrorpc.call_metadata(request_id="r-7", tenant=3):
                return back.echo(2)
        if name == "error":
            try:
                back.fail()
            except ValueError as exc:
                return str(exc)
            return None
        if name == "oneway":
            back.note.oneway(3)
            return back.echo(4)
        if name == "annotations":
            return back.annotations()
        if name == "late":  # (run without TRACE_SPANS) a provider set after calls were made
            import opentelemetry.trace  # noqa: F401
            before = back.annotations()
            install()
            return [before, back.annotations()]
        if name == "map":
            return list(back.echo.map([(1,), (2,), (3,)]))
        if name == "nested":
            return front.relay(ns, 5)
        if name == "aio":
            async def main() -> Any:
                return [await back.echo.aio(6), await back.aecho.aio(7), await front.arelay.aio(ns, 8)]
            return asyncio.run(main())
        if name == "cancelled":
            async def give_up() -> Any:
                try:
                    await asyncio.wait_for(back.nap.aio(30), 0.3)
                except asyncio.TimeoutError:
                    return "gave up"
                return None
            return asyncio.run(give_up())
        if name == "stream":
            return list(back.count.stream(3))
        if name == "astream":
            async def items() -> Any:
                return [i async for i in back.acount.astream(3)]
            return asyncio.run(items())
        if name == "nested_stream":
            return list(front.relay_stream.stream(ns, 2))
    raise SystemExit(f"unknown scenario {name}")


if __name__ == "__main__":
    result = _scenario(sys.argv[1], sys.argv[2])
    print(json.dumps({"result": result, "spans": finished_spans()}))

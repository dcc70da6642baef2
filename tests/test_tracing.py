"""OpenTelemetry traces across real processes: a client process and worker processes, each tracing with the
SDK into an in-memory exporter (tracing_app.py), hand their spans back; the spans of one call form one trace,
also through a service calling another, with aio(), streams, oneway calls, metadata and errors. A client with
no provider configured sends no trace context, and a stock Pyro5 proxy calls a traced worker unharmed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import Pyro5.api
import pytest

import pyrorpc
from pyrorpc import tracing
from pyrorpc.endpoint import Endpoint
from pyrorpc.protocol import pack_annotations
from pyrorpc.testing import NameServerProcess, WorkerProcess, wait_for

HERE = os.path.dirname(os.path.abspath(__file__))
APP = os.path.join(HERE, "tracing_app.py")

pytestmark = pytest.mark.skipif(not tracing.INSTALLED, reason="needs the otel extra")


def _env(trace: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYRORPC_", "PYRO_", "OTEL_"))}
    env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
    if trace:
        env["TRACE_SPANS"] = "1"
    else:
        env.pop("TRACE_SPANS", None)
    return env


class Fleet:
    def __init__(self) -> None:
        self.ns_process = NameServerProcess(env=_env(False))
        self.ns = self.ns_process.ns
        self.back = WorkerProcess("tracing_app:Back", self.ns, env=_env(True))
        self.front = WorkerProcess("tracing_app:Front", self.ns, env=_env(True))

    def close(self) -> None:
        for process in (self.front, self.back, self.ns_process):
            process.kill()

    def client(self, scenario: str, trace: bool = True) -> tuple[Any, list[dict[str, Any]]]:
        """Run a client scenario in a process of its own (traced from the start): its result and its spans."""
        done = subprocess.run([sys.executable, APP, scenario, self.ns], env=_env(trace), capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        out = json.loads(done.stdout.strip().splitlines()[-1])
        return out["result"], out["spans"]

    def spans(self, worker: WorkerProcess, trace_id: str | None, count: int) -> list[dict[str, Any]]:
        """The spans of ``trace_id`` (None: every span) ``worker`` finished, once it has ``count`` of them
        (a worker ends its span as it writes the reply: the client may be quicker)."""
        with pyrorpc.connect(worker.uri, timeout=10) as proxy:
            def found() -> list[dict[str, Any]] | None:
                spans = [s for s in proxy.spans() if trace_id is None or s["trace_id"] == trace_id]
                return spans if len(spans) >= count else None
            result = wait_for(found, timeout=10, message=f"{count} spans of trace {trace_id}")
        assert trace_id is None or len(result) == count, result
        return result  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    made = Fleet()
    try:
        yield made
    finally:
        made.close()


def _one(spans: list[dict[str, Any]], name: str, kind: str) -> dict[str, Any]:
    found = [s for s in spans if s["name"] == name and s["kind"] == kind]
    assert len(found) == 1, (name, kind, spans)
    return found[0]


def _child(span: dict[str, Any], parent: dict[str, Any]) -> None:
    assert span["trace_id"] == parent["trace_id"], (span, parent)
    assert span["parent"] == parent["span_id"], (span, parent)


def test_client_span_is_the_parent_of_the_worker_span(fleet: Fleet) -> None:
    result, spans = fleet.client("call")
    assert result == 1
    client = _one(spans, "trace_back/echo", "CLIENT")
    assert client["parent"] is None
    assert client["status"] == "UNSET"
    attrs = client["attributes"]
    port = int(fleet.back.uri.rsplit(":", 1)[1])
    assert attrs["rpc.system"] == "pyrorpc" and attrs["rpc.service"] == "trace_back"
    assert attrs["rpc.method"] == "echo" and attrs["pyrorpc.call"] == "call"
    assert attrs["pyrorpc.worker"] == fleet.back.name
    assert attrs["net.peer.name"] == "127.0.0.1" and attrs["net.peer.port"] == port

    (server,) = fleet.spans(fleet.back, client["trace_id"], 1)
    assert server["name"] == "trace_back/echo" and server["kind"] == "SERVER"
    _child(server, client)
    assert server["attributes"]["rpc.method"] == "echo"
    assert server["attributes"]["pyrorpc.worker"] == fleet.back.name
    assert server["attributes"]["net.peer.name"] == "127.0.0.1"


def test_nested_call_is_one_trace(fleet: Fleet) -> None:
    """client -> front.relay -> (a Pool inside the method) -> back.echo: four spans, one trace."""
    result, spans = fleet.client("nested")
    assert result == 5
    client = _one(spans, "trace_front/relay", "CLIENT")
    front = fleet.spans(fleet.front, client["trace_id"], 2)
    relay = _one(front, "trace_front/relay", "SERVER")
    inner = _one(front, "trace_back/echo", "CLIENT")
    (echo,) = fleet.spans(fleet.back, client["trace_id"], 1)
    _child(relay, client)
    _child(inner, relay)
    _child(echo, inner)
    assert echo["kind"] == "SERVER"


def test_aio_calls_and_async_methods(fleet: Fleet) -> None:
    result, spans = fleet.client("aio")
    assert result == [6, 7, 8]
    assert {s["attributes"]["pyrorpc.call"] for s in spans} == {"aio"}
    echo = _one(spans, "trace_back/echo", "CLIENT")
    aecho = _one(spans, "trace_back/aecho", "CLIENT")
    arelay = _one(spans, "trace_front/arelay", "CLIENT")
    _child(_one(fleet.spans(fleet.back, echo["trace_id"], 1), "trace_back/echo", "SERVER"), echo)
    _child(_one(fleet.spans(fleet.back, aecho["trace_id"], 1), "trace_back/aecho", "SERVER"), aecho)
    # an async method calling another service with aio(): its span is current in its task
    front = fleet.spans(fleet.front, arelay["trace_id"], 2)
    served = _one(front, "trace_front/arelay", "SERVER")
    inner = _one(front, "trace_back/aecho", "CLIENT")
    _child(served, arelay)
    _child(inner, served)
    _child(_one(fleet.spans(fleet.back, arelay["trace_id"], 1), "trace_back/aecho", "SERVER"), inner)


@pytest.mark.parametrize(("scenario", "method", "call"), [("stream", "count", "stream"),
                                                          ("astream", "acount", "astream")])
def test_streams(fleet: Fleet, scenario: str, method: str, call: str) -> None:
    result, spans = fleet.client(scenario)
    assert result == [0, 1, 2]
    client = _one(spans, f"trace_back/{method}", "CLIENT")
    assert client["attributes"]["pyrorpc.call"] == call and client["status"] == "UNSET"
    (server,) = fleet.spans(fleet.back, client["trace_id"], 1)
    _child(server, client)
    assert server["status"] == "UNSET"


def test_a_stream_that_calls_another_service(fleet: Fleet) -> None:
    """The span of a generator method is current while it makes its items: its calls are its children."""
    result, spans = fleet.client("nested_stream")
    assert result == [0, 1]
    client = _one(spans, "trace_front/relay_stream", "CLIENT")
    front = fleet.spans(fleet.front, client["trace_id"], 2)
    served = _one(front, "trace_front/relay_stream", "SERVER")
    inner = _one(front, "trace_back/count", "CLIENT")
    _child(served, client)
    _child(inner, served)
    _child(_one(fleet.spans(fleet.back, client["trace_id"], 1), "trace_back/count", "SERVER"), inner)


def test_map_batches(fleet: Fleet) -> None:
    result, spans = fleet.client("map")
    assert result == [1, 2, 3]
    batches = [s for s in spans if s["name"] == "trace_back/echo" and s["attributes"]["pyrorpc.call"] == "batch"]
    assert batches and sum(s["attributes"]["pyrorpc.batch_size"] for s in batches) == 3
    for client in batches:
        (server,) = fleet.spans(fleet.back, client["trace_id"], 1)
        assert server["name"] == "trace_back/echo"
        assert server["attributes"]["pyrorpc.batch_size"] == client["attributes"]["pyrorpc.batch_size"]
        _child(server, client)


def test_metadata_becomes_attributes(fleet: Fleet) -> None:
    result, spans = fleet.client("metadata")
    assert result == 2
    client = _one(spans, "trace_back/echo", "CLIENT")
    (server,) = fleet.spans(fleet.back, client["trace_id"], 1)
    for span in (client, server):
        assert span["attributes"]["pyrorpc.metadata.request_id"] == "r-7"
        assert span["attributes"]["pyrorpc.metadata.tenant"] == 3


def test_errors_set_the_status_and_record_the_exception(fleet: Fleet) -> None:
    result, spans = fleet.client("error")
    assert result == "boom"
    client = _one(spans, "trace_back/fail", "CLIENT")
    (server,) = fleet.spans(fleet.back, client["trace_id"], 1)
    _child(server, client)
    for span in (client, server):
        assert span["status"] == "ERROR"
        assert "exception" in span["events"]


def test_a_call_given_up_is_no_error(fleet: Fleet) -> None:
    result, spans = fleet.client("cancelled")
    assert result == "gave up"
    client = _one(spans, "trace_back/nap", "CLIENT")
    assert client["status"] == "UNSET" and client["attributes"]["pyrorpc.abandoned"] is True
    (server,) = fleet.spans(fleet.back, client["trace_id"], 1)  # cancelled there too (MSG_CANCEL)
    _child(server, client)
    assert server["status"] == "UNSET" and server["attributes"]["pyrorpc.abandoned"] is True


def test_oneway_calls(fleet: Fleet) -> None:
    result, spans = fleet.client("oneway")
    assert result == 4
    client = _one(spans, "trace_back/note", "CLIENT")
    assert client["attributes"]["pyrorpc.call"] == "oneway"
    (server,) = fleet.spans(fleet.back, client["trace_id"], 1)
    assert server["name"] == "trace_back/note"
    _child(server, client)


def test_a_client_with_no_provider_sends_no_trace_context(fleet: Fleet) -> None:
    import opentelemetry.trace  # noqa: F401 - the API imported, no provider set: still off

    assert tracing.tracer() is None
    with pyrorpc.Pool("trace_back", ns=fleet.ns) as back:
        assert "PRTC" not in back.annotations()
        assert back.aecho(1) == 1
    # the same call from a traced client does carry it
    result, _spans = fleet.client("annotations")
    assert "PRTC" in result


def test_a_provider_set_later_turns_tracing_on(fleet: Fleet) -> None:
    (before, after), spans = fleet.client("late", trace=False)
    assert "PRTC" not in before and "PRTC" in after
    client = _one(spans, "trace_back/annotations", "CLIENT")
    _child(_one(fleet.spans(fleet.back, client["trace_id"], 1), "trace_back/annotations", "SERVER"), client)


def test_a_stock_pyro5_proxy_calls_a_traced_worker(fleet: Fleet) -> None:
    before = len(fleet.spans(fleet.back, None, 0))
    with Pyro5.api.Proxy(fleet.back.uri) as proxy:
        assert proxy.echo("stock") == "stock"
        assert proxy.annotations() == []
    spans = fleet.spans(fleet.back, None, before + 2)[before:]
    assert [s["name"] for s in spans] == ["trace_back/echo", "trace_back/annotations"]
    assert all(s["parent"] is None and s["status"] == "UNSET" for s in spans)  # roots: no trace came


def test_garbage_trace_context_is_ignored(fleet: Fleet) -> None:
    """A PRTC that is no trace context: the call runs, its span is a root."""
    before = len(fleet.spans(fleet.back, None, 0))
    endpoint = Endpoint(fleet.back.uri, pyrorpc.Settings())
    try:
        for raw in (b"\xff\xfe", b"traceparent=00-zz-yy-01", b"no equals sign", b"=" * 9000):
            assert endpoint.call("echo", ("x",), {}, 5.0, trace=pack_annotations({"PRTC": raw})) == "x"
    finally:
        endpoint.close()
    spans = fleet.spans(fleet.back, None, before + 4)[before:]
    assert all(s["name"] == "trace_back/echo" and s["parent"] is None for s in spans)



def test_the_cost_benchmark_runs() -> None:
    """benchmarks/tracing_cost.py, tiny: a row per tracing state."""
    script = os.path.join(os.path.dirname(HERE), "benchmarks", "tracing_cost.py")
    done = subprocess.run([sys.executable, script, "--calls", "200", "--rounds", "1", "--cpus", ""], env=_env(False),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line.split("|")[1].strip() for line in done.stdout.splitlines() if line.startswith("| ")]
    assert rows[1:] == ["off", "no-sdk", "sdk-drop", "sdk-batch"], done.stdout

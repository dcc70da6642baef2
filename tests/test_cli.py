"""The ``pyrorpc`` command, run as a real subprocess against real name servers and worker processes."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from click.testing import CliRunner

import pyrorpc
from pyrorpc.cli import main as cli_main
from pyrorpc.testing import ChildProcess, WorkerProcess, wait_for

HERE = os.path.dirname(os.path.abspath(__file__))
DOWN_NS = "127.0.0.1:1"  # nothing listens on port 1: connection refused at once
CLI_TIMEOUT = 30.0


# helpers ---------------------------------------------------------------------------------------------

def cli(*args: str, env: dict[str, str] | None = None,
        timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run ``python -m pyrorpc ARGS`` to completion; short connect timeout so failures stay fast."""
    full_env = {**os.environ, "PYRORPC_CONNECT_TIMEOUT": "3", **(env or {})}
    return subprocess.run([sys.executable, "-m", "pyrorpc", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    """Assert a clean success and return stdout."""
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stdout + result.stderr
    return result.stdout


def user_error(result: subprocess.CompletedProcess[str]) -> str:
    """Assert the user-error contract and return the single ``Error:`` line.

    Exit 1 with exactly one ``Error: ...`` line on stderr, or a click usage error (exit 2: usage text plus
    one ``Error:`` line); never a traceback.
    """
    both = result.stdout + result.stderr
    assert "Traceback" not in both, both
    assert result.returncode in (1, 2), f"exit {result.returncode}\n{both}"
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, f"expected one 'Error:' line on stderr, got:\n{result.stderr}"
    if result.returncode == 1:
        assert result.stderr.strip().splitlines() == errors, f"exit 1 must print only the error line:\n{result.stderr}"
    else:
        assert result.stderr.lstrip().startswith("Usage:"), result.stderr
    return errors[0]


def registry(ns: str) -> pyrorpc.NameServerClient:
    return pyrorpc.NameServerClient(pyrorpc.Settings(ns=ns, connect_timeout=3))


def live_workers(ns: str, service: str = "calc") -> list[pyrorpc.WorkerInfo]:
    return registry(ns).service_workers(service)


class Spawned(ChildProcess):
    """A long-running ``python -m pyrorpc ARGS`` in its own session, output collected line by line."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None) -> None:
        super().__init__([sys.executable, "-m", "pyrorpc", *args],
                         env={**os.environ, "PYRORPC_CONNECT_TIMEOUT": "3", **(env or {})})


@pytest.fixture
def spawn() -> Any:
    made: list[Spawned] = []

    def factory(*args: str, env: dict[str, str] | None = None) -> Spawned:
        s = Spawned(args, env)
        made.append(s)
        return s

    yield factory
    for s in made:
        s.kill()
        print(f"--- output of pyrorpc {' '.join(s.proc.args[3:])}:\n{s.output}")  # shown if the test failed


@pytest.fixture
def calc(ns_addr: str, worker_factory: Callable[..., Any]) -> Any:
    """One ``services:Calculator`` worker process registered with the in-thread name server."""
    return worker_factory("services:Calculator", ns_addr)


@pytest.fixture(scope="module")
def shared_ns() -> Iterator[str]:
    """One in-thread name server (lease TTL 3 s) for the tests of this module that register nothing, remove
    nothing and count nothing: they only call ``shared_calc`` and read the registry."""
    from nameserver import NameServerDaemon
    with NameServerDaemon("127.0.0.1", 0, lease_ttl=3.0) as daemon:
        daemon.start()
        host, port = daemon.address
        yield f"{host}:{port}"


@pytest.fixture(scope="module")
def shared_calc(shared_ns: str) -> Iterator[WorkerProcess]:
    """The only worker of ``shared_ns``, a ``services:Calculator`` process (tests that count its calls, or
    remove or add registrations, use ``calc`` and a name server of their own)."""
    # module scope: started before the per-test clean_environ, so its environment is made the same way here
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYRORPC_", "PYRO_"))}
    env["PYTHONPATH"] = HERE + os.pathsep + os.environ.get("PYTHONPATH", "")
    worker = WorkerProcess("services:Calculator", shared_ns, env=env)
    try:
        yield worker
    finally:
        worker.kill()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# 1. pyrorpc call -------------------------------------------------------------------------------------

def test_call_prints_result(shared_ns: str, shared_calc: Any) -> None:
    result = cli("call", "calc", "add", "2", "3", "--ns", shared_ns)
    assert ok(result) == "5\n"
    assert result.stderr == ""


def test_call_negative_numbers_are_arguments_not_options(shared_ns: str, shared_calc: Any) -> None:
    assert ok(cli("call", "calc", "add", "-1", "-2", "--ns", shared_ns)).strip() == "-3"


def test_call_keyword_and_literal_arguments(shared_ns: str, shared_calc: Any) -> None:
    assert ok(cli("call", "calc", "add", "--kw", "a=40", "--kw", "b=2", "--ns", shared_ns)).strip() == "42"
    assert ok(cli("call", "calc", "add", "1", "--kw", "b=2.5", "--ns", shared_ns)).strip() == "3.5"
    # string literals and bare words both arrive as str; a string result prints without quotes
    assert ok(cli("call", "calc", "add", "'ab'", "'cd'", "--ns", shared_ns)) == "abcd\n"
    assert ok(cli("call", "calc", "add", "foo", "bar", "--ns", shared_ns)) == "foobar\n"
    # a list result prints as its repr
    assert ok(cli("call", "calc", "add", "[1, 'x']", "[None]", "--ns", shared_ns)).strip() == "[1, 'x', None]"


def test_call_json_output_parses(shared_ns: str, shared_calc: Any) -> None:
    assert json.loads(ok(cli("call", "calc", "add", "[1, 2]", "[3]", "--json", "--ns", shared_ns))) == [1, 2, 3]
    assert json.loads(ok(cli("call", "calc", "add", "'a'", "'b'", "--json", "--ns", shared_ns))) == "ab"
    assert json.loads(ok(cli("call", "calc", "add", "2", "3", "--json", "--ns", shared_ns))) == 5
    assert json.loads(ok(cli("call", "calc", "get", "k", "--json", "--ns", shared_ns))) == "value-k"


def test_call_oneway_then_logs_shows_message(shared_ns: str, shared_calc: Any) -> None:
    token = f"hello-{os.getpid()}-{time.monotonic_ns()}"
    out = ok(cli("call", "calc", "log", token, "--oneway", "--ns", shared_ns))
    assert "oneway" in out
    assert token not in out  # nothing is returned by a oneway call

    def logged() -> bool:
        return token in json.loads(ok(cli("call", "calc", "logs", "--json", "--ns", shared_ns)))

    wait_for(logged, timeout=10, interval=0.1, message="oneway message in logs")
    assert token in ok(cli("call", "calc", "logs", "--ns", shared_ns))


def test_call_by_worker_name_and_by_uri(ns_addr: str, worker_factory: Callable[..., Any]) -> None:
    w1 = worker_factory("services:Calculator", ns_addr)
    w2 = worker_factory("services:Calculator", ns_addr)
    assert w1.worker_pid != w2.worker_pid
    for w in (w1, w2):
        assert int(ok(cli("call", w.name, "pid", "--ns", ns_addr))) == w.worker_pid
        # a PYRO: URI needs no name server at all
        assert int(ok(cli("call", w.uri, "pid", "--ns", DOWN_NS))) == w.worker_pid
        assert ok(cli("call", w.uri, "add", "20", "22")).strip() == "42"
    # by service name: one of the two
    assert int(ok(cli("call", "calc", "pid", "--ns", ns_addr))) in {w1.worker_pid, w2.worker_pid}


def test_call_uses_pyrorpc_ns_env(shared_ns: str, shared_calc: Any) -> None:
    assert ok(cli("call", "calc", "add", "2", "3", env={"PYRORPC_NS": shared_ns})) == "5\n"
    # --ns wins over the environment
    assert ok(cli("call", "calc", "add", "2", "3", "--ns", shared_ns, env={"PYRORPC_NS": DOWN_NS})) == "5\n"
    # and the environment really is read: a dead name server there is an error
    line = user_error(cli("call", "calc", "add", "2", "3", env={"PYRORPC_NS": DOWN_NS}))
    assert DOWN_NS in line


def test_call_remote_exception_is_one_error_line(shared_ns: str, shared_calc: Any) -> None:
    result = cli("call", "calc", "fail", "'boom'", "--ns", shared_ns)
    line = user_error(result)
    assert result.returncode == 1
    assert "ValueError" in line and "boom" in line
    assert result.stdout == ""


def test_call_traceback_option_shows_remote_traceback(shared_ns: str, shared_calc: Any) -> None:
    result = cli("call", "calc", "fail", "'boom'", "--traceback", "--ns", shared_ns)
    assert result.returncode == 1 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    # the remote traceback (asked for), then the one error line, last
    assert "raise ValueError(message)" in result.stderr and "services.py" in result.stderr
    assert [ln for ln in lines if ln.startswith("Error:")] == [lines[-1]]
    assert "ValueError" in lines[-1] and "boom" in lines[-1]
    # and this process's own stack is never shown, with or without --traceback
    assert "click/core.py" not in result.stderr and "pyrorpc/cli.py" not in result.stderr


def test_call_timeout_is_one_error_line(shared_ns: str, shared_calc: Any) -> None:
    started = time.monotonic()
    result = cli("call", "calc", "slow", "3", "--timeout", "0.5", "--ns", shared_ns)
    elapsed = time.monotonic() - started
    line = user_error(result)
    assert "Timeout" in line
    assert elapsed < 2.9, f"--timeout 0.5 took {elapsed:.1f}s"


# 2. user mistakes: one Error: line, non-zero exit, no traceback --------------------------------------

@pytest.mark.parametrize("ns, needle", [("nonsense", "nonsense"), ("host:99999", "99999"), ("host:", "host:")])
def test_bad_ns_address(ns: str, needle: str) -> None:
    for args in (["call", "calc", "add", "1", "2"], ["ns", "ping"], ["workers"]):
        result = cli(*args, "--ns", ns)
        line = user_error(result)
        assert needle in line
        assert result.returncode == 2  # a bad option value is a usage error


def test_bad_ns_in_environment() -> None:
    line = user_error(cli("ns", "ping", env={"PYRORPC_NS": "nonsense"}))
    assert "nonsense" in line


@pytest.mark.parametrize("args", [
    ["call", "calc", "add", "1", "2"],
    ["ns", "ping"],
    ["ns", "list"],
    ["ns", "lookup", "calc.x"],
    ["ns", "remove", "calc.x"],
    ["workers"],
    ["worker", "start", "services:Calculator"],
], ids=lambda a: " ".join(a[:2]))
def test_name_server_down(args: list[str]) -> None:
    started = time.monotonic()
    # (a worker keeps trying a name server for connect_timeout: 1 s here, the error is the same)
    result = cli(*args, "--ns", DOWN_NS, env={"PYRORPC_CONNECT_TIMEOUT": "1"})
    line = user_error(result)
    assert result.returncode == 1
    assert DOWN_NS in line
    assert time.monotonic() - started < 10


def test_unknown_service(shared_ns: str) -> None:
    result = cli("call", "nosuchservice", "add", "1", "2", "--ns", shared_ns)
    line = user_error(result)
    assert result.returncode == 1
    assert "nosuchservice" in line


@pytest.mark.parametrize("method", ["nosuchmethod", "secret_value"])
def test_unknown_or_unexposed_method(shared_ns: str, shared_calc: Any, method: str) -> None:
    """Calling a method the service does not expose is a user mistake: one line, no traceback."""
    result = cli("call", "calc", method, "--ns", shared_ns)
    line = user_error(result)
    assert method in line


def test_private_method_refused(shared_ns: str, shared_calc: Any) -> None:
    result = cli("call", "calc", "_private", "--ns", shared_ns)
    line = user_error(result)
    assert "_private" in line
    assert "private" not in result.stdout  # never called: the method would have returned "private"


@pytest.mark.parametrize("spec, needle", [
    ("nosuchmod:X", "nosuchmod"),
    ("services:NoSuchClass", "NoSuchClass"),
    ("services", "MODULE:CLASS"),
    (":Calculator", "MODULE:CLASS"),
    ("services:CustomError.nope", "CustomError.nope"),
])
def test_worker_start_unimportable_class(spec: str, needle: str) -> None:
    # the spec is checked before the name server is contacted, so a dead --ns must not matter
    result = cli("worker", "start", spec, "--ns", DOWN_NS)
    line = user_error(result)
    assert result.returncode == 1
    assert needle in line


def test_worker_start_class_without_service_name(ns_addr: str) -> None:
    line = user_error(cli("worker", "start", "services:Plain", "--ns", ns_addr))
    assert "Plain" in line and "service" in line
    assert live_workers(ns_addr, "Plain") == [] and registry(ns_addr).count() == 1  # nothing registered


def test_worker_start_plain_class_with_service_option(ns_addr: str, worker_factory: Callable[..., Any]) -> None:
    w = worker_factory("services:Plain", ns_addr, args=["--service", "plain"])
    assert w.service == "plain" and w.name.startswith("plain.")
    assert ok(cli("call", "plain", "hello", "--ns", ns_addr)) == "hello\n"


def test_ns_lookup_unknown_name(shared_ns: str) -> None:
    result = cli("ns", "lookup", "no.such.name", "--ns", shared_ns)
    assert "no.such.name" in user_error(result)
    assert result.returncode == 1


def test_ns_remove_unknown_name(shared_ns: str) -> None:
    result = cli("ns", "remove", "no.such.name", "--ns", shared_ns)
    assert "no.such.name" in user_error(result)
    assert result.returncode == 1


@pytest.mark.parametrize("args, needle", [
    (["call", "calc", "add", "--kw", "novalue"], "novalue"),
    (["call", "calc", "add", "--kw", "1x=2"], "1x=2"),
    (["call", "calc", "add", "--timeout", "0"], "--timeout"),
    (["call", "calc", "_private"], "_private"),
    (["worker", "start", "services:Calculator", "--processes", "2", "--port", "5000"], "--port"),
    (["worker", "start", "services:Calculator", "--processes", "0"], "--processes"),
    (["ns", "start", "--port", "70000"], "--port"),
    (["ns", "nosuchcommand"], "nosuchcommand"),
])
def test_usage_errors_without_network(args: list[str], needle: str) -> None:
    """Argument validation that must fail before any connection (the --ns given is dead)."""
    result = CliRunner().invoke(cli_main, [*args, "--ns", DOWN_NS] if args[0] != "ns" else args,
                                prog_name="pyrorpc")
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1 and needle in error_lines[0], result.output


# 3. pyrorpc ns ... -----------------------------------------------------------------------------------

def test_ns_ping(shared_ns: str) -> None:
    out = ok(cli("ns", "ping", "--ns", shared_ns))
    assert shared_ns in out and "pyrorpc" in out


def test_ns_list(shared_ns: str, shared_calc: Any) -> None:
    out = ok(cli("ns", "list", "--ns", shared_ns))
    rows = dict(line.split(None, 1) for line in out.strip().splitlines())
    assert rows[shared_calc.name].strip() == shared_calc.uri
    assert "Pyro.NameServer" in rows

    out = ok(cli("ns", "list", "calc", "--ns", shared_ns))
    rows = dict(line.split(None, 1) for line in out.strip().splitlines())
    assert rows == {shared_calc.name: shared_calc.uri}


def test_ns_list_json(shared_ns: str, shared_calc: Any) -> None:
    data = json.loads(ok(cli("ns", "list", "--json", "--ns", shared_ns)))
    assert set(data) == {"Pyro.NameServer", shared_calc.name}
    assert data[shared_calc.name]["uri"] == shared_calc.uri
    assert "pyrorpc.service:calc" in data[shared_calc.name]["metadata"]

    data = json.loads(ok(cli("ns", "list", "calc", "--json", "--ns", shared_ns)))
    assert set(data) == {shared_calc.name}
    assert data[shared_calc.name]["uri"] == shared_calc.uri


def test_ns_list_service_json_keeps_metadata(shared_ns: str, shared_calc: Any) -> None:
    """``ns list SERVICE --json`` has the same shape and content as ``ns list --json``, just filtered."""
    everything = json.loads(ok(cli("ns", "list", "--json", "--ns", shared_ns)))
    only_calc = json.loads(ok(cli("ns", "list", "calc", "--json", "--ns", shared_ns)))
    assert "pyrorpc.service:calc" in only_calc[shared_calc.name]["metadata"]
    assert only_calc[shared_calc.name]["metadata"] == everything[shared_calc.name]["metadata"]


def test_ns_list_unknown_service(shared_ns: str) -> None:
    assert "nosuchservice" in user_error(cli("ns", "list", "nosuchservice", "--ns", shared_ns))


def test_ns_lookup(shared_ns: str, shared_calc: Any) -> None:
    data = json.loads(ok(cli("ns", "lookup", shared_calc.name, "--json", "--ns", shared_ns)))
    assert data["name"] == shared_calc.name and data["uri"] == shared_calc.uri
    assert "pyrorpc.service:calc" in data["metadata"]
    assert f"pyrorpc.pid:{shared_calc.worker_pid}" in data["metadata"]

    lines = ok(cli("ns", "lookup", shared_calc.name, "--ns", shared_ns)).splitlines()
    assert lines[0] == shared_calc.uri
    assert "  pyrorpc.service:calc" in lines[1:]


def test_ns_remove(ns_addr: str, calc: Any) -> None:
    # a plain (unleased) registration: once removed it stays removed
    client = registry(ns_addr)
    client.register("plain.thing", "PYRO:thing@127.0.0.1:1", {"x"})
    assert "removed plain.thing" in ok(cli("ns", "remove", "plain.thing", "--ns", ns_addr))
    assert "plain.thing" not in client.list()
    assert "plain.thing" in user_error(cli("ns", "remove", "plain.thing", "--ns", ns_addr))

    # a live worker's entry: removed now, and the worker's next heartbeat registers it again
    assert calc.name in ok(cli("ns", "remove", calc.name, "--ns", ns_addr))
    wait_for(lambda: calc.name in client.list(), timeout=5, interval=0.1, message="worker re-registered")


# 4. pyrorpc workers ----------------------------------------------------------------------------------

def test_workers_json_and_table_reflect_calls(ns_addr: str, calc: Any) -> None:
    for i in range(3):
        ok(cli("call", "calc", "add", str(i), "1", "--ns", ns_addr))
    user_error(cli("call", "calc", "fail", "x", "--ns", ns_addr))

    def reported() -> dict[str, Any] | None:
        rows = json.loads(ok(cli("workers", "--json", "--ns", ns_addr)))
        assert [r["name"] for r in rows] == [calc.name]
        return rows[0] if rows[0]["calls"] >= 4 else None

    row = wait_for(reported, timeout=8, interval=0.2, message="4 calls in the lease report")
    assert row["calls"] == 4 and row["errors"] == 1 and row["in_flight"] == 0
    assert row["pid"] == calc.worker_pid
    assert row["uri"] == calc.uri and row["service"] == "calc"
    assert row["host"] and socket.gethostname().startswith(row["host"])
    assert 0 <= row["uptime"] < 120
    assert row["last_heartbeat"] is not None and 0 <= row["last_heartbeat"] <= 3.5  # TTL 3 s

    out = ok(cli("workers", "calc", "--ns", ns_addr))
    lines = out.strip().splitlines()
    assert lines[0].split() == ["WORKER", "HOST", "PID", "IN-FLIGHT", "CALLS", "ERRORS", "UPTIME", "HEARTBEAT"]
    assert lines[-1] == "1 worker(s)"
    (line,) = [ln for ln in lines if ln.startswith(calc.name)]
    name, host, pid, in_flight, calls, errors, uptime, heartbeat, *rest = line.split()
    assert (name, host, pid) == (calc.name, row["host"], str(calc.worker_pid))
    assert (in_flight, calls, errors) == ("0", "4", "1")
    assert re.fullmatch(r"\d+s|\d+m\d\ds", uptime)
    assert re.fullmatch(r"\d+\.\ds", heartbeat) and rest == ["ago"]


def test_workers_lists_every_service(ns_addr: str, worker_factory: Callable[..., Any]) -> None:
    calc = worker_factory("services:Calculator", ns_addr)
    sleeper = worker_factory("services:Sleeper", ns_addr)
    rows = json.loads(ok(cli("workers", "--json", "--ns", ns_addr)))
    assert {(r["name"], r["service"], r["pid"]) for r in rows} == {
        (calc.name, "calc", calc.worker_pid), (sleeper.name, "sleeper", sleeper.worker_pid)}
    only = json.loads(ok(cli("workers", "sleeper", "--json", "--ns", ns_addr)))
    assert [r["name"] for r in only] == [sleeper.name]


def test_workers_unknown_service(shared_ns: str) -> None:
    result = cli("workers", "nosuchservice", "--ns", shared_ns)
    assert result.returncode == 1 and "Traceback" not in result.stdout + result.stderr
    assert [ln for ln in result.stderr.splitlines() if ln.startswith("Error:")] == [
        "Error: no live workers for service 'nosuchservice'"]


# 5. pyrorpc ns start ---------------------------------------------------------------------------------

def test_ns_start_ping_and_sigterm(spawn: Callable[..., Spawned]) -> None:
    ns = spawn("ns", "start", "--port", "0", "--lease-ttl", "3")
    match = ns.expect(r"NS running on (\S+):(\d+)")
    host, port = match.group(1), int(match.group(2))
    assert host == "127.0.0.1" and port > 0
    assert "lease TTL 3s" in ns.output
    addr = f"{host}:{port}"

    assert addr in ok(cli("ns", "ping", "--ns", addr))
    # a stock Pyro5 client finds it under the well-known name
    import Pyro5.api
    with Pyro5.api.Proxy(f"PYRO:Pyro.NameServer@{addr}") as stock:
        stock._pyroTimeout = 5
        stock.ping()
        assert "Pyro.NameServer" in stock.list()

    ns.proc.send_signal(signal.SIGTERM)
    assert ns.proc.wait(10) == 0
    ns._reader.join(5)
    assert "Traceback" not in ns.output
    assert "shut down" in ns.output
    user_error(cli("ns", "ping", "--ns", addr))  # and it is really gone


def test_ns_start_port_in_use(shared_ns: str) -> None:
    host, port = shared_ns.rsplit(":", 1)
    result = cli("ns", "start", "--host", host, "--port", port, timeout=15)
    line = user_error(result)
    assert result.returncode == 1
    assert port in line or "in use" in line.lower()


# 6. supervisor: pyrorpc worker start --processes N ---------------------------------------------------

def test_supervisor_restarts_killed_worker_and_drains_on_sigterm(ns_addr: str,
                                                                 spawn: Callable[..., Spawned]) -> None:
    sup = spawn("worker", "start", "services:Calculator", "--processes", "2", "--ns", ns_addr,
                "--drain-timeout", "2")

    def two_workers() -> list[pyrorpc.WorkerInfo] | None:
        assert sup.proc.poll() is None, f"supervisor exited:\n{sup.output}"
        found = live_workers(ns_addr)
        return found if len(found) == 2 else None

    first = wait_for(two_workers, timeout=15, interval=0.1, message="2 supervised workers registered")
    pids = {w.pid for w in first}
    assert len(pids) == 2 and sup.proc.pid not in pids
    # the same entries a stock Pyro5 client sees
    import Pyro5.api
    with Pyro5.api.Proxy(f"PYRO:Pyro.NameServer@{ns_addr}") as stock:
        stock._pyroTimeout = 5
        assert set(stock.yplookup(meta_all={"pyrorpc.service:calc"})) == {w.name for w in first}

    victim, survivor = first
    os.kill(victim.pid, signal.SIGKILL)
    killed_at = time.monotonic()

    def replacement() -> pyrorpc.WorkerInfo | None:
        assert sup.proc.poll() is None, f"supervisor exited:\n{sup.output}"
        return next((w for w in live_workers(ns_addr) if w.pid not in pids), None)

    new = wait_for(replacement, timeout=10, interval=0.1, message="restarted worker registered")
    assert new.pid != victim.pid and pid_alive(new.pid)
    assert int(ok(cli("call", new.name, "pid", "--ns", ns_addr))) == new.pid

    wait_for(lambda: victim.name not in {w.name for w in live_workers(ns_addr)}, timeout=8, interval=0.1,
             message="dead worker's lease expired")
    assert time.monotonic() - killed_at < 3 + 2  # TTL 3 s plus sweep slack
    assert {w.pid for w in live_workers(ns_addr)} == {survivor.pid, new.pid}
    assert str(victim.pid) in sup.output  # the supervisor said which worker died

    sup.proc.send_signal(signal.SIGTERM)
    # leases were renewed <= 1 s ago, so they cannot expire for ~2 s: gone sooner means deregistered
    try:
        wait_for(lambda: not live_workers(ns_addr), timeout=1.5, interval=0.05)
    except TimeoutError:
        pytest.fail(f"still registered 1.5 s after SIGTERM: {live_workers(ns_addr)}")
    assert sup.proc.wait(15) == 0, sup.output
    for pid in (survivor.pid, new.pid):
        assert not pid_alive(pid)
    sup._reader.join(5)
    for w in (survivor, new):  # each drained and said so (a SIGKILLed worker prints nothing)
        assert f"worker {w.name} stopped" in sup.output, sup.output
    assert "Traceback" not in sup.output


# 7. help and demo ------------------------------------------------------------------------------------

COMMANDS = ("ns", "worker", "workers", "call", "demo")


def _pyrorpc_script() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "pyrorpc")
    path = here if os.path.exists(here) else shutil.which("pyrorpc")
    assert path, "the `pyrorpc` console script is not installed"
    return path


@pytest.mark.parametrize("entry", ["module", "script"])
def test_help_lists_commands(entry: str) -> None:
    argv = [sys.executable, "-m", "pyrorpc"] if entry == "module" else [_pyrorpc_script()]
    result = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=CLI_TIMEOUT)
    out = ok(result)
    assert out.startswith("Usage: pyrorpc ")
    listed = re.search(r"Commands:\n((?:  .*\n?)+)", out)
    assert listed, out
    assert {line.split()[0] for line in listed.group(1).splitlines()} >= set(COMMANDS)


@pytest.mark.parametrize("args", [["demo"], ["ns"], ["ns", "start"], ["worker", "start"], ["call"], ["workers"]])
def test_subcommand_help(args: list[str]) -> None:
    out = ok(cli(*args, "--help"))
    assert out.startswith(f"Usage: pyrorpc {' '.join(args)}")


def test_demo_help() -> None:
    out = ok(cli("demo", "--help"))
    for option in ("--workers", "--calls", "--no-kill"):
        assert option in out


def test_demo_runs(tmp_path: Any) -> None:
    result = subprocess.run([sys.executable, "-m", "pyrorpc", "demo", "--calls", "60", "--workers", "2"],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    out = ok(result)
    assert "0 lost" in out
    assert "60/60" in out


def test_worker_started_before_its_name_server_waits_for_it(tmp_path: Any) -> None:
    """`pyrorpc ns start & pyrorpc worker start ...`: the worker gives the name server connect_timeout."""
    import socket as _socket

    from pyrorpc.testing import NameServerProcess, WorkerProcess
    with _socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ns_addr = f"127.0.0.1:{port}"
    result: dict[str, Any] = {}

    def start_worker() -> None:
        result["worker"] = WorkerProcess("services:Calculator", ns_addr, timeout=20)

    import threading as _threading
    t = _threading.Thread(target=start_worker)
    t.start()
    with NameServerProcess(port=port, lease_ttl=3) as ns:
        t.join(30)
        worker = result["worker"]
        try:
            names = [w.name for w in pyrorpc.NameServerClient(pyrorpc.Settings(ns=ns.ns)).service_workers("calc")]
            assert names == [worker.name]
        finally:
            worker.kill()

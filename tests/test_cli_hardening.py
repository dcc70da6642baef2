"""Issue 10, items 14, 15, 17, 18: the CLI's errors, ``workers --watch``, the demo's report, the README's
conversion notes. Real name servers and workers on 127.0.0.1; the CLI as a subprocess or through CliRunner."""

from __future__ import annotations

import atexit
import datetime
import decimal
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import Pyro5.errors
import pytest
from click.testing import CliRunner
from test_cli import DOWN_NS, Spawned, cli, ok, user_error

import pyrorpc
from nameserver import NameServerDaemon
from pyrorpc.cli import main as cli_main
from pyrorpc.demo import DemoService, run_demo

README = Path(__file__).resolve().parent.parent / "README.md"


# services the tests' workers serve (imported by worker processes as test_cli_hardening:CLASS) ------------

@pyrorpc.service("echo")
class Echo:
    def echo(self, value: Any) -> Any:
        return value

    def kind(self, value: Any) -> str:
        return type(value).__name__


class _Unserializable:
    def __init__(self) -> None:
        self.a = 1


class FlakyDemo(DemoService):
    """The demo's service, but square(12) fails: the demo must count what did not come back."""

    def square(self, x: int, work_ms: float = 0.0) -> tuple[int, int]:
        if x == 12:
            raise ValueError("square(12) failed on purpose")
        return super().square(x, work_ms)


class UncleanDemo(DemoService):
    """The demo's service in a worker process that exits with status 3 when stopped."""

    def __init__(self) -> None:
        super().__init__()
        atexit.register(os._exit, 3)


# helpers ---------------------------------------------------------------------------------------------

def invoke(*args: str) -> Any:
    """Run the CLI in-process (no network needed before the error)."""
    return CliRunner().invoke(cli_main, list(args), prog_name="pyrorpc")


def usage_error(result: Any) -> str:
    """Exit 2, one ``Error:`` line (returned), no traceback."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.fixture
def spawn() -> Iterator[Callable[..., Spawned]]:
    made: list[Spawned] = []

    def factory(*args: str) -> Spawned:
        made.append(Spawned(args))
        return made[-1]

    yield factory
    for s in made:
        s.kill()
        print(f"--- output of pyrorpc {' '.join(s.proc.args[3:])}:\n{s.output}")


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, str]:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    server.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    (tmp_path / "cert.pem").write_bytes(b"".join(b.bytes() for b in server.cert_chain_pems))
    return {name: str(tmp_path / f"{name}.pem") for name in ("ca", "key", "cert")}


@pytest.fixture
def tls_ns(pki: dict[str, str]) -> Iterator[str]:
    settings = pyrorpc.Settings(tls_cert=pki["cert"], tls_key=pki["key"])
    with NameServerDaemon("127.0.0.1", 0, lease_ttl=3.0, settings=settings) as daemon:
        daemon.start()
        yield "{}:{}".format(*daemon.address)


@pytest.fixture
def echo(ns_addr: str) -> Iterator[pyrorpc.WorkerHost]:
    with pyrorpc.WorkerHost(Echo, ns=ns_addr) as host:
        yield host


# 14. one clear Error: line ---------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["inf", "nan", "-inf", "1e99"])
def test_timeout_out_of_range_is_a_usage_error(value: str) -> None:
    line = usage_error(invoke("call", "calc", "add", "1", "2", "--timeout", value, "--ns", DOWN_NS))
    assert "--timeout" in line and (value in line or str(float(value)) in line), line


def test_port_in_use_names_the_address(ns_addr: str) -> None:
    host, port = ns_addr.rsplit(":", 1)
    for args in (["ns", "start", "--host", host, "--port", port],
                 ["worker", "start", "services:Calculator", "--port", port, "--ns", ns_addr]):
        result = cli(*args, timeout=15)
        line = user_error(result)
        assert result.returncode == 1
        assert ns_addr in line and "in use" in line and "Errno" not in line, line


def test_bad_host_says_it_cannot_be_resolved(ns_addr: str) -> None:
    bad = "no-such-host.invalid"
    for args in (["ns", "start", "--host", bad, "--port", "0"],
                 ["worker", "start", "services:Calculator", "--host", bad, "--ns", ns_addr]):
        result = cli(*args, timeout=15)
        line = user_error(result)
        assert bad in line and "gaierror" not in line and "Errno" not in line, line


def test_ns_address_with_two_ports_is_a_usage_error() -> None:
    for args in (["ns", "ping"], ["workers"], ["call", "calc", "add"]):
        line = usage_error(invoke(*args, "--ns", "127.0.0.1:9090:1"))
        assert "127.0.0.1:9090:1" in line and "HOST:PORT" in line and "invalid ipv6" not in line, line
    with pytest.raises(ValueError, match="HOST:PORT"):
        pyrorpc.Settings(ns="127.0.0.1:9090:1")
    # bracketed and bare IPv6 addresses still parse
    assert pyrorpc.Settings(ns="[::1]:9090").ns == ("::1", 9090)
    assert pyrorpc.Settings(ns="::1:9090").ns == ("::1", 9090)


def test_uri_with_port_out_of_range() -> None:
    line = user_error(cli("call", "PYRO:obj@127.0.0.1:99999", "add", "1", "2"))
    assert "99999" in line and "port" in line and "refused" not in line, line


def test_empty_service_name_is_refused(ns_addr: str) -> None:
    result = cli("worker", "start", "services:Calculator", "--service", "", "--ns", ns_addr, timeout=15)
    line = user_error(result)
    assert "service name" in line and "''" in line, line
    assert pyrorpc.NameServerClient(pyrorpc.Settings(ns=ns_addr)).service_workers("calc") == []


def test_tls_cert_without_its_key(pki: dict[str, str]) -> None:
    for args in (["ns", "start", "--port", "0", "--tls-cert", pki["cert"]],
                 ["call", "calc", "add", "1", "2", "--ns", DOWN_NS, "--tls-cert", pki["cert"], "--tls-ca", pki["ca"]]):
        line = user_error(cli(*args, timeout=15))
        assert "PEM lib" not in line and pki["cert"] in line and "--tls-key" in line, line


def test_client_without_tls_against_a_tls_server(tls_ns: str, pki: dict[str, str]) -> None:
    for args in (["ns", "ping"], ["ns", "list"], ["call", "calc", "add", "1", "2"]):
        line = user_error(cli(*args, "--ns", tls_ns))
        assert "TLS" in line and "--tls-ca" in line, line
        assert "connection closed" not in line and "not enough data" not in line, line
    settings = pyrorpc.Settings(ns=tls_ns, tls_cert=pki["cert"], tls_key=pki["key"], tls_ca=pki["ca"])
    with pyrorpc.WorkerHost(Echo, settings=settings) as host:
        line = user_error(cli("call", str(host.uri), "echo", "1"))
        assert "TLS" in line and "--tls-ca" in line, line
        # with the CA it works
        assert ok(cli("call", "echo", "echo", "1", "--ns", tls_ns, "--tls-ca", pki["ca"])) == "1\n"


def _warnings(caplog: pytest.LogCaptureFixture, peer: Any) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and str(peer) in r.getMessage()]


def test_server_logs_tls_refusals_as_secret_refusals(pki: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    settings = pyrorpc.Settings(tls_cert=pki["cert"], tls_key=pki["key"], secret="s3cr3t")
    with NameServerDaemon("127.0.0.1", 0, settings=settings) as daemon:
        daemon.start()
        # a client without TLS: one warning line naming the peer, worded as a secret refusal is
        with socket.create_connection(daemon.address, timeout=5) as sock:
            sock.sendall(b"PYRO" + bytes(20))
            assert sock.recv(100) == b""  # the server closed the connection
            peer = sock.getsockname()
        (tls_line,) = _warnings(caplog, peer)
        # a TLS client without the secret
        with pytest.raises(pyrorpc.AuthenticationError):
            pyrorpc.NameServerClient(pyrorpc.Settings(ns="{}:{}".format(*daemon.address), tls_ca=pki["ca"])).ping()
    (secret_line,) = [m for m in (r.getMessage() for r in caplog.records) if "authentication failed" in m]
    prefix = secret_line.split("(")[0]  # "nameserver: refused connection from "
    assert tls_line.startswith(prefix) and "TLS" in tls_line, (tls_line, secret_line)


@pytest.fixture
def secure_ns() -> Iterator[str]:
    with NameServerDaemon("127.0.0.1", 0, settings=pyrorpc.Settings(secret="s3cr3t")) as daemon:
        daemon.start()
        yield "{}:{}".format(*daemon.address)


def test_auth_and_reach_errors_name_the_address_once(secure_ns: str) -> None:
    for extra in ([], ["--secret", "wrong"]):
        line = user_error(cli("ns", "list", "--ns", secure_ns, *extra))
        assert line.count(secure_ns) == 1 and "AuthenticationError" in line and "secret" in line, line
    line = user_error(cli("ns", "ping", "--ns", DOWN_NS))
    assert line.count(DOWN_NS) == 1, line
    settings = pyrorpc.Settings(ns=secure_ns, secret="s3cr3t")
    with pyrorpc.WorkerHost(Echo, settings=settings) as host:
        location = str(host.uri).split("@")[1]
        line = user_error(cli("call", str(host.uri), "echo", "1", "--secret", "wrong"))
        assert line.count(location) == 1 and "AuthenticationError" in line, line


def test_ns_lookup_of_a_service_says_how_to_list_its_workers(ns_addr: str, echo: pyrorpc.WorkerHost) -> None:
    line = user_error(cli("ns", "lookup", "echo", "--ns", ns_addr))
    assert "'echo' is a service" in line and "pyrorpc workers echo" in line, line
    assert "unknown name: nosuch" in user_error(cli("ns", "lookup", "nosuch", "--ns", ns_addr))


def test_ns_remove_of_a_leased_worker_says_it_comes_back(ns_addr: str, echo: pyrorpc.WorkerHost) -> None:
    out = ok(cli("ns", "remove", echo.name, "--ns", ns_addr))
    assert f"removed {echo.name}" in out
    assert "renewal" in out and "unless" in out and "stop" in out, out


def test_workers_of_unknown_service_prints_no_table(ns_addr: str) -> None:
    for extra in ([], ["--json"]):
        result = cli("workers", "nosuch", "--ns", ns_addr, *extra)
        assert result.stdout == "", result.stdout
        assert "nosuch" in user_error(result)


@pytest.mark.parametrize("args, needle", [
    (["[1,"], "[1,"),
    (["{'a': x}"], "{'a': x}"),
    (["1", "--kw", "b=[1,"], "[1,"),
    (["--kw", "a=1", "--kw", "a=2"], "a"),
])
def test_unparsable_literal_and_repeated_keyword_are_usage_errors(args: list[str], needle: str) -> None:
    line = usage_error(invoke("call", "calc", "add", *args, "--ns", DOWN_NS))
    assert needle in line, line


def test_bare_words_are_still_strings() -> None:
    from pyrorpc.cli import parse_literal
    assert parse_literal("foo") == "foo"
    assert parse_literal("hello world") == "hello world"
    assert parse_literal("a-b") == "a-b"
    assert parse_literal("'[1,'") == "[1,"
    assert parse_literal("[1, 2]") == [1, 2]
    assert parse_literal("-3") == -3
    assert parse_literal("127.0.0.1") == "127.0.0.1" and parse_literal("2024-01-01") == "2024-01-01"


# 15. workers: one table, or --watch that rides out a name-server blip ----------------------------------

def test_readme_calls_only_watch_a_live_table() -> None:
    for line in README.read_text().splitlines():
        if "pyrorpc workers" in line and "live" in line:
            assert "--watch" in line, line


def test_workers_watch_keeps_retrying_through_a_name_server_blip(spawn: Callable[..., Spawned]) -> None:
    with NameServerDaemon("127.0.0.1", 0, lease_ttl=3.0) as first:
        first.start()
        host, port = first.address
        ns = f"{host}:{port}"
        watch = spawn("workers", "--watch", "--ns", ns)
        watch.expect(r"^0 worker\(s\)$")
    line = watch.expect(r"^Error|name server")  # the problem is shown ...
    assert ns in line.string and "Ctrl-C" in line.string, line.string
    assert watch.alive()  # ... and the watch goes on
    with NameServerDaemon(host, port, lease_ttl=3.0) as second:
        second.start()
        watch.expect(r"^0 worker\(s\)$")
        watch.signal(signal.SIGINT)
        assert watch.wait(10) == 0, watch.output
    assert "Traceback" not in watch.output


# 17. the demo tells what happened ----------------------------------------------------------------------

def test_demo_counts_calls_that_did_not_come_back() -> None:
    lines: list[str] = []
    status = run_demo(n_workers=2, calls=20, kill=False, echo=lines.append, spec="test_cli_hardening:FlakyDemo")
    out = "\n".join(lines)
    assert status == 1, out
    (results,) = [line for line in lines if line.startswith("results")]
    assert "12/20 correct" in results and "8 lost" in results and "square(12) failed" in results, results


def test_demo_says_when_a_worker_did_not_stop_cleanly() -> None:
    lines: list[str] = []
    status = run_demo(n_workers=1, calls=10, kill=False, echo=lines.append, spec="test_cli_hardening:UncleanDemo")
    out = "\n".join(lines)
    assert status == 1, out
    assert "cleanly" not in out and "status 3" in out, out
    assert "over 1 worker " in out and "1 workers" not in out, out


def test_demo_kills_early_enough_that_failover_shows(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "pyrorpc", "demo"], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    out = ok(result)
    kill = re.search(r"killed \S+ \(pid (\d+)\) with SIGKILL at result (\d+)/300", out)
    assert kill, out
    assert int(kill.group(2)) <= 300 // 4, out
    counts = {int(pid): int(n) for pid, n in re.findall(r"^  pid (\d+) .*?(\d+)(?:  \(killed\))?$", out, re.M)}
    victim = counts.pop(int(kill.group(1)))
    assert len(counts) == 2 and all(victim < n / 2 for n in counts.values()), out
    assert "300/300 correct and in order, 0 lost" in out
    assert "stopped cleanly" in out and "3 workers" in out


# 18. what arrives, and what --json prints -----------------------------------------------------------------

def test_serpent_conversions_are_as_the_readme_says(ns_addr: str, echo: pyrorpc.WorkerHost) -> None:
    text = README.read_text()
    for needle in ("`datetime`", "`Decimal`", "empty set", "class instances", "SerializeError", "--json"):
        assert needle in text, needle
    with pyrorpc.connect("echo", ns=ns_addr) as proxy:
        assert proxy.echo(datetime.datetime(2024, 1, 2, 3, 4, 5)) == "2024-01-02T03:04:05"
        assert proxy.echo(decimal.Decimal("1.10")) == "1.10"
        assert proxy.echo(set()) == ()
        assert proxy.echo({1, 2}) == {1, 2}
        assert proxy.echo(b"\x00a") == b"\x00a"
        assert proxy.kind((1, 2)) == "tuple"
        with pytest.raises(Pyro5.errors.SerializeError):
            proxy.echo(_Unserializable())


def test_json_output_of_sets_and_bytes(ns_addr: str, echo: pyrorpc.WorkerHost) -> None:
    def as_json(literal: str) -> Any:
        result = invoke("call", "echo", "echo", literal, "--json", "--ns", ns_addr)
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    assert as_json("{3, 1, 2}") == [1, 2, 3]
    assert as_json("b'\\x00ab'") == {"data": "AGFi", "encoding": "base64"}
    assert as_json("{'k': {2, 1}}") == {"k": [1, 2]}
    assert as_json("(1, 'x')") == [1, "x"]
    text = README.read_text()
    assert "base64" in text and "sorted list" in text

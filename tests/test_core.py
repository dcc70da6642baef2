"""WorkerHost + connect(): call modes, errors, timeouts, thread safety, lifecycle, leases, interop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
import subprocess
import sys
import threading
import time

import Pyro5.api
import Pyro5.errors
import pytest
from services import Calculator, CustomError, Plain

import pyrorpc
from pyrorpc.testing import NameServerProcess, wait_for


@pytest.fixture
def calc_host(ns_addr):
    with pyrorpc.WorkerHost(Calculator, ns=ns_addr) as host:
        yield host


def registered(ns, service="calc"):
    return pyrorpc.NameServerClient(pyrorpc.Settings(ns=ns)).service_workers(service)


@pyrorpc.service("announcer")
class Announcer:
    """Served by worker processes (``test_core:Announcer``): creates a file when a call starts, so the test
    in another process knows the call reached the worker."""

    def slow(self, marker, seconds):
        with open(marker, "w"):
            pass
        time.sleep(seconds)
        return os.getpid()


# call modes -----------------------------------------------------------------------------------------

def test_sync_oneway_future_aio(calc_host, ns_addr):
    with pyrorpc.connect("calc", ns=ns_addr) as calc:
        assert calc.add(1, 2) == 3
        assert calc.log.oneway("hi") is None
        assert calc.log("sync-on-oneway-method") is None  # @oneway: callers never wait
        fut = calc.add.future(3, 4)
        assert isinstance(fut, concurrent.futures.Future)
        assert fut.result(5) == 7
        assert asyncio.run(calc.add.aio(5, 6)) == 11
        wait_for(lambda: sorted(calc.logs()) == ["hi", "sync-on-oneway-method"], 5, message="oneway delivery")


def test_connect_by_worker_name_and_uri(calc_host, ns_addr):
    with pyrorpc.connect(calc_host.name, ns=ns_addr) as by_name:
        assert by_name.add(1, 1) == 2
    with pyrorpc.connect(calc_host.uri) as by_uri:  # no name server needed
        assert by_uri.add(2, 2) == 4


def test_remote_exception_keeps_type_and_traceback(calc_host, ns_addr):
    with pyrorpc.connect("calc", ns=ns_addr) as calc:
        with pytest.raises(ValueError, match="bad input") as info:
            calc.fail("bad input")
        remote_tb = "".join(info.value._pyroTraceback)
        assert "services.py" in remote_tb and "raise ValueError" in remote_tb
        # a user-defined exception class arrives as itself when the caller has imported its module...
        with pytest.raises(CustomError, match="custom") as info2:
            calc.fail_custom()
        assert "raise CustomError" in "".join(info2.value._pyroTraceback)
        assert calc.add(1, 1) == 2  # and the connection is fine


def test_unknown_remote_exception_class_becomes_remote_error(nameserver, worker_factory):
    ns = nameserver()
    w = worker_factory("services:Calculator", ns.ns)
    import subprocess
    import sys
    # ...and as pyrorpc.RemoteError naming it when the caller has not (a fresh interpreter, no `services`)
    code = ("import pyrorpc\n"
            f"p = pyrorpc.connect({w.uri!r})\n"
            "try:\n    p.fail_custom()\nexcept pyrorpc.RemoteError as e:\n"
            "    print('REMOTE', e.remote_type, e.args)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"})
    assert "REMOTE services.CustomError ('custom',)" in out.stdout, out.stdout + out.stderr


def test_unknown_service_and_method(calc_host, ns_addr):
    with pytest.raises(pyrorpc.NoWorkersError, match="nosuch"):
        pyrorpc.connect("nosuch", ns=ns_addr)
    with pyrorpc.connect("calc", ns=ns_addr) as calc:
        with pytest.raises(AttributeError):
            calc.no_such_method()
        assert calc.add(1, 1) == 2  # the proxy is still fine


def test_private_methods_are_not_callable(calc_host, ns_addr):
    with pyrorpc.connect("calc", ns=ns_addr) as calc:
        with pytest.raises(AttributeError):
            calc._private()
        with pytest.raises(AttributeError):
            calc.method("_private")
    with Pyro5.api.Proxy(calc_host.uri) as raw:  # a raw client gets refused by the worker itself
        with pytest.raises(AttributeError):
            raw._pyroInvoke("_private", (), {})
        with pytest.raises(AttributeError):
            raw._pyroInvoke("__getattr__", ("secret_value",), {})


def test_colliding_method_name_reachable(calc_host, ns_addr):
    calc = pyrorpc.connect("calc", ns=ns_addr)
    assert calc.method("close")() == "remote close"
    calc.close()


def test_timeout_per_proxy_and_per_call(calc_host, ns_addr):
    # (the timed-out calls run on in the worker, whose stop at the end waits for them: 1 s, not longer)
    with pyrorpc.connect("calc", ns=ns_addr, timeout=0.3) as calc:
        with pytest.raises(pyrorpc.CallTimeoutError):
            calc.slow(1)
        assert isinstance(calc.slow.with_timeout(5)(0.5), int)
    with pyrorpc.connect("calc", ns=ns_addr) as calc:
        with pytest.raises(Pyro5.errors.TimeoutError):  # also catchable as Pyro5's own error
            calc.slow.with_timeout(0.2)(1)
        assert calc.add(1, 2) == 3


def test_proxy_shared_between_threads(calc_host, ns_addr):
    errors = []
    with pyrorpc.connect("calc", ns=ns_addr) as calc:
        def worker(n):
            try:
                for i in range(50):
                    assert calc.add(n, i) == n + i
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert errors == []


def test_futures_respect_in_flight_window(calc_host, ns_addr):
    with pyrorpc.connect("calc", ns=ns_addr, max_in_flight=2) as calc:
        futures = [calc.slow_idem.future(i, 0.5) for i in range(2)]
        third: list[concurrent.futures.Future] = []
        submitted = threading.Event()

        def submit_third():
            third.append(calc.slow_idem.future(2, 0.01))
            submitted.set()

        submitter = threading.Thread(target=submit_third)
        submitter.start()
        wait_for(lambda: calc_host.stats.in_flight == 2, 5, message="two calls running")
        assert not submitted.wait(0.1)  # the window is full: future() waits instead of piling up
        assert [f.result(10) for f in futures] == [0, 1]
        assert submitted.wait(5) and third[0].result(10) == 4  # ...and goes once a call finished
        submitter.join(5)


def test_instance_modes(ns_addr):
    with pyrorpc.WorkerHost(Calculator, ns=ns_addr, instance_mode="single") as host:
        with pyrorpc.connect(host.uri) as a, pyrorpc.connect(host.uri) as b:
            a.log("x")
            wait_for(lambda: b.logs() == ["x"], 5, message="shared instance")
    with pyrorpc.WorkerHost(Calculator, ns=ns_addr, instance_mode="percall", service="calc2") as host:
        with pyrorpc.connect(host.uri) as a:
            a.log.oneway("x")
            assert a.logs() == []
    with pytest.raises(pyrorpc.ConfigurationError, match="instance_mode"):
        pyrorpc.WorkerHost(Calculator, ns=ns_addr, instance_mode="bogus")


def test_service_name_required(ns_addr):
    with pytest.raises(pyrorpc.ConfigurationError, match="service="):
        pyrorpc.WorkerHost(Plain, ns=ns_addr)
    with pyrorpc.WorkerHost(Plain, ns=ns_addr, service="plain") as host:
        assert host.name.startswith("plain.")
        with pyrorpc.connect("plain", ns=ns_addr) as p:
            assert p.hello() == "hello"


# lifecycle -----------------------------------------------------------------------------------------

def test_registration_metadata_and_deregistration(ns_addr):
    host = pyrorpc.WorkerHost(Calculator, ns=ns_addr).start()
    try:
        with Pyro5.api.Proxy(f"PYRO:Pyro.NameServer@{ns_addr}") as ns:
            found = ns.yplookup(meta_all={"pyrorpc.service:calc"})
            assert list(found) == [host.name]
            uri, meta = found[host.name]
            assert uri == host.uri and "pyrorpc.service:calc" in meta
            assert host.name.startswith("calc.")
    finally:
        host.stop()
    assert registered(ns_addr) == []


def test_stop_drains_in_flight_calls(ns_addr):
    host = pyrorpc.WorkerHost(Calculator, ns=ns_addr).start()
    calc = pyrorpc.connect(host.uri)
    slow = calc.slow.future(0.5)
    wait_for(lambda: host.stats.in_flight == 1, 5, message="call in flight")
    assert host.stats.calls == 0
    assert host.stop() is True
    assert host.stats.calls == 1 and host.stats.in_flight == 0  # stop() returned after the call, not before
    assert isinstance(slow.result(5), int)
    assert registered(ns_addr) == []
    with pytest.raises(pyrorpc.WorkerLostError):
        calc.add(1, 2)  # gone: bound by URI, nowhere else to go
    calc.close()


def test_drain_refuses_new_calls_without_running_them(ns_addr):
    host = pyrorpc.WorkerHost(Calculator, ns=ns_addr, drain_timeout=5).start()
    calc = pyrorpc.connect("calc", ns=ns_addr)  # bound to `host`, the only worker of "calc" yet
    try:
        with pyrorpc.WorkerHost(Calculator, ns=ns_addr) as other:
            # two connections to `host`: one for the long call below, one left idle, so that the calls made
            # while it drains reach it (a draining worker accepts no new connection but serves its open ones)
            assert [f.result(5) for f in [calc.slow.future(0.2), calc.slow.future(0.2)]] == [os.getpid()] * 2
            wait_for(lambda: host.stats.calls == 2, 5, message="warm-up calls counted")
            busy = calc.slow.future(0.6)
            wait_for(lambda: host.stats.in_flight == 1, 5, message="call in flight")
            stopper = threading.Thread(target=host.stop)
            stopper.start()
            wait_for(lambda: host.stats.draining, 5, message="draining")
            # refused by the draining worker before running: the proxy moves to the other worker
            assert calc.add(1, 2) == 3 and calc.add(2, 3) == 5
            wait_for(lambda: other.stats.calls == 2, 5, message="both calls on the other worker")
            assert isinstance(busy.result(5), int)
            stopper.join(10)
            assert host.stats.calls == 3  # the warm-up calls and the call in flight, nothing after
    finally:
        calc.close()
        host.stop()


def test_worker_reregisters_after_entry_removed(ns_addr, ns_daemon):
    with pyrorpc.WorkerHost(Calculator, ns=ns_addr) as host:
        ns_daemon.nameserver.remove(host.name)
        assert registered(ns_addr) == []
        # lease TTL 3 s -> renew every 1 s
        wait_for(lambda: [w.name for w in registered(ns_addr)] == [host.name], 3, message="re-registration")


def test_heartbeat_reports_load(ns_addr):
    with pyrorpc.WorkerHost(Calculator, ns=ns_addr) as host:
        with pyrorpc.connect("calc", ns=ns_addr) as calc:
            for i in range(5):
                calc.add(i, i)
            with pytest.raises(ValueError):
                calc.fail("x")
        info = wait_for(lambda: [w for w in registered(ns_addr) if w.calls >= 6], 4, message="load report")[0]
        assert info.errors == 1 and info.pid > 0 and info.host == host.hostname and info.threads == 64
        assert info.last_heartbeat is not None and info.last_heartbeat < 3


def test_name_server_unreachable_at_start(dead_ns):
    host = pyrorpc.WorkerHost(Calculator, settings=pyrorpc.Settings(ns=dead_ns, connect_timeout=1))
    with pytest.raises(pyrorpc.NameServerUnavailableError):
        host.start()
    with pytest.raises(pyrorpc.NameServerUnavailableError):
        pyrorpc.connect("calc", settings=pyrorpc.Settings(ns=dead_ns, connect_timeout=1))


# processes: SIGTERM, SIGKILL, name server restart, stock Pyro5 name server --------------------------

def test_sigterm_deregisters_fast_and_exits_zero_after_drain(nameserver, worker_factory, tmp_path):
    ns = nameserver(lease_ttl=3)
    w = worker_factory("test_core:Announcer", ns.ns)
    calc = pyrorpc.connect(w.uri)
    marker = tmp_path / "call-started"
    slow = calc.slow.future(str(marker), 1.0)
    wait_for(marker.exists, 5, message="the call reached the worker")
    t0 = time.monotonic()
    w.signal(signal.SIGTERM)
    wait_for(lambda: registered(ns.ns, "announcer") == [], 1.0, interval=0.01, message="deregistration")
    gone = time.monotonic() - t0
    assert gone < 1.0
    assert slow.result(10) == w.worker_pid  # drained, not cut off
    assert w.wait(10) == 0
    calc.close()


def test_sigkill_lease_expires_within_ttl_plus_one(nameserver, worker_factory):
    ns = nameserver(lease_ttl=3)
    w = worker_factory("services:Calculator", ns.ns)
    survivor = worker_factory("services:Calculator", ns.ns)
    assert len(registered(ns.ns)) == 2
    t0 = time.monotonic()
    w.kill()
    wait_for(lambda: [x.name for x in registered(ns.ns)] == [survivor.name], 4.0, interval=0.05,
             message="lease expiry")
    assert time.monotonic() - t0 <= 4.0


def test_name_server_restart_memory_storage(nameserver, worker_factory):
    ns = nameserver(lease_ttl=3)
    workers = [worker_factory("services:Calculator", ns.ns) for _ in range(2)]
    ns2 = ns.restart()
    try:
        t0 = time.monotonic()
        # renew period = TTL/3 = 1 s; every worker must be back within two periods
        wait_for(lambda: sorted(x.name for x in registered(ns2.ns)) == sorted(w.name for w in workers), 2.0,
                 interval=0.05, message="re-registration after restart")
        assert time.monotonic() - t0 <= 2.0
    finally:
        ns2.kill()


def test_against_stock_pyro5_name_server(worker_factory, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "Pyro5.nameserver", "-n", "127.0.0.1", "-p", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        port = None
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("NS running on"):
                port = int(line.split()[3].rsplit(":", 1)[1])
                break
        assert port
        ns = f"127.0.0.1:{port}"
        w = worker_factory("services:Calculator", ns)
        client = pyrorpc.NameServerClient(pyrorpc.Settings(ns=ns))
        assert client.leasing is False
        assert [x.name for x in client.service_workers("calc")] == [w.name]
        with pyrorpc.connect("calc", ns=ns) as calc:
            assert calc.add(2, 3) == 5
        client.remove(w.name)  # no leases there: the worker notices and registers again
        wait_for(lambda: [x.name for x in client.service_workers("calc")] == [w.name], 15, interval=0.1,
                 message="re-registration on stock name server")
        assert w.terminate() == 0
        assert client.service_workers("calc") == []
    finally:
        proc.kill()
        proc.wait()


def test_plain_pyro5_proxy_calls_a_worker(calc_host, ns_addr):
    with Pyro5.api.Proxy(f"PYRO:Pyro.NameServer@{ns_addr}") as ns:
        [(name, (uri, _meta))] = ns.yplookup(meta_all={"pyrorpc.service:calc"}).items()
    with Pyro5.api.Proxy(uri) as plain:
        assert plain.add(40, 2) == 42
        assert plain.get("k") == "value-k"
    with Pyro5.api.Proxy(f"PYRONAME:{name}@{ns_addr}") as by_name:
        assert by_name.add(1, 2) == 3


def test_nameserver_process_lease_ttl_cli_flag():
    with NameServerProcess(lease_ttl=3) as ns:
        with pyrorpc.WorkerHost(Calculator, ns=ns.ns) as host:
            assert host.lease_ttl == 3.0


def test_bytes_arrive_as_bytes(calc_host, ns_addr):
    with pyrorpc.connect("calc", ns=ns_addr) as calc:
        out = calc.add(b"\x00\x01", bytes(range(256)))
        assert isinstance(out, bytes) and out == b"\x00\x01" + bytes(range(256))
        with pytest.raises(ValueError) as info:
            calc.fail(b"\xff")
        assert info.value.args == (b"\xff",)


def test_interrupted_call_never_leaves_its_reply_to_the_next_call():
    """A KeyboardInterrupt mid-call (Ctrl-C) must close that connection: its late reply would otherwise be
    read as the reply of the next call on the same proxy."""
    with pyrorpc.WorkerHost(Calculator, register=False) as host:
        proxy = pyrorpc.connect(host.uri)
        try:
            assert proxy.add(1, 1) == 2  # one connection, now idle
            wait_for(lambda: host.stats.calls == 1 and host.stats.in_flight == 0, 5, message="add counted")

            interrupted: list[bool] = []

            def once(_signo: int, _frame: object) -> None:  # Ctrl-C's KeyboardInterrupt, once; later ones ignored
                if not interrupted:
                    interrupted.append(True)
                    raise KeyboardInterrupt

            def ctrl_c_while_running():  # a real Ctrl-C (EINTR) while the call runs on the worker
                wait_for(lambda: host.stats.in_flight == 1, 5, interval=0.005, message="slow call running")
                # to the main thread itself, and again until it took effect: a process-directed signal may land
                # on any of the threads earlier tests left behind (seen in a full run, never alone)
                while not interrupted and host.stats.in_flight == 1:
                    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
                    time.sleep(0.05)

            previous = signal.signal(signal.SIGINT, once)
            interrupter = threading.Thread(target=ctrl_c_while_running)
            try:
                interrupter.start()
                with pytest.raises(KeyboardInterrupt):
                    proxy.slow(2.0)  # (long enough for the Ctrl-C to land on a loaded machine)
                interrupter.join(5)
            finally:
                signal.signal(signal.SIGINT, previous)
            assert host.stats.calls == 1  # add; slow still running
            calls = 0

            def call_until_the_slow_reply_was_written():
                nonlocal calls
                assert proxy.add(calls, 10) == calls + 10
                calls += 1
                return host.stats.calls >= 2 + calls  # add, our calls, and slow (its reply written)

            # calls before, while and after the interrupted call's reply arrives: each gets its own reply
            wait_for(call_until_the_slow_reply_was_written, 8, interval=0.01, message="the slow call's reply")
            assert [proxy.add(i, 20) for i in range(5)] == [20, 21, 22, 23, 24]
        finally:
            proxy.close()

"""The registry at scale: kept name-server connections, pushed membership (watch_service), several name servers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from services import Calculator

import pyrorpc
from nameserver import NameServerDaemon
from pyrorpc.testing import wait_for

SECRET = "registry-scale-secret"
PUSH_DELAY = 0.5  # the acceptance bound: a pool learns of a change this soon after the name server knows it


class CountingVerifier:
    """Wraps a server's handshake check: counts the handshakes (one per connection) it accepted."""

    def __init__(self, verify: Callable[..., Any]) -> None:
        self.verify = verify
        self.count = 0
        self.lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        reply = self.verify(*args, **kwargs)
        with self.lock:
            self.count += 1
        return reply


@pytest.fixture
def secure_ns() -> Iterator[tuple[NameServerDaemon, CountingVerifier]]:
    """A name server in a thread with a secret (lease TTL 3 s), whose handshakes are counted."""
    with NameServerDaemon("127.0.0.1", 0, lease_ttl=3.0, settings=pyrorpc.Settings(secret=SECRET)) as daemon:
        counter = CountingVerifier(daemon.server.verify)
        daemon.server.verify = counter
        daemon.start()
        yield daemon, counter


def addr(daemon: NameServerDaemon) -> str:
    return "{}:{}".format(*daemon.address)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYRORPC_CONNECT_TIMEOUT": "3", **(env or {})}
    return subprocess.run([sys.executable, "-m", "pyrorpc", *args], capture_output=True, text=True, timeout=60,
                          env=full_env)


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode in (1, 2), result
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


class Watcher:
    """Watches a service through its own NameServerClient; ``changes`` holds (monotonic time, worker names)
    each time the name server reported a new membership."""

    def __init__(self, ns: str, service: str) -> None:
        self.client = pyrorpc.NameServerClient(pyrorpc.Settings(ns=ns))
        self.service = service
        self.version, workers = self.client.watch_service(service, None, 0)
        self.changes: list[tuple[float, set[str]]] = [(time.monotonic(), {w.name for w in workers})]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                version, workers = self.client.watch_service(self.service, self.version, 1.0)
            except pyrorpc.NameServerUnavailableError:
                return
            if version != self.version:
                self.version = version
                self.changes.append((time.monotonic(), {w.name for w in workers}))

    def when(self, predicate: Callable[[set[str]], bool], timeout: float = 10.0, after: int = 0) -> float:
        """The time of the first reported membership (from the ``after``-th on) for which ``predicate``
        holds (waits for it)."""
        def found() -> float | None:
            return next((t for t, names in list(self.changes)[after:] if predicate(names)), None)
        return wait_for(found, timeout, interval=0.01, message="membership change seen by the watcher")

    def close(self) -> None:
        self.stop.set()
        self.client.close()
        self.thread.join(5)


# 1. cheap heartbeats: one kept connection ------------------------------------------------------------

def test_operations_share_one_kept_connection(secure_ns) -> None:
    daemon, handshakes = secure_ns
    with pyrorpc.NameServerClient(pyrorpc.Settings(ns=addr(daemon), secret=SECRET)) as client:
        for i in range(50):
            client.lease("calc.h.1.a", "PYRO:calc.h.1.a@127.0.0.1:1", {"pyrorpc.service:calc"}, {"calls": i}, 3.0)
        assert [w.name for w in client.service_workers("calc")] == ["calc.h.1.a"]
        assert client.lookup("calc.h.1.a")[0] == "PYRO:calc.h.1.a@127.0.0.1:1"
        assert handshakes.count == 1
        assert daemon.server.connection_count() == 1


def test_threads_share_a_client_safely(secure_ns) -> None:
    daemon, handshakes = secure_ns
    client = pyrorpc.NameServerClient(pyrorpc.Settings(ns=addr(daemon), secret=SECRET))
    errors: list[BaseException] = []

    def renew(n: int) -> None:
        try:
            for i in range(40):
                name = f"calc.h.{n}.a"
                client.lease(name, f"PYRO:{name}@127.0.0.1:1", {"pyrorpc.service:calc"}, {"calls": i}, 3.0)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=renew, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert len(client.service_workers("calc")) == 8
    assert handshakes.count <= 8  # at most one connection per thread at once, each kept (not one per renewal)
    client.close()


def test_worker_heartbeats_reuse_one_connection(secure_ns) -> None:
    daemon, handshakes = secure_ns
    watcher_client = pyrorpc.NameServerClient(pyrorpc.Settings(ns=addr(daemon), secret=SECRET))
    with pyrorpc.WorkerHost(Calculator, ns=addr(daemon), lease_ttl=0.6, secret=SECRET) as host:
        [info] = watcher_client.service_workers("calc")
        first = handshakes.count
        # a renewal every 0.2 s: wait for ten of them (the reported load carries no count, the age does)
        deadline = time.monotonic() + 2.0
        ages = []
        while time.monotonic() < deadline:
            [info] = watcher_client.service_workers("calc")
            ages.append(info.last_heartbeat)
            time.sleep(0.05)
        assert max(a for a in ages if a is not None) < 0.5  # it kept renewing
        assert handshakes.count == first  # ... without a single new handshake
        assert info.name == host.name
    watcher_client.close()


def test_heartbeats_renew_with_the_lease_token_and_load_changes_only(secure_ns) -> None:
    """After the first lease, a heartbeat is ``renew(name, token, changed load fields)``: the name server
    counts a renewal and keeps the merged load report; a name server that lost the lease (restarted, or
    expired) answers None and the client sends the whole lease again, so the worker is registered again."""
    daemon, _handshakes = secure_ns
    ns = daemon.nameserver
    calls: list[str] = []
    real_renew, real_lease = ns.renew, ns.lease
    ns.renew = lambda *a, **k: (calls.append("renew"), real_renew(*a, **k))[1]  # type: ignore[method-assign]
    ns.lease = lambda *a, **k: (calls.append("lease"), real_lease(*a, **k))[1]  # type: ignore[method-assign]
    name, uri, tags = "calc.h.1.a", "PYRO:calc.h.1.a@127.0.0.1:1", {"pyrorpc.service:calc", "pyrorpc.pid:1"}
    with pyrorpc.NameServerClient(pyrorpc.Settings(ns=addr(daemon), secret=SECRET)) as client:
        for i in range(5):
            assert client.lease(name, uri, tags, {"calls": i, "threads": 4, "host": "h"}, 3.0) == 3.0
        assert calls == ["lease", "renew", "renew", "renew", "renew"]
        [info] = client.service_workers("calc")
        assert (info.calls, info.threads, info.host) == (4, 4, "h")
        # a changed load field travels alone; the others stay as they were
        client.lease(name, uri, tags, {"calls": 4, "threads": 8, "host": "h"}, 3.0)
        [info] = client.service_workers("calc")
        assert (info.calls, info.threads, info.host) == (4, 8, "h")
        # the lease is gone (as after a name server restart): the renewal is refused, the whole lease follows
        ns.remove(name)
        calls.clear()
        assert client.lease(name, uri, tags, {"calls": 5, "threads": 8, "host": "h"}, 3.0) == 3.0
        assert calls == ["renew", "lease"]
        # a load report with other fields than the lease's is a whole lease (it replaces the report)
        calls.clear()
        client.lease(name, uri, tags, {"calls": 5, "threads": 8}, 3.0)
        assert calls == ["lease"] and client.service_workers("calc")[0].host == ""
        assert [w.name for w in client.service_workers("calc")] == [name]
        # new metadata or a new TTL is a whole lease, never a renewal
        calls.clear()
        client.lease(name, uri, tags | {"pyrorpc.threads:8"}, {"calls": 5}, 3.0)
        client.lease(name, uri, tags | {"pyrorpc.threads:8"}, {"calls": 5}, 4.0)
        assert calls == ["lease", "lease"]
        # a renewal with somebody else's token renews nothing
        assert ns.renew(name, 12345, None) is None


def test_lease_many_renews_several_in_one_request(secure_ns) -> None:
    daemon, handshakes = secure_ns
    with pyrorpc.NameServerClient(pyrorpc.Settings(ns=addr(daemon), secret=SECRET)) as client:
        leases = [(f"calc.h.1.{x}", f"PYRO:calc.h.1.{x}@127.0.0.1:1", {"pyrorpc.service:calc"}, {"calls": 1}, 3.0)
                  for x in "abc"]
        leases[1] = (*leases[1][:4], -1)  # refused alone
        first, refused, third = client.lease_many(leases)
        assert first == third == 3.0
        assert isinstance(refused, ValueError) and "ttl" in str(refused)
        assert sorted(w.name for w in client.service_workers("calc")) == ["calc.h.1.a", "calc.h.1.c"]
        assert client.lease_many([leases[0], leases[2]]) == [3.0, 3.0]  # renewed
        with pytest.raises(ValueError, match="at most"):
            client.lease_many([leases[0]] * 1001)
        assert handshakes.count == 1


def test_broken_connection_is_replaced(secure_ns) -> None:
    daemon, handshakes = secure_ns
    host, port = daemon.address
    client = pyrorpc.NameServerClient(pyrorpc.Settings(ns=addr(daemon), secret=SECRET, connect_timeout=3))
    client.lease("calc.h.1.a", "PYRO:calc.h.1.a@127.0.0.1:1", {"pyrorpc.service:calc"}, {}, 3.0)
    daemon.close()  # its connections go with it: the client's kept one is now dead
    with NameServerDaemon(host, port, lease_ttl=3.0, settings=pyrorpc.Settings(secret=SECRET)) as again:
        again.start()
        # the renewal goes through at once on a fresh connection (and registers the worker again)
        assert client.lease("calc.h.1.a", "PYRO:calc.h.1.a@127.0.0.1:1", {"pyrorpc.service:calc"}, {}, 3.0) == 3.0
        assert [w.name for w in client.service_workers("calc")] == ["calc.h.1.a"]
        assert again.server.connection_count() == 1
    client.close()


def test_connection_closed_by_idle_timeout_is_replaced() -> None:
    settings = pyrorpc.Settings(idle_timeout=0.2)
    with NameServerDaemon("127.0.0.1", 0, settings=settings) as daemon:
        daemon.start()
        client = pyrorpc.NameServerClient(pyrorpc.Settings(ns=addr(daemon)))
        client.ping()
        wait_for(lambda: daemon.server.connection_count() == 0, 5, message="the server closed the idle connection")
        client.remove("nothing.here")  # not idempotent: sent only on a connection known to be open
        assert client.count() == 1
        client.close()


# 2. pushed membership -----------------------------------------------------------------------------------

def test_watch_returns_on_registration_removal_and_expiry(ns_addr: str) -> None:
    watcher = Watcher(ns_addr, "calc")
    client = pyrorpc.NameServerClient(pyrorpc.Settings(ns=ns_addr))
    try:
        uri = "PYRO:calc.h.1.a@127.0.0.1:1"
        t0 = time.monotonic()
        client.lease("calc.h.1.a", uri, {"pyrorpc.service:calc"}, {}, 1.0)
        assert watcher.when(lambda names: "calc.h.1.a" in names) - t0 < PUSH_DELAY
        t0 = time.monotonic()
        assert client.remove("calc.h.1.a") == 1
        assert watcher.when(lambda names: not names) - t0 < PUSH_DELAY
        # expiry: the lease (TTL 1 s) expires one TTL after its last renewal
        client.lease("calc.h.1.b", uri, {"pyrorpc.service:calc"}, {}, 1.0)
        renewed = time.monotonic()
        registered = watcher.when(lambda names: "calc.h.1.b" in names)
        after = next(i for i, (t, _names) in enumerate(watcher.changes) if t == registered) + 1
        seen_gone = watcher.when(lambda names: "calc.h.1.b" not in names, after=after)
        assert seen_gone - renewed > 0.9 and seen_gone - (renewed + 1.0) < PUSH_DELAY
        # a lease renewal is no membership change: nothing is pushed
        client.lease("calc.h.1.c", uri, {"pyrorpc.service:calc"}, {}, 3.0)
        watcher.when(lambda names: "calc.h.1.c" in names)
        changes = len(watcher.changes)
        for _ in range(5):
            client.lease("calc.h.1.c", uri, {"pyrorpc.service:calc"}, {}, 3.0)
        version, workers = client.watch_service("calc", watcher.version, 0.3)
        assert version == watcher.version and [w.name for w in workers] == ["calc.h.1.c"]
        assert len(watcher.changes) == changes
    finally:
        watcher.close()
        client.close()


def test_waiting_watches_hold_no_name_server_thread() -> None:
    with NameServerDaemon("127.0.0.1", 0, settings=pyrorpc.Settings(threads=2)) as daemon:
        daemon.start()
        ns = addr(daemon)
        clients = [pyrorpc.NameServerClient(pyrorpc.Settings(ns=ns)) for _ in range(6)]
        versions = [c.watch_service("calc", None, 0)[0] for c in clients]
        results: list[Any] = []
        threads = [threading.Thread(target=lambda c=c, v=v: results.append(c.watch_service("calc", v, 5.0)))
                   for c, v in zip(clients, versions, strict=True)]
        for t in threads:
            t.start()
        time.sleep(0.2)  # let the six watches reach the name server (two call threads there)
        other = pyrorpc.NameServerClient(pyrorpc.Settings(ns=ns, connect_timeout=2))
        started = time.monotonic()
        other.lease("calc.h.1.a", "PYRO:calc.h.1.a@127.0.0.1:1", {"pyrorpc.service:calc"}, {}, 3.0)
        assert time.monotonic() - started < 0.5
        for t in threads:
            t.join(5)
        assert len(results) == 6 and all([w.name for w in workers] == ["calc.h.1.a"] for _v, workers in results)
        for c in [*clients, other]:
            c.close()


def test_watch_checks_its_arguments(ns_addr: str) -> None:
    client = pyrorpc.NameServerClient(pyrorpc.Settings(ns=ns_addr))
    with pytest.raises(ValueError, match="timeout"):
        client.watch_service("calc", None, -1)
    with pytest.raises(TypeError, match="service"):
        client.watch_service(42, None, 0)  # type: ignore[arg-type]
    started = time.monotonic()
    version, _ = client.watch_service("calc", None, 0)
    client.watch_service("calc", version, 0.2)
    assert 0.2 <= time.monotonic() - started < 2
    client.close()


def _caller(pool: pyrorpc.Pool, seen: list[tuple[float, int]], stop: threading.Event,
            failures: list[BaseException]) -> None:
    while not stop.is_set():
        try:
            pid = pool.pid()
        except Exception as exc:  # pragma: no cover - reported by the test
            failures.append(exc)
            return
        seen.append((time.monotonic(), pid))


def test_pool_sends_to_a_new_worker_at_once(nameserver, worker_factory, pool_factory) -> None:
    ns = nameserver(lease_ttl=3).ns
    first = worker_factory("services:Calculator", ns)
    pool = pool_factory("calc", ns=ns, refresh=30)  # polling alone would take 30 s
    watcher = Watcher(ns, "calc")
    seen: list[tuple[float, int]] = []
    stop = threading.Event()
    failures: list[BaseException] = []
    callers = [threading.Thread(target=_caller, args=(pool, seen, stop, failures)) for _ in range(4)]
    for t in callers:
        t.start()
    try:
        wait_for(lambda: seen, 10, message="first calls")
        newcomer = worker_factory("services:Calculator", ns)
        known = watcher.when(lambda names: newcomer.name in names)
        first_call = wait_for(lambda: next((t for t, pid in list(seen) if pid == newcomer.worker_pid), None), 10,
                              interval=0.01, message="a call served by the new worker")
        assert first_call - known < PUSH_DELAY, f"{first_call - known:.3f}s after the name server knew"
    finally:
        stop.set()
        for t in callers:
            t.join(10)
        watcher.close()
    assert failures == []
    assert {pid for _t, pid in seen} == {first.worker_pid, newcomer.worker_pid}


def test_pool_drops_a_killed_worker_when_its_lease_expires(nameserver, worker_factory, pool_factory) -> None:
    ns = nameserver(lease_ttl=1.0).ns
    victim = worker_factory("services:Calculator", ns)
    survivor = worker_factory("services:Calculator", ns)
    pool = pool_factory("calc", ns=ns, refresh=30)
    watcher = Watcher(ns, "calc")
    client = pyrorpc.NameServerClient(pyrorpc.Settings(ns=ns))
    try:
        assert {w.name for w in pool.workers()} == {victim.name, survivor.name}
        victim.kill()
        killed = time.monotonic()
        [info] = [w for w in client.service_workers("calc") if w.name == victim.name] or [None]
        assert info is not None and info.last_heartbeat is not None and info.ttl == 1.0
        expires = killed - info.last_heartbeat + info.ttl  # one TTL after its last renewal
        gone_from_pool = wait_for(lambda: victim.name not in {w.name for w in pool.workers()} and time.monotonic(),
                                  10, interval=0.01, message="the pool dropped the killed worker")
        gone_from_ns = watcher.when(lambda names: victim.name not in names)
        assert gone_from_pool - expires < PUSH_DELAY, f"{gone_from_pool - expires:.3f}s after its lease expired"
        assert gone_from_pool - gone_from_ns < PUSH_DELAY
        assert {pool.pid() for _ in range(20)} == {survivor.worker_pid}
    finally:
        watcher.close()
        client.close()


def test_stock_pyro5_name_server_falls_back_to_polling(worker_factory, pool_factory) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "Pyro5.nameserver", "-n", "127.0.0.1", "-p", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        port = next(int(line.split()[3].rsplit(":", 1)[1]) for line in proc.stdout if line.startswith("NS running"))
        ns = f"127.0.0.1:{port}"
        client = pyrorpc.NameServerClient(pyrorpc.Settings(ns=ns))
        assert client.can_watch is False and client.leasing is False
        first = worker_factory("services:Calculator", ns)
        pool = pool_factory("calc", ns=ns, refresh=0.3)
        assert [w.name for w in pool.workers()] == [first.name]
        second = worker_factory("services:Calculator", ns)
        wait_for(lambda: {w.name for w in pool.workers()} == {first.name, second.name}, 5,
                 message="the polled membership")
        assert pool.add(2, 3) == 5
        second.terminate()
        wait_for(lambda: {w.name for w in pool.workers()} == {first.name}, 5, message="the departure polled")
        client.close()
    finally:
        proc.kill()
        proc.wait()


# 3. several name servers ------------------------------------------------------------------------------

def test_first_name_server_down(dead_ns: str, nameserver, worker_factory, pool_factory) -> None:
    live = nameserver(lease_ttl=3).ns
    both = f"{dead_ns},{live}"
    worker = worker_factory("services:Calculator", both)  # `pyrorpc worker start --ns DEAD,LIVE`
    pool = pool_factory("calc", ns=both)
    assert pool.add(1, 2) == 3
    assert [w.name for w in pool.workers()] == [worker.name]
    with pyrorpc.connect("calc", ns=both) as calc:
        assert calc.add(2, 2) == 4
    listing = cli("ns", "list", "--ns", both)
    assert listing.returncode == 0, listing.stderr
    assert worker.name in listing.stdout
    listing = cli("workers", "calc", env={"PYRORPC_NS": both})
    assert listing.returncode == 0 and worker.name in listing.stdout, listing.stderr
    ping = cli("ns", "ping", "--ns", both)
    assert ping.returncode == 0 and live in ping.stdout, ping.stderr


def test_every_name_server_down_names_each(dead_ns: str) -> None:
    other = "127.0.0.1:1"
    both = f"{dead_ns},{other}"
    line = one_error_line(cli("ns", "list", "--ns", both))
    assert dead_ns in line and other in line, line
    with pytest.raises(pyrorpc.NameServerUnavailableError) as info:
        pyrorpc.Pool("calc", ns=both, connect_timeout=1)
    assert dead_ns in str(info.value) and other in str(info.value)


@pytest.mark.parametrize("bad, needle", [("127.0.0.1:1,,127.0.0.1:2", "empty"), ("127.0.0.1:1,127.0.0.1:1", "twice"),
                                         ("127.0.0.1:1,nonsense", "nonsense"), (",", "empty")])
def test_bad_name_server_lists(bad: str, needle: str) -> None:
    result = cli("ns", "list", "--ns", bad)
    assert result.returncode == 2 and needle in one_error_line(result)
    assert needle in one_error_line(cli("ns", "ping", env={"PYRORPC_NS": bad}))
    with pytest.raises(ValueError, match=needle):
        pyrorpc.Settings(ns=bad)
    with pytest.raises(pyrorpc.ConfigurationError, match=needle):
        pyrorpc.WorkerHost(Calculator, ns=bad)


def test_name_server_lists_in_settings() -> None:
    s = pyrorpc.Settings(ns="127.0.0.1:9090, [::1]:9091")
    assert [str(a) for a in s.ns] == ["127.0.0.1:9090", "[::1]:9091"]
    assert str(s.ns) == "127.0.0.1:9090,[::1]:9091" and s.ns.host == "127.0.0.1" and s.ns.port == 9090
    assert pyrorpc.Settings(ns=["a:1", ("b", 2)]).ns == pyrorpc.Settings(ns="a:1,b:2").ns
    assert pyrorpc.Settings().ns == pyrorpc.Address("127.0.0.1", 9090)  # one address: as before
    assert pyrorpc.Settings.from_env({"PYRORPC_NS": "a:1,b:2"}).ns == pyrorpc.Settings(ns="a:1,b:2").ns


def test_workers_and_pools_move_on_when_their_name_server_dies(nameserver, worker_factory, pool_factory) -> None:
    a, b = nameserver(lease_ttl=1.5), nameserver(lease_ttl=1.5)
    both = f"{a.ns},{b.ns}"
    worker = worker_factory("services:Calculator", both, args=["--lease-ttl", "1.5"])
    pool = pool_factory("calc", ns=both, timeout=10)
    on_b = pyrorpc.NameServerClient(pyrorpc.Settings(ns=b.ns))
    assert [w.name for w in pyrorpc.NameServerClient(pyrorpc.Settings(ns=a.ns)).service_workers("calc")] \
        == [worker.name]
    assert on_b.service_workers("calc") == []  # memory storage: each name server keeps its own registry
    a.kill()
    killed = time.monotonic()
    # the worker renews with B at its next renewal (every TTL/3 = 0.5 s)
    wait_for(lambda: [w.name for w in on_b.service_workers("calc")] == [worker.name], 5,
             message="the worker registered with the second name server")
    assert time.monotonic() - killed < 1.5
    assert [pool.add(i, 1) for i in range(20)] == [i + 1 for i in range(20)]
    wait_for(lambda: [w.name for w in pool.workers()] == [worker.name], 5, message="the pool watching B")
    on_b.close()


def test_supervised_workers_take_the_list(nameserver, dead_ns: str) -> None:
    live = nameserver(lease_ttl=3).ns
    proc = subprocess.Popen([sys.executable, "-m", "pyrorpc", "worker", "start", "services:Calculator",
                             "--processes", "2", "--ns", f"{dead_ns},{live}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    client = pyrorpc.NameServerClient(pyrorpc.Settings(ns=live))
    try:
        wait_for(lambda: len(client.service_workers("calc")) == 2, 20, interval=0.1,
                 message="two supervised workers registered")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        client.close()


def test_closing_a_pool_ends_its_watch_at_once(ns_daemon) -> None:
    ns = addr(ns_daemon)
    with pyrorpc.WorkerHost(Calculator, ns=ns):
        pool = pyrorpc.Pool("calc", ns=ns, refresh=20)
        assert pool.add(1, 1) == 2
        wait_for(lambda: ns_daemon.server.connection_count() >= 1, 5, message="the pool's connections")
        pool.close()
        # the watch waiting on the name server (up to 20 s) is cut short with the pool's connections
        wait_for(lambda: ns_daemon.server.connection_count() <= 1, 2, message="the watch connection closed")


def test_ns_scale_benchmark_smoke(tmp_path) -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "ns_scale.json"
    done = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "ns_scale.py"), "--smoke", "--unpinned",
                           "--json", str(out)], capture_output=True, text=True, timeout=120, cwd=root)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "name server CPU, share of one core" in done.stdout
    report = json.loads(out.read_text())
    paced = report["paced"]
    assert paced["target_renewals_per_s"] == 300 and paced["renewals_per_s"] > 250
    assert 0 < paced["ns_cpu_share"] < 1 and paced["ns_cpu_us_per_renewal"] > 0
    assert 0 < report["lookup"]["p50_ms"] <= report["lookup"]["p99_ms"]
    assert report["saturated"]["renewals_per_s"] > 0


# shared heartbeats: a supervisor renews for its workers ------------------------------------------------

class CallLog:
    """Counts the name server's lease calls by method (wraps the NameServer object's methods)."""

    def __init__(self, ns: Any) -> None:
        self.calls: list[tuple[float, str, int]] = []  # (monotonic time, method, leases in it)
        self.lock = threading.Lock()
        self.local = threading.local()
        for method, size in (("lease", lambda a: 1), ("renew", lambda a: 1), ("lease_many", lambda a: len(a[0])),
                             ("renew_many", lambda a: len(a) // 3)):
            self._wrap(ns, method, size)

    def _wrap(self, ns: Any, method: str, size: Callable[[tuple[Any, ...]], int]) -> None:
        real = getattr(ns, method)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(self.local, "depth", 0)
            if not depth:  # (lease_many's own lease calls are not requests)
                with self.lock:
                    self.calls.append((time.monotonic(), method, size(args)))
            self.local.depth = depth + 1
            try:
                return real(*args, **kwargs)
            finally:
                self.local.depth = depth
        setattr(ns, method, wrapper)

    def since(self, t: float) -> list[tuple[str, int]]:
        with self.lock:
            return [(m, n) for at, m, n in self.calls if at >= t]


def test_lease_many_renews_held_leases_by_token(secure_ns) -> None:
    daemon, _handshakes = secure_ns
    log = CallLog(daemon.nameserver)
    leases = [(f"calc.h.1.{x}", f"PYRO:calc.h.1.{x}@127.0.0.1:1", {"pyrorpc.service:calc"}, {"calls": 1}, 3.0)
              for x in "abc"]
    with pyrorpc.NameServerClient(pyrorpc.Settings(ns=addr(daemon), secret=SECRET)) as client:
        t = time.monotonic()
        assert client.lease_many(leases) == [3.0] * 3
        assert client.lease_many(leases) == [3.0] * 3
        assert log.since(t) == [("lease_many", 3), ("renew_many", 3)]
        daemon.nameserver.remove("calc.h.1.b")  # (as if the name server had restarted, for this one)
        t = time.monotonic()
        assert client.lease_many([(*lease[:3], {"calls": 2}, 3.0) for lease in leases]) == [3.0] * 3
        assert log.since(t) == [("renew_many", 3), ("lease_many", 1)]
        assert sorted(w.name for w in client.service_workers("calc")) == [lease[0] for lease in leases]
        assert {w.calls for w in client.service_workers("calc")} == {2}


def test_supervised_workers_renew_together_and_leave_cleanly(tmp_path) -> None:
    """``pyrorpc worker start --processes 3``: the supervisor renews its three workers with one request per
    period; a SIGKILLed worker is renewed no more (its lease expires); on stop every worker is gone for good."""
    with NameServerDaemon("127.0.0.1", 0, lease_ttl=1.5) as daemon:
        daemon.start()
        log = CallLog(daemon.nameserver)
        client = pyrorpc.NameServerClient(pyrorpc.Settings(ns=addr(daemon)))
        tests_dir = os.path.dirname(os.path.abspath(__file__))
        sup = pyrorpc.testing.ChildProcess([sys.executable, "-m", "pyrorpc", "worker", "start", "services:Calculator",
                                            "--processes", "3", "--ns", addr(daemon)], cwd=tests_dir)
        try:
            wait_for(lambda: len(client.service_workers("calc")) == 3, 20)
            time.sleep(1.0)  # every worker has handed over its heartbeats by now
            t = time.monotonic()
            time.sleep(2.0)  # four periods of 0.5 s
            calls = log.since(t)
            assert calls and all(method == "renew_many" for method, _n in calls), calls  # (no lone renewals)
            assert 9 <= sum(n for _m, n in calls) <= 15, calls  # 3 workers x 4 periods (one more or less)
            # (in step: one request for all three, but for a beat late past the supervisor's 50 ms on a busy CPU)
            assert sum(1 for _m, n in calls if n == 3) * 2 >= len(calls), calls
            workers = {w.pid: w.name for w in client.service_workers("calc")}
            victim = sorted(workers)[0]
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()
            wait_for(lambda: workers[victim] not in {w.name for w in client.service_workers("calc")}, 10)
            assert time.monotonic() - killed_at < 1.5 + 1.0  # its lease ran out: nobody renewed it
            # the supervisor restarts it: the new one joins the shared renewals
            wait_for(lambda: len(client.service_workers("calc")) == 3, 20)
        finally:
            sup.stop(signal.SIGTERM, 30)
        assert client.service_workers("calc") == []
        time.sleep(2.0)  # a renewal that raced with a worker's goodbye is taken back, never left to linger
        assert client.service_workers("calc") == []
        client.close()


def test_a_renewal_racing_with_a_goodbye_is_taken_back(secure_ns) -> None:
    """A worker deregisters while its supervisor's renewal of it is on the way: the renewal registers it again
    at the name server, then the supervisor reads the goodbye and removes it."""
    from pyrorpc.heartbeats import SharedHeartbeats

    daemon, _handshakes = secure_ns
    ns = daemon.nameserver
    shared = SharedHeartbeats(pyrorpc.Settings(ns=addr(daemon), secret=SECRET), phase=0.0)
    write_fd, env = shared.open_pipe()
    name, uri = "calc.h.9.a", "PYRO:calc.h.9.a@127.0.0.1:1"
    real = ns.lease_many

    def lease_many(leases: Any) -> Any:
        os.write(write_fd, json.dumps({"name": name, "bye": True}).encode() + b"\n")  # the goodbye ...
        ns.remove(name)  # ... and the worker's own deregistration, before the renewal arrives
        return real(leases)
    ns.lease_many = lease_many
    try:
        assert env["PYRORPC_HEARTBEAT_FD"] == str(write_fd)
        os.write(write_fd, json.dumps({"name": name, "uri": uri, "tags": ["pyrorpc.service:calc"],
                                       "load": {"calls": 1}, "ttl": 3.0}).encode() + b"\n")
        wait_for(lambda: shared.requests == 1, 5)
        wait_for(lambda: name not in ns.storage, 5)
        time.sleep(0.3)
        assert name not in ns.storage
        os.write(write_fd, json.dumps({"name": name, "uri": uri, "tags": ["pyrorpc.service:calc"],
                                       "load": {"calls": 2}, "ttl": 3.0}).encode() + b"\n")
        time.sleep(0.3)
        assert name not in ns.storage and shared.requests == 1  # it said goodbye: never renewed again
    finally:
        shared.close()
        os.close(write_fd)

"""etcd storage: several name servers over one real 3-member etcd cluster serve one registry, leases and locks.

Every test starts its own etcd cluster on 127.0.0.1 (tests/etcd_cluster.py); name servers run in this
process (unit level) or as ``pyrorpc ns start --storage etcd://...`` processes (the acceptance scenarios).
"""

from __future__ import annotations

import collections
import concurrent.futures
import datetime
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import Pyro5.api
import Pyro5.errors
import pytest
from etcd_cluster import EtcdCluster, etcd_binary

import pyrorpc
from pyrorpc.testing import ChildProcess, WorkerProcess, wait_for

pytest.importorskip("etcd3gw", reason="the etcd extra (etcd3gw) is not installed: pip install -e '.[etcd]'")


@pyrorpc.service("echo")
class Echo:
    """The service the acceptance scenario's workers serve (``pyrorpc worker start test_etcd:Echo``)."""

    @pyrorpc.idempotent
    def pid(self, x: int, seconds: float = 0.002) -> tuple[int, int]:
        time.sleep(seconds)
        return x, os.getpid()


@pytest.fixture(scope="session")
def etcd_bin() -> str:
    binary = etcd_binary()
    if binary is None:
        pytest.skip("no etcd server binary, and it cannot be installed here (apt-get install etcd-server)")
    return binary


def cluster(binary: str) -> Iterator[EtcdCluster]:
    """A 3-member etcd cluster, its data in memory where /dev/shm allows (etcd syncs every write to disk)."""
    data = Path(tempfile.mkdtemp(prefix="pyrorpc-etcd-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None))
    try:
        with EtcdCluster(data, binary=binary) as made:
            yield made
    finally:
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
def etcd(etcd_bin: str) -> Iterator[EtcdCluster]:
    """A fresh cluster for this test alone (it kills members)."""
    yield from cluster(etcd_bin)


@pytest.fixture(scope="module")
def shared_etcd(etcd_bin: str) -> Iterator[EtcdCluster]:
    """One cluster for this module's tests that kill nothing; each uses a key prefix of its own."""
    yield from cluster(etcd_bin)


@pytest.fixture
def ns_pair(shared_etcd: EtcdCluster, request: pytest.FixtureRequest) -> Iterator[tuple[Any, Any]]:
    """Two name servers in this process over the shared cluster, under a prefix of this test's (lease TTL 3 s)."""
    from nameserver import NameServerDaemon
    url = f"{shared_etcd.url}/{request.node.name}"
    a = NameServerDaemon("127.0.0.1", 0, storage=url, lease_ttl=3.0)
    try:
        b = NameServerDaemon("127.0.0.1", 0, storage=url, lease_ttl=3.0)
    except BaseException:
        a.close()
        raise
    with a, b:
        a.start()
        b.start()
        yield a, b


def stock(daemon: Any) -> Any:
    return Pyro5.api.Proxy(daemon.uri)


# unit level: the registry through stock Pyro5 clients ----------------------------------------------------

def test_stock_pyro5_client_sees_one_registry_on_both_name_servers(ns_pair: tuple[Any, Any]) -> None:
    a, b = ns_pair
    with stock(a) as pa, stock(b) as pb:
        pa.register("calc.one", "PYRO:obj@127.0.0.1:5001", metadata={"pyrorpc.service:calc", "x"})
        pa.register("plain", "PYRO:plain@127.0.0.1:5002")
        wait_for(lambda: "calc.one" in pb.list() and "plain" in pb.list(), 5, message="registrations on b")
        uri, meta = pb.lookup("calc.one", return_metadata=True)
        assert str(uri) == "PYRO:obj@127.0.0.1:5001" and meta == {"pyrorpc.service:calc", "x"}
        assert pb.yplookup(meta_all={"pyrorpc.service:calc"}) == {
            "calc.one": ("PYRO:obj@127.0.0.1:5001", {"pyrorpc.service:calc", "x"})}
        assert pb.yplookup(meta_any={"x"}, return_metadata=False) == {"calc.one": "PYRO:obj@127.0.0.1:5001"}
        assert set(pb.list(prefix="calc.")) == {"calc.one"}
        # each name server is registered under Pyro5's name with its own address, never shared
        assert pa.lookup(Pyro5.core.NAMESERVER_NAME) == a.uri and pb.lookup(Pyro5.core.NAMESERVER_NAME) == b.uri
        assert pa.count() == pb.count() == 3
        with pytest.raises(Pyro5.errors.NamingError):
            pb.lookup("nobody")
        pb.set_metadata("plain", {"tagged"})
        wait_for(lambda: pa.lookup("plain", return_metadata=True)[1] == {"tagged"}, 5, message="metadata on a")
        assert pb.remove("calc.one") == 1
        wait_for(lambda: "calc.one" not in pa.list(), 5, message="removal on a")
        assert pa.yplookup(meta_all={"pyrorpc.service:calc"}) == {}
        assert pa.remove(prefix="pla") == 1
        wait_for(lambda: set(pb.list()) == {Pyro5.core.NAMESERVER_NAME}, 5, message="prefix removal on b")


def test_a_lease_renewed_on_either_name_server_expires_on_time(ns_pair: tuple[Any, Any]) -> None:
    a, b = ns_pair
    name, uri, tags = "calc.w1", "PYRO:w1@127.0.0.1:5003", ["pyrorpc.service:calc"]
    with stock(a) as pa, stock(b) as pb:
        assert _untoken(pa.lease(name, uri, tags, {"threads": 4, "calls": 1}, 2.0)) == {"ttl": 2.0, "created": True}
        wait_for(lambda: [w["name"] for w in pb.service_workers("calc")] == [name], 5, message="lease seen on b")
        # renewing through the other name server renews the same registration
        deadline = time.monotonic() + 2.6  # past the 2 s TTL
        while time.monotonic() < deadline:
            reply = pb.lease(name, uri, tags, {"threads": 4, "calls": 2}, 2.0)
            assert _untoken(reply) == {"ttl": 2.0, "created": False}
            time.sleep(0.5)
        [record] = pa.service_workers("calc")
        assert record["ttl"] == 2.0 and record["load"]["threads"] == 4
        # a renewal by token carries counters; a fixed field (an etcd write) or a new one asks for a whole lease,
        # so the name server's I/O thread never waits on etcd; another name server does not know the token
        token = pb.lease(name, uri, tags, {"threads": 4, "calls": 2}, 2.0)["token"]
        assert pb.renew(name, token, {"calls": 3}) == 2.0
        assert pb.renew(name, token, {"threads": 8}) is None
        assert pb.renew(name, token, {"new_key": 1}) is None
        assert pa.renew(name, token, {"calls": 3}) is None
        # a fixed field of the load report is written at once
        pb.lease(name, uri, tags, {"threads": 8, "calls": 3}, 2.0)
        wait_for(lambda: pa.service_workers("calc")[0]["load"]["threads"] == 8, 5, message="new load on a")
        # nobody renews: the name server it renewed through last drops it, from both, within TTL + 1 s
        stopped = time.monotonic()
        wait_for(lambda: not pa.service_workers("calc") and not pb.service_workers("calc"), 4,
                 message="lease expired everywhere")
        assert time.monotonic() - stopped <= 2.0 + 1.0
        assert name not in pa.list() and name not in pb.list()
        assert pb.lease(name, uri, tags, None, 2.0)["created"] is True


def test_a_dead_name_servers_registrations_outlive_it_by_its_lease_ttl_at_most(ns_pair: tuple[Any, Any]) -> None:
    a, b = ns_pair
    with stock(b) as pb:
        with stock(a) as pa:
            pa.lease("calc.orphan", "PYRO:o@127.0.0.1:5008", ["pyrorpc.service:calc"], None, 1.0)
            pa.lease("calc.moved", "PYRO:m@127.0.0.1:5009", ["pyrorpc.service:calc"], None, 1.0)
        wait_for(lambda: len(pb.service_workers("calc")) == 2, 5)
        a.close()  # its worker of calc.moved renews through b from now on; calc.orphan's is gone too
        closed = time.monotonic()
        while time.monotonic() < closed + 3.0 + 1.5:  # past a's lease TTL (3 s)
            assert not pb.lease("calc.moved", "PYRO:m@127.0.0.1:5009", ["pyrorpc.service:calc"], None, 1.0)[
                "created"]
            time.sleep(0.3)
        assert [w["name"] for w in pb.service_workers("calc")] == ["calc.moved"]


def test_locks_hold_across_name_servers(ns_pair: tuple[Any, Any]) -> None:
    a, b = ns_pair
    with stock(a) as pa, stock(b) as pb:
        pa.register("plain", "PYRO:plain@127.0.0.1:5004")
        with pytest.raises(ValueError, match="plain registration"):
            pb.acquire_lock("plain", "x", 2.0)

        # many contenders on both name servers at once: one owner gets it, every time
        def contend(k: int) -> tuple[str, bool]:
            owner = f"owner{k % 4}"
            with stock(a if k % 2 else b) as ns:
                return owner, ns.acquire_lock("job", owner, 2.0)

        with concurrent.futures.ThreadPoolExecutor(8) as ex:
            results = list(ex.map(contend, range(24)))
        winners = {owner for owner, got in results if got}
        assert len(winners) == 1, results
        [winner] = winners
        loser = "owner0" if winner != "owner0" else "owner1"
        assert pb.acquire_lock("job", winner, 2.0) and pa.acquire_lock("job", winner, 2.0)  # renewals
        assert not pa.acquire_lock("job", loser, 2.0)
        assert not pb.release_lock("job", loser)
        assert pb.release_lock("job", winner)
        assert pa.acquire_lock("job", loser, 2.0)
        # a holder that stops renewing loses the lock when etcd expires its lease
        wait_for(lambda: pb.acquire_lock("job", winner, 2.0), 5, interval=0.2, message="lock expired")
        assert not pa.acquire_lock("job", loser, 2.0)


def test_name_server_follows_etcd_when_its_member_dies(etcd: EtcdCluster) -> None:
    from nameserver import NameServerDaemon
    with NameServerDaemon("127.0.0.1", 0, storage=etcd.url, lease_ttl=3.0) as a, \
            NameServerDaemon("127.0.0.1", 0, storage=etcd.url, lease_ttl=3.0) as b, stock(a.start()) as pa, \
            stock(b.start()) as pb:
        pa.register("before", "PYRO:before@127.0.0.1:5005")
        wait_for(lambda: "before" in pb.list(), 5)
        etcd.kill(0)  # both name servers talk to the first endpoint of the URL
        assert "before" in pb.list()  # reads come from the name server's copy
        pa.register("after", "PYRO:after@127.0.0.1:5006")  # moves on to another member
        wait_for(lambda: "after" in pb.list(), 5, message="the watch moved to a live member")
        assert pb.lease("calc.w", "PYRO:w@127.0.0.1:5007", ["pyrorpc.service:calc"], None, 2.0)["created"]
        wait_for(lambda: len(pa.service_workers("calc")) == 1, 5)


# acceptance: name servers, etcd members and workers killed under load -------------------------------------

class Procs:
    """Child processes of one test (name servers, workers, schedulers); all killed at its end."""

    def __init__(self) -> None:
        self.children: list[ChildProcess] = []

    def ns(self, url: str, port: int = 0, lease_ttl: float = 3.0) -> tuple[ChildProcess, str]:
        """``pyrorpc ns start --storage URL``; returns the process and its HOST:PORT."""
        child = self.add(ChildProcess([sys.executable, "-m", "pyrorpc", "ns", "start", "--port", str(port),
                                       "--storage", url, "--lease-ttl", str(lease_ttl)]))
        return child, child.expect(r"^NS running on (\S+)", 20).group(1)

    def worker(self, ns: str, spec: str = "test_etcd:Echo", **kwargs: Any) -> WorkerProcess:
        return self.add(WorkerProcess(spec, ns, **kwargs))

    def add(self, child: Any) -> Any:
        self.children.append(child)
        return child

    def close(self) -> None:
        for child in self.children:
            child.kill()


@pytest.fixture
def procs() -> Iterator[Procs]:
    made = Procs()
    yield made
    made.close()


class Load:
    """Client threads calling ``pool.pid`` (idempotent) until stopped; counts answers per worker pid."""

    def __init__(self, pool: pyrorpc.Pool, threads: int = 4) -> None:
        self.pool = pool
        self.ok = 0
        self.failures: list[BaseException] = []
        self.pids: collections.Counter[int] = collections.Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(k,), daemon=True) for k in range(threads)]

    def _run(self, k: int) -> None:
        i = 0
        while not self._stop.is_set():
            i += 1
            x = k * 10_000_000 + i
            try:
                echoed, pid = self.pool.pid(x)
                assert echoed == x
                with self._lock:
                    self.ok += 1
                    self.pids[pid] += 1
            except BaseException as exc:  # recorded; the test asserts there are none
                with self._lock:
                    self.failures.append(exc)

    def calls_to(self, pid: int) -> int:
        with self._lock:
            return self.pids[pid]

    def more(self, n: int, timeout: float = 10.0, message: str = "calls") -> None:
        before = self.ok
        wait_for(lambda: self.ok >= before + n, timeout, message=message)

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)


def workers_on(ns: str, service: str = "echo") -> dict[str, pyrorpc.WorkerInfo]:
    with pyrorpc.NameServerClient(pyrorpc.Settings(ns=ns, connect_timeout=2)) as client:
        return {w.name: w for w in client.service_workers(service)}


def renewed_since(moment: float, *ns: str) -> set[str]:
    """The workers that renewed their lease through one of ``ns`` after ``moment`` (time.monotonic())."""
    now = time.monotonic()
    return {name for addr in ns for name, w in workers_on(addr).items()
            if w.last_heartbeat is not None and now - w.last_heartbeat > moment}


def test_two_name_servers_over_three_etcd_members_under_load(etcd: EtcdCluster, procs: Procs) -> None:
    ttl = 3.0
    renewal = ttl / 3
    ns_a, addr_a = procs.ns(etcd.url, lease_ttl=ttl)
    _ns_b, addr_b = procs.ns(etcd.url, lease_ttl=ttl)
    both = f"{addr_a},{addr_b}"
    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        workers = list(ex.map(lambda _i: procs.worker(both), range(4)))
    names = {w.name for w in workers}
    wait_for(lambda: set(workers_on(addr_b)) == names, 5, message="all four workers on b")
    with pyrorpc.Pool("echo", ns=both, timeout=10) as pool, Load(pool) as load:
        load.more(200, message="load running")
        assert {w.worker_pid for w in workers} <= set(load.pids)

        # name server A dies: nothing fails, every worker renews through B within a renewal period
        killed = time.monotonic()
        ns_a.kill()
        wait_for(lambda: renewed_since(killed, addr_b) == names, renewal + 1.5, interval=0.05,
                 message="every worker renewed through b")
        load.more(200, message="calls with name server a dead")
        newcomer = procs.worker(both)  # a is down: it registers through b
        wait_for(lambda: load.calls_to(newcomer.worker_pid) >= 20, 10, message="traffic to the newcomer")
        names.add(newcomer.name)

        # A comes back on its address and serves the same registry
        host, port = addr_a.rsplit(":", 1)
        ns_a, addr_a2 = procs.ns(etcd.url, port=int(port), lease_ttl=ttl)
        assert addr_a2 == addr_a
        assert set(workers_on(addr_a)) == names

        # an etcd member dies, the Raft leader (an election follows): nothing fails or is lost
        etcd.kill(etcd.leader())
        member_died = time.monotonic()
        load.more(200, message="calls after an etcd member died")
        with pyrorpc.NameServerClient(pyrorpc.Settings(ns=addr_a)) as client:  # writes go on
            client.register("probe", "PYRO:probe@127.0.0.1:1")
        wait_for(lambda: "probe" in pyrorpc.NameServerClient(pyrorpc.Settings(ns=addr_b)).list(), 5)
        # nothing is lost over a whole lease period (had a name server lost its etcd lease, it would be)
        time.sleep(max(0.0, member_died + ttl + 0.5 - time.monotonic()))
        assert set(workers_on(addr_a)) == names and set(workers_on(addr_b)) == names

        # a worker dies: gone from both name servers within TTL + 1 s, and calls go on
        victim = workers[0]
        victim.kill()
        died = time.monotonic()
        wait_for(lambda: victim.name not in workers_on(addr_a) and victim.name not in workers_on(addr_b),
                 ttl + 2, interval=0.05, message="dead worker dropped")
        gone_after = time.monotonic() - died
        load.more(200, message="calls after a worker died")
    assert load.failures == [], load.failures[:3]
    assert gone_after <= ttl + 1.0, gone_after


# acceptance: a lock across name servers (examples/scheduled) ---------------------------------------------

SCHEDULED = Path(__file__).resolve().parent.parent / "examples" / "scheduled"


def test_schedulers_on_two_name_servers_one_fires_and_the_other_takes_over(shared_etcd: EtcdCluster, procs: Procs,
                                                                           tmp_path: Path) -> None:
    pytest.importorskip("croniter")
    url = f"{shared_etcd.url}/scheduled"
    _a, addr_a = procs.ns(url)
    _b, addr_b = procs.ns(url)
    env = {**os.environ, "NEWSLETTER_DB": str(tmp_path / "newsletter.sqlite"), "PYTHONUNBUFFERED": "1"}
    procs.worker(f"{addr_a},{addr_b}", "worker:Newsletter", cwd=str(SCHEDULED), env=env)

    def scheduler(owner: str, ns: str, ready: str) -> ChildProcess:
        child = procs.add(ChildProcess([sys.executable, "client.py", "--cron", "* * * * * *", "--lock-ttl", "2",
                                        "--id", owner, "--ns", ns], env=env, cwd=SCHEDULED))
        child.expect(ready, 15)
        return child

    a = scheduler("sched-a", addr_a, r"\[sched-a\] leader")  # each asks its own name server for the lock
    b = scheduler("sched-b", addr_b, r"\[sched-b\] standby")
    with pyrorpc.Pool("newsletter", ns=addr_b, timeout=10) as newsletter:
        def fired_by(owner: str) -> list[dict[str, Any]]:
            return [h for h in newsletter.history() if h["scheduler"] == owner]

        wait_for(lambda: len(fired_by("sched-a")) >= 3, 10, message="three ticks fired by the leader")
        assert not fired_by("sched-b"), "the scheduler on the other name server fired while the leader lived"
        a.kill()  # the leader dies without releasing its lock
        wait_for(lambda: len(fired_by("sched-b")) >= 2, 15, message="the standby took over")
        b.expect(r"\[sched-b\] leader")
        assert b.stop() == 0
        history = newsletter.history()
    editions = [h["edition"] for h in history]
    assert len(editions) == len(set(editions)), f"an edition was fired twice: {history}"
    owners = [h["scheduler"] for h in sorted(history, key=lambda h: h["edition"])]
    assert owners == sorted(owners), history  # one leader at a time: a's editions, then b's
    ticks = sorted(datetime.datetime.strptime(e, "%Y-%m-%dT%H:%M:%SZ") for e in editions)
    gaps = [(t1, t2) for t1, t2 in zip(ticks, ticks[1:], strict=False) if (t2 - t1).total_seconds() != 1]
    assert not gaps, f"ticks lost in the takeover: {gaps}\n{a.output}\n{b.output}"


def test_concurrent_writes_share_transactions_and_fail_alone(shared_etcd: EtcdCluster) -> None:
    from nameserver.etcd_client import EtcdClient
    client = EtcdClient([(h, int(p)) for h, p in (e.split(":") for e in shared_etcd.endpoints)])
    try:
        gone = client.grant(5)
        client.revoke(gone)
        alive = client.grant(5)

        def write(i: int) -> int | str:
            try:  # the same key from several threads; one write with a lease etcd no longer has
                return client.put(f"/group/{i % 40}".encode(), str(i).encode(), gone if i == 17 else alive)
            except Pyro5.errors.NamingError as exc:
                return str(exc)

        with concurrent.futures.ThreadPoolExecutor(32) as ex:
            results = list(ex.map(write, range(200)))
        failed = [(i, r) for i, r in enumerate(results) if isinstance(r, str)]
        assert [i for i, _r in failed] == [17] and "lease not found" in failed[0][1], failed
        revisions = [r for r in results if isinstance(r, int)]
        assert len(set(revisions)) < len(revisions) / 2, "the writes did not share transactions"
        kvs = client.range(b"/group/", b"/group0")["kvs"]
        assert len(kvs) == 40
    finally:
        client.close()


def test_load_reports_reach_other_name_servers(shared_etcd: EtcdCluster) -> None:
    from nameserver import NameServer
    from nameserver.etcd import EtcdStorage
    url = f"{shared_etcd.url}/load-reports"
    a = NameServer(EtcdStorage.from_url(url, owner_ttl=3, load_interval=0.5))
    b = NameServer(EtcdStorage.from_url(url, owner_ttl=3, load_interval=0.5))
    try:
        def load_on_b() -> dict[str, Any]:
            records = b.service_workers("calc")
            return records[0]["load"] if records else {}

        args = ("calc.w", "PYRO:w@127.0.0.1:5010", ["pyrorpc.service:calc"])
        a.lease(*args, {"threads": 4, "calls": 1}, 3.0)
        wait_for(lambda: load_on_b().get("calls") == 1, 5, message="the first report on b")
        a.lease(*args, {"threads": 4, "calls": 2}, 3.0)  # a counter: not written yet (due after 0.5 s)
        assert a.service_workers("calc")[0]["load"]["calls"] == 2  # the owner has the fresh one
        time.sleep(0.6)
        a.lease(*args, {"threads": 4, "calls": 3}, 3.0)  # due now: written with the next flush (<= 1 s)
        wait_for(lambda: load_on_b().get("calls") == 3, 3, message="counters written in a flush")
        a.lease(*args, {"threads": 8, "calls": 3}, 3.0)  # a fixed field: written at once
        wait_for(lambda: load_on_b().get("threads") == 8, 1, message="a fixed field written at once")
    finally:
        a.storage.close()
        b.storage.close()


def test_storage_urls() -> None:
    from nameserver import open_storage
    from nameserver.etcd import parse_url
    assert parse_url("etcd://10.0.0.1:2379,h2:2479") == ([("10.0.0.1", 2379), ("h2", 2479)], "/pyrorpc/ns/")
    assert parse_url("etcd://[::1]:2379/staging/") == ([("::1", 2379)], "/staging/")
    for bad in ("etcd://", "etcd://host", "etcd://h:0", "etcd://h:2379,", "etcd://h:x"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            open_storage(bad)


def _untoken(reply: dict) -> dict:
    """A lease reply without its token (a random int, checked where renew is)."""
    assert isinstance(reply.pop("token"), int)
    return reply

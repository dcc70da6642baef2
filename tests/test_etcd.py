"""etcd storage: several name servers over one real 3-member etcd cluster serve one registry, leases and locks.

Every test starts its own etcd cluster on 127.0.0.1 (tests/etcd_cluster.py); name servers run in this
process (unit level) or as ``pyrorpc ns start --storage etcd://...`` processes (the acceptance scenarios).
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import Pyro5.api
import Pyro5.errors
import pytest
from etcd_cluster import EtcdCluster, etcd_binary

import pyrorpc
from pyrorpc.testing import wait_for

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


@pytest.fixture
def etcd(etcd_bin: str, tmp_path: Path) -> Iterator[EtcdCluster]:
    """A fresh 3-member etcd cluster for this test (its data in memory where /dev/shm allows: etcd syncs
    every write to disk)."""
    base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else tmp_path
    data = Path(tempfile.mkdtemp(prefix="pyrorpc-etcd-", dir=base))
    try:
        with EtcdCluster(data, binary=etcd_bin) as cluster:
            yield cluster
    finally:
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
def ns_pair(etcd: EtcdCluster) -> Iterator[tuple[Any, Any]]:
    """Two name servers in this process over the cluster (lease TTL 3 s)."""
    from nameserver import NameServerDaemon
    a = NameServerDaemon("127.0.0.1", 0, storage=etcd.url, lease_ttl=3.0)
    try:
        b = NameServerDaemon("127.0.0.1", 0, storage=etcd.url, lease_ttl=3.0)
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


def test_a_lease_renewed_on_either_name_server_and_expired_by_etcd(ns_pair: tuple[Any, Any]) -> None:
    a, b = ns_pair
    name, uri, tags = "calc.w1", "PYRO:w1@127.0.0.1:5003", ["pyrorpc.service:calc"]
    with stock(a) as pa, stock(b) as pb:
        assert pa.lease(name, uri, tags, {"threads": 4, "calls": 1}, 2.0) == {"ttl": 2.0, "created": True}
        wait_for(lambda: [w["name"] for w in pb.service_workers("calc")] == [name], 5, message="lease seen on b")
        # renewing through the other name server renews the same registration
        deadline = time.monotonic() + 4.5  # well past the 2 s TTL
        while time.monotonic() < deadline:
            assert pb.lease(name, uri, tags, {"threads": 4, "calls": 2}, 2.0) == {"ttl": 2.0, "created": False}
            time.sleep(0.5)
        [record] = pa.service_workers("calc")
        assert record["ttl"] == 2.0 and record["load"]["threads"] == 4
        # a fixed field of the load report is written at once
        pb.lease(name, uri, tags, {"threads": 8, "calls": 3}, 2.0)
        wait_for(lambda: pa.service_workers("calc")[0]["load"]["threads"] == 8, 5, message="new load on a")
        # nobody renews: etcd drops it, from both name servers, within TTL + 1 s
        stopped = time.monotonic()
        wait_for(lambda: not pa.service_workers("calc") and not pb.service_workers("calc"), 4,
                 message="lease expired everywhere")
        assert time.monotonic() - stopped <= 2.0 + 1.0
        assert name not in pa.list() and name not in pb.list()
        assert pb.lease(name, uri, tags, None, 2.0)["created"] is True


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


def test_name_server_follows_etcd_when_its_member_dies(ns_pair: tuple[Any, Any], etcd: EtcdCluster) -> None:
    a, b = ns_pair
    with stock(a) as pa, stock(b) as pb:
        pa.register("before", "PYRO:before@127.0.0.1:5005")
        wait_for(lambda: "before" in pb.list(), 5)
        etcd.kill(0)  # both name servers talk to the first endpoint of the URL
        assert "before" in pb.list()  # reads come from the name server's copy
        pa.register("after", "PYRO:after@127.0.0.1:5006")  # moves on to another member
        wait_for(lambda: "after" in pb.list(), 5, message="the watch moved to a live member")
        assert pb.lease("calc.w", "PYRO:w@127.0.0.1:5007", ["pyrorpc.service:calc"], None, 2.0)["created"]
        wait_for(lambda: len(pa.service_workers("calc")) == 1, 5)

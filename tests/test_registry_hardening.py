"""What a lease may carry: the name server refuses absurd load reports, clients clamp what they read."""

from __future__ import annotations

import math
from typing import Any

import Pyro5.api
import pytest
from services import Calculator

import pyrorpc
from nameserver import NameServer
from nameserver.registry import MAX_THREADS, check_load
from pyrorpc.testing import wait_for

U1 = "PYRO:obj@127.0.0.1:9999"
GOOD_LOAD = {"in_flight": 0, "calls": 3, "errors": 1, "connections": 2, "host": "box", "pid": 4242,
             "threads": 64, "started": 1_700_000_000.5}


def client(ns_addr: str) -> pyrorpc.NameServerClient:
    return pyrorpc.NameServerClient(pyrorpc.Settings(ns=ns_addr))


# the regression (issue 10, item 8): a lease with threads=-1 used to make every call fail with
# "SlotsBusy: all -1 call slots busy" and no failover

def test_lease_with_negative_threads_is_refused_and_the_pool_keeps_calling(ns_addr, pool_factory):
    with pyrorpc.WorkerHost(Calculator, ns=ns_addr, threads=8) as host:
        bad = {**host.load(), "threads": -1}
        with pytest.raises(ValueError, match="threads"):
            client(ns_addr).lease(host.name, host.uri, host.metadata, bad, None)
        with Pyro5.api.Proxy(f"PYRO:Pyro.NameServer@{ns_addr}") as raw:  # a stock Pyro5 client, same answer
            with pytest.raises(ValueError, match="threads"):
                raw.lease("calc.intruder.1.x", host.uri, sorted(host.metadata), bad, 3)
        [info] = client(ns_addr).service_workers("calc")
        assert info.name == host.name and info.threads == 8  # the worker's own report stands
        pool = pool_factory("calc", ns=ns_addr, timeout=5)
        before = host.stats.calls
        assert [pool.add(i, 1) for i in range(20)] == [i + 1 for i in range(20)]
        assert list(pool.add.map((i, i) for i in range(100))) == [2 * i for i in range(100)]
        # a worker counts a call once its reply is written, which can be just after the caller has it
        wait_for(lambda: host.stats.calls - before >= 120, 5, message="120 calls on the worker")


def test_pool_clamps_absurd_figures_registered_without_a_lease(ns_addr, pool_factory):
    """A plain registration (no lease, so nothing checked: what a stock Pyro5 name server would hold too)
    whose tags claim threads=-1 and a negative pid: the client clamps them and calls the real worker."""
    with pyrorpc.WorkerHost(Calculator, ns=ns_addr, register=False) as host:
        client(ns_addr).register("calc.liar.1.x", host.uri, {"pyrorpc.service:calc", "pyrorpc.threads:-1",
                                                             "pyrorpc.pid:-5", "pyrorpc.started:nan"})
        pool = pool_factory("calc", ns=ns_addr, timeout=5)
        assert [pool.add(i, 1) for i in range(10)] == [i + 1 for i in range(10)]
        futures = [pool.add.future(i, i) for i in range(10)]  # one slot: the rest wait, none fails
        assert [f.result(5) for f in futures] == [2 * i for i in range(10)]
        wait_for(lambda: host.stats.calls == 20, 5, message="20 calls on the worker")
        [info] = pool.workers()
        assert (info.threads, info.pid, info.started, info.uptime) == (1, 0, 0.0, 0.0)


# the name server's checks, offline

@pytest.mark.parametrize("field, value", [
    ("threads", -1), ("threads", 0), ("threads", MAX_THREADS + 1), ("threads", 2.5), ("threads", "64"),
    ("threads", True), ("threads", None),
    ("in_flight", -1), ("calls", -3), ("errors", 1.5), ("connections", "2"), ("calls", 2**63),
    ("pid", -1), ("pid", 2**32), ("pid", "1"),
    ("host", 5), ("host", "h" * 256), ("host", None),
    ("started", float("nan")), ("started", float("inf")), ("started", -1.0), ("started", 1e12),
    ("started", "yesterday"), ("started", False),
], ids=lambda v: repr(v)[:12])
def test_lease_refuses_a_bad_known_load_field(field: str, value: Any) -> None:
    ns = NameServer()
    with pytest.raises(ValueError, match=f"load\\['{field}'\\]"):
        ns.lease("s.w1", U1, {"pyrorpc.service:s"}, {**GOOD_LOAD, field: value}, 5)
    assert ns.count() == 0 and ns.services() == {} and ns.leases == {}  # nothing registered


def test_refused_renewal_keeps_the_previous_report() -> None:
    ns = NameServer()
    ns.lease("s.w1", U1, {"pyrorpc.service:s"}, GOOD_LOAD, 5)
    with pytest.raises(ValueError, match="threads"):
        ns.lease("s.w1", U1, {"pyrorpc.service:s"}, {**GOOD_LOAD, "threads": -1}, 5)
    with pytest.raises(TypeError, match="load must be a dict"):
        ns.lease("s.w1", U1, {"pyrorpc.service:s"}, [("threads", -1)], 5)
    [worker] = ns.service_workers("s")
    assert worker["load"] == GOOD_LOAD


def test_good_reports_pass_and_extras_are_cleaned() -> None:
    assert check_load(None) == {}
    assert check_load(GOOD_LOAD) == GOOD_LOAD
    assert check_load({"threads": 1, "started": 0, "pid": 0, "host": ""}) == \
        {"threads": 1, "started": 0.0, "pid": 0, "host": ""}
    extras = {f"k{i}": i for i in range(40)}
    clean = check_load({**extras, "threads": 3, "queue": "x" * 300, "flag": True, 7: 1})
    assert clean["threads"] == 3 and "queue" not in clean and "flag" not in clean and 7 not in clean
    assert len(clean) == 1 + 32  # at most 32 extra keys, the known fields always kept


def test_a_real_workers_report_is_accepted(ns_addr):
    with pyrorpc.WorkerHost(Calculator, ns=ns_addr) as host:
        load = host.load()
        assert check_load(load) == load
        info = wait_for(lambda: client(ns_addr).service_workers("calc"), 5, message="registration")[0]
        assert (info.threads, info.pid, info.host) == (64, host.load()["pid"], host.hostname)


# what clients make of what they read, whoever wrote it

@pytest.mark.parametrize("load, tags, expected", [
    ({"threads": -1}, (), {"threads": 1}),
    ({"threads": 0}, (), {"threads": 1}),
    ({"threads": 10**12}, (), {"threads": MAX_THREADS}),
    ({"threads": float("inf")}, (), {"threads": 1}),
    ({"threads": "many"}, (), {"threads": 1}),
    ({}, ("pyrorpc.threads:-7",), {"threads": 1}),
    ({}, (), {"threads": 0}),  # not reported: the client uses its own limit
    ({"in_flight": -4, "calls": -1, "errors": float("nan"), "connections": -2},
     (), {"in_flight": 0, "calls": 0, "errors": 0, "connections": 0}),
    ({"pid": -1}, (), {"pid": 0}),
    ({"started": float("nan")}, (), {"started": 0.0}),
    ({"started": -100.0}, (), {"started": 0.0}),
    ({"started": 1e300}, (), {"started": 0.0}),
    ({"host": "h" * 1000}, (), {"host": "h" * 255}),
], ids=lambda v: repr(v)[:40])
def test_worker_info_clamps_what_it_reads(load: dict[str, Any], tags: tuple[str, ...],
                                          expected: dict[str, Any]) -> None:
    info = pyrorpc.WorkerInfo.from_record("calc.h.1.x", U1, ("pyrorpc.service:calc", *tags), load, None, None)
    assert {k: getattr(info, k) for k in expected} == expected
    assert info.uptime >= 0 and math.isfinite(info.uptime)


def test_worker_info_clamps_lease_figures_and_odd_load_types() -> None:
    info = pyrorpc.WorkerInfo.from_record("calc.h.1.x", U1, (), "not a dict", -5.0, -1.0)  # type: ignore[arg-type]
    assert (info.last_heartbeat, info.ttl, info.threads, info.calls) == (0.0, None, 0, 0)
    direct = pyrorpc.WorkerInfo("w", U1, "calc", threads=-1, in_flight=-3, client_in_flight=-1)
    assert (direct.threads, direct.in_flight, direct.client_in_flight) == (0, 0, 0)

"""Pool: balancing, map/broadcast, failover with SIGKILLed workers, membership, backpressure."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import os
import threading
import time

import pytest
from services import Calculator

import pyrorpc
from pyrorpc.testing import wait_for


def start_workers(worker_factory, ns, n, spec="services:Calculator", **kwargs):
    with concurrent.futures.ThreadPoolExecutor(n) as ex:
        return list(ex.map(lambda _i: worker_factory(spec, ns, **kwargs), range(n)))


def test_call_modes_and_introspection(ns_addr, pool_factory):
    with pyrorpc.WorkerHost(Calculator, ns=ns_addr) as a, pyrorpc.WorkerHost(Calculator, ns=ns_addr) as b:
        pool = pool_factory("calc", ns=ns_addr)
        assert pool.add(1, 2) == 3
        assert pool.log.oneway("x") is None
        assert pool.add.future(2, 2).result(5) == 4
        assert asyncio.run(pool.add.aio(3, 3)) == 6
        assert list(pool.add.map([(1, 2), (3, 4)])) == [3, 7]
        assert list(pool.get.map(["a", "b"])) == ["value-a", "value-b"]  # single arguments need no tuple
        result = pool.get.broadcast("k")
        assert result == {a.name: "value-k", b.name: "value-k"}
        failures = pool.fail.broadcast("boom")
        assert set(failures) == {a.name, b.name} and all(isinstance(e, ValueError) for e in failures.values())
        infos = pool.workers()
        assert [w.name for w in infos] == sorted([a.name, b.name])
        assert all(w.service == "calc" and w.pid == os.getpid() and w.uri for w in infos)
        assert pool.method("close")() == "remote close"  # name collision with Pool.close
        with pytest.raises(ValueError):
            pool.fail("bad")


def test_balancing_four_workers(nameserver, worker_factory, pool_factory):
    ns = nameserver(lease_ttl=3)
    workers = start_workers(worker_factory, ns.ns, 4, spec="services:Sleeper")
    pool = pool_factory("sleeper", ns=ns.ns)
    counts: collections.Counter[int] = collections.Counter()
    lock = threading.Lock()

    def client():
        for _ in range(50):
            pid = pool.sleep(10)
            with lock:
                counts[pid] += 1

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sum(counts.values()) == 400
    shares = {w.worker_pid: counts[w.worker_pid] / 400 for w in workers}
    assert all(0.15 <= s <= 0.35 for s in shares.values()), shares


def test_shared_pool_sixteen_threads(ns_addr, pool_factory):
    with pyrorpc.WorkerHost(Calculator, ns=ns_addr), pyrorpc.WorkerHost(Calculator, ns=ns_addr):
        pool = pool_factory("calc", ns=ns_addr)
        errors = []

        def client(n):
            try:
                for i in range(100):
                    assert pool.add(n, i) == n + i
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=client, args=(n,)) for n in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []


def test_map_survives_sigkill_of_a_worker(nameserver, worker_factory, pool_factory):
    ns = nameserver(lease_ttl=3)
    workers = start_workers(worker_factory, ns.ns, 3)
    pool = pool_factory("calc", ns=ns.ns, timeout=20)
    results = []
    for i, value in enumerate(pool.slow_idem.map((i, 0.002) for i in range(3000))):
        results.append(value)
        if i == 1000:
            workers[0].kill()
    assert results == [i * i for i in range(3000)]
    assert workers[0].name not in [w.name for w in pool.workers()] or pool.workers()


def test_non_idempotent_calls_never_run_twice(nameserver, worker_factory, pool_factory, tmp_path):
    ns = nameserver(lease_ttl=3)
    journal = tmp_path / "journal.txt"
    env = dict(os.environ, JOURNAL_FILE=str(journal))
    workers = start_workers(worker_factory, ns.ns, 3, spec="services:Journal", env=env)
    pool = pool_factory("journal", ns=ns.ns, timeout=20)
    outcomes: dict[int, str] = {}
    lock = threading.Lock()

    def client(base):
        for i in range(base, base + 60):
            try:
                assert pool.record(i, 0.005) == i
                result = "ok"
            except pyrorpc.WorkerLostError:
                result = "lost"
            with lock:
                outcomes[i] = result

    threads = [threading.Thread(target=client, args=(k * 1000,)) for k in range(6)]
    for t in threads:
        t.start()
    wait_for(lambda: len(outcomes) > 120, 30, message="calls under way")
    workers[1].kill()
    for t in threads:
        t.join(60)
    assert len(outcomes) == 360
    print("outcomes:", collections.Counter(outcomes.values()))
    executed = collections.Counter(int(x) for x in journal.read_text().split())
    assert max(executed.values()) == 1, "a call ran twice"
    for token, outcome in outcomes.items():
        if outcome == "ok":
            assert executed[token] == 1, token
    # calls lost with the killed worker are reported, never silently dropped
    assert set(executed) | {t for t, o in outcomes.items() if o == "lost"} == set(outcomes)


def test_name_server_down_then_new_worker_joins(nameserver, worker_factory, pool_factory):
    ns = nameserver(lease_ttl=3)
    start_workers(worker_factory, ns.ns, 2)
    pool = pool_factory("calc", ns=ns.ns, refresh=0.5)
    ns.kill()
    assert all(pool.add(i, 1) == i + 1 for i in range(300))
    ns2 = ns.restart()
    try:
        newcomer = worker_factory("services:Calculator", ns2.ns)
        t0 = time.monotonic()
        wait_for(lambda: newcomer.name in [w.name for w in pool.workers()], 5, interval=0.05,
                 message="new worker in pool")
        joined = time.monotonic() - t0
        assert joined <= 0.5 + 1.0  # one refresh period (+ a failed-refresh backoff)
        pids = {pool.pid() for _ in range(60)}
        assert newcomer.worker_pid in pids
    finally:
        ns2.kill()


def test_no_workers_error_within_timeout(ns_addr, pool_factory):
    pool = pool_factory("calc", ns=ns_addr, timeout=0.5)
    t0 = time.monotonic()
    with pytest.raises(pyrorpc.NoWorkersError):
        pool.add(1, 2)
    assert time.monotonic() - t0 < 2.0


def test_new_worker_gets_traffic_within_refresh(ns_addr, pool_factory):
    with pyrorpc.WorkerHost(Calculator, ns=ns_addr):
        pool = pool_factory("calc", ns=ns_addr, refresh=0.3)
        assert len(pool.workers()) == 1
        with pyrorpc.WorkerHost(Calculator, ns=ns_addr) as second:
            wait_for(lambda: len(pool.workers()) == 2, 2, message="refresh")
            served = collections.Counter()
            for _ in range(40):
                fut = [pool.slow_idem.future(2, 0.01) for _ in range(4)]
                [f.result(5) for f in fut]
            served.update(w.name for w in pool.workers() if w.calls or True)
            assert second.stats.calls > 0


def test_worker_stopped_gracefully_loses_nothing(ns_addr, pool_factory):
    a = pyrorpc.WorkerHost(Calculator, ns=ns_addr).start()
    with pyrorpc.WorkerHost(Calculator, ns=ns_addr):
        pool = pool_factory("calc", ns=ns_addr)
        futures = [pool.add.future(i, i) for i in range(200)]
        a.stop()  # non-idempotent calls: refused-while-draining calls go elsewhere, in-flight ones finish
        futures += [pool.add.future(i, i) for i in range(200, 400)]
        assert [f.result(20) for f in futures] == [2 * i for i in range(400)]


def test_backpressure_and_connection_cap(ns_addr, pool_factory):
    with pyrorpc.WorkerHost(Calculator, ns=ns_addr, threads=3) as host:
        pool = pool_factory("calc", ns=ns_addr, max_in_flight=8)
        [member] = pool._members.values()
        assert member.endpoint.capacity == 3  # capped by the worker's connection threads
        futures = [pool.slow_idem.future(i, 0.05) for i in range(12)]
        assert pool._window.outstanding <= 3
        assert [f.result(10) for f in futures] == [i * i for i in range(12)]
        assert host.server.connection_count() <= 3


def test_hung_worker_is_ejected(ns_addr, pool_factory):
    with pyrorpc.WorkerHost(Calculator, ns=ns_addr) as a, pyrorpc.WorkerHost(Calculator, ns=ns_addr) as b:
        pool = pool_factory("calc", ns=ns_addr, timeout=0.3, cooldown=5)
        member_a = pool._members[a.name]
        member_a.endpoint.in_flight  # noqa: B018 - exists
        with pytest.raises(pyrorpc.CallTimeoutError):
            pool.method("slow").with_timeout(0.2)(1)
        ejected = [w.name for w in pool.workers() if w.ejected]
        assert len(ejected) == 1
        healthy = ({a.name, b.name} - set(ejected)).pop()
        for _ in range(20):
            pool.add(1, 1)
        counts = {m.name: m.endpoint.calls for m in pool._members.values()}
        assert counts[healthy] >= 20


def test_bad_arguments():
    with pytest.raises(pyrorpc.ConfigurationError):
        pyrorpc.Pool("bad name!", ns="127.0.0.1:1")
    with pytest.raises(ValueError, match="strategy"):
        pyrorpc.Pool("calc", ns="127.0.0.1:1", strategy="nope")
    with pytest.raises(ValueError, match="max_in_flight"):
        pyrorpc.Pool("calc", ns="127.0.0.1:1", max_in_flight=0)
    with pytest.raises(pyrorpc.NameServerUnavailableError):
        pyrorpc.Pool("calc", settings=pyrorpc.Settings(ns="127.0.0.1:1", connect_timeout=0.5))


def test_map_batches_and_keeps_order_around_failures(ns_addr, pool_factory):
    from pyrorpc.pool import _Failed
    with pyrorpc.WorkerHost(Calculator, ns=ns_addr) as a, pyrorpc.WorkerHost(Calculator, ns=ns_addr) as b:
        pool = pool_factory("calc", ns=ns_addr)
        out = pool._call_batch("div", [(1, 1), (1, 0), (4, 2), (9, 3)], None)
        assert out[0] == 1.0 and isinstance(out[1], _Failed) and isinstance(out[1].exc, ZeroDivisionError)
        assert out[2:] == [2.0, 3.0]  # ran after the failure: resent, not lost
        assert list(pool.add.map((i, i) for i in range(5000))) == [2 * i for i in range(5000)]
        assert a.stats.calls + b.stats.calls >= 5000
        assert pool._members[a.name].endpoint.calls + pool._members[b.name].endpoint.calls < 2500  # batched
        results = pool.div.map([(1, 1), (2, 1), (1, 0), (3, 1)])
        assert next(results) == 1.0 and next(results) == 2.0
        with pytest.raises(ZeroDivisionError):
            next(results)
        assert list(pool.add.map([])) == []
        with pytest.raises(ValueError, match="window"):
            pool.add.map([(1, 2)], window=0)


def test_ejected_worker_is_probed_back_after_cooldown(ns_addr, pool_factory):
    with pyrorpc.WorkerHost(Calculator, ns=ns_addr) as a, pyrorpc.WorkerHost(Calculator, ns=ns_addr) as b:
        pool = pool_factory("calc", ns=ns_addr, cooldown=0.3)
        member = pool._members[a.name]
        pool._eject(member)
        assert [w.name for w in pool.workers() if w.ejected] == [a.name]
        before = a.stats.calls
        for _ in range(20):
            pool.add(1, 1)
        assert a.stats.calls == before  # left out while cooling down
        wait_for(lambda: not pool._members[a.name].ejected_until > time.monotonic(), 2, message="cooldown")
        for _ in range(40):
            pool.add(1, 1)
        assert a.stats.calls > before and member.strikes == 0  # a good call clears the strikes
        assert b.stats.calls > 0

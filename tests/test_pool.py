"""Pool: balancing, map/broadcast, failover with SIGKILLed workers, membership, backpressure."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import os
import threading
import time
from collections.abc import Iterator

import pytest
from Pyro5.callcontext import current_context
from services import Calculator, Steer

import pyrorpc
from pyrorpc.testing import wait_for

_RUNS: list[tuple[int, int]] = []  # (request number, argument) of every Recorder.inv run in this process
_RUNS_LOCK = threading.Lock()
_REQUEST_NUMBERS = itertools.count()


@pyrorpc.service("recorder")
class Recorder:
    """Served in this process: records every run with the number of the request (Pyro5 message) it came
    in, so a test sees from the worker's side which items were batched together and which were resent."""

    def inv(self, x):
        annotations = current_context.annotations  # the request's own dict: a batch's items share it
        with _RUNS_LOCK:
            if "test.request" not in annotations:
                annotations["test.request"] = next(_REQUEST_NUMBERS)
            _RUNS.append((annotations["test.request"], x))
        return 1 / x


@pytest.fixture
def recorded() -> Iterator[list[tuple[int, int]]]:
    with _RUNS_LOCK:
        _RUNS.clear()
    yield _RUNS


def ejected(pool: pyrorpc.Pool) -> list[str]:
    return [w.name for w in pool.workers() if w.ejected]


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
    # its lease runs out (TTL 3 s) and the next membership refresh drops it
    wait_for(lambda: workers[0].name not in [w.name for w in pool.workers()], 10, message="dead worker dropped")
    assert sorted(w.name for w in pool.workers()) == sorted(w.name for w in workers[1:])


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
            for _ in range(40):
                fut = [pool.slow_idem.future(2, 0.01) for _ in range(4)]
                assert [f.result(5) for f in fut] == [4] * 4
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
        assert [w.threads for w in pool.workers()] == [3]
        peaks = {"pool": 0, "worker": 0}
        done = threading.Event()

        def sample():
            while not done.wait(0.002):
                peaks["pool"] = max(peaks["pool"], pool.workers()[0].client_in_flight)
                peaks["worker"] = max(peaks["worker"], host.stats.in_flight)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            futures = [pool.slow_idem.future(i, 0.05) for i in range(12)]
            assert [f.result(10) for f in futures] == [i * i for i in range(12)]
        finally:
            done.set()
            sampler.join(5)
        # max_in_flight=8 is capped by the worker's 3 threads: exactly 3 at once, seen from both ends
        assert peaks == {"pool": 3, "worker": 3}
        assert host.server.connection_count() <= 3


def test_hung_worker_is_ejected(ns_addr, pool_factory):
    with pyrorpc.WorkerHost(Calculator, ns=ns_addr) as a, pyrorpc.WorkerHost(Calculator, ns=ns_addr) as b:
        hosts = {a.name: a, b.name: b}
        pool = pool_factory("calc", ns=ns_addr, timeout=0.3, cooldown=5)
        with pytest.raises(pyrorpc.CallTimeoutError):
            pool.method("slow").with_timeout(0.2)(0.5)
        [hung_name] = ejected(pool)
        hung = hosts.pop(hung_name)
        [healthy] = hosts.values()
        wait_for(lambda: hung.stats.in_flight == 0, 5, message="the hung call finished")
        hung_calls, healthy_calls = hung.stats.calls, healthy.stats.calls
        assert [pool.add(1, i) for i in range(20)] == list(range(1, 21))
        wait_for(lambda: healthy.stats.calls == healthy_calls + 20, 5, message="20 calls on the healthy worker")
        assert hung.stats.calls == hung_calls  # left out for its cooldown


def test_bad_arguments(dead_ns):
    with pytest.raises(pyrorpc.ConfigurationError):
        pyrorpc.Pool("bad name!", ns=dead_ns)
    with pytest.raises(ValueError, match="strategy"):
        pyrorpc.Pool("calc", ns=dead_ns, strategy="nope")
    with pytest.raises(ValueError, match="max_in_flight"):
        pyrorpc.Pool("calc", ns=dead_ns, max_in_flight=0)
    with pytest.raises(pyrorpc.NameServerUnavailableError):
        pyrorpc.Pool("calc", settings=pyrorpc.Settings(ns=dead_ns, connect_timeout=0.5))


def test_map_batches_calls_per_worker(ns_addr, pool_factory, recorded):
    with pyrorpc.WorkerHost(Recorder, ns=ns_addr) as a, pyrorpc.WorkerHost(Recorder, ns=ns_addr) as b:
        pool = pool_factory("recorder", ns=ns_addr)
        assert [pool.inv(x) for x in (1, 2, 4)] == [1.0, 0.5, 0.25]
        assert len({request for request, _x in recorded}) == 3  # the recorder tells requests apart
        recorded.clear()
        items = range(1, 5001)
        assert list(pool.inv.map(items)) == [1 / x for x in items]
        assert sorted(x for _request, x in recorded) == list(items)  # each item ran exactly once
        assert len({request for request, _x in recorded}) < 2500  # batched: several items per request
        # both workers served (a worker counts a call once its reply is written: wait for the last one)
        wait_for(lambda: a.stats.calls + b.stats.calls == 5003, 5, message="every reply written")
        assert a.stats.calls > 0 and b.stats.calls > 0


def test_map_keeps_order_around_a_failure_and_resends_the_rest_of_its_batch(ns_addr, pool_factory, recorded):
    with pyrorpc.WorkerHost(Recorder, ns=ns_addr):
        pool = pool_factory("recorder", ns=ns_addr)
        assert pool.inv(1) == 1.0  # connected: the first batch below times a plain call
        recorded.clear()
        # window=1: [1] goes alone, then the batch grows to ~20 ms of work and takes [0, 3, 4, ...]; the
        # worker stops a batch at its first exception, and the items after it are sent again
        results = pool.inv.map([1, 0, *range(3, 40)], window=1)
        assert next(results) == 1.0
        with pytest.raises(ZeroDivisionError):
            next(results)
        requests = dict((x, request) for request, x in recorded)
        ran = [x for _request, x in recorded]
        assert ran[:3] == [1, 0, 3] and ran == [1, 0, *range(3, len(ran) + 1)]  # in order, each once
        assert requests[1] != requests[0]  # [1] alone first
        assert requests[3] != requests[0]  # 3 was in 0's batch, did not run there, ran in a request of its own
        with pytest.raises(StopIteration):
            next(results)  # a map ends at its first failure
        results = pool.inv.map([1, 2, 0, 4])
        assert next(results) == 1.0 and next(results) == 0.5
        with pytest.raises(ZeroDivisionError):
            next(results)
        assert list(pool.inv.map([])) == []
        with pytest.raises(ValueError, match="window"):
            pool.inv.map([1], window=0)


def test_ejected_worker_is_probed_back_after_cooldown(ns_addr, pool_factory):
    cooldown = 1.0
    with pyrorpc.WorkerHost(Calculator, ns=ns_addr) as a, pyrorpc.WorkerHost(Calculator, ns=ns_addr) as b:
        pool = pool_factory("calc", ns=ns_addr, strategy=Steer(a.name), cooldown=cooldown)
        hang = pool.method("slow").with_timeout(0.2)
        with pytest.raises(pyrorpc.CallTimeoutError):
            hang(0.4)  # on a: a is ejected
        ejected_at = time.monotonic()
        assert ejected(pool) == [a.name]
        wait_for(lambda: a.stats.in_flight == 0, 5, message="the hung call finished")
        a_calls, b_calls = a.stats.calls, b.stats.calls
        assert [pool.add(1, i) for i in range(20)] == list(range(1, 21))
        assert a.stats.calls == a_calls  # left out while cooling down, though the strategy asks for it
        wait_for(lambda: b.stats.calls == b_calls + 20, 5, message="the calls went to b")
        wait_for(lambda: ejected(pool) == [], 3 * cooldown, message="end of the cooldown")
        assert time.monotonic() - ejected_at >= cooldown - 0.05
        assert pool.add(2, 2) == 4
        wait_for(lambda: a.stats.calls == a_calls + 1, 5, message="a probed back")
        # that good call cleared a's strike: failing again costs one cooldown, not a doubled one
        with pytest.raises(pyrorpc.CallTimeoutError):
            hang(0.4)
        ejected_at = time.monotonic()
        assert ejected(pool) == [a.name]
        wait_for(lambda: ejected(pool) == [], 4 * cooldown, message="end of the second cooldown")
        assert time.monotonic() - ejected_at < 1.5 * cooldown
        wait_for(lambda: a.stats.in_flight == 0, 5, message="the hung call finished")

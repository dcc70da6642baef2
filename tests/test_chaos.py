"""Chaos under load: a hung (SIGSTOPped) worker, a name server killed and restarted, 64 client threads."""

from __future__ import annotations

import collections
import concurrent.futures
import signal
import threading
import time

import pytest

import pyrorpc
from pyrorpc.testing import wait_for


def start_workers(worker_factory, ns, n, spec="services:Calculator", **kwargs):
    with concurrent.futures.ThreadPoolExecutor(n) as ex:
        return list(ex.map(lambda _i: worker_factory(spec, ns, **kwargs), range(n)))


class Load:
    """Client threads calling an idempotent method until stopped; records every outcome."""

    def __init__(self, pool, threads=6, seconds_per_call=0.005):
        self.pool = pool
        self.ok = 0
        self.failures: list[BaseException] = []
        self.by_pid: collections.Counter[int] = collections.Counter()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(k, seconds_per_call)) for k in range(threads)]

    def _run(self, k, seconds):
        i = 0
        while not self._stop.is_set():
            i += 1
            x = k * 1_000_000 + i
            try:
                assert self.pool.slow_idem(x, seconds) == x * x
                with self._lock:
                    self.ok += 1
            except BaseException as exc:  # recorded and asserted on by the test
                with self._lock:
                    self.failures.append(exc)

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def count(self):
        with self._lock:
            return self.ok


@pytest.mark.slow
def test_sigstop_worker_is_routed_around_and_comes_back(nameserver, worker_factory, pool_factory):
    ns = nameserver(lease_ttl=2)
    workers = start_workers(worker_factory, ns.ns, 3)
    victim = workers[0]
    pool = pool_factory("calc", ns=ns.ns, timeout=8, refresh=0.3)
    with Load(pool) as load:
        wait_for(lambda: load.count() > 200, 20, message="load running")
        direct = pyrorpc.connect(victim.uri, timeout=0.5)
        assert direct.add(1, 1) == 2  # connected before the hang
        victim.signal(signal.SIGSTOP)
        t0 = time.monotonic()
        # a call that reaches the hung worker times out (a new connection could not even be opened)
        with pytest.raises(pyrorpc.CallTimeoutError):
            direct.add(1, 1)
        direct.close()
        # its lease lapses (TTL 2 s): the pool stops sending to it, cuts its stuck calls off, and the
        # idempotent ones finish on the other workers
        wait_for(lambda: victim.name not in [w.name for w in pool.workers() if not w.ejected], 6,
                 message="hung worker left out")
        routed_around = time.monotonic() - t0
        before = load.count()
        wait_for(lambda: load.count() > before + 200, 20, message="others keep serving")
        victim.signal(signal.SIGCONT)
        wait_for(lambda: victim.name in [w.name for w in pool.workers() if not w.ejected], 10,
                 message="worker back after SIGCONT")
        served = {m.name: m.endpoint.calls for m in pool._members.values()}
        wait_for(lambda: pool._members[victim.name].endpoint.calls > served.get(victim.name, 0) + 20, 20,
                 message="traffic to the returned worker")
    assert load.failures == [], load.failures[:3]
    assert routed_around < 6
    assert load.ok > 600


@pytest.mark.slow
def test_sigstop_non_idempotent_calls_return_or_report_loss(nameserver, worker_factory, pool_factory):
    ns = nameserver(lease_ttl=2)
    workers = start_workers(worker_factory, ns.ns, 2)
    pool = pool_factory("calc", ns=ns.ns, timeout=8, refresh=0.3)
    futures = []
    for i in range(40):
        futures.append(pool.slow.future(0.2))
        if i == 20:
            workers[0].signal(signal.SIGSTOP)
    outcomes = collections.Counter()
    for f in futures:
        try:
            f.result(30)
            outcomes["ok"] += 1
        except pyrorpc.WorkerLostError:
            outcomes["lost"] += 1
    workers[0].signal(signal.SIGCONT)
    assert outcomes["ok"] + outcomes["lost"] == 40 and outcomes["ok"] >= 20


@pytest.mark.slow
def test_name_server_killed_and_restarted_under_load(nameserver, worker_factory, pool_factory):
    ns = nameserver(lease_ttl=2)
    start_workers(worker_factory, ns.ns, 2)
    pool = pool_factory("calc", ns=ns.ns, timeout=10, refresh=0.3)
    with Load(pool) as load:
        wait_for(lambda: load.count() > 100, 20)
        ns.kill()
        before = load.count()
        wait_for(lambda: load.count() > before + 300, 20, message="calls while the name server is down")
        ns2 = ns.restart()
        try:
            wait_for(lambda: len(pyrorpc.NameServerClient(pyrorpc.Settings(ns=ns2.ns)).service_workers("calc")) == 2,
                     5, message="workers re-registered")
            newcomer = worker_factory("services:Calculator", ns2.ns)
            wait_for(lambda: newcomer.name in [w.name for w in pool.workers()], 5, message="newcomer joins")
            wait_for(lambda: pool._members[newcomer.name].endpoint.calls > 20, 20, message="newcomer traffic")
        finally:
            ns2.kill()
    assert load.failures == [], load.failures[:3]


@pytest.mark.slow
def test_64_threads_500_calls_four_workers(nameserver, worker_factory, pool_factory):
    ns = nameserver(lease_ttl=3)
    threads = 16  # worker connection threads: the pool must never need more connections than this
    start_workers(worker_factory, ns.ns, 4, args=["--threads", str(threads)])
    pool = pool_factory("calc", ns=ns.ns, timeout=60)
    errors: list[BaseException] = []
    peak = collections.Counter()

    def client(k):
        try:
            for i in range(500):
                assert pool.add(k, i) == k + i
                if i % 100 == 0:
                    for m in list(pool._members.values()):
                        peak[m.name] = max(peak[m.name], m.endpoint.in_flight)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    with concurrent.futures.ThreadPoolExecutor(64) as ex:
        list(ex.map(client, range(64)))
    assert errors == []
    assert all(m.endpoint.capacity <= threads for m in pool._members.values())
    assert all(v <= threads for v in peak.values())
    infos = wait_for(lambda: [w for w in pool.workers() if w.calls] if
                     sum(w.calls for w in pool.workers()) >= 32000 else None, 10, message="load reports")
    assert all(w.connections <= threads for w in infos)
    assert sum(m.endpoint.calls for m in pool._members.values()) == 32000

"""Hedged calls and outlier ejection (issue 14), against real worker processes."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import os
import threading
import time
from collections.abc import Iterator

import pytest
from services import Steer

import pyrorpc
from pyrorpc.hedging import outliers
from pyrorpc.testing import NameServerProcess, WorkerProcess, wait_for

HERE = os.path.dirname(os.path.abspath(__file__))
SPEC = "slow_services:Tunable"


class Fleet:
    """A name server and four ``tunable`` workers for the whole module; ``reset()`` between tests."""

    def __init__(self) -> None:
        env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.ns_process = NameServerProcess(lease_ttl=10.0, env=env)
        self.ns = self.ns_process.ns
        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            self.workers: list[WorkerProcess] = list(ex.map(
                lambda _i: WorkerProcess(SPEC, self.ns, env=env, args=["--threads", "16"]), range(4)))
        self.env = env
        self.proxies = {w.name: pyrorpc.connect(w.name, ns=self.ns) for w in self.workers}
        self.pids = {w.name: self.proxies[w.name].reset() for w in self.workers}

    def tune(self, name: str, **kwargs: float) -> None:
        self.proxies[name].tune(**kwargs)

    def counts(self) -> dict[str, int]:
        return {name: p.count() for name, p in self.proxies.items()}

    def reset(self) -> None:
        for p in self.proxies.values():
            p.reset()

    def close(self) -> None:
        for p in self.proxies.values():
            p.close()
        for w in self.workers:
            w.kill()
        self.ns_process.kill()


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    f = Fleet()
    try:
        yield f
    finally:
        f.close()


@pytest.fixture
def tuned(fleet: Fleet) -> Iterator[Fleet]:
    fleet.reset()
    yield fleet
    fleet.reset()


def idle(pool: pyrorpc.Pool) -> bool:
    return all(w.client_in_flight == 0 for w in pool.workers())


def warm(pool: pyrorpc.Pool, n: int = 8) -> None:
    """Connect to every worker once (the pool learns which methods are idempotent from the handshake)."""
    pool.count.broadcast()
    for i in range(n):
        pool.work(i)


# hedged calls ---------------------------------------------------------------------------------------------

def test_hedged_call_modes_return_the_other_workers_reply(tuned: Fleet, pool_factory):
    slow = tuned.workers[0].name
    pool = pool_factory("tunable", ns=tuned.ns, strategy=Steer(slow), hedge=0.05, hedge_budget=1.0)
    warm(pool, 20)  # (budget: 20 eligible calls = 10 tokens, the burst)
    tuned.tune(slow, base=1.0)
    others = {tuned.pids[w.name] for w in tuned.workers[1:]}

    t0 = time.monotonic()
    pid, x = pool.work(1)
    assert (pid in others, x) == (True, 1)
    pid, x = pool.work.future(2).result(5)
    assert (pid in others, x) == (True, 2)
    pid, x = asyncio.run(pool.work.aio(3))
    assert (pid in others, x) == (True, 3)
    pid, x = asyncio.run(pool.awork.aio(4))
    assert (pid in others, x) == (True, 4)
    assert time.monotonic() - t0 < 2.0  # four calls, none waited for the slow worker's 1 s
    wait_for(lambda: idle(pool), 0.5, message="the cancelled attempts' slots freed")  # (not after 1 s)


def test_a_hedge_never_goes_to_the_same_worker_and_a_fast_reply_is_not_hedged(tuned: Fleet, pool_factory):
    slow = tuned.workers[0].name
    pool = pool_factory("tunable", ns=tuned.ns, strategy=Steer(slow), hedge=0.05, hedge_budget=1.0)
    warm(pool, 20)
    before = tuned.counts()
    for i in range(5):
        assert pool.work(i)[1] == i  # fast: answered before the delay, no hedge
    tuned.tune(slow, base=0.3)
    for i in range(5):
        assert pool.work(i)[0] != tuned.pids[slow]
    after = tuned.counts()
    assert after[slow] - before[slow] == 10  # every call went there first, never a hedge
    assert sum(after.values()) - sum(before.values()) == 15  # the five slow ones hedged once each


def test_hedges_stay_within_the_budget(tuned: Fleet, pool_factory):
    pool = pool_factory("tunable", ns=tuned.ns, hedge=0.002, hedge_budget=0.1)
    warm(pool, 0)
    for w in tuned.workers:
        tuned.tune(w.name, base=0.01)  # every call is late for a 2 ms hedge
    before = sum(tuned.counts().values())
    n = 200
    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        assert sorted(x for _pid, x in ex.map(pool.work, range(n))) == list(range(n))
    extra = sum(tuned.counts().values()) - before - n
    assert 1 <= extra <= 0.1 * n


def test_a_method_that_is_not_idempotent_is_never_hedged(tuned: Fleet, pool_factory):
    slow = tuned.workers[0].name
    pool = pool_factory("tunable", ns=tuned.ns, strategy=Steer(slow), hedge=0.01, hedge_budget=1.0)
    warm(pool, 20)
    tuned.tune(slow, base=0.1)
    before = tuned.counts()
    for i in range(3):
        assert pool.plain(i) == (tuned.pids[slow], i)
    assert asyncio.run(pool.plain.aio(7))[0] == tuned.pids[slow]
    after = tuned.counts()
    assert (after[slow] - before[slow], sum(after.values()) - sum(before.values())) == (4, 4)


def test_hedging_with_a_single_worker_does_nothing(tuned: Fleet, nameserver, worker_factory, pool_factory):
    ns = nameserver()
    solo = worker_factory(SPEC, ns.ns, args=["--service", "solo"], env=tuned.env)
    pool = pool_factory("solo", ns=ns.ns, hedge=0.001, hedge_budget=1.0)
    with pyrorpc.connect(solo.name, ns=ns.ns) as proxy:
        proxy.tune(base=0.02)
        for i in range(20):
            assert pool.work(i)[1] == i
        assert asyncio.run(pool.work.aio(99))[1] == 99
        assert proxy.count() == 21  # once each, no second copy anywhere


def test_the_losers_slot_is_freed(tuned: Fleet, pool_factory):
    slow = tuned.workers[0].name
    pool = pool_factory("tunable", ns=tuned.ns, strategy=Steer(slow), hedge=0.02, hedge_budget=1.0,
                        max_in_flight=2)
    warm(pool, 20)
    tuned.tune(slow, base=2.0)
    for i in range(6):  # three times the slow worker's two slots: a leaked slot would block the third call
        assert pool.work(i)[0] != tuned.pids[slow]
    wait_for(lambda: idle(pool), 0.5, message="no call in flight")
    tuned.tune(slow, base=0.0)
    assert pool.work(1)[0] == tuned.pids[slow]  # its slots are free again


def test_close_during_a_hedge(tuned: Fleet, pool_factory):
    pool = pyrorpc.Pool("tunable", ns=tuned.ns, hedge=0.01, hedge_budget=1.0)
    try:
        warm(pool, 20)
        for w in tuned.workers:
            tuned.tune(w.name, base=0.3)
        futures = [pool.work.future(i) for i in range(8)]
        time.sleep(0.05)  # (the hedges are out)
    finally:
        closer = threading.Thread(target=pool.close)
        closer.start()
        closer.join(10)
    assert not closer.is_alive()
    for i, fut in enumerate(futures):
        try:
            assert fut.result(5)[1] == i
        except RuntimeError as exc:  # a call that was waiting when the pool closed
            assert "closed" in str(exc)
    assert not [t for t in threading.enumerate() if t.name.startswith("pool-tunable-hedger")]
    with pytest.raises(RuntimeError, match="closed"):
        pool.work(1)


def test_hedge_options_are_checked():
    for bad in ({"hedge": -1}, {"hedge": "p95"}, {"hedge_budget": 0}, {"hedge_budget": 2},
                {"outlier_latency": 0.5}, {"outlier_errors": 1.5}):
        name = next(iter(bad))
        with pytest.raises(ValueError, match=f"`{name}`"):
            pyrorpc.Pool("x", ns="127.0.0.1:1", **bad)


# outlier ejection -----------------------------------------------------------------------------------------

def test_outlier_rule():
    fast, slow = (0.005, 0.0), (0.05, 0.0)
    assert outliers({"a": fast, "b": fast, "c": fast, "d": slow}, latency=5, errors=0.2, limit=2) == ["d"]
    assert outliers({"a": fast, "b": fast, "c": (0.02, 0.0), "d": slow}, latency=5, errors=0.2, limit=2) == ["d"]
    assert outliers({"a": fast, "b": fast, "c": fast, "d": slow}, latency=0, errors=0.2, limit=2) == []
    assert outliers({"a": fast, "b": fast, "c": fast, "d": slow}, latency=5, errors=0.2, limit=0) == []
    assert outliers({"a": fast, "b": None, "c": None, "d": slow}, latency=5, errors=0.2, limit=2) == ["d"]
    assert outliers({"a": fast, "d": None}, latency=5, errors=0.2, limit=1) == []  # no peer to compare with
    tiny = {"a": (0.0001, 0.0), "b": (0.0001, 0.0), "c": (0.0009, 0.0)}
    assert outliers(tiny, latency=5, errors=0.2, limit=1) == []  # under 1 ms: never a latency outlier
    failing = {"a": (0.005, 0.02), "b": (0.005, 0.0), "c": (0.005, 0.5)}
    assert outliers(failing, latency=5, errors=0.2, limit=1) == ["c"]
    everywhere = {"a": (0.005, 0.4), "b": (0.005, 0.5), "c": (0.005, 0.45)}
    assert outliers(everywhere, latency=5, errors=0.2, limit=1) == []  # the method fails everywhere
    two_slow = {"a": fast, "b": fast, "c": slow, "d": (0.08, 0.0)}
    assert outliers(two_slow, latency=5, errors=0.2, limit=1) == ["d"]  # the worst first


def _load(pool: pyrorpc.Pool, stop: threading.Event, seen: list[tuple[float, int]], threads: int = 8) -> list[
        threading.Thread]:
    def run() -> None:
        i = 0
        while not stop.is_set():
            pid, _x = pool.plain(i)
            seen.append((time.monotonic(), pid))
            i += 1

    workers = [threading.Thread(target=run, daemon=True) for _ in range(threads)]
    for t in workers:
        t.start()
    return workers


def _share(seen: list[tuple[float, int]], pid: int, start: float, end: float) -> tuple[float, int]:
    window = [p for t, p in list(seen) if start <= t < end]
    return (collections.Counter(window)[pid] / len(window) if window else 0.0), len(window)


def test_a_slow_worker_is_left_out_and_comes_back_after_it_recovers(tuned: Fleet, pool_factory):
    """Acceptance: one worker 10x slower than three others gets <= 5% of new calls within 5 s, and traffic
    again within a cooldown after it recovers."""
    cooldown = 0.5
    pool = pool_factory("tunable", ns=tuned.ns, cooldown=cooldown, outlier_ejection=True)
    slow = tuned.workers[0]
    for w in tuned.workers:
        tuned.tune(w.name, base=0.005)
    seen: list[tuple[float, int]] = []
    stop = threading.Event()
    threads = _load(pool, stop, seen)
    try:
        time.sleep(1.0)
        share, n = _share(seen, tuned.pids[slow.name], time.monotonic() - 1.0, time.monotonic())
        assert 0.1 < share < 0.4, (share, n)  # balanced while all are alike
        slowed = time.monotonic()
        tuned.tune(slow.name, base=0.05)  # 10x slower
        wait_for(lambda: slow.name in [w.name for w in pool.workers() if w.ejected], 5.0,
                 message="the slow worker ejected")
        time.sleep(max(0.0, slowed + 5.0 - time.monotonic()))
        mark = time.monotonic()
        time.sleep(3.0)
        share, n = _share(seen, tuned.pids[slow.name], slowed + 5.0, mark + 3.0)
        assert share <= 0.05 and n > 300, (share, n)
        slow_share, slow_n = share, n
        assert not [w for w in pool.workers() if w.ejected and w.name != slow.name]  # never the others

        recovered = time.monotonic()
        tuned.tune(slow.name, base=0.005)
        # its cooldown has grown (x1, x2, x4, x8 while it stayed slow): it is back within the longest one
        limit = cooldown * 8 + 2.0
        wait_for(lambda: _share(seen, tuned.pids[slow.name], time.monotonic() - 0.5, time.monotonic())[0] > 0.1,
                 limit, interval=0.1, message="the recovered worker's traffic back")
        back = time.monotonic() - recovered
        print(f"slow worker's share 5-8 s after it slowed: {slow_share:.1%} of {slow_n} calls; back {back:.1f} s "
              f"after it recovered")
        time.sleep(1.0)
        share, n = _share(seen, tuned.pids[slow.name], time.monotonic() - 1.0, time.monotonic())
        assert share > 0.15, (share, n, back)  # and it stays in
        assert not [w for w in pool.workers() if w.ejected]
    finally:
        stop.set()
        for t in threads:
            t.join(10)


def test_outlier_ejection_leaves_at_least_half_and_can_be_turned_off(tuned: Fleet, pool_factory):
    pool = pool_factory("tunable", ns=tuned.ns, cooldown=5.0, outlier_ejection=True)
    off = pool_factory("tunable", ns=tuned.ns, cooldown=5.0, outlier_ejection=False)
    for w, base in zip(tuned.workers, (0.05, 0.08, 0.002, 0.002), strict=True):
        tuned.tune(w.name, base=base)  # two outliers of four: both left out, never a third
    seen: list[tuple[float, int]] = []
    stop = threading.Event()
    threads = _load(pool, stop, seen) + _load(off, stop, [], threads=2)
    try:
        deadline = time.monotonic() + 3.0
        most = 0
        while time.monotonic() < deadline:
            most = max(most, sum(w.ejected for w in pool.workers()))
            assert not [w for w in off.workers() if w.ejected]
            time.sleep(0.05)
        assert 1 <= most <= 2
    finally:
        stop.set()
        for t in threads:
            t.join(10)

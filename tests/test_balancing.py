"""Balancing strategies, without a network."""

from __future__ import annotations

import collections
import dataclasses
import random

import pytest

from pyrorpc.balancing import LeastLoaded, PowerOfTwo, Random, RoundRobin, Strategy, make_strategy


@dataclasses.dataclass
class C:
    name: str
    in_flight: int = 0
    reported_load: int = 0


def test_least_loaded_prefers_fewest_in_flight_then_reported_load():
    s = LeastLoaded(random.Random(1))
    a, b, c = C("a", 2, 0), C("b", 1, 5), C("c", 1, 3)
    assert s.choose([a, b, c]) is c


def test_least_loaded_breaks_full_ties_at_random():
    s = LeastLoaded(random.Random(2))
    cands = [C(n) for n in "abcd"]
    counts = collections.Counter(s.choose(cands).name for _ in range(4000))
    assert set(counts) == set("abcd") and all(800 < v < 1200 for v in counts.values())


def test_least_loaded_spreads_concurrent_calls_evenly():
    s = LeastLoaded(random.Random(3))
    cands = [C(n) for n in "abcd"]
    for _ in range(16):  # 16 calls in flight at once land 4 per worker
        s.choose(cands).in_flight += 1
    assert [c.in_flight for c in cands] == [4, 4, 4, 4]


def test_round_robin_cycles_in_name_order():
    s = RoundRobin()
    cands = [C("b"), C("a"), C("c")]
    assert [s.choose(cands).name for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]


def test_power_of_two_avoids_the_busiest():
    s = PowerOfTwo(random.Random(4))
    busy, idle1, idle2 = C("busy", 10), C("i1"), C("i2")
    picks = collections.Counter(s.choose([busy, idle1, idle2]).name for _ in range(3000))
    assert picks["busy"] == 0 and picks["i1"] > 1000 and picks["i2"] > 1000
    assert s.choose([busy]) is busy


def test_random_is_uniform():
    s = Random(random.Random(5))
    cands = [C(n) for n in "abc"]
    counts = collections.Counter(s.choose(cands).name for _ in range(3000))
    assert all(850 < v < 1150 for v in counts.values())


def test_make_strategy():
    assert isinstance(make_strategy("least-loaded"), LeastLoaded)
    assert isinstance(make_strategy("round-robin"), RoundRobin)
    custom = RoundRobin()
    assert make_strategy(custom) is custom and isinstance(custom, Strategy)
    with pytest.raises(ValueError, match="strategy"):
        make_strategy("fastest")
    with pytest.raises(ValueError):
        make_strategy(42)  # type: ignore[arg-type]

"""Balancing strategies: which live worker gets the next call (pure logic, no network)."""

from __future__ import annotations

import itertools
import random
import threading
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

__all__ = ["LeastLoaded", "PowerOfTwo", "Random", "RoundRobin", "Strategy", "make_strategy", "STRATEGIES"]


class Candidate(Protocol):
    """What a strategy looks at: this client's calls in flight and the worker's reported load."""

    name: str

    @property
    def in_flight(self) -> int: ...

    @property
    def reported_load(self) -> int: ...


@runtime_checkable
class Strategy(Protocol):
    """Chooses one of a non-empty sequence of candidates."""

    def choose(self, candidates: Sequence[Candidate]) -> Candidate: ...


class LeastLoaded:
    """Fewest calls in flight from this client; ties by the worker-reported load, then at random."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def choose(self, candidates: Sequence[Candidate]) -> Candidate:
        if len(candidates) == 1:
            return candidates[0]
        best: list[Candidate] = []
        best_key: tuple[int, int] | None = None
        for c in candidates:
            key = (c.in_flight, c.reported_load)
            if best_key is None or key < best_key:
                best, best_key = [c], key
            elif key == best_key:
                best.append(c)
        return best[0] if len(best) == 1 else self.rng.choice(best)


class PowerOfTwo:
    """Two candidates at random; the one with fewer calls in flight (then lower reported load) wins."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def choose(self, candidates: Sequence[Candidate]) -> Candidate:
        if len(candidates) == 1:
            return candidates[0]
        a, b = self.rng.sample(list(candidates), 2)
        return a if (a.in_flight, a.reported_load) <= (b.in_flight, b.reported_load) else b


class RoundRobin:
    """Each candidate in turn (ordered by name, so membership changes keep the rotation fair)."""

    def __init__(self) -> None:
        self._counter = itertools.count()
        self._lock = threading.Lock()

    def choose(self, candidates: Sequence[Candidate]) -> Candidate:
        with self._lock:
            n = next(self._counter)
        ordered = sorted(candidates, key=lambda c: c.name)
        return ordered[n % len(ordered)]


class Random:
    """Uniformly at random."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()

    def choose(self, candidates: Sequence[Candidate]) -> Candidate:
        return self.rng.choice(list(candidates))


STRATEGIES = {
    "least-loaded": LeastLoaded,
    "power-of-two": PowerOfTwo,
    "round-robin": RoundRobin,
    "random": Random,
}


def make_strategy(strategy: "str | Strategy") -> Strategy:
    """A strategy from its name (``least-loaded``, ``power-of-two``, ``round-robin``, ``random``) or object.

    Raises:
        ValueError: for an unknown name or an object without ``choose``.
    """
    if isinstance(strategy, str):
        try:
            return STRATEGIES[strategy]()  # type: ignore[no-any-return]
        except KeyError:
            raise ValueError(f"`strategy` must be one of {', '.join(STRATEGIES)}, got {strategy!r}") from None
    if isinstance(strategy, Strategy):
        return strategy
    raise ValueError(f"`strategy` must be a name or an object with choose(candidates), got {strategy!r}")

"""Pushed streams on the worker: items are not held back behind a generator that goes quiet, and a
generator that raises or yields what cannot be sent ends its stream with that error after its items."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import Pyro5.errors
import pytest

import pyrorpc

_release = threading.Event()


@pyrorpc.service("quiet")
class Quiet:
    def burst_then_quiet(self, n: int) -> Any:
        yield from range(n)
        _release.wait(30)  # goes quiet with items still in its frame
        yield n

    async def aburst_then_quiet(self, n: int) -> Any:
        for i in range(n):
            yield i
        while not _release.is_set():
            await asyncio.sleep(0.05)
        yield n

    def bad_item(self) -> Any:
        yield 1
        yield threading.Lock()

    def fails(self) -> Any:
        yield 1
        yield 2
        raise ValueError("broken after two")


@pytest.fixture
def uri() -> Any:
    _release.clear()
    host = pyrorpc.WorkerHost(Quiet, register=False).start()
    yield host.uri
    _release.set()
    host.stop()


def test_items_before_a_quiet_spell_arrive_at_once(uri: str) -> None:
    with pyrorpc.connect(uri, timeout=10) as p:
        it = iter(p.burst_then_quiet.stream(3))
        started = time.monotonic()
        assert [next(it) for _ in range(3)] == [0, 1, 2]
        took = time.monotonic() - started
        _release.set()
        assert list(it) == [3]
    assert took < 1.0, f"the first items waited {took:.2f}s for the generator's next one"


def test_async_items_before_a_quiet_spell_arrive_at_once(uri: str) -> None:
    async def main() -> float:
        with pyrorpc.connect(uri, timeout=10) as p:
            agen = p.aburst_then_quiet.astream(3)
            started = time.monotonic()
            got = [await agen.__anext__() for _ in range(3)]
            took = time.monotonic() - started
            _release.set()
            rest = [x async for x in agen]
            assert got + rest == [0, 1, 2, 3]
            return took

    took = asyncio.run(main())
    assert took < 1.0, f"the first items waited {took:.2f}s for the generator's next one"


def test_an_unserializable_item_ends_the_stream_with_a_clear_error(uri: str) -> None:
    got: list[Any] = []
    with pyrorpc.connect(uri, timeout=10) as p:
        with pytest.raises(Pyro5.errors.SerializeError, match="bad_item"):
            for x in p.bad_item.stream():
                got.append(x)
        assert p.burst_then_quiet.stream(0) is not None  # the proxy still works
    assert got == [1]


def test_a_generator_error_comes_after_its_items(uri: str) -> None:
    got: list[Any] = []
    with pyrorpc.connect(uri, timeout=10) as p:
        with pytest.raises(ValueError, match="broken after two"):
            for x in p.fails.stream():
                got.append(x)
    assert got == [1, 2]

"""Generator results served to stock Pyro5 proxies through Pyro5's own item-streaming protocol
(``pyrorpc/streams.py``): ``FLAGS_ITEMSTREAMRESULT`` + stream id, then ``Pyro.Daemon.get_next_stream_item``
per item and ``close_stream`` when the client stops early.

One in-process worker serves every test; each test names its streams with a tag of its own, so what the
generators record (their ``finally`` blocks) cannot mix between tests.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import Pyro5.api
import Pyro5.errors
import pytest
from Pyro5.callcontext import current_context

import pyrorpc
from pyrorpc.testing import wait_for

FINISHED: list[str] = []  # tags of generators whose finally ran, in order


@pyrorpc.service("streams")
class Streamer:
    def gen(self, n: int, tag: str = "") -> Iterator[int]:
        try:
            yield from range(n)
        finally:
            FINISHED.append(tag)

    def endless(self, tag: str) -> Iterator[int]:
        i = 0
        try:
            while True:
                yield i
                i += 1
        finally:
            FINISHED.append(tag)

    def failing(self, n: int, tag: str) -> Iterator[int]:
        try:
            yield from range(n)
            raise ValueError(f"boom after {n}")
        finally:
            FINISHED.append(tag)

    def iterator(self, n: int) -> Iterator[str]:
        return iter([str(i) for i in range(n)])  # a plain iterator, not a generator

    async def agen(self, n: int, tag: str = "") -> AsyncIterator[int]:
        try:
            for i in range(n):
                await asyncio.sleep(0)
                yield i * 10
        finally:
            FINISHED.append(tag)

    def plain(self) -> list[int]:
        return [1, 2, 3]


@pytest.fixture(scope="module")
def host() -> Iterator[pyrorpc.WorkerHost]:
    host = pyrorpc.WorkerHost(Streamer, register=False, threads=8).start()
    try:
        yield host
    finally:
        host.stop()


def _streams(host: pyrorpc.WorkerHost) -> Any:
    assert host.server is not None
    return host.server.stock_streams


def _tag() -> str:
    return uuid.uuid4().hex


def _finished(tag: str) -> bool:
    return tag in FINISHED


def test_ten_thousand_items_in_order(host: pyrorpc.WorkerHost) -> None:
    tag = _tag()
    with Pyro5.api.Proxy(host.uri) as p:
        items = list(p.gen(10_000, tag))
        assert items == list(range(10_000))
        assert p.plain() == [1, 2, 3]  # the connection is in step after the stream
    assert _finished(tag)
    wait_for(lambda: len(_streams(host)) == 0, 2, message="exhausted stream forgotten")


def test_plain_iterator_and_correlation_id(host: pyrorpc.WorkerHost) -> None:
    with Pyro5.api.Proxy(host.uri) as p:
        current_context.correlation_id = uuid.uuid4()  # requests and replies carry FLAGS_CORR_ID
        try:
            assert list(p.iterator(5)) == ["0", "1", "2", "3", "4"]
        finally:
            current_context.correlation_id = None
        assert list(p.iterator(0)) == []


def test_async_generator_method(host: pyrorpc.WorkerHost) -> None:
    tag = _tag()
    with Pyro5.api.Proxy(host.uri) as p:
        assert list(p.agen(50, tag)) == [i * 10 for i in range(50)]
    assert _finished(tag)


def test_early_close_runs_finally(host: pyrorpc.WorkerHost) -> None:
    tag, tag2, tag3 = _tag(), _tag(), _tag()
    with Pyro5.api.Proxy(host.uri) as p:
        it = p.endless(tag)
        assert next(it) == 0
        assert next(it) == 1
        assert not _finished(tag)
        it.close()  # close_stream, oneway
        wait_for(lambda: _finished(tag), 2, message="generator closed by close_stream")
        # dropping the iterator does the same (its __del__ closes the stream)
        it2 = p.endless(tag2)
        next(it2)
        del it2
        wait_for(lambda: _finished(tag2), 2, message="generator closed when its iterator was dropped")
        # an async generator: aclose() on the event loop
        it3 = p.agen(1000, tag3)
        assert next(it3) == 0
        it3.close()
        wait_for(lambda: _finished(tag3), 2, message="async generator closed by close_stream")
        assert p.plain() == [1, 2, 3]


def test_connection_closing_mid_stream_closes_generators(host: pyrorpc.WorkerHost) -> None:
    tag, atag = _tag(), _tag()
    p = Pyro5.api.Proxy(host.uri)
    it = p.endless(tag)
    ait = p.agen(1000, atag)
    assert [next(it), next(it), next(ait)] == [0, 1, 0]
    p._pyroRelease()  # the connection closes under both streams
    wait_for(lambda: _finished(tag) and _finished(atag), 2, message="streams closed with their connection")
    with pytest.raises(Pyro5.errors.ConnectionClosedError):
        next(it)
    del it, ait


def test_other_connection_cannot_use_the_stream(host: pyrorpc.WorkerHost) -> None:
    tag = _tag()
    with Pyro5.api.Proxy(host.uri) as p, Pyro5.api.Proxy(host.uri.replace(host.name, "Pyro.Daemon")) as daemon:
        it = p.gen(5, tag)
        assert next(it) == 0
        with pytest.raises(Pyro5.errors.PyroError, match="item stream belongs to other client"):
            daemon.get_next_stream_item(it.streamId)
        daemon.close_stream(it.streamId)  # another connection cannot close it either
        assert list(it) == [1, 2, 3, 4]  # still the owner's, in step


def test_exception_mid_generator_after_items(host: pyrorpc.WorkerHost) -> None:
    tag = _tag()
    with Pyro5.api.Proxy(host.uri) as p:
        it = p.failing(3, tag)
        got = []
        with pytest.raises(ValueError, match="boom after 3") as info:
            for item in it:
                got.append(item)
        assert got == [0, 1, 2]
        assert "boom after 3" in "".join(Pyro5.errors.get_pyro_traceback(info.type, info.value, info.tb))
        assert _finished(tag)
        # the stream is gone, like with Pyro5
        with Pyro5.api.Proxy(host.uri.replace(host.name, "Pyro.Daemon")) as daemon:
            with pytest.raises(Pyro5.errors.PyroError, match="item stream terminated"):
                daemon.get_next_stream_item(it.streamId)
        assert p.plain() == [1, 2, 3]


def test_unknown_stream_id(host: pyrorpc.WorkerHost) -> None:
    with Pyro5.api.Proxy(host.uri.replace(host.name, "Pyro.Daemon")) as daemon:
        with pytest.raises(Pyro5.errors.PyroError, match="item stream terminated"):
            daemon.get_next_stream_item(str(uuid.uuid4()))
        with pytest.raises(Pyro5.errors.PyroError, match="item stream terminated"):
            daemon.get_next_stream_item(42)
        daemon.close_stream("no-such-stream")  # ignored, like Pyro5


def test_stale_stream_is_swept(host: pyrorpc.WorkerHost) -> None:
    tag = _tag()
    streams = _streams(host)
    with Pyro5.api.Proxy(host.uri) as p:
        it = p.endless(tag)
        assert next(it) == 0
        old, streams.timeout = streams.timeout, 0.3
        try:
            wait_for(lambda: _finished(tag), 3, message="stale stream swept")
        finally:
            streams.timeout = old
        with pytest.raises(Pyro5.errors.PyroError, match="item stream terminated"):
            next(it)
        assert p.plain() == [1, 2, 3]


def test_concurrent_streams(host: pyrorpc.WorkerHost) -> None:
    results: dict[int, list[int]] = {}

    def consume(k: int) -> None:
        with Pyro5.api.Proxy(host.uri) as p:
            results[k] = list(p.gen(300 + k))

    threads = [threading.Thread(target=consume, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == {k: list(range(300 + k)) for k in range(6)}

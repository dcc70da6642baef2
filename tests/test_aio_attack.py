"""Regression tests from an adversarial pass over the asyncio client and streams (aio.py, endpoint.py,
proxy.py, pool.py). Each one failed when written: it pins a bug, not current behaviour."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

import pyrorpc
from pyrorpc.testing import wait_for

LIMIT = 100_000
CLOSED: set[str] = set()


@pyrorpc.service("aioattack")
class AttackService:
    def echo_slow(self, data: bytes, delay: float = 1.0) -> int:
        time.sleep(delay)
        return len(data)

    def echo_stream(self, data: bytes) -> Any:
        yield len(data)

    def forever(self, key: str, delay: float = 0.01) -> Any:
        try:
            i = 0
            while True:
                time.sleep(delay)
                yield i
                i += 1
        finally:
            CLOSED.add(key)

    async def fetch(self, x: Any, delay: float = 0.0) -> Any:
        await asyncio.sleep(delay)
        return x


@pytest.fixture
def host():
    hosts = []

    def make(**options: Any) -> pyrorpc.WorkerHost:
        h = pyrorpc.WorkerHost(AttackService, register=False, threads=4, **options).start()
        hosts.append(h)
        return h

    yield make
    for h in hosts:
        h.stop()


def test_astream_argument_refused_by_worker_is_message_too_large(host):
    """A stream whose argument is over the worker's max_message_size fails with MessageTooLargeError (as
    aio() and the blocking stream() do), not WorkerLostError (which makes a Pool eject a healthy worker)."""
    w = host(max_message_size=LIMIT)
    with pyrorpc.connect(w.uri) as p:
        with pytest.raises(pyrorpc.MessageTooLargeError):
            list(p.echo_stream.stream(b"y" * (LIMIT + 10)))

        async def main() -> None:
            with pytest.raises(pyrorpc.MessageTooLargeError):
                async for _ in p.echo_stream.astream(b"y" * (LIMIT + 10)):
                    pass

        asyncio.run(main())


def test_oversized_astream_argument_does_not_blame_another_call(host):
    """The worker drops the channel over an oversized stream request: an innocent (large but legal) call
    outstanding on the same channel must not be reported as the one too large."""
    w = host(max_message_size=LIMIT)
    with pyrorpc.connect(w.uri) as p:
        async def main() -> tuple[BaseException | int, BaseException | None]:
            call = asyncio.create_task(p.echo_slow.aio(b"x" * 60_000, 1.0))
            await asyncio.sleep(0.2)
            stream_error = None
            try:
                async for _ in p.echo_stream.astream(b"y" * (LIMIT + 10)):
                    pass
            except Exception as exc:
                stream_error = exc
            try:
                outcome: BaseException | int = await call
            except Exception as exc:
                outcome = exc
            return outcome, stream_error

        outcome, stream_error = asyncio.run(main())
        assert not isinstance(outcome, pyrorpc.MessageTooLargeError), outcome
        assert isinstance(stream_error, pyrorpc.MessageTooLargeError), stream_error


def test_proxy_close_ends_outstanding_astream(host):
    """Proxy.close() with an endless astream outstanding: the consumer fails promptly (it used to run on
    forever over a connection close() could never close)."""
    w = host()
    p = pyrorpc.connect(w.uri, timeout=20)
    seen = []

    async def main() -> BaseException | None:
        async def consume() -> None:
            async for x in p.forever.astream("close-a"):
                seen.append(x)

        task = asyncio.create_task(consume())
        while len(seen) < 5:
            await asyncio.sleep(0.01)
        await asyncio.get_running_loop().run_in_executor(None, p.close)
        done, _ = await asyncio.wait([task], timeout=5)
        if not done:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return None
        return task.exception()

    error = asyncio.run(main())
    assert error is not None, "astream still running 5 s after Proxy.close()"
    wait_for(lambda: "close-a" in CLOSED, timeout=5)


def test_proxy_close_ends_outstanding_blocking_stream(host):
    w = host()
    p = pyrorpc.connect(w.uri, timeout=20)
    outcome: list[Any] = []
    started = threading.Event()

    def consume() -> None:
        try:
            for _ in p.forever.stream("close-b"):
                started.set()
            outcome.append("ended")
        except Exception as exc:
            outcome.append(exc)

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    assert started.wait(10)
    p.close()
    t.join(5)
    assert not t.is_alive(), "blocking stream still running 5 s after Proxy.close()"
    wait_for(lambda: "close-b" in CLOSED, timeout=5)


def test_stream_closed_by_worker_for_a_stalled_consumer_says_so(host):
    """The worker closes a stream whose consumer stalls past the timeout; the client should learn that at
    once, not wait another full timeout and report "no item within" (a CallTimeoutError that makes a Pool
    eject the healthy worker)."""
    w = host()
    with pyrorpc.connect(w.uri, timeout=2) as p:
        it = p.forever.stream("stall", 0.0)
        next(it)
        wait_for(lambda: "stall" in CLOSED, timeout=10)
        started = time.monotonic()
        with pytest.raises(Exception) as info:
            for _ in it:
                pass
        assert time.monotonic() - started < 1.0 or not isinstance(info.value, pyrorpc.CallTimeoutError), info.value


def test_many_waiters_for_a_channel_opening_cancel_alone():
    """Thousands of aio() calls waiting for one channel to open: each waits on a future of its own, so the
    opening task carries one callback however many wait (cancelling each used to remove its callback
    from the task's list: quadratic), the cancelled ones end with CancelledError and the rest with the
    opening's error."""
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(100)  # accepts, never answers the handshake: the opening hangs
    port = silent.getsockname()[1]

    async def main() -> None:
        proxy = pyrorpc.connect(f"PYRO:x@127.0.0.1:{port}", timeout=30, connect_timeout=1)
        try:
            calls = [asyncio.ensure_future(proxy.ping.aio()) for _ in range(2000)]
            await asyncio.sleep(0.2)
            endpoint = proxy._endpoint
            (task,) = endpoint._opening.values()
            assert len(task._callbacks) == 1 and len(endpoint._open_waiters[task]) == 2000
            for call in calls[:1000]:
                call.cancel()
            results = await asyncio.gather(*calls, return_exceptions=True)
        finally:
            proxy.close()
        assert all(isinstance(r, asyncio.CancelledError) for r in results[:1000])
        assert all(isinstance(r, pyrorpc.WorkerLostError) for r in results[1000:]), {type(r) for r in results}
        assert not endpoint._open_waiters

    try:
        asyncio.run(main())
    finally:
        silent.close()

"""Client and pool hardening (issue 10, items 1-4): oversized messages, cancelled aio() calls, dropped
pools, and close() while other threads call."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import os
import sys
import threading
import weakref

import pytest

import pyrorpc
from pyrorpc.testing import wait_for

GATE = threading.Event()  # block() waits for it; each test that uses it sets it before leaving
SMALL = 64 * 1024


@pyrorpc.service("hard")
class Hard:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.runs: collections.Counter[str] = collections.Counter()

    def _ran(self, name: str) -> None:
        with self.lock:
            self.runs[name] += 1

    def add(self, a, b):
        return a + b

    def blob(self, n):
        self._ran("blob")
        return "x" * n

    @pyrorpc.idempotent
    def blob_idem(self, n):
        self._ran("blob_idem")
        return "x" * n

    def echo(self, data):
        return len(data)

    @pyrorpc.idempotent
    def echo_idem(self, data):
        return len(data)

    def ran(self, name):
        with self.lock:
            return self.runs[name]

    def block(self, seconds=10.0):
        self._ran("block")
        GATE.wait(seconds)
        return "released"


@pytest.fixture
def gate():
    GATE.clear()
    yield GATE
    GATE.set()


def hosts(stack: contextlib.ExitStack, n: int, **kwargs) -> list[pyrorpc.WorkerHost]:
    return [stack.enter_context(pyrorpc.WorkerHost(Hard, **kwargs)) for _ in range(n)]


# 1. messages over max_message_size ---------------------------------------------------------------------

def test_reply_over_client_limit_fails_that_call_alone(ns_addr):
    with contextlib.ExitStack() as stack:
        hosts(stack, 3, ns=ns_addr)
        pool = stack.enter_context(pyrorpc.Pool("hard", ns=ns_addr, timeout=10, max_message_size=SMALL))
        assert pool.add(1, 2) == 3
        for method in ("blob", "blob_idem"):
            with pytest.raises(pyrorpc.MessageTooLargeError, match="max_message_size"):
                pool.method(method)(4 * SMALL)
            assert pool.add(2, 3) == 5  # the pool stays usable
        # no worker was ejected, and the idempotent call was not retried on the other workers
        assert [w.ejected for w in pool.workers()] == [False, False, False]
        assert sum(pool.ran.broadcast("blob").values()) == 1
        assert sum(pool.ran.broadcast("blob_idem").values()) == 1
        assert pool.blob_idem(100) == "x" * 100

        proxy = stack.enter_context(pyrorpc.connect("hard", ns=ns_addr, max_message_size=SMALL))
        for _ in range(3):
            with pytest.raises(pyrorpc.MessageTooLargeError, match="max_message_size"):
                proxy.blob(4 * SMALL)
            assert proxy.add(1, 1) == 2


def test_argument_over_worker_limit_fails_with_the_workers_refusal(ns_addr):
    with contextlib.ExitStack() as stack:
        hosts(stack, 2, ns=ns_addr, max_message_size=SMALL)
        pool = stack.enter_context(pyrorpc.Pool("hard", ns=ns_addr, timeout=10))
        # small enough to be sent whole before the refusal arrives, and big enough to be cut off by it
        for size in (2 * SMALL, 8 * 1024 * 1024):
            for method in ("echo", "echo_idem"):
                with pytest.raises(pyrorpc.MessageTooLargeError, match="max_message_size"):
                    pool.method(method)("x" * size)
                assert pool.echo("x" * 1000) == 1000
        assert [w.ejected for w in pool.workers()] == [False, False]

        proxy = stack.enter_context(pyrorpc.connect("hard", ns=ns_addr))
        with pytest.raises(pyrorpc.MessageTooLargeError, match="max_message_size"):
            proxy.echo("x" * 2 * SMALL)
        assert proxy.echo("abc") == 3


# 2. cancelled and pending aio() calls -----------------------------------------------------------------

def test_cancelled_aio_call_gives_back_its_slot_at_once(gate):
    with pyrorpc.WorkerHost(Hard, register=False) as host, \
            pyrorpc.connect(host.uri, timeout=20, max_in_flight=1) as proxy:

        async def main():
            try:
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(proxy.block.aio(15), 0.3)
                # the only call slot is free again: this call does not wait for the abandoned one
                assert await asyncio.wait_for(proxy.add.aio(1, 2), 5) == 3
            finally:
                gate.set()  # the abandoned call's reply is written now: it must never be read as another's
            for i in range(20):
                assert await asyncio.wait_for(proxy.add.aio(i, 1), 5) == i + 1

        asyncio.run(main())
        assert proxy.ran("block") == 1
        assert proxy.add(2, 2) == 4


def test_pending_aio_calls_leave_the_default_executor_alone(gate):
    with pyrorpc.WorkerHost(Hard, register=False) as host, \
            pyrorpc.connect(host.uri, timeout=20, max_in_flight=2) as proxy:

        async def main():
            calls = [asyncio.ensure_future(proxy.block.aio(15)) for _ in range(1000)]
            try:
                await asyncio.sleep(0)  # let them all start
                # an unrelated to_thread() runs although 1,000 awaits are pending
                assert await asyncio.wait_for(asyncio.to_thread(lambda: 42), 5) == 42
                assert not any(c.done() for c in calls)
            finally:
                gate.set()
            assert await asyncio.wait_for(asyncio.gather(*calls), 30) == ["released"] * 1000

        asyncio.run(main())


# 3. a Pool dropped without close() --------------------------------------------------------------------

def _client_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(("pool-", "pyrorpc-call"))]


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_dropped_pool_is_collected_with_its_threads_and_connections(ns_addr):
    with pyrorpc.WorkerHost(Hard, ns=ns_addr):
        with pyrorpc.Pool("hard", ns=ns_addr) as warm:  # whatever the first pool creates lazily
            assert warm.add.future(1, 1).result(10) == 2
        wait_for(lambda: not _client_threads(), 10, message="the closed pool's threads gone")
        before = _fds()
        refs = []
        for i in range(20):
            pool = pyrorpc.Pool("hard", ns=ns_addr)
            assert pool.add(i, 1) == i + 1
            assert pool.add.future(i, 2).result(10) == i + 2
            refs.append(weakref.ref(pool))
            del pool

        def freed():
            gc.collect()
            return all(r() is None for r in refs) and not _client_threads() and _fds() <= before + 2

        wait_for(freed, 15, interval=0.1, message="dropped pools collected, threads and connections freed")


# 4. close() while other threads call ------------------------------------------------------------------

def _waiting(thread: threading.Thread) -> bool:
    """True while ``thread`` is blocked in a threading wait (a Condition or Event)."""
    frame = sys._current_frames().get(thread.ident)  # type: ignore[arg-type]
    while frame is not None:
        if frame.f_code.co_name == "wait" and frame.f_code.co_filename == threading.__file__:
            return True
        frame = frame.f_back
    return False


class Callers:
    """Threads that each make one call and keep what it raised."""

    def __init__(self, calls) -> None:
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, args=(c,), daemon=True) for c in calls]
        for t in self.threads:
            t.start()
        wait_for(lambda: all(_waiting(t) for t in self.threads), 5, message="every caller waiting")

    def _run(self, call) -> None:
        try:
            call()
        except BaseException as exc:  # reported through `errors`
            self.errors.append(exc)

    def join(self, timeout: float) -> None:
        """Wait until every caller ended; TimeoutError if one is still waiting after ``timeout`` seconds."""
        wait_for(lambda: not any(t.is_alive() for t in self.threads), timeout, message="callers ended")


def _pool_closed(exc: BaseException) -> bool:
    return isinstance(exc, RuntimeError) and "is closed" in str(exc)


def test_close_fails_callers_waiting_for_a_worker_at_once(ns_addr):
    pool = pyrorpc.Pool("hard", ns=ns_addr, timeout=20)  # no worker: callers wait for one to appear
    callers = Callers([lambda: pool.add(1, 2)] * 3 + [lambda: pool.add.future(1, 2).result(30)] * 3)
    pool.close()
    callers.join(5)  # not after their 20 s timeout
    assert len(callers.errors) == 6 and all(_pool_closed(e) for e in callers.errors), callers.errors
    with pytest.raises(RuntimeError, match="is closed"):
        pool.add(1, 2)


def test_close_fails_callers_waiting_for_a_slot_at_once(ns_addr, gate):
    with pyrorpc.WorkerHost(Hard, ns=ns_addr):
        pool = pyrorpc.Pool("hard", ns=ns_addr, timeout=20, max_in_flight=1)
        busy = pool.block.future(15)  # holds the only call slot (and the in-flight window)
        wait_for(lambda: pool.workers()[0].client_in_flight == 1, 5)
        # three wait for the worker's call slot, three for the in-flight window
        callers = Callers([lambda: pool.add(1, 2)] * 3 + [lambda: pool.add.future(1, 2).result(30)] * 3)
        closer = threading.Thread(target=pool.close, daemon=True)
        try:
            closer.start()
            callers.join(5)
            assert len(callers.errors) == 6 and all(_pool_closed(e) for e in callers.errors), callers.errors
            assert closer.is_alive()  # close() waits for the future in flight...
        finally:
            gate.set()
        assert busy.result(10) == "released"  # ...which finishes normally
        closer.join(10)
        assert not closer.is_alive()


def test_a_call_to_a_hung_worker_takes_its_own_timeout_not_the_connect_timeout():
    """Opening a connection counts against the call's timeout: a worker that accepts and never answers the
    handshake (hung, SIGSTOPped) costs a 0.5 s call 0.5 s, not connect_timeout (10 s here); sync and aio."""
    import socket
    import time

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    uri = f"PYRO:hung@127.0.0.1:{silent.getsockname()[1]}"

    async def aio_call() -> None:
        with pyrorpc.connect(uri, timeout=0.5, connect_timeout=10) as proxy:
            await proxy.ping.aio()

    try:
        for run in (lambda: pyrorpc.connect(uri, timeout=0.5, connect_timeout=10).ping(),
                    lambda: asyncio.run(aio_call())):
            t0 = time.monotonic()
            with pytest.raises(pyrorpc.WorkerLostError):
                run()
            assert time.monotonic() - t0 < 5  # (was 10 s: connect_timeout)
    finally:
        silent.close()

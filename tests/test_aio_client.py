"""The asyncio client and streams (issue 11, client half): ``aio()`` on one multiplexed connection per
worker with no thread per call, cancellation and timeouts that reach the worker, failover like the sync
path; ``stream()``/``astream()`` with credit, early stop, timeouts and lost workers.

In-process workers serve most tests; the acceptance run, the crash tests and the pool tests use real
worker processes (this module is their service: ``test_aio_client:AioService``).
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import Pyro5.api
import Pyro5.errors
import pytest

import pyrorpc
from pyrorpc.testing import wait_for

FINISHED: list[str] = []  # tags of calls and generators whose ``finally`` ran (in-process workers)
STARTED: list[str] = []


def _tag() -> str:
    return uuid.uuid4().hex[:12]


@pyrorpc.service("aiotest")
class AioService:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.peak = 0

    def _enter(self) -> None:
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)

    def _leave(self) -> None:
        with self.lock:
            self.running -= 1

    def add(self, a: Any, b: Any) -> Any:
        return a + b

    def whoami(self) -> int:
        return id(self)

    def take_peak(self) -> int:
        with self.lock:
            peak, self.peak = self.peak, 0
            return peak

    async def snooze(self, seconds: float, tag: str = "") -> str:
        self._enter()
        STARTED.append(tag)
        try:
            await asyncio.sleep(seconds)
            return tag
        finally:
            self._leave()
            FINISHED.append(tag)

    @pyrorpc.idempotent
    async def pid_snooze(self, seconds: float) -> int:
        await asyncio.sleep(seconds)
        return os.getpid()

    async def plain_pid_snooze(self, seconds: float) -> int:
        await asyncio.sleep(seconds)
        return os.getpid()

    def slow(self, seconds: float, tag: str = "") -> str:
        self._enter()
        try:
            time.sleep(seconds)
            return tag
        finally:
            self._leave()

    def fail(self, message: str) -> None:
        raise ValueError(message)

    def big(self, n: int) -> str:
        return "x" * n

    @pyrorpc.oneway
    def note(self, tag: str) -> None:
        FINISHED.append(tag)

    async def context(self) -> list[Any]:
        call = pyrorpc.current_call()
        assert call is not None
        return [call.metadata, call.remaining()]

    def count(self, n: int, tag: str = "") -> Iterator[int]:
        try:
            yield from range(n)
        finally:
            FINISHED.append(tag)

    async def acount(self, n: int, tag: str = "") -> AsyncIterator[int]:
        try:
            for i in range(n):
                if i % 100 == 0:
                    await asyncio.sleep(0)
                yield i
        finally:
            FINISHED.append(tag)

    def fail_after(self, n: int) -> Iterator[int]:
        yield from range(n)
        raise ValueError(f"failed after {n}")

    def stall(self, first: int, seconds: float, tag: str) -> Iterator[int]:
        try:
            yield from range(first)
            time.sleep(seconds)
            yield first
        finally:
            FINISHED.append(tag)

    def ticks(self, seconds: float) -> Iterator[int]:
        i = 0
        while True:
            yield i
            i += 1
            if seconds:
                time.sleep(seconds)

    def pids(self, n: int) -> Iterator[int]:
        for _ in range(n):
            yield os.getpid()

    def stream_context(self) -> Iterator[Any]:
        call = pyrorpc.current_call()
        yield call.metadata if call is not None else None


@pytest.fixture
def host() -> Iterator[pyrorpc.WorkerHost]:
    """An in-process worker (4 call threads), not registered anywhere."""
    h = pyrorpc.WorkerHost(AioService, register=False, threads=4).start()
    try:
        yield h
    finally:
        h.stop()


def _connections_to(port: int) -> int:
    """Established TCP connections of this process to ``port`` on 127.0.0.1 (from /proc)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                    if remote_port == port and fields[3] == "01" and fields[9] in inodes:
                        count += 1
        except FileNotFoundError:
            continue
    return count


def _port(uri: str) -> int:
    return int(uri.rsplit(":", 1)[1])


# the acceptance run --------------------------------------------------------------------------------------

def test_2000_async_calls_at_once_one_worker_few_threads_few_connections(nameserver, worker_factory):
    """An async method awaiting asyncio.sleep(1), called 2,000 times at once through one Pool on one worker
    process with 4 threads: all return within 10 s (one at a time, 2,000 s; four at a time, 500 s: the bound
    leaves room for a loaded machine), the client stays under 30 threads and the worker holds at most 64
    connections from it."""
    ns = nameserver(lease_ttl=10)
    worker = worker_factory("test_aio_client:AioService", ns.ns, args=["--threads", "4"])
    port = _port(worker.uri)
    with pyrorpc.Pool("aiotest", ns=ns.ns, max_in_flight=2000, timeout=30) as pool:
        assert pool.add(1, 2) == 3
        peaks = {"threads": 0, "connections": 0}

        async def sample(stop: asyncio.Event) -> None:
            while not stop.is_set():
                peaks["threads"] = max(peaks["threads"], threading.active_count())
                peaks["connections"] = max(peaks["connections"], _connections_to(port))
                await asyncio.sleep(0.01)

        async def main() -> list[str]:
            stop = asyncio.Event()
            sampler = asyncio.create_task(sample(stop))
            try:
                return await asyncio.wait_for(
                    asyncio.gather(*[pool.snooze.aio(1.0, str(i)) for i in range(2000)]), 10.0)
            finally:
                stop.set()
                await sampler

        results = asyncio.run(main())
    assert results == [str(i) for i in range(2000)]
    assert peaks["threads"] < 30, peaks
    assert 1 <= peaks["connections"] <= 64, peaks


# calls ------------------------------------------------------------------------------------------------

def test_replies_come_back_out_of_order_on_one_connection(host):
    with pyrorpc.connect(host.uri) as p:
        async def main() -> tuple[str, int]:
            slow = asyncio.ensure_future(p.snooze.aio(0.5, "slow"))
            fast = asyncio.ensure_future(p.snooze.aio(0.0, "fast"))
            done, _ = await asyncio.wait({slow, fast}, return_when=asyncio.FIRST_COMPLETED)
            first = done.pop().result()
            await slow
            return first, host.server.connection_count()

        first, connections = asyncio.run(main())
    assert first == "fast"
    assert connections == 1


def test_async_methods_are_not_held_to_the_worker_threads_sync_ones_are(ns_addr):
    with pyrorpc.WorkerHost(AioService, ns=ns_addr, threads=2) as h, \
            pyrorpc.Pool("aiotest", ns=ns_addr, max_in_flight=100) as pool:
        wait_for(lambda: pool.workers(), message="the pool sees the worker")
        assert pool.take_peak() == 0

        async def main() -> int:
            await asyncio.gather(*[pool.snooze.aio(0.3) for _ in range(20)])
            async_peak = pool.take_peak()
            seen = []

            async def watch() -> None:
                while True:
                    seen.append(pool.workers()[0].client_in_flight)
                    await asyncio.sleep(0.005)

            watcher = asyncio.create_task(watch())
            try:
                assert await asyncio.gather(*[pool.slow.aio(0.1, str(i)) for i in range(6)]) == \
                    [str(i) for i in range(6)]
            finally:
                watcher.cancel()
            assert max(seen) == 2, seen  # the worker's 2 threads
            return async_peak

        assert asyncio.run(main()) == 20  # all at once on the worker's event loop
        assert h.server is not None


def test_cancel_frees_the_slot_at_once_and_cancels_the_worker_coroutine(host):
    tag = _tag()
    with pyrorpc.connect(host.uri, max_in_flight=1) as p:
        async def main() -> str:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(p.snooze.aio(30, tag), 0.3)
            # the only slot is free again at once
            return await asyncio.wait_for(p.snooze.aio(0, "next"), 1.0)

        assert asyncio.run(main()) == "next"
    wait_for(lambda: tag in FINISHED, timeout=1.0, message="the worker's coroutine was cancelled")


def test_task_cancel_reaches_the_worker(host):
    tag = _tag()
    with pyrorpc.connect(host.uri) as p:
        async def main() -> None:
            task = asyncio.ensure_future(p.snooze.aio(30, tag))
            while tag not in STARTED:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(main())
    wait_for(lambda: tag in FINISHED, timeout=1.0, message="the worker's coroutine was cancelled")


def test_cancelled_sync_method_frees_its_slot(host):
    with pyrorpc.connect(host.uri, max_in_flight=1) as p:
        async def main() -> int:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(p.slow.aio(2.0), 0.2)
            return await asyncio.wait_for(p.add.aio(2, 3), 1.0)

        assert asyncio.run(main()) == 5


def test_timeout_raises_call_timeout_error_and_cancels_at_the_worker(host):
    tag = _tag()
    with pyrorpc.connect(host.uri) as p:
        async def main() -> float:
            started = time.monotonic()
            with pytest.raises(pyrorpc.CallTimeoutError):
                await asyncio.wait_for(p.snooze.with_timeout(0.5).aio(30, tag), 2.0)
            return time.monotonic() - started

        assert asyncio.run(main()) >= 0.5
    wait_for(lambda: tag in FINISHED, timeout=1.0, message="the worker's coroutine was cancelled")


def test_oneway_remote_errors_and_results(host):
    tag = _tag()
    with pyrorpc.connect(host.uri) as p:
        async def main() -> None:
            assert await p.note.aio(tag) is None
            with pytest.raises(ValueError, match="boom") as info:
                await p.fail.aio("boom")
            assert "ValueError" in "".join(info.value._pyroTraceback)  # type: ignore[attr-defined]
            assert await p.add.aio([1], [2]) == [1, 2]
            assert await p.add.aio(b"a", b"b") == b"ab"

        asyncio.run(main())
    wait_for(lambda: tag in FINISHED, timeout=5.0, message="the oneway call ran")


def test_call_metadata_and_deadline_reach_the_worker(host):
    with pyrorpc.connect(host.uri, timeout=20) as p:
        async def main() -> list[Any]:
            with pyrorpc.call_metadata(request_id="r1"):
                return await p.context.aio()

        metadata, remaining = asyncio.run(main())
        assert metadata == {"request_id": "r1"}
        assert 0 < remaining <= 20
        with pyrorpc.call_metadata(request_id="s1"):
            assert list(p.stream_context.stream()) == [{"request_id": "s1"}]

        async def astream() -> list[Any]:
            with pyrorpc.call_metadata(request_id="a1"):
                return [x async for x in p.stream_context.astream()]

        assert asyncio.run(astream()) == [{"request_id": "a1"}]


def test_message_size_limits(host):
    with pyrorpc.connect(host.uri, max_message_size=10_000) as p:
        async def main() -> None:
            with pytest.raises(pyrorpc.MessageTooLargeError, match="nothing was sent"):
                await p.add.aio("x" * 20_000, "")
            with pytest.raises(pyrorpc.MessageTooLargeError):
                await p.big.aio(20_000)  # the reply: the call ran, its result is dropped
            assert await p.add.aio(1, 2) == 3  # the connection is fine

        asyncio.run(main())


def test_request_over_the_workers_limit():
    with pyrorpc.WorkerHost(AioService, register=False, max_message_size=10_000) as h, \
            pyrorpc.connect(h.uri) as p:
        async def main() -> None:
            with pytest.raises(pyrorpc.MessageTooLargeError):
                await p.add.aio("x" * 20_000, "")
            assert await p.add.aio(1, 2) == 3

        asyncio.run(main())


def test_each_asyncio_run_gets_its_own_connection_and_closes_it(host):
    with pyrorpc.connect(host.uri) as p:
        for i in range(3):
            assert asyncio.run(p.add.aio(i, 1)) == i + 1
        wait_for(lambda: host.server.connection_count() == 0, timeout=5.0,
                 message="the connections of finished event loops closed")


def test_stock_pyro5_daemon_gets_aio_calls_from_a_thread_and_no_streams():
    @Pyro5.api.expose
    class Stock:
        def add(self, a: int, b: int) -> int:
            return a + b

        def gen(self) -> Iterator[int]:
            yield 1

    daemon = Pyro5.api.Daemon(host="127.0.0.1")
    uri = str(daemon.register(Stock()))
    thread = threading.Thread(target=daemon.requestLoop, daemon=True)
    thread.start()
    try:
        with pyrorpc.connect(uri) as p:
            assert asyncio.run(p.add.aio(1, 2)) == 3
            assert asyncio.run(p.add.aio(3, 4)) == 7
            with pytest.raises(Pyro5.errors.ProtocolError, match="does not stream"):
                list(p.gen.stream())
    finally:
        daemon.shutdown()
        thread.join(5)


def test_lost_worker_fails_outstanding_calls(worker_factory, nameserver):
    ns = nameserver(lease_ttl=10)
    worker = worker_factory("test_aio_client:AioService", ns.ns)
    with pyrorpc.connect(worker.uri) as p:
        async def main() -> list[Any]:
            assert await p.add.aio(1, 1) == 2
            calls = [asyncio.ensure_future(p.plain_pid_snooze.aio(30)) for _ in range(10)]
            await asyncio.sleep(0.2)
            worker.kill()
            return await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 2.0)

        outcomes = asyncio.run(main())
        assert all(isinstance(o, pyrorpc.WorkerLostError) for o in outcomes), outcomes
        with pytest.raises(pyrorpc.WorkerLostError, match="cannot reach"):
            asyncio.run(p.add.aio(1, 1))  # nothing listens there: not sent


def test_proxy_bound_to_a_service_moves_when_its_worker_is_gone(nameserver, worker_factory):
    ns = nameserver(lease_ttl=10)
    workers = {w.worker_pid: w for w in (worker_factory("test_aio_client:AioService", ns.ns),
                                          worker_factory("test_aio_client:AioService", ns.ns))}
    with pyrorpc.connect("aiotest", ns=ns.ns) as p:
        first = asyncio.run(p.plain_pid_snooze.aio(0))
        workers.pop(first).kill()
        (other,) = workers
        assert asyncio.run(p.plain_pid_snooze.aio(0)) == other  # not sent to the dead one: moved
        assert list(p.pids.stream(2)) == [other, other]


# pools ------------------------------------------------------------------------------------------------

def test_pool_aio_fails_over_when_a_worker_is_killed(nameserver, worker_factory):
    ns = nameserver(lease_ttl=10)
    a = worker_factory("test_aio_client:AioService", ns.ns)
    b = worker_factory("test_aio_client:AioService", ns.ns)
    with pyrorpc.Pool("aiotest", ns=ns.ns, max_in_flight=500) as pool:
        wait_for(lambda: len(pool.workers()) == 2, message="the pool sees both workers")

        async def main() -> tuple[list[Any], list[Any], list[Any]]:
            idem = [asyncio.ensure_future(pool.pid_snooze.aio(0.5)) for _ in range(100)]
            plain = [asyncio.ensure_future(pool.plain_pid_snooze.aio(0.5)) for _ in range(100)]
            await asyncio.sleep(0.2)
            a.kill()
            idem_out = await asyncio.gather(*idem, return_exceptions=True)
            plain_out = await asyncio.gather(*plain, return_exceptions=True)
            # channels to the dead worker are gone: later calls are not sent there, whatever the method
            after = await asyncio.gather(*[pool.plain_pid_snooze.aio(0) for _ in range(50)], return_exceptions=True)
            return idem_out, plain_out, after

        idem_out, plain_out, after = asyncio.run(main())
    assert idem_out.count(b.worker_pid) == 100, idem_out  # idempotent: retried on the other worker
    lost = [o for o in plain_out if isinstance(o, pyrorpc.WorkerLostError)]
    assert lost and len(lost) + plain_out.count(b.worker_pid) == 100, plain_out  # none silently dropped
    assert after == [b.worker_pid] * 50


def test_pool_aio_goes_elsewhere_when_a_worker_drains(ns_addr):
    with pyrorpc.WorkerHost(AioService, ns=ns_addr) as a, pyrorpc.WorkerHost(AioService, ns=ns_addr) as b, \
            pyrorpc.Pool("aiotest", ns=ns_addr, max_in_flight=200) as pool:
        wait_for(lambda: len(pool.workers()) == 2, message="the pool sees both workers")
        ids = {pool.method("whoami")() for _ in range(50)}
        assert len(ids) == 2

        async def main() -> tuple[list[Any], set[int]]:
            calls = [asyncio.ensure_future(pool.snooze.aio(0.3, str(i))) for i in range(100)]
            await asyncio.sleep(0.1)
            stopper = threading.Thread(target=a.stop)
            stopper.start()
            more = [asyncio.ensure_future(pool.snooze.aio(0.05, str(i))) for i in range(100, 200)]
            results = await asyncio.gather(*calls, *more)
            await asyncio.get_running_loop().run_in_executor(None, stopper.join)
            return results, set(await asyncio.gather(*[pool.whoami.aio() for _ in range(20)]))

        results, later = asyncio.run(main())
        assert results == [str(i) for i in range(200)]
        assert len(later) == 1 and later < ids
        assert b.server is not None


def test_pool_streams_start_on_a_live_worker(nameserver, worker_factory):
    ns = nameserver(lease_ttl=10)
    a = worker_factory("test_aio_client:AioService", ns.ns)
    b = worker_factory("test_aio_client:AioService", ns.ns)
    with pyrorpc.Pool("aiotest", ns=ns.ns) as pool:
        wait_for(lambda: len(pool.workers()) == 2, message="the pool sees both workers")
        seen = {tuple(pool.pids.stream(3)) for _ in range(20)}
        assert seen == {(a.worker_pid,) * 3, (b.worker_pid,) * 3}  # each stream on one worker, both used
        a.kill()  # still registered (its lease has not run out): streams cannot start there
        for _ in range(10):
            assert list(pool.pids.stream(3)) == [b.worker_pid] * 3

        async def main() -> list[list[int]]:
            out = []
            for _ in range(10):
                out.append([x async for x in pool.pids.astream(3)])
            return out

        assert asyncio.run(main()) == [[b.worker_pid] * 3] * 10


# streams ------------------------------------------------------------------------------------------------

def test_stream_of_a_million_items_in_order(host):
    with pyrorpc.connect(host.uri) as p:
        expected = 0
        for item in p.count.stream(1_000_000):
            assert item == expected
            expected += 1
        assert expected == 1_000_000


@pytest.mark.parametrize("stop", ["close", "drop"])
def test_stream_stopped_early_closes_the_generator_on_the_worker(host, stop):
    tag = _tag()
    with pyrorpc.connect(host.uri) as p:
        items = p.count.stream(10**9, tag)
        got = [next(items) for _ in range(10)]
        assert got == list(range(10))
        if stop == "close":
            items.close()  # type: ignore[attr-defined]
        else:
            del items  # garbage: closed by its finalizer
        wait_for(lambda: tag in FINISHED, timeout=1.0, message="the worker's generator was closed")


def test_stream_break_in_for_loop(host):
    tag = _tag()
    with pyrorpc.connect(host.uri) as p:
        for i in p.count.stream(10**9, tag):
            if i == 9:
                break
        wait_for(lambda: tag in FINISHED, timeout=1.0, message="the worker's generator was closed")


def test_stream_error_after_items(host):
    with pyrorpc.connect(host.uri) as p:
        got = []
        with pytest.raises(ValueError, match="failed after 5"):
            for item in p.fail_after.stream(5):
                got.append(item)
        assert got == [0, 1, 2, 3, 4]


def test_stream_waiting_longer_than_the_timeout(host):
    tag = _tag()
    with pyrorpc.connect(host.uri) as p:
        got = []
        started = time.monotonic()
        with pytest.raises(pyrorpc.CallTimeoutError):
            for item in p.stall.with_timeout(0.5).stream(0, 2, tag):
                got.append(item)
        assert got == []
        assert time.monotonic() - started >= 0.5
        # (the generator is stuck in a sync sleep: it is closed as soon as it yields)
        wait_for(lambda: tag in FINISHED, timeout=5.0, message="the worker's generator was closed")


def test_stream_of_a_worker_killed_midway(nameserver, worker_factory):
    ns = nameserver(lease_ttl=10)
    worker = worker_factory("test_aio_client:AioService", ns.ns)
    with pyrorpc.connect(worker.uri) as p:
        got: list[int] = []
        with pytest.raises(pyrorpc.WorkerLostError):
            for item in p.ticks.stream(0.0005):
                got.append(item)
                if len(got) == 100:
                    worker.kill()
        assert len(got) >= 100
        assert got == list(range(len(got)))  # every item received came out, in order, before the error


def test_astream_in_order_and_stopped_early(host):
    tag = _tag()
    with pyrorpc.connect(host.uri) as p:
        async def main() -> tuple[list[int], list[int]]:
            whole = [x async for x in p.acount.astream(5000)]
            sync_gen = [x async for x in p.count.astream(3000)]
            got = []
            async for x in p.acount.astream(10**9, tag):
                got.append(x)
                if len(got) == 10:
                    break
            assert got == list(range(10))
            return whole, sync_gen

        whole, sync_gen = asyncio.run(main())
        assert whole == list(range(5000))
        assert sync_gen == list(range(3000))
    wait_for(lambda: tag in FINISHED, timeout=1.0, message="the worker's generator was closed")


def test_astream_errors(host):
    with pyrorpc.connect(host.uri) as p:
        async def main() -> list[int]:
            got = []
            with pytest.raises(ValueError, match="failed after 3"):
                async for x in p.fail_after.astream(3):
                    got.append(x)
            with pytest.raises(pyrorpc.CallTimeoutError):
                async for x in p.stall.with_timeout(0.3).astream(0, 2, _tag()):
                    got.append(x)
            with pytest.raises((TypeError, Pyro5.errors.ProtocolError), match="stream"):
                await p.count.aio(3)  # a generator result to a plain call: use stream()
            return got

        assert asyncio.run(main()) == [0, 1, 2]


def test_no_connection_is_left_after_close(host):
    p = pyrorpc.connect(host.uri)

    async def main() -> None:
        assert await p.add.aio(1, 2) == 3
        p.close()
        await asyncio.sleep(0)

    asyncio.run(main())
    wait_for(lambda: host.server.connection_count() == 0, timeout=5.0, message="connections closed")
    with socket.create_connection(("127.0.0.1", _port(host.uri))):
        pass  # the worker still accepts


# security -------------------------------------------------------------------------------------------------

SECRET = "aio-secret-for-tests"


def test_secret_handshake_on_multiplexed_and_stream_connections():
    with pyrorpc.WorkerHost(AioService, register=False, secret=SECRET) as h:
        with pyrorpc.connect(h.uri, secret=SECRET) as p:
            assert asyncio.run(p.add.aio(1, 2)) == 3
            assert list(p.count.stream(3)) == [0, 1, 2]
        with pyrorpc.connect(h.uri, secret="wrong") as p:
            with pytest.raises(pyrorpc.AuthenticationError):
                asyncio.run(p.add.aio(1, 2))
            with pytest.raises(pyrorpc.AuthenticationError):
                list(p.count.stream(3))
        with pyrorpc.connect(h.uri) as p:  # no secret at all
            with pytest.raises(pyrorpc.AuthenticationError):
                asyncio.run(p.add.aio(1, 2))


@pytest.fixture
def pki(tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    server.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    (tmp_path / "cert.pem").write_bytes(b"".join(b.bytes() for b in server.cert_chain_pems))
    return {"ca": str(tmp_path / "ca.pem"), "cert": str(tmp_path / "cert.pem"), "key": str(tmp_path / "key.pem")}


def test_tls_on_multiplexed_and_stream_connections(pki):
    with pyrorpc.WorkerHost(AioService, register=False, tls_cert=pki["cert"], tls_key=pki["key"]) as h:
        with pyrorpc.connect(h.uri, tls_ca=pki["ca"]) as p:
            async def main() -> tuple[list[Any], list[int]]:
                calls = await asyncio.gather(*[p.snooze.aio(0.05, str(i)) for i in range(50)])
                items = [x async for x in p.count.astream(5000)]
                return calls, items

            calls, items = asyncio.run(main())
            assert calls == [str(i) for i in range(50)]
            assert items == list(range(5000))
            assert list(p.count.stream(5000)) == list(range(5000))
        with pyrorpc.connect(h.uri, connect_timeout=2) as p:  # no TLS settings: told what is missing
            with pytest.raises(pyrorpc.WorkerLostError, match="needs TLS"):
                asyncio.run(p.add.aio(1, 2))

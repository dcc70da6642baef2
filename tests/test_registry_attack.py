"""Regression tests from an adversarial pass over the name server's watches (issue 12): each failed before
its fix."""

from __future__ import annotations

import asyncio
import threading
import time

import Pyro5.api

import pyrorpc
from nameserver import NameServerDaemon
from nameserver.registry import NameServer
from pyrorpc.testing import wait_for


def test_a_stock_proxys_watch_answers_at_once_and_holds_no_thread(ns_addr):
    """On a plain connection a call thread waits for an async method: a watch from a stock Pyro5 proxy
    answers at once (its caller polls) instead of holding one of the name server's threads for 30 s, so
    64 of them cannot starve lease renewals."""
    uri = f"PYRO:Pyro.NameServer@{ns_addr}"
    with Pyro5.api.Proxy(uri) as proxy:
        version = proxy.watch_service("calc", None, 0)["version"]
        t0 = time.monotonic()
        reply = proxy.watch_service("calc", version, 30)
        assert time.monotonic() - t0 < 5 and reply["version"] == version and reply["workers"] == []


def test_watches_end_at_once_when_the_name_server_stops():
    """A stopping name server answers the watches under way (their pools move to another name server at
    once) instead of holding its drain for them."""
    daemon = NameServerDaemon("127.0.0.1", 0, lease_ttl=3.0).start()
    address = f"{daemon.address[0]}:{daemon.address[1]}"
    client = pyrorpc.NameServerClient(pyrorpc.Settings(ns=address))
    version, _workers = client.watch_service("calc", None, 0)
    answers: list[float] = []

    def watch() -> None:
        try:
            client.watch_service("calc", version, 30)
        except pyrorpc.NameServerUnavailableError:
            pass
        answers.append(time.monotonic())

    watchers = [threading.Thread(target=watch) for _ in range(3)]
    for t in watchers:
        t.start()
    wait_for(lambda: sum(len(w) for w in daemon.nameserver._watchers.values()) == 3, 10,
             message="three watches waiting")
    t0 = time.monotonic()
    daemon.close()
    for t in watchers:
        t.join(10)
    client.close()
    assert len(answers) == 3 and max(answers) - t0 < 1.5
    assert time.monotonic() - t0 < 1.5  # (was the whole 2 s drain)


def test_many_watches_end_in_linear_time_and_versions_are_forgotten():
    """Watches that end remove themselves in O(1) (a list's remove made 10,000 of them quadratic), one
    change wakes them with one shared reply, and a service whose last worker left keeps no version."""
    ns = NameServer()

    async def main() -> None:
        version = ns.membership_version("svc")
        watches = [asyncio.ensure_future(ns.watch_service("svc", version, 0.2 + i * 1e-5)) for i in range(10000)]
        await asyncio.sleep(0)
        assert sum(len(w) for w in ns._watchers.values()) == 10000
        for task in reversed(watches):  # newest first: the worst order for a list
            task.cancel()
        await asyncio.gather(*watches, return_exceptions=True)
        assert not ns._watchers
        waiting = [asyncio.ensure_future(ns.watch_service("svc", version, 5)) for _ in range(100)]
        await asyncio.sleep(0)
        ns.lease("svc.w1", "PYRO:x@127.0.0.1:1", ["pyrorpc.service:svc"], None, 60)
        replies = await asyncio.gather(*waiting)
        assert {len(r["workers"]) for r in replies} == {1}
        assert len({id(r["workers"]) for r in replies}) == 1  # built once, shared

    t0 = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - t0 < 10
    ns.remove("svc.w1")
    assert "svc" not in ns._versions


def test_a_name_server_that_refuses_our_secret_is_passed_over():
    """With --ns A,B where A belongs to another cluster (another secret), the client goes on to B, which
    takes its secret; only when every one refuses is it an AuthenticationError."""
    a = NameServerDaemon("127.0.0.1", 0, settings=pyrorpc.Settings(secret="AAA")).start()
    b = NameServerDaemon("127.0.0.1", 0, settings=pyrorpc.Settings(secret="BBB")).start()
    try:
        both = f"127.0.0.1:{a.address[1]},127.0.0.1:{b.address[1]}"
        with pyrorpc.NameServerClient(pyrorpc.Settings(ns=both, secret="BBB")) as client:
            client.ping()
            assert client.address.port == b.address[1]
        with pyrorpc.NameServerClient(pyrorpc.Settings(ns=both, secret="CCC")) as client:
            try:
                client.ping()
            except pyrorpc.AuthenticationError:
                pass
            else:
                raise AssertionError("nobody takes secret CCC")
    finally:
        a.close()
        b.close()


def test_a_hung_name_server_costs_a_lease_its_own_timeout(ns_addr):
    """A name server that accepts and never answers (hung) costs a lease renewal the timeout it was given
    (a worker gives a third of its TTL), once: then the next name server in the list is asked."""
    import socket

    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)
    try:
        both = f"127.0.0.1:{hung.getsockname()[1]},{ns_addr}"
        with pyrorpc.NameServerClient(pyrorpc.Settings(ns=both, connect_timeout=10)) as client:
            t0 = time.monotonic()
            ttl = client.lease("calc.x.1.a", "PYRO:x@127.0.0.1:1", ["pyrorpc.service:calc"], {}, 3.0, timeout=0.5)
            assert ttl == 3.0 and time.monotonic() - t0 < 3
    finally:
        hung.close()

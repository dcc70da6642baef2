"""Locks in the name server: one holder at a time, renewal, release, expiry."""

from __future__ import annotations

import pytest

import pyrorpc
from nameserver import NameServer
from pyrorpc.testing import wait_for


def test_lock_offline():
    ns = NameServer()
    assert ns.acquire_lock("cron.newsletter", "a", 0.3)
    assert not ns.acquire_lock("cron.newsletter", "b", 0.3)
    assert ns.acquire_lock("cron.newsletter", "a", 0.3)  # renewal by the holder
    assert not ns.release_lock("cron.newsletter", "b")
    assert ns.release_lock("cron.newsletter", "a")
    assert ns.acquire_lock("cron.newsletter", "b", 0.3)
    assert ns.expire() == [] and not ns.acquire_lock("cron.newsletter", "a", 0.3)  # b holds it
    wait_for(lambda: "cron.newsletter" in ns.expire(), 2, message="b's lock lapsed")
    assert "cron.newsletter" not in ns.list()
    assert ns.acquire_lock("cron.newsletter", "a", 0.3)  # free again
    ns.register("plain", "PYRO:x@localhost:1")
    with pytest.raises(ValueError):
        ns.acquire_lock("plain", "a", 1)
    with pytest.raises(TypeError):
        ns.acquire_lock("x", "", 1)


def test_lock_over_the_network(ns_addr):
    a = pyrorpc.NameServerClient(pyrorpc.Settings(ns=ns_addr))
    b = pyrorpc.NameServerClient(pyrorpc.Settings(ns=ns_addr))
    assert a.acquire_lock("job", "owner-a", 0.5)
    assert not b.acquire_lock("job", "owner-b", 0.5)
    wait_for(lambda: b.acquire_lock("job", "owner-b", 0.5), 3, message="lock expiry")
    assert not a.acquire_lock("job", "owner-a", 0.5)

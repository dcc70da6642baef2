"""Client, pool and error-path hardening found by trying pyrorpc as a new user and as an adversary would."""

from __future__ import annotations

import pytest

import pyrorpc


class Weird(Exception):
    """Defined in a module the caller has imported, but raised under a name it has not (see below)."""


class Unencodable:
    def __getstate__(self):
        raise TypeError("not for the wire")


@pyrorpc.service("reports.daily")
class Reports:
    def count(self) -> int:
        return 7


@pyrorpc.service("oddities")
class Oddities:
    def raise_unknown(self) -> None:
        cls = type("Unimportable", (Exception,), {"__module__": "nowhere.at_all"})
        raise cls("weird", 1)

    def raise_unencodable(self) -> None:
        raise ValueError("bad value", Unencodable())


def test_dotted_service_name_is_kept_whole(ns_addr):
    with pyrorpc.WorkerHost(Reports, ns=ns_addr) as host, pyrorpc.Pool("reports.daily", ns=ns_addr) as pool:
        assert pool.count() == 7
        [info] = pool.workers()
        assert info.service == "reports.daily" and info.name == host.name
        [listed] = pyrorpc.NameServerClient(pyrorpc.Settings(ns=ns_addr)).service_workers("reports.daily")
        assert listed.service == "reports.daily"


def test_remote_exception_of_an_unknown_class_names_its_type(ns_addr):
    with pyrorpc.WorkerHost(Oddities, register=False) as host, pyrorpc.connect(host.uri) as proxy:
        with pytest.raises(pyrorpc.RemoteError) as info:
            proxy.raise_unknown()
        assert info.value.remote_type == "nowhere.at_all.Unimportable"
        assert str(info.value) == "nowhere.at_all.Unimportable: weird, 1"


def test_remote_exception_that_cannot_be_encoded_arrives_as_remote_error(ns_addr):
    with pyrorpc.WorkerHost(Oddities, register=False) as host, pyrorpc.connect(host.uri) as proxy:
        with pytest.raises(pyrorpc.RemoteError) as info:
            proxy.raise_unencodable()
        assert info.value.remote_type == "builtins.ValueError"
        assert "bad value" in str(info.value) and str(info.value).startswith("builtins.ValueError: ")
        assert proxy.method("raise_unknown") is not None  # the connection is still usable:
        with pytest.raises(pyrorpc.RemoteError):
            proxy.raise_unknown()


@pyrorpc.service("nested")
class Nested:
    def __init__(self) -> None:
        self.runs = 0

    @pyrorpc.idempotent
    def lost_inside(self) -> None:
        self.runs += 1
        raise pyrorpc.WorkerLostError("a service this method called was lost")

    def timed_out_inside(self) -> None:
        raise pyrorpc.CallTimeoutError("a service this method called timed out")

    def runs_here(self) -> int:
        return self.runs


def test_a_methods_own_lost_or_timeout_error_is_not_the_workers_fault(ns_addr):
    """A method that calls another service can raise WorkerLostError or CallTimeoutError itself: that is
    the call's result, not a lost or hung worker, so no ejection and no retry elsewhere."""
    with pyrorpc.WorkerHost(Nested, ns=ns_addr) as a, pyrorpc.WorkerHost(Nested, ns=ns_addr) as b, \
            pyrorpc.Pool("nested", ns=ns_addr, timeout=10) as pool:
        with pytest.raises(pyrorpc.WorkerLostError, match="called was lost"):
            pool.lost_inside()
        runs = pool.method("runs_here").broadcast()
        assert set(runs) == {a.name, b.name} and sorted(runs.values()) == [0, 1]  # ran once, not retried
        with pytest.raises(pyrorpc.CallTimeoutError, match="called timed out"):
            pool.timed_out_inside()
        assert not any(w.ejected for w in pool.workers())

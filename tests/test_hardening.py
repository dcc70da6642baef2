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

"""Settings: defaults, PYRORPC_* variables, keyword overrides, validation naming the bad parameter."""

from __future__ import annotations

import Pyro5
import pytest

import pyrorpc
from pyrorpc import Address, Settings
from pyrorpc.config import resolve


def test_defaults():
    s = Settings()
    assert s.ns == Address("127.0.0.1", 9090) and s.timeout == 30.0 and s.lease_ttl is None


def test_from_env_and_overrides():
    env = {"PYRORPC_NS": "10.1.2.3:7777", "PYRORPC_TIMEOUT": "2.5", "PYRORPC_THREADS": "8",
           "PYRORPC_SECRET": "s3"}
    s = Settings.from_env(env)
    assert s.ns == Address("10.1.2.3", 7777) and s.timeout == 2.5 and s.threads == 8 and s.secret == "s3"
    s2 = Settings.from_env(env, timeout=9, ns="127.0.0.1:1")
    assert s2.timeout == 9.0 and s2.ns.port == 1 and s2.threads == 8


def test_env_is_read_by_resolve(monkeypatch):
    monkeypatch.setenv("PYRORPC_NS", "127.0.0.1:4242")
    assert resolve(None).ns.port == 4242
    assert resolve(None, ns="127.0.0.1:5").ns.port == 5


@pytest.mark.parametrize("text", ["nonsense", "host:", ":80", "host:99999", "host:abc", "a b:1", "[::1]"])
def test_bad_addresses(text):
    with pytest.raises(ValueError):
        Address.parse(text)


def test_ipv6_address():
    assert Address.parse("[::1]:9090") == Address("::1", 9090)
    assert str(Address("::1", 9090)) == "[::1]:9090"


@pytest.mark.parametrize("field,value", [("timeout", 0), ("timeout", -1), ("threads", 0), ("max_in_flight", 1.5),
                                         ("refresh", "x"), ("drain_timeout", -1), ("secret", "")])
def test_validation_names_the_parameter(field, value):
    with pytest.raises(ValueError, match=field):
        Settings(**{field: value})


def test_bad_env_names_the_variable():
    with pytest.raises(ValueError, match="PYRORPC_TIMEOUT"):
        Settings.from_env({"PYRORPC_TIMEOUT": "soon"})
    with pytest.raises(ValueError, match="PYRORPC_NS"):
        Settings.from_env({"PYRORPC_NS": "nope"})


def test_unknown_override():
    with pytest.raises(TypeError, match="bogus"):
        Settings().replace(bogus=1)


def test_library_never_touches_global_pyro_config(ns_addr):
    from services import Calculator

    import pyrorpc
    before = {k: getattr(Pyro5.config, k) for k in Pyro5.config.__slots__}
    with pyrorpc.WorkerHost(Calculator, ns=ns_addr, threads=5):
        with pyrorpc.Pool("calc", ns=ns_addr, timeout=3) as pool:
            assert pool.add(1, 2) == 3
        with pyrorpc.connect("calc", ns=ns_addr, timeout=4) as p:
            assert p.add(1, 2) == 3
    after = {k: getattr(Pyro5.config, k) for k in Pyro5.config.__slots__}
    assert before == after


def test_secret_never_shows_in_repr():
    settings = pyrorpc.Settings(secret="s3cr3t-value")
    assert "s3cr3t-value" not in repr(settings) and settings.secret == "s3cr3t-value"


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 1e19, 1e-7, 0.0, -1.0])
def test_every_timeout_is_a_real_timeout_or_refused(value):
    """Below a millisecond a kernel timeout rounds to 0 (= forever); inf or 1e19 overflow: refused up front."""
    for name in ("timeout", "connect_timeout", "refresh", "idle_timeout"):
        with pytest.raises(ValueError, match=name):
            pyrorpc.Settings(**{name: value})
    if value != value or value < 0 or value > 1e9:  # nan, negative, absurd: a drain must end
        with pytest.raises(ValueError, match="drain_timeout"):
            pyrorpc.Settings(drain_timeout=value)


def test_with_timeout_refuses_what_cannot_be_a_timeout():
    from pyrorpc.proxy import RemoteMethod
    method = RemoteMethod(None, "m")  # type: ignore[arg-type]
    for bad in (float("inf"), 1e19, 1e-9, 0, -1, True):
        with pytest.raises(pyrorpc.ConfigurationError, match="seconds"):
            method.with_timeout(bad)
    assert method.with_timeout(0.5)._timeout == 0.5

"""The name server: stock Pyro5 behaviour kept, the service index, leases, SQLite, the daemon, interop."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import Pyro5.api
import Pyro5.core
import Pyro5.errors
import Pyro5.nameserver
import pytest

from nameserver import SERVICE_TAG, NameServer
from pyrorpc.testing import NameServerProcess, wait_for

U1 = "PYRO:obj_1@localhost:5001"
U2 = "PYRO:obj_2@localhost:5002"
U3 = "PYRO:obj_3@localhost:5003"


def svc(name: str) -> str:
    return SERVICE_TAG + name


# -- helpers ---------------------------------------------------------------------------------------


def norm(value: Any) -> Any:
    """Results of our and the stock server in one comparable shape (URI -> str, any set -> frozenset)."""
    if isinstance(value, Pyro5.core.URI):
        return str(value)
    if isinstance(value, dict):
        return {k: norm(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return tuple(norm(v) for v in value)
    if isinstance(value, (set, frozenset)):
        return frozenset(value)
    return value


def outcome(call: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return "ok", norm(call())
    except Exception as exc:  # the exception type is part of the behaviour we compare
        return "raised", type(exc)


def same(ours: Any, stock: Any, op: Callable[[Any], Any]) -> tuple[str, Any]:
    """Run ``op`` on both servers; the result (or exception type) must be identical."""
    mine, theirs = outcome(lambda: op(ours)), outcome(lambda: op(stock))
    assert mine == theirs
    return mine


def make_storage(kind: str, path: Any) -> Any:
    if kind == "memory":
        return Pyro5.nameserver.MemoryStorage()
    return Pyro5.nameserver.SqlStorage(str(path))


@pytest.fixture(params=["memory", "sqlite"])
def pair(request: pytest.FixtureRequest, tmp_path: Any) -> tuple[NameServer, Any]:
    """(ours, stock) name servers over fresh storages of the same kind."""
    ours = NameServer(make_storage(request.param, tmp_path / "ours.sqlite"))
    stock = Pyro5.nameserver.NameServer(make_storage(request.param, tmp_path / "stock.sqlite"))
    return ours, stock


def expected_index(ns: Any) -> dict[str, dict[str, tuple[str, frozenset[str]]]]:
    """The service index recomputed from scratch from what the storage holds."""
    index: dict[str, dict[str, tuple[str, frozenset[str]]]] = {}
    for name, (uri, meta) in ns.storage.everything(return_metadata=True).items():
        for tag in meta or ():
            if isinstance(tag, str) and tag.startswith(SERVICE_TAG):
                index.setdefault(tag[len(SERVICE_TAG):], {})[name] = (str(uri), frozenset(meta))
    return index


def assert_index_exact(ours: NameServer, stock: Any, also: tuple[str, ...] = ()) -> None:
    """The index equals a recomputation; every service answers exactly like the stock server's scan."""
    expected = expected_index(ours)
    actual = {s: {n: (str(u), frozenset(m)) for n, (u, m) in members.items()}
              for s, members in ours.storage.by_service.items()}
    assert actual == expected
    assert ours.services() == {s: len(members) for s, members in expected.items()}
    for service in sorted(set(expected) | set(also)):
        for return_metadata in (True, False):
            mine = norm(ours.yplookup(meta_all={svc(service)}, return_metadata=return_metadata))
            theirs = norm(stock.yplookup(meta_all={svc(service)}, return_metadata=return_metadata))
            assert mine == theirs, service
        assert {w["name"] for w in ours.service_workers(service)} == set(expected.get(service, {}))
    assert same(ours, stock, lambda ns: ns.list(return_metadata=True))[0] == "ok"
    assert same(ours, stock, lambda ns: ns.count())[0] == "ok"


class CountingStorage(Pyro5.nameserver.MemoryStorage):
    """MemoryStorage that counts writes and full scans (to prove renewals and index lookups avoid them)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.scans = 0

    def __setitem__(self, key: str, value: Any) -> None:
        self.writes += 1
        super().__setitem__(key, value)

    def __iter__(self) -> Any:
        self.scans += 1
        return super().__iter__()

    def everything(self, return_metadata: bool = False) -> Any:
        self.scans += 1
        return super().everything(return_metadata)

    def optimized_metadata_search(self, metadata_all: Any = None, metadata_any: Any = None,
                                  return_metadata: bool = False) -> Any:
        self.scans += 1
        return super().optimized_metadata_search(metadata_all, metadata_any, return_metadata)


# -- 1. offline: stock behaviour and the service index ---------------------------------------------


def test_is_a_drop_in_subclass() -> None:
    assert issubclass(NameServer, Pyro5.nameserver.NameServer)
    ns = NameServer()  # same constructor, default storage
    ns.register("a", U1)
    assert ns.count() == 1
    ns = NameServer(storageProvider=Pyro5.nameserver.MemoryStorage())
    assert ns.count() == 0


def test_inherited_methods_answer_like_stock(pair: tuple[Any, Any]) -> None:
    ours, stock = pair
    registrations: list[tuple[str, str, Any]] = [
        ("calc.w1", U1, {svc("calc"), "class:Calc"}),
        ("calc.w2", U2, {svc("calc")}),
        ("mail.w1", U3, {svc("mail"), "class:Mail", "region:eu"}),
        ("plain.one", U1, None),
        ("plain.two", U2, {"region:eu"}),
        ("other", U3, []),
    ]
    for name, uri, meta in registrations:
        def register(ns: Any, n: str = name, u: str = uri, m: Any = meta) -> None:
            ns.register(n, u, metadata=m)
        same(ours, stock, register)
    same(ours, stock, lambda ns: ns.register("by.uri.object", Pyro5.core.URI(U2)))

    ops: list[Callable[[Any], Any]] = [
        lambda ns: ns.count(),
        lambda ns: ns.lookup("calc.w1"),
        lambda ns: ns.lookup("calc.w1", return_metadata=True),
        lambda ns: ns.lookup("plain.one", return_metadata=True),
        lambda ns: ns.lookup("missing"),
        lambda ns: ns.list(),
        lambda ns: ns.list(return_metadata=True),
        lambda ns: ns.list(prefix="calc."),
        lambda ns: ns.list(prefix="calc.", return_metadata=True),
        lambda ns: ns.list(prefix="nothing"),
        lambda ns: ns.list(regex=r"plain\..*"),
        lambda ns: ns.list(regex=r".*\.w1", return_metadata=True),
        lambda ns: ns.list(regex="("),
        lambda ns: ns.list(prefix="a", regex="b"),
        lambda ns: ns.yplookup(meta_all={svc("calc")}),
        lambda ns: ns.yplookup(meta_all=[svc("calc")], return_metadata=False),
        lambda ns: ns.yplookup(meta_all={svc("calc"), "class:Calc"}),
        lambda ns: ns.yplookup(meta_all={svc("mail"), "region:eu"}, return_metadata=False),
        lambda ns: ns.yplookup(meta_all={svc("calc"), "region:eu"}),
        lambda ns: ns.yplookup(meta_all={svc("nosuch")}),
        lambda ns: ns.yplookup(meta_all={"region:eu"}),
        lambda ns: ns.yplookup(meta_any={"region:eu", "class:Calc"}),
        lambda ns: ns.yplookup(meta_any={svc("calc"), svc("mail")}, return_metadata=False),
        lambda ns: ns.yplookup(meta_any={"nothing"}),
        lambda ns: ns.yplookup(),
        lambda ns: ns.yplookup(meta_all=svc("calc")),
        lambda ns: ns.yplookup(meta_any="region:eu"),
        lambda ns: ns.yplookup(meta_all={"a"}, meta_any={"b"}),
        lambda ns: ns.register("calc.w1", U2, safe=True),
        lambda ns: ns.register(42, U1),
        lambda ns: ns.register("bad.uri", "not a uri"),
        lambda ns: ns.register("bad.uri", 1234),
        lambda ns: ns.register("bad.meta", U1, metadata="a string"),
        lambda ns: ns.set_metadata("missing", {"x"}),
        lambda ns: ns.set_metadata(42, {"x"}),
        lambda ns: ns.set_metadata("plain.one", "a string"),
        lambda ns: ns.ping(),
    ]
    for op in ops:
        same(ours, stock, op)
    assert_index_exact(ours, stock, also=("nosuch",))


def test_index_stays_exact_after_every_kind_of_mutation(pair: tuple[Any, Any]) -> None:
    ours, stock = pair
    steps: list[tuple[str, Callable[[Any], Any]]] = [
        ("register", lambda ns: [ns.register(n, u, metadata=m) for n, u, m in [
            ("a.1", U1, {svc("a")}), ("a.2", U2, {svc("a"), "x"}), ("b.1", U3, {svc("b")}),
            ("c.1", U1, {svc("c")}), ("c.2", U2, {svc("c")}), ("plain.1", U3, None), ("plain.2", U1, {"x"})]]),
        ("overwrite with another service", lambda ns: ns.register("a.2", U3, metadata={svc("b"), "x"})),
        ("overwrite without a service", lambda ns: ns.register("b.1", U3)),
        ("overwrite same name same service", lambda ns: ns.register("c.2", U3, metadata={svc("c"), "y"})),
        ("safe register refused", lambda ns: ns.register("a.1", U3, safe=True, metadata={svc("z")})),
        ("set_metadata moves service", lambda ns: ns.set_metadata("c.1", {svc("a")})),
        ("set_metadata adds service", lambda ns: ns.set_metadata("plain.1", [svc("c")])),
        ("set_metadata clears", lambda ns: ns.set_metadata("c.2", None)),
        ("set_metadata empties", lambda ns: ns.set_metadata("a.2", set())),
        ("remove by name", lambda ns: ns.remove("a.1")),
        ("remove missing name", lambda ns: ns.remove("nope")),
        ("remove by prefix", lambda ns: ns.remove(prefix="c.")),
        ("register more", lambda ns: [ns.register(f"d.{i}", U1, metadata={svc("d")}) for i in range(5)]),
        ("remove by regex", lambda ns: ns.remove(regex=r"d\.[12]")),
        ("remove by regex, no match", lambda ns: ns.remove(regex=r"zzz.*")),
        ("remove nothing", lambda ns: ns.remove()),
        ("storage.clear()", lambda ns: ns.storage.clear()),
        ("register after clear", lambda ns: [ns.register("a.9", U2, metadata={svc("a")}),
                                             ns.register("e.1", U2, metadata={svc("e")})]),
    ]
    for label, step in steps:
        same(ours, stock, step)
        try:
            assert_index_exact(ours, stock, also=("a", "b", "c", "d", "e", "z"))
        except AssertionError as exc:
            raise AssertionError(f"index wrong after {label}: {exc}") from exc
    assert ours.services() == {"a": 1, "e": 1}


def test_entry_with_two_service_tags_is_found_under_both(pair: tuple[Any, Any]) -> None:
    """Metadata is a set of free-form tags: an entry may carry two service tags; stock finds it by either."""
    ours, stock = pair
    for ns in (ours, stock):
        ns.register("multi.1", U1, metadata={svc("alpha"), svc("beta")})
        ns.register("alpha.1", U2, metadata={svc("alpha")})
    for service in ("alpha", "beta"):
        assert norm(ours.yplookup(meta_all={svc(service)})) == norm(stock.yplookup(meta_all={svc(service)})), service
    assert {w["name"] for w in ours.service_workers("beta")} == {"multi.1"}
    assert ours.services() == {"alpha": 2, "beta": 1}


def test_index_is_rebuilt_from_existing_storage(tmp_path: Any) -> None:
    path = tmp_path / "ns.sqlite"
    first = NameServer(Pyro5.nameserver.SqlStorage(str(path)))
    stock = Pyro5.nameserver.NameServer()
    for ns in (first, stock):
        ns.register("s.1", U1, metadata={svc("s")})
        ns.register("s.2", U2, metadata={svc("s"), "x"})
        ns.register("t.1", U3, metadata={svc("t")})
        ns.register("plain", U3)
    again = NameServer(Pyro5.nameserver.SqlStorage(str(path)))
    assert again.services() == {"s": 2, "t": 1}
    assert_index_exact(again, stock)


def test_service_lookups_use_the_index_not_a_scan() -> None:
    storage = CountingStorage()
    ns = NameServer(storage)
    for i in range(50):
        ns.register(f"s{i % 5}.{i}", U1, metadata={svc(f"s{i % 5}")})
    storage.scans = 0
    assert len(ns.service_workers("s3")) == 10
    assert len(ns.yplookup(meta_all={svc("s3")})) == 10
    assert len(ns.yplookup(meta_all=[svc("s3")], return_metadata=False)) == 10
    assert storage.scans == 0


# -- 2. leases ---------------------------------------------------------------------------------------


def test_lease_creates_renews_without_rewrite_and_records_load() -> None:
    storage = CountingStorage()
    ns = NameServer(storage)
    assert _untoken(ns.lease("calc.w1", U1, {svc("calc"), "pyrorpc.pid:1"}, {"in_flight": 2, "calls": 7}, 5)) == \
        {"ttl": 5.0, "created": True}
    uri, meta = ns.lookup("calc.w1", return_metadata=True)
    assert str(uri) == U1
    assert meta == {svc("calc"), "pyrorpc.pid:1", "pyrorpc.lease:5"}
    assert norm(ns.yplookup(meta_all={svc("calc")})) == {"calc.w1": (U1, frozenset(meta))}
    writes = storage.writes

    reply = ns.lease("calc.w1", Pyro5.core.URI(U1), [svc("calc"), "pyrorpc.pid:1"], {"in_flight": 0, "calls": 9}, 5)
    assert _untoken(reply) == {"ttl": 5.0, "created": False}
    assert storage.writes == writes, "a renewal must not rewrite the storage"

    [worker] = ns.service_workers("calc")
    assert worker["name"] == "calc.w1" and worker["uri"] == U1
    assert "metadata" not in worker  # the frequent reply stays small: the load report carries what's needed
    [full] = ns.service_workers("calc", with_metadata=True)
    assert full["metadata"] == sorted(meta)
    assert worker["load"] == {"in_flight": 0, "calls": 9}
    assert worker["ttl"] == 5.0
    assert 0 <= worker["age"] < 2.0

    # a changed URI or changed tags rewrite the entry, still not "created"
    assert ns.lease("calc.w1", U2, {svc("calc"), "pyrorpc.pid:1"}, None, 5)["created"] is False
    assert storage.writes == writes + 1
    assert str(ns.lookup("calc.w1")) == U2
    assert ns.service_workers("calc")[0]["load"] == {}


def test_lease_defaults_and_load_cleaning() -> None:
    ns = NameServer()
    ns.default_lease_ttl = 7.0
    assert _untoken(ns.lease("s.w", U1)) == {"ttl": 7.0, "created": True}
    assert ns.lookup("s.w", return_metadata=True)[1] == {"pyrorpc.lease:7"}
    ns.lease("s.w1", U1, {svc("s"), 42, "pyrorpc.lease:999"},
             {"ok": 1, "f": 0.5, "s": "text", "flag": True, "long": "x" * 300, 5: 1, "n": None}, 3)
    assert ns.lookup("s.w1", return_metadata=True)[1] == {svc("s"), "pyrorpc.lease:3"}
    assert ns.service_workers("s")[0]["load"] == {"ok": 1, "f": 0.5, "s": "text"}
    with pytest.raises(TypeError, match="load must be a dict"):
        ns.lease("s.w1", U1, [svc("s")], "not a dict", 3)
    assert ns.service_workers("s")[0]["load"] == {"ok": 1, "f": 0.5, "s": "text"}  # refused: nothing changed
    ns.lease("s.w1", U1, [svc("s")], None, 3)
    assert ns.service_workers("s")[0]["load"] == {}


@pytest.mark.parametrize("kwargs, error", [
    ({"ttl": 0.1}, ValueError), ({"ttl": 0}, ValueError), ({"ttl": -1}, ValueError),
    ({"ttl": 86401}, ValueError), ({"ttl": True}, ValueError), ({"ttl": "5"}, ValueError),
    ({"ttl": float("nan")}, ValueError),
    ({"name": 5}, TypeError), ({"name": ""}, TypeError), ({"name": None}, TypeError),
    ({"name": Pyro5.core.NAMESERVER_NAME}, TypeError),
    ({"metadata": "pyrorpc.service:s"}, TypeError),
    ({"uri": 1234}, TypeError), ({"uri": "not a uri"}, Pyro5.errors.PyroError),
], ids=lambda v: repr(v) if isinstance(v, dict) else v.__name__)
def test_lease_rejects_bad_arguments(kwargs: dict[str, Any], error: type[Exception]) -> None:
    ns = NameServer()
    args: dict[str, Any] = {"name": "s.w1", "uri": U1, "metadata": {svc("s")}, "load": None, "ttl": 5.0}
    args.update(kwargs)
    with pytest.raises(error):
        ns.lease(**args)
    assert ns.count() == 0 and ns.services() == {} and ns.leases == {}


def test_service_workers_rejects_non_str_and_reports_plain_entries() -> None:
    ns = NameServer()
    with pytest.raises(TypeError):
        ns.service_workers(5)  # type: ignore[arg-type]
    assert ns.service_workers("nothing") == []
    ns.register("s.plain", U1, metadata={svc("s")})
    [worker] = ns.service_workers("s")
    assert worker["ttl"] is None and worker["age"] is None and worker["load"] == {}


def test_expired_leases_are_dropped_and_plain_entries_never() -> None:
    ns = NameServer()
    ns.register("s.plain", U1, metadata={svc("s")})
    ns.register("unrelated", U2)
    t0 = time.monotonic()
    ns.lease("s.dying", U2, {svc("s")}, {"calls": 1}, 0.3)
    ns.lease("s.kept", U3, {svc("s")}, None, 0.4)
    assert ns.expire() == []
    dead: list[str] = []

    def renew_kept_and_sweep() -> bool:
        # s.kept is renewed well within its TTL, for longer than two TTLs
        ns.lease("s.kept", U3, {svc("s")}, None, 0.4)
        dead.extend(ns.expire())
        if dead and not expired_at:
            expired_at.append(time.monotonic())
        return bool(dead) and time.monotonic() - t0 > 1.0

    expired_at: list[float] = []
    wait_for(renew_kept_and_sweep, timeout=5, message="s.dying expired")
    assert expired_at[0] - t0 >= 0.3, "expired before its TTL"
    assert dead == ["s.dying"]
    assert "s.dying" not in ns.list()
    assert {w["name"] for w in ns.service_workers("s")} == {"s.plain", "s.kept"}
    assert set(ns.list()) == {"s.plain", "s.kept", "unrelated"}
    assert ns.services() == {"s": 2}
    assert ns.expire() == []


def test_service_workers_hides_an_expired_lease_before_the_sweep() -> None:
    ns = NameServer()
    ns.lease("s.w1", U1, {svc("s")}, None, 0.3)
    wait_for(lambda: not ns.service_workers("s"), timeout=5, message="lease seen as expired")
    assert "s.w1" in ns.list()  # not swept yet
    assert ns.expire() == ["s.w1"]
    assert ns.list() == {} and ns.services() == {}


def test_register_and_remove_drop_the_lease() -> None:
    """A plain register over a leased name makes it permanent; remove (any form) forgets the lease."""
    ns = NameServer()
    for name in ("s.overwritten", "s.removed", "p.removed", "r.removed", "s.sentinel"):
        ns.lease(name, U1, {svc("s")}, None, 0.3)
    ns.register("s.overwritten", U2, metadata={svc("s")})
    assert ns.remove("s.removed") == 1
    assert ns.remove(prefix="p.") == 1
    assert ns.remove(regex=r"r\..*") == 1
    assert [w["ttl"] for w in ns.service_workers("s") if w["name"] == "s.overwritten"] == [None]

    dead = wait_for(ns.expire, timeout=5, message="sentinel expired")
    assert dead == ["s.sentinel"], "removed names must not come back from expire()"
    assert set(ns.list()) == {"s.overwritten"}
    assert ns.expire() == []
    # a fresh lease on a removed name is a creation again
    assert ns.lease("s.removed", U1, {svc("s")}, None, 5)["created"] is True


def test_storage_clear_forgets_every_lease() -> None:
    ns = NameServer()
    ns.lease("s.w1", U1, {svc("s")}, None, 5)
    ns.lease("bare.lease", U2, None, None, 5)  # leased, but no service tag
    ns.storage.clear()
    assert ns.list() == {} and ns.services() == {}
    assert ns.leases == {}, "clear() left leases behind"
    assert ns.lease("bare.lease", U2, None, None, 5)["created"] is True


# -- 3. SQLite storage --------------------------------------------------------------------------------


def test_every_persisted_lease_expires_after_a_reload(tmp_path: Any) -> None:
    path = str(tmp_path / "ns.sqlite")
    first = NameServer(Pyro5.nameserver.SqlStorage(path))
    first.lease("s.w1", U1, {svc("s")}, {"calls": 3}, 0.3)
    first.lease("bare.lease", U2, None, None, 0.3)  # a lease without a service tag
    first.register("s.plain", U3, metadata={svc("s")})
    first.register("plain", U3)

    loaded = NameServer(Pyro5.nameserver.SqlStorage(path))
    assert set(loaded.list()) == {"s.w1", "bare.lease", "s.plain", "plain"}
    by_name = {w["name"]: w for w in loaded.service_workers("s")}
    assert by_name["s.w1"]["ttl"] == 0.3 and by_name["s.plain"]["ttl"] is None
    assert by_name["s.w1"]["load"] == {}  # load is not persisted, only the lease

    dropped: set[str] = set()

    def sweep() -> bool:
        dropped.update(loaded.expire())
        return {"s.w1", "bare.lease"} <= dropped

    try:
        wait_for(sweep, timeout=3, message="persisted leases expired")
    except TimeoutError:
        pass
    assert set(loaded.list()) == {"s.plain", "plain"}, "a persisted lease never expired after a restart"


def test_sqlite_registrations_survive_a_restart(tmp_path: Any) -> None:
    path = str(tmp_path / "ns.sqlite")
    proc = NameServerProcess(storage=path, lease_ttl=5)
    try:
        with Pyro5.api.Proxy(f"PYRO:{Pyro5.core.NAMESERVER_NAME}@{proc.ns}") as ns:
            ns._pyroTimeout = 10
            ns.register("plain.thing", U1, metadata=["class:Thing"])
            ns.register("s.plain", U2, metadata=[svc("s")])
            leased_at = time.monotonic()
            assert ns.lease("s.w1", U3, [svc("s")], {"calls": 1}, 1.5)["created"] is True
        proc = proc.restart()
        restarted_at = time.monotonic()
        assert "3 existing registrations" in proc.output
        with Pyro5.api.Proxy(f"PYRO:{Pyro5.core.NAMESERVER_NAME}@{proc.ns}") as ns:
            ns._pyroTimeout = 10
            uri, meta = ns.lookup("plain.thing", return_metadata=True)
            assert str(uri) == U1 and meta == {"class:Thing"}
            workers = {w["name"]: w for w in ns.service_workers("s")}
            assert set(workers) == {"s.plain", "s.w1"}, "leased entry gone at once: its clock did not restart"
            # its age counts from the restart, not from the original lease
            assert workers["s.w1"]["age"] < time.monotonic() - leased_at
            assert ns.services() == {"s": 2}
            wait_for(lambda: "s.w1" not in ns.list(), timeout=1.5 + 3, message="s.w1 expired after restart")
            assert time.monotonic() - restarted_at >= 1.0
            assert set(ns.list()) == {Pyro5.core.NAMESERVER_NAME, "plain.thing", "s.plain"}
    finally:
        proc.kill()


# -- 4. the daemon process ---------------------------------------------------------------------------


def test_daemon_answers_ping_and_exits_cleanly_on_sigterm(nameserver: Callable[..., NameServerProcess]) -> None:
    proc = nameserver(lease_ttl=3)
    assert proc.address.host == "127.0.0.1" and proc.address.port > 0
    with Pyro5.api.Proxy(f"PYRO:{Pyro5.core.NAMESERVER_NAME}@{proc.ns}") as ns:
        ns._pyroTimeout = 5
        assert ns.ping() is None
        assert ns.count() == 1
        uri, meta = ns.lookup(Pyro5.core.NAMESERVER_NAME, return_metadata=True)
        assert str(uri) == f"PYRO:{Pyro5.core.NAMESERVER_NAME}@{proc.ns}"
        assert "class:Pyro5.nameserver.NameServer" in meta
    started = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert proc.wait(5) == 0
    assert time.monotonic() - started < 5
    wait_for(lambda: "NS shut down." in proc.lines, timeout=5, message="'NS shut down.' printed")
    assert "Traceback" not in proc.output


@pytest.mark.parametrize("args", [
    ["--storage", "bogus"],
    ["--storage", "sql:"],
    ["--storage", "/nonexistent-dir/ns.sqlite"],
    ["--lease-ttl", "0"],
    ["--port", "99999"],
], ids=["bogus-storage", "empty-sql-path", "unopenable-sqlite", "zero-ttl", "port-out-of-range"])
def test_daemon_user_errors_are_one_line(args: list[str]) -> None:
    done = subprocess.run([sys.executable, "-m", "nameserver", "--port", "0", *args],
                          capture_output=True, text=True, timeout=20)
    assert done.returncode != 0
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    assert re.search(r"^Error: ", done.stderr, re.M), done.stderr
    assert "NS running" not in done.stdout


# -- 5. interop with stock Pyro5 tools ---------------------------------------------------------------


def nsc(port: int, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "Pyro5.nsc", "-n", "127.0.0.1", "-p", str(port), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen[str]) -> str:
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    return out


def test_stock_clients_work_against_our_server(nameserver: Callable[..., NameServerProcess],
                                               worker_factory: Callable[..., Any]) -> None:
    proc = nameserver(lease_ttl=5)
    port = proc.address.port
    worker = worker_factory("services:Calculator", proc.ns)
    assert worker.name.startswith("calc.")

    ns = Pyro5.api.locate_ns(host="127.0.0.1", port=port)
    with ns:
        ns._pyroTimeout = 5
        ns.ping()
        assert str(ns._pyroUri) == f"PYRO:{Pyro5.core.NAMESERVER_NAME}@127.0.0.1:{port}"
        ns.register("plain.thing", U1, metadata={"class:Thing"})
        assert str(ns.lookup(worker.name)) == worker.uri
        assert set(ns.yplookup(meta_all={svc("calc")})) == {worker.name}

    # the stock control tool (its yellow-pages command is called yplookup_all)
    jobs = {cmd: nsc(port, *cmd.split()) for cmd in
            ("list", f"lookup {worker.name}", f"yplookup_all {svc('calc')}", "ping", "lookup no.such.name")}
    outputs = {cmd: finish(job) for cmd, job in jobs.items() if cmd != "lookup no.such.name"}
    missing = jobs["lookup no.such.name"]
    missing_out, _ = missing.communicate(timeout=20)
    assert missing.returncode != 0 and "NamingError" in missing_out

    assert "--------START LIST" in outputs["list"]
    assert f"{worker.name} --> {worker.uri}" in outputs["list"]
    assert f"plain.thing --> {U1}" in outputs["list"]
    assert worker.uri in outputs[f"lookup {worker.name}"].splitlines()[0]
    assert svc("calc") in outputs[f"lookup {worker.name}"]
    listed = re.findall(r"^(\S+) --> ", outputs[f"yplookup_all {svc('calc')}"], re.M)
    assert listed == [worker.name]
    assert "Name server ping ok." in outputs["ping"]

    assert "Removed plain.thing" in finish(nsc(port, "remove", "plain.thing"))
    with Pyro5.api.Proxy(f"PYRO:{Pyro5.core.NAMESERVER_NAME}@127.0.0.1:{port}") as ns:
        ns._pyroTimeout = 5
        assert "plain.thing" not in ns.list()

    # a plain Pyro5 proxy reaches the worker by name and by metadata
    with Pyro5.api.Proxy(f"PYRONAME:{worker.name}@127.0.0.1:{port}") as calc:
        calc._pyroTimeout = 5
        assert calc.add(2, 3) == 5
    with Pyro5.api.Proxy(f"PYROMETA:{svc('calc')}@127.0.0.1:{port}") as calc:
        calc._pyroTimeout = 5
        assert calc.pid() == worker.worker_pid


# -- 6. scale ------------------------------------------------------------------------------------------


def test_ten_thousand_entries_one_service_is_exact() -> None:
    storage = CountingStorage()
    ours = NameServer(storage)
    stock = Pyro5.nameserver.NameServer()
    for s in range(1000):
        tag = svc(f"svc{s}")
        for w in range(10):
            name, uri = f"svc{s}.w{w}", f"PYRO:obj_{s}_{w}@10.0.{s % 250}.{w}:{9000 + s}"
            if w % 2:
                ours.lease(name, uri, {tag, f"pyrorpc.pid:{w}"}, {"calls": w}, 60)
            else:
                ours.register(name, uri, metadata={tag, f"pyrorpc.pid:{w}"})
            stock.register(name, uri, metadata=ours.lookup(name, return_metadata=True)[1])
    assert ours.count() == stock.count() == 10_000
    assert len(ours.services()) == 1000 and set(ours.services().values()) == {10}

    storage.scans = 0
    workers = ours.service_workers("svc500")
    assert sorted(w["name"] for w in workers) == [f"svc500.w{w}" for w in range(10)]
    leased = {w["name"]: w["load"] for w in workers if w["ttl"]}
    assert leased == {f"svc500.w{w}": {"calls": w} for w in (1, 3, 5, 7, 9)}
    mine = ours.yplookup(meta_all={svc("svc500")})
    assert storage.scans == 0, "a service lookup scanned the registry"
    assert norm(mine) == norm(stock.yplookup(meta_all={svc("svc500")}))
    assert len(mine) == 10
    assert norm(ours.yplookup(meta_all={svc("svc500"), "pyrorpc.pid:3"}, return_metadata=False)) == \
        {"svc500.w3": "PYRO:obj_500_3@10.0.0.3:9500"}
    assert ours.service_workers("svc5000") == [] and ours.yplookup(meta_all={svc("svc5000")}) == {}


def test_renew_needs_the_lease_token_and_merges_the_load() -> None:
    ns = NameServer(CountingStorage())
    reply = ns.lease("calc.w1", U1, {svc("calc")}, {"in_flight": 2, "calls": 7, "host": "h"}, 0.5)
    token = reply["token"]
    assert ns.renew("calc.w1", token, {"calls": 9}) == 0.5
    [worker] = ns.service_workers("calc")
    assert worker["load"] == {"in_flight": 2, "calls": 9, "host": "h"}
    assert ns.renew("calc.w1", token) == 0.5  # nothing changed: no load at all
    assert ns.renew("calc.w1", token + 1, {"calls": 10}) is None  # not the holder's token
    assert ns.renew("calc.w2", token) is None  # no such lease
    assert ns.renew(["calc.w1"], token) is None  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="in_flight"):
        ns.renew("calc.w1", token, {"in_flight": -1})  # checked as lease checks it
    with pytest.raises(TypeError):
        ns.renew("calc.w1", token, [1])
    assert ns.service_workers("calc")[0]["load"]["calls"] == 9  # a refused report changed nothing
    # a field the report does not have takes a whole lease: renewals cannot grow a report past lease's limits
    assert ns.renew("calc.w1", token, {"extra1": 1}) is None
    for i in range(100):
        ns.renew("calc.w1", token, {f"k{i}": i})
    assert set(ns.service_workers("calc")[0]["load"]) == {"in_flight", "calls", "host"}
    time.sleep(0.6)
    assert ns.renew("calc.w1", token) is None  # expired, even before the sweep removed it: not revived
    assert ns.expire() == ["calc.w1"]
    again = ns.lease("calc.w1", U1, {svc("calc")}, None, 0.5)
    assert again["created"] is True and again["token"] != token


def test_big_service_lookups_are_not_for_the_io_thread() -> None:
    ns = NameServer(CountingStorage())
    for i in range(NameServer.INLINE_WORKERS + 1):
        ns.lease(f"big.w{i}", U1, {svc("big")}, None, 5)
    ns.lease("small.w1", U1, {svc("small")}, None, 5)
    assert ns._inline_ok("service_workers", ("small",)) and ns._inline_ok("service_workers", ("nothing",))
    assert not ns._inline_ok("service_workers", ("big",))
    assert ns._inline_ok("renew", ("big.w1", 1, None)) and ns._inline_ok("service_workers", ([],))


def _untoken(reply: dict) -> dict:
    """A lease reply without its token (a random int, checked where renew is)."""
    assert isinstance(reply.pop("token"), int)
    return reply

"""Delivery (issue 14): acknowledged send() on Proxy and Pool, worker-side dedup, the durable outbox."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import Pyro5.api
import pytest
from delivery_app import Mailer, journal_runs
from services import Steer

import pyrorpc
from pyrorpc.testing import ChildProcess, wait_for


@pytest.fixture(autouse=True)
def fresh_runs() -> None:
    Mailer.runs.clear()


def _runs(kind: str = "done") -> list[str]:
    return [uid for k, uid in list(Mailer.runs) if k == kind]


# send() ------------------------------------------------------------------------------------------------

def test_proxy_send_returns_once_accepted_not_when_done(ns_addr: str) -> None:
    with pyrorpc.WorkerHost(Mailer, ns=ns_addr), pyrorpc.connect("mailer", ns=ns_addr) as p:
        began = time.monotonic()
        send_id = p.mail.send("a", 1.0)
        assert time.monotonic() - began < 0.5  # accepted, not run to its end
        assert isinstance(send_id, str) and send_id
        wait_for(lambda: "a" in _runs("start"), 5)
        assert "a" not in _runs("done")
        wait_for(lambda: "a" in _runs("done"), 5)
        assert p.amail.send("b") and wait_for(lambda: "b" in _runs("done"), 5)  # async def methods too


def test_pool_send(ns_addr: str) -> None:
    with pyrorpc.WorkerHost(Mailer, ns=ns_addr), pyrorpc.WorkerHost(Mailer, ns=ns_addr), \
            pyrorpc.Pool("mailer", ns=ns_addr) as pool:
        for i in range(20):
            pool.mail.send(f"m{i}")
        wait_for(lambda: len(_runs()) == 20, 5)
        assert sorted(_runs()) == sorted(f"m{i}" for i in range(20))


def test_same_id_twice_runs_once(ns_addr: str) -> None:
    with pyrorpc.WorkerHost(Mailer, ns=ns_addr), pyrorpc.connect("mailer", ns=ns_addr) as p:
        assert p.mail.send_as("welcome-42", "x") == "welcome-42"
        assert p.mail.send_as("welcome-42", "x") == "welcome-42"  # acknowledged again...
        p.mail.send_as("welcome-43", "y")
        wait_for(lambda: "y" in _runs(), 5)
        assert _runs().count("x") == 1  # ...but not run again


def test_refused_before_acceptance_raises_and_never_runs(ns_addr: str) -> None:
    with pyrorpc.WorkerHost(Mailer, ns=ns_addr), pyrorpc.connect("mailer", ns=ns_addr) as p:
        with pytest.raises(AttributeError):
            p.nosuch.send(1)
        with pytest.raises(TypeError):
            p.mail.send("a", 1, 2, 3)
        with pytest.raises(TypeError):
            p.mail.send("a", bogus=1)
        p.mail.send("ok")
        wait_for(lambda: "ok" in _runs(), 5)
        assert _runs("start") == ["ok"]


def test_idempotent_send_waits_for_completion(ns_addr: str) -> None:
    with pyrorpc.WorkerHost(Mailer, ns=ns_addr), pyrorpc.connect("mailer", ns=ns_addr) as p:
        began = time.monotonic()
        p.mail_idem.send("i", 0.5)
        assert time.monotonic() - began >= 0.45
        assert "i" in _runs()


def test_send_to_a_draining_worker_goes_elsewhere(nameserver, worker_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    ns = nameserver(lease_ttl=30)
    env = dict(os.environ, DELIVERY_JOURNAL=str(tmp_path))
    a = worker_factory("delivery_app:Mailer", ns.ns, env=env)
    b = worker_factory("delivery_app:Mailer", ns.ns, env=env)
    with pyrorpc.Pool("mailer", ns=ns.ns, strategy=Steer(a.name)) as pool:
        pool.mail.send("busy", 1.5)  # accepted by a; keeps its drain going
        wait_for(lambda: "busy" in sum(journal_runs(str(tmp_path), "start").values(), []), 10)
        a.signal(signal.SIGTERM)
        # (the pool hears of it from the name server or from a itself, MSG_NOTICE; a call sent to a meanwhile
        # is refused unrun: either way it goes to b)
        wait_for(lambda: a.name not in {w.name for w in pool.workers()}, 10)
        pool.mail.send("after")
        assert a.wait(15) == 0
        runs = journal_runs(str(tmp_path))
        assert runs[f"{a.worker_pid}.log"] == ["busy"]  # accepted: kept through the drain
        assert runs[f"{b.worker_pid}.log"] == ["after"]


def test_send_to_a_dead_worker_goes_elsewhere(nameserver, worker_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    ns = nameserver(lease_ttl=30)  # the dead worker stays registered: the pool finds out by trying
    env = dict(os.environ, DELIVERY_JOURNAL=str(tmp_path))
    a = worker_factory("delivery_app:Mailer", ns.ns, env=env)
    b = worker_factory("delivery_app:Mailer", ns.ns, env=env)
    with pyrorpc.Pool("mailer", ns=ns.ns, strategy=Steer(a.name)) as pool:
        pool.mail.send("first")
        wait_for(lambda: journal_runs(str(tmp_path)).get(f"{a.worker_pid}.log"), 10)
        a.kill()
        pool.mail.send("second")
        wait_for(lambda: sum(len(v) for v in journal_runs(str(tmp_path)).values()) == 2, 10)
        runs = journal_runs(str(tmp_path))
        assert runs[f"{a.worker_pid}.log"] == ["first"]
        assert runs[f"{b.worker_pid}.log"] == ["second"]


def test_send_cut_off_after_writing_is_never_sent_elsewhere(nameserver, worker_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A send written to a worker that is stopped (SIGSTOP) and cut off before it acknowledged: it may still
    run there once the worker resumes, so send() raises WorkerLostError and never sends it to another worker."""
    ns = nameserver(lease_ttl=3)
    env = dict(os.environ, DELIVERY_JOURNAL=str(tmp_path))
    a = worker_factory("delivery_app:Mailer", ns.ns, env=env)
    b = worker_factory("delivery_app:Mailer", ns.ns, env=env)
    with pyrorpc.Pool("mailer", ns=ns.ns, strategy=Steer(a.name)) as pool:
        pool.mail.send("warm")  # (the channel to a is open)
        time.sleep(0.3)
        a.signal(signal.SIGSTOP)
        try:
            with pytest.raises(pyrorpc.WorkerLostError):
                pool.mail.send("once-only")  # cut off once a's lease renewals stop
        finally:
            a.signal(signal.SIGCONT)
        time.sleep(1.0)
    runs = journal_runs(str(tmp_path), "start")
    assert runs.get(f"{b.worker_pid}.log", []) == []
    assert runs[f"{a.worker_pid}.log"].count("once-only") <= 1


def test_a_resend_gets_the_first_runs_outcome(ns_addr: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """An outbox entry re-sent to the worker that ran it (its sender died before writing the outcome down)
    ends as that run ended: failed with its error, or done once a run still going ends; it never runs twice."""
    path = str(tmp_path / "outbox.sqlite")
    with pyrorpc.WorkerHost(Mailer, ns=ns_addr) as host, pyrorpc.Pool("mailer", ns=ns_addr) as pool:
        pool.fail.send_as("first-failed", "x")  # accepted, then it raises
        pool.mail.send_as("first-slow", "slow", 1.0)  # accepted, still running below
        wait_for(lambda: ("start", "slow") in Mailer.runs, 5)
        with pyrorpc.Outbox(path, ns=ns_addr, service="mailer", send=False):
            pass  # (creates the journal)
        with contextlib.closing(sqlite3.connect(path)) as db, db:  # what a sender that died left behind
            for entry_id, method, args in (("first-failed", "fail", ("x",)), ("first-slow", "mail", ("slow", 1.0))):
                db.execute("INSERT INTO entries (id, service, method, payload, created, state, lease_until, worker, "
                           "sent_at) VALUES (?, 'mailer', ?, ?, ?, 'inflight', 0, ?, ?)",
                           (entry_id, method, pyrorpc.codec.dumps((args, {})), time.time(), host.name, time.time()))
        with pyrorpc.Outbox(path, ns=ns_addr, service="mailer") as outbox:
            assert outbox.wait(10)
            status = outbox.status()
    assert status["failed"] == 1 and status["lost"] == 0
    [entry] = status["entries"]
    assert entry["id"] == "first-failed" and "ValueError" in entry["error"] and "cannot mail x" in entry["error"]
    assert [uid for kind, uid in Mailer.runs if kind == "start"] == ["slow"]  # each ran once


def test_idempotent_send_is_resent_after_sigkill(nameserver, worker_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    ns = nameserver(lease_ttl=30)
    env = dict(os.environ, DELIVERY_JOURNAL=str(tmp_path))
    a = worker_factory("delivery_app:Mailer", ns.ns, env=env)
    b = worker_factory("delivery_app:Mailer", ns.ns, env=env)
    with pyrorpc.Pool("mailer", ns=ns.ns, strategy=Steer(a.name)) as pool:
        killer = threading.Thread(target=lambda: (
            wait_for(lambda: "job" in sum(journal_runs(str(tmp_path), "start").values(), []), 10), a.kill()))
        killer.start()
        pool.mail_idem.send("job", 1.0)  # returns once it ran: on b, after a died mid-run
        killer.join(10)
        runs = journal_runs(str(tmp_path))
        assert runs.get(f"{a.worker_pid}.log", []) == []
        assert runs[f"{b.worker_pid}.log"] == ["job"]


def test_non_idempotent_send_is_not_resent_after_acceptance(nameserver, worker_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    ns = nameserver(lease_ttl=30)
    env = dict(os.environ, DELIVERY_JOURNAL=str(tmp_path))
    a = worker_factory("delivery_app:Mailer", ns.ns, env=env)
    b = worker_factory("delivery_app:Mailer", ns.ns, env=env)
    with pyrorpc.Pool("mailer", ns=ns.ns, strategy=Steer(a.name)) as pool:
        pool.mail.send("once", 1.0)  # accepted by a: send() returned
        wait_for(lambda: "once" in sum(journal_runs(str(tmp_path), "start").values(), []), 10)
        a.kill()
        pool.mail.send("marker")  # (goes to b: a is gone)
        wait_for(lambda: "marker" in journal_runs(str(tmp_path)).get(f"{b.worker_pid}.log", []), 10)
    assert journal_runs(str(tmp_path), "start")[f"{b.worker_pid}.log"] == ["marker"]  # "once" never re-sent


class StockMailer:
    runs: list[str] = []

    @Pyro5.api.expose
    def mail(self, uid):
        time.sleep(0.2)
        StockMailer.runs.append(uid)


def test_send_to_a_stock_pyro5_daemon_is_a_sync_call() -> None:
    StockMailer.runs.clear()
    with Pyro5.api.Daemon(host="127.0.0.1", port=0) as daemon:
        uri = daemon.register(StockMailer, "stock.mailer")
        thread = threading.Thread(target=daemon.requestLoop, daemon=True)
        thread.start()
        try:
            with pyrorpc.connect(str(uri)) as p:
                p.mail.send("s1")
                assert StockMailer.runs == ["s1"]  # accepted = completed
        finally:
            daemon.shutdown()
            thread.join(5)


# the outbox --------------------------------------------------------------------------------------------

HERE = os.path.dirname(os.path.abspath(__file__))


def _delivered(path: str, timeout: float) -> None:
    """Wait until nothing in the outbox at ``path`` is pending, in flight or awaiting its outcome."""
    def idle() -> bool:
        status = pyrorpc.outbox.outbox_status(path)
        return not (status["pending"] or status["in_flight"] or status["accepted"])
    wait_for(idle, timeout)


def _client(ns: str, path: str, first: int, count: int) -> ChildProcess:
    return ChildProcess([sys.executable, os.path.join(HERE, "delivery_client.py"), ns, path, str(first), str(count)],
                        stdin=True)


def test_outbox_survives_a_sigkilled_client_and_runs_every_call_once(nameserver, worker_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Issue 14's acceptance: 10,000 enqueues while no worker runs, the client SIGKILLed after 5,000, a new
    client enqueues the other 5,000; then 3 workers start: every call runs exactly once."""
    ns = nameserver()
    path = str(tmp_path / "outbox.sqlite")
    journal = tmp_path / "journal"
    journal.mkdir()
    first = _client(ns.ns, path, 0, 5000)
    try:
        first.expect("ENQUEUED 5000", 20)
        first.kill()
    finally:
        first.kill()
    assert pyrorpc.outbox.outbox_status(path)["pending"] == 5000
    with _client(ns.ns, path, 5000, 5000) as second:
        second.expect("ENQUEUED 5000", 20)
        env = dict(os.environ, DELIVERY_JOURNAL=str(journal))
        with concurrent.futures.ThreadPoolExecutor(3) as ex:
            list(ex.map(lambda _i: worker_factory("delivery_app:Mailer", ns.ns, env=env), range(3)))
        wait_for(lambda: sum(len(v) for v in journal_runs(str(journal)).values()) >= 10_000, 20)
        wait_for(lambda: pyrorpc.outbox.outbox_status(path)["accepted"] == 0, 5)
    runs = [uid for uids in journal_runs(str(journal)).values() for uid in uids]
    assert len(runs) == 10_000
    assert sorted(runs) == sorted(f"u{i}" for i in range(10_000))  # each exactly once
    assert len(journal_runs(str(journal))) == 3  # (on all three workers)
    status = pyrorpc.outbox.outbox_status(path)
    assert {k: status[k] for k in ("pending", "in_flight", "accepted", "failed", "lost")} == \
        {"pending": 0, "in_flight": 0, "accepted": 0, "failed": 0, "lost": 0}


def test_outbox_worker_sigkilled_mid_run(nameserver, worker_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """@idempotent entries: none lost; the others never run twice, each either ran or is reported lost."""
    ns = nameserver(lease_ttl=30)
    env = dict(os.environ, DELIVERY_JOURNAL=str(tmp_path))
    a = worker_factory("delivery_app:Mailer", ns.ns, env=env)
    b = worker_factory("delivery_app:Mailer", ns.ns, env=env)
    path = str(tmp_path / "outbox.sqlite")
    with pyrorpc.Pool("mailer", ns=ns.ns, outbox=path) as pool:
        ids = {}
        for i in range(60):
            ids[pool.mail.enqueue(f"n{i}", 0.2)] = f"n{i}"
            pool.mail_idem.enqueue(f"i{i}", 0.2)
        wait_for(lambda: len(journal_runs(str(tmp_path), "start").get(f"{a.worker_pid}.log", [])) >= 10, 10)
        a.kill()
        _delivered(path, 20)
    done = journal_runs(str(tmp_path), "done")
    started = sum(journal_runs(str(tmp_path), "start").values(), [])
    ran = set(sum(done.values(), []))
    assert {f"i{i}" for i in range(60)} <= ran  # idempotent: 0 lost
    plain = [uid for uid in started if uid.startswith("n")]
    assert len(plain) == len(set(plain))  # never run twice
    status = pyrorpc.outbox.outbox_status(path)
    lost = {ids[e["id"]] for e in status["entries"] if e["state"] == "lost"}
    assert status["lost"] == len(lost)
    for i in range(60):
        assert (f"n{i}" in ran) != (f"n{i}" in lost), f"n{i}"  # ran, or reported lost: never both, never neither
    on_a = f"{a.worker_pid}.log"
    cut_off = set(journal_runs(str(tmp_path), "start")[on_a]) - set(done.get(on_a, []))
    assert cut_off  # (the kill did cut calls off mid-run)
    assert {uid for uid in cut_off if uid.startswith("i")} <= set(done[f"{b.worker_pid}.log"])  # re-sent to b


def test_outbox_resend_after_a_sender_crash_goes_to_the_same_worker(nameserver, worker_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The process that enqueued is SIGKILLed with calls on their way to two workers; whoever opens the outbox
    next re-sends them, each to the worker it went to (which has it already: it does not run it again), and
    a call whose worker is gone meanwhile is reported lost instead of run elsewhere."""
    ns = nameserver(lease_ttl=3)
    path = str(tmp_path / "outbox.sqlite")
    env = dict(os.environ, DELIVERY_JOURNAL=str(tmp_path))
    workers = [worker_factory("delivery_app:Mailer", ns.ns, env=env) for _ in range(3)]
    client = _client(ns.ns, path, 0, 400)
    try:
        client.expect("ENQUEUED 400", 20)
        wait_for(lambda: sum(len(v) for v in journal_runs(str(tmp_path), "start").values()) >= 150, 20)
        client.kill()
    finally:
        client.kill()
    victim = workers[0]
    victim.kill()  # entries it had may have run there or not: they must not run anywhere else
    time.sleep(0.5)
    with pyrorpc.Outbox(path, ns=ns.ns, service="mailer", lease=1.0) as outbox:
        _delivered(path, 30)
        status = outbox.status()
    runs = journal_runs(str(tmp_path), "start")
    starts = [uid for uids in runs.values() for uid in uids]
    twice = sorted({uid for uid in starts if starts.count(uid) > 1})
    assert twice == []
    with contextlib.closing(sqlite3.connect(path)) as db:
        lost = {pyrorpc.codec.loads(payload)[0][0] for (payload,) in
                db.execute("SELECT payload FROM entries WHERE state = 'lost'")}
    assert status["lost"] == len(lost)
    assert set(starts) | lost == {f"u{i}" for i in range(400)}  # each ran, or is reported lost
    survivors = {uid for name, uids in runs.items() if name != f"{victim.worker_pid}.log" for uid in uids}
    assert not lost & survivors  # a lost one may have run on the dead worker, never on another
    assert status["pending"] == status["in_flight"] == status["accepted"] == status["failed"] == 0


def test_entries_left_unconfirmed_by_a_close_are_settled_by_the_next_sender(ns_addr: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """close() before the outcomes came leaves entries accepted (``unconfirmed`` once the claim runs out); the
    next sender asks their worker again, which answers with the outcome: done, none run twice."""
    path = str(tmp_path / "odd #1?%41.sqlite")  # (a path with URI characters: status reads it all the same)
    with pyrorpc.WorkerHost(Mailer, ns=ns_addr):
        with pyrorpc.Outbox(path, ns=ns_addr, service="mailer", lease=0.5) as outbox:
            for i in range(5):
                outbox.enqueue("mail", (f"c{i}", 1.0))
            wait_for(lambda: outbox.status()["accepted"] == 5, 10)
            outbox.close(0.1)
        time.sleep(0.6)
        assert pyrorpc.outbox.outbox_status(path)["unconfirmed"] == 5
        with pyrorpc.Outbox(path, ns=ns_addr, service="mailer") as outbox:
            assert outbox.wait(15)
            status = outbox.status()
    assert {k: status[k] for k in ("pending", "in_flight", "accepted", "unconfirmed", "failed", "lost")} == \
        dict.fromkeys(("pending", "in_flight", "accepted", "unconfirmed", "failed", "lost"), 0)
    assert sorted(uid for kind, uid in Mailer.runs if kind == "start") == [f"c{i}" for i in range(5)]


def test_a_request_over_the_workers_limit_is_refused_before_sending(ns_addr: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The worker's max_message_size is known from its handshake: send() of a bigger request raises
    MessageTooLargeError at once (the worker would drop the connection), and an outbox entry that big ends
    failed without holding up the others."""
    path = str(tmp_path / "outbox.sqlite")
    with pyrorpc.WorkerHost(Mailer, ns=ns_addr, max_message_size=1_000_000), \
            pyrorpc.Pool("mailer", ns=ns_addr) as pool:
        with pytest.raises(pyrorpc.MessageTooLargeError):
            pool.mail.send("q" * 2_000_000)
        with pyrorpc.Outbox(path, ns=ns_addr, service="mailer") as outbox:
            outbox.enqueue("mail", ("q" * 2_000_000,))
            for i in range(5):
                outbox.enqueue("mail", (f"s{i}",))
            assert outbox.wait(10)
            status = outbox.status()
    assert status["failed"] == 1 and "MessageTooLargeError" in status["entries"][0]["error"]
    assert sorted(uid for kind, uid in Mailer.runs if kind == "done") == [f"s{i}" for i in range(5)]


def test_an_outbox_of_the_version_before_is_taken_over(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """An outbox file without the entries' workers: the columns are added (by whichever of several opening
    processes comes first), and what it left accepted is reported lost (asking a worker again could run it
    on another one), the rest kept."""
    path = str(tmp_path / "old.sqlite")
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.executescript(pyrorpc.outbox._SCHEMA.replace(",\n    worker TEXT,\n    sent_at REAL NOT NULL DEFAULT 0", ""))
        for i, state in enumerate(("pending", "inflight", "accepted")):
            payload = pyrorpc.codec.dumps((("x",), {}))
            db.execute("INSERT INTO entries (id, service, method, payload, created, state) "
                       "VALUES (?, 'mailer', 'mail', ?, ?, ?)", (f"e{i}", payload, time.time(), state))
    assert "worker" not in {row[1] for row in sqlite3.connect(path).execute("PRAGMA table_info(entries)")}
    with pyrorpc.Outbox(path, service="mailer", send=False), pyrorpc.Outbox(path, service="mailer", send=False):
        pass
    status = pyrorpc.outbox.outbox_status(path)
    [entry] = status["entries"]
    assert status["lost"] == 1 and entry["id"] == "e2" and "older pyrorpc" in entry["error"]
    assert status["pending"] == 2  # (the in-flight one's claim is long gone)


def test_the_journal_is_checkpointed_off_the_enqueue_path(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Commits never checkpoint the write-ahead log (its fsync stalled the enqueues of that commit); the
    outbox's checkpointer copies it into the database file within a second."""
    path = str(tmp_path / "outbox.sqlite")
    with pyrorpc.Outbox(path, service="mailer", send=False) as outbox:
        with contextlib.closing(sqlite3.connect(path)) as db:
            assert db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000  # (sqlite's default elsewhere)
        assert outbox._db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0  # (enqueue's connection)
        empty = os.path.getsize(path)
        for i in range(3000):
            outbox.enqueue("mail", (f"u{i}",))
        wait_for(lambda: os.path.getsize(path) > empty + 100_000, 5, message="the log copied into the database")
    assert pyrorpc.outbox.outbox_status(path)["pending"] == 3000


def test_outbox_keeps_failed_entries_and_status_shows_them(ns_addr: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = str(tmp_path / "outbox.sqlite")
    with pyrorpc.WorkerHost(Mailer, ns=ns_addr), pyrorpc.Pool("mailer", ns=ns_addr, outbox=path) as pool:
        pool.nosuch.enqueue(1)
        pool.mail.enqueue("a", "b", "c", "d")
        pool.fail.enqueue("z")
        pool.mail.enqueue("fine")
        _delivered(path, 10)
    assert _runs() == ["fine"]
    status = pyrorpc.outbox.outbox_status(path)
    assert status["failed"] == 3 and status["pending"] == 0
    errors = sorted(e["error"] for e in status["entries"])
    assert errors[0].startswith("AttributeError") and "nosuch" in errors[0]
    assert errors[1].startswith("TypeError")
    assert errors[2] == "ValueError: cannot mail z"
    out = subprocess.run([sys.executable, "-m", "pyrorpc", "outbox", "status", path], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    assert "failed: 3" in out.stdout and "pending: 0" in out.stdout
    assert "cannot mail z" in out.stdout and "nosuch" in out.stdout
    out = subprocess.run([sys.executable, "-m", "pyrorpc", "outbox", "status", path, "--json"], capture_output=True,
                         text=True, timeout=30)
    assert json.loads(out.stdout)["failed"] == 3
    out = subprocess.run([sys.executable, "-m", "pyrorpc", "outbox", "status", str(tmp_path / "none.sqlite")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and out.stderr.startswith("Error:")


def test_enqueue_needs_an_outbox(ns_addr: str) -> None:
    with pyrorpc.WorkerHost(Mailer, ns=ns_addr), pyrorpc.Pool("mailer", ns=ns_addr) as pool:
        with pytest.raises(pyrorpc.ConfigurationError, match="outbox"):
            pool.mail.enqueue("x")


def test_two_processes_share_an_outbox(ns_addr: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Two outboxes on one file (as two processes would): each entry is delivered once."""
    path = str(tmp_path / "outbox.sqlite")
    with pyrorpc.Outbox(path, ns=ns_addr, service="mailer") as one, \
            pyrorpc.Outbox(path, ns=ns_addr, service="mailer") as two:
        for i in range(300):
            (one if i % 2 else two).enqueue("mail", (f"s{i}",))
        with pyrorpc.WorkerHost(Mailer, ns=ns_addr):
            assert one.wait(20) and two.wait(20)
            wait_for(lambda: len(_runs()) >= 300, 5)
    assert sorted(_runs()) == sorted(f"s{i}" for i in range(300))


def test_seen_ids_are_bounded_by_count_and_age() -> None:
    from pyrorpc.acks import RUNNING, SeenIds

    seen = SeenIds(limit=3, ttl=0.2)

    def run(key: bytes) -> bool:  # accepted and ran to its end
        new = seen.accept(key)
        seen.finish(key, 0, b"# serpent utf-8 python3.2\nNone")
        return new

    assert all(run(k) for k in (b"a", b"b", b"c"))
    assert not seen.accept(b"a")  # a re-send
    assert run(b"d") and len(seen) == 3  # the oldest ("a") made room
    assert not seen.accept(b"b")
    assert run(b"a") and len(seen) == 3  # forgotten: accepted again
    time.sleep(0.25)
    assert run(b"d")  # too old to be remembered: accepted again
    assert len(seen) == 1
    # a run under way is never forgotten (its re-sends wait for it), whatever its age or the count
    assert seen.accept(b"slow")
    time.sleep(0.25)
    for k in (b"e", b"f", b"g", b"h"):
        run(k)
    assert seen.accept_or_outcome(b"slow") is RUNNING
    assert seen.join(b"slow", "waiter") is None
    assert seen.finish(b"slow", 0, b"x" * 2000) == ["waiter"]
    kept = SeenIds()
    kept.accept(b"big")
    kept.finish(b"big", 0, b"x" * 2000)
    assert kept.accept_or_outcome(b"big") == (0, b"# serpent utf-8 python3.2\nNone")  # (a big result kept as None)


def test_outbox_delivers_to_a_stock_pyro5_worker(ns_addr: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A stock Pyro5 daemon registered as a worker of the service: no acknowledgement, a plain call."""
    StockMailer.runs.clear()
    path = str(tmp_path / "outbox.sqlite")
    host, port = ns_addr.split(":")
    with Pyro5.api.Daemon(host="127.0.0.1", port=0) as daemon:
        uri = daemon.register(StockMailer, "stock.mailer")
        thread = threading.Thread(target=daemon.requestLoop, daemon=True)
        thread.start()
        try:
            with Pyro5.api.locate_ns(host, int(port)) as ns:
                ns.register("mailer.stock", uri, metadata={"pyrorpc.service:mailer"})
            with pyrorpc.Outbox(path, ns=ns_addr, service="mailer") as outbox:
                outbox.enqueue("mail", ("s1",))
                outbox.enqueue("mail", ("s2",))
                _delivered(path, 15)
            assert sorted(StockMailer.runs) == ["s1", "s2"]
            assert pyrorpc.outbox.outbox_status(path)["failed"] == 0
        finally:
            daemon.shutdown()
            thread.join(5)

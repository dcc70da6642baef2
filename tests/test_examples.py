"""Every example under examples/ run end to end as its README says, so none of them rots.

Each test starts a real name server on an ephemeral port, starts workers the way a user does
(``pyrorpc worker start worker:Class`` in the example's folder), runs the example's other programs
(``python client.py ...``) as subprocesses, and checks what they print and what the services recorded.
Readiness is read from output lines or polled, never slept for. The commands run here are also checked
to appear in the example's README.
"""

from __future__ import annotations

import ast
import collections
import concurrent.futures
import datetime
import http.client
import importlib.util
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import pyrorpc
from pyrorpc.testing import ChildProcess, NameServerProcess, WorkerProcess, wait_for

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


class Example:
    """One example folder with its own name server; everything it starts is killed at teardown."""

    def __init__(self, name: str, ns: NameServerProcess, env: dict[str, str]) -> None:
        self.name = name
        self.dir = EXAMPLES / name
        self.ns = ns.ns
        self.env = {**os.environ, "PYRORPC_NS": self.ns, "PYTHONUNBUFFERED": "1", **env}
        self.children: list[ChildProcess] = []
        self.worker_procs: list[WorkerProcess] = []
        self.readme = (self.dir / "README.md").read_text()

    def in_readme(self, *snippets: str) -> None:
        """The README shows the commands this test runs (ports and ``--ns`` aside)."""
        missing = [s for s in snippets if s not in self.readme]
        assert not missing, f"examples/{self.name}/README.md does not show {missing}"

    def workers(self, *specs: str, args: tuple[str, ...] = ()) -> list[WorkerProcess]:
        """``pyrorpc worker start SPEC --ns NS`` from the example's folder, one process per spec, started
        in parallel; returns once all are registered."""
        with concurrent.futures.ThreadPoolExecutor(len(specs)) as pool:
            futures = [pool.submit(WorkerProcess, spec, self.ns, args=args, cwd=str(self.dir), env=self.env)
                       for spec in specs]
            procs = []
            for fut in futures:
                try:
                    procs.append(fut.result())
                except Exception:
                    for f in futures:  # don't leave the others running
                        if f.exception() is None:
                            f.result().kill()
                    raise
        self.worker_procs += procs
        return procs

    def start(self, *argv: str, ready: str | None = None,
              timeout: float = 15.0) -> tuple[ChildProcess, re.Match[str] | None]:
        """``python ARGV...`` in the background from the example's folder; waits for a ``ready`` line."""
        child = ChildProcess([sys.executable, *argv], env=self.env, cwd=self.dir)
        self.children.append(child)
        return child, (child.expect(ready, timeout) if ready else None)

    def run(self, *argv: str, timeout: float = 45.0) -> str:
        """``python ARGV...`` from the example's folder to completion; its stdout (it must exit 0)."""
        proc = subprocess.run([sys.executable, *argv], cwd=self.dir, env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        assert proc.returncode == 0, f"{argv} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    def pool(self, service: str) -> pyrorpc.Pool:
        return pyrorpc.Pool(service, ns=self.ns, timeout=10)

    def close(self) -> None:
        for child in self.children:
            child.stop(signal.SIGKILL)
        for proc in self.worker_procs:
            proc.kill()


@pytest.fixture
def example(nameserver: Any) -> Iterator[Any]:
    """Factory: ``example("web_offload", ENV_VAR="x")`` -> an Example with its own name server."""
    made: list[Example] = []

    def factory(name: str, **env: str) -> Example:
        ex = Example(name, nameserver(lease_ttl=3), env)
        made.append(ex)
        return ex

    yield factory
    for ex in made:
        ex.close()


def load_module(path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(f"example_{path.parent.name}_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# 1. web_offload ----------------------------------------------------------------------------------------

def test_web_offload(example: Any, tmp_path: Path) -> None:
    outbox = tmp_path / "outbox.sqlite"
    ex = example("web_offload", MAILER_OUTBOX=str(outbox))
    ex.in_readme("pyrorpc worker start worker:Mailer", "python app.py --port 8000",
                 "python client.py --url http://127.0.0.1:8000 --requests 20", "pyrorpc outbox status outbox.sqlite")
    ex.workers("worker:Mailer")
    _app, ready = ex.start("app.py", "--port", "0", ready=r"sign-up app on (http://[\d.:]+)/")
    assert ready is not None
    requests = 8
    out = ex.run("client.py", "--url", ready.group(1), "--requests", str(requests))

    medians = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(inline|offload)\s.*median\s+([\d.]+) ms",
                                                                   out, re.M)}
    assert set(medians) == {"inline", "offload"}, out
    # a behaviour check, not a benchmark: the handler that hands the mail off does not wait 200-500 ms
    assert medians["inline"] >= 200, out
    assert medians["inline"] >= 5 * medians["offload"], out
    assert f"mailer: {requests}/{requests} offloaded welcome mails sent" in out

    # ask the mailer ourselves: every offloaded sign-up (and the warm-up) got its mail, the inline ones
    # were sent by the web handler itself
    with ex.pool("mailer") as mailer:
        sent = [a for r in mailer.sent.broadcast().values() for a in r]
    assert len([a for a in sent if "-offload-" in a]) == requests + 1
    assert not [a for a in sent if "-inline-" in a]
    assert len(sent) == len(set(sent))

    # ...through the outbox, which is empty once they went out
    def outbox_empty() -> str | None:
        out = subprocess.run([sys.executable, "-m", "pyrorpc", "outbox", "status", str(outbox)], env=ex.env,
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return out.stdout if out.stdout.startswith("pending: 0  in-flight: 0  accepted: 0  unconfirmed: 0  "
                                                   "failed: 0  lost: 0") else None
    wait_for(outbox_empty, 10, message="an empty outbox")


def _sign_up_burst(url: str, emails: list[str], acknowledged: list[str], threads: int = 8) -> list[threading.Thread]:
    """POST ``/signup`` for every address from ``threads`` threads (started, returned), appending to
    ``acknowledged`` each address whose request was answered 200; a thread stops at its first failed request
    (the app was killed)."""
    todo = iter(emails)
    lock = threading.Lock()
    parsed = urllib.parse.urlsplit(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port

    def sign_up() -> None:
        while True:
            with lock:
                email = next(todo, None)
            if email is None:
                return
            try:
                conn = http.client.HTTPConnection(host, port, timeout=10)
                try:
                    conn.request("POST", "/signup", urllib.parse.urlencode({"email": email}),
                                 {"Content-Type": "application/x-www-form-urlencoded"})
                    resp = conn.getresponse()
                    body = resp.read()
                finally:
                    conn.close()
            except (OSError, http.client.HTTPException):
                return
            if resp.status == 200 and body.endswith(b"}") and json.loads(body)["email"] == email:
                with lock:
                    acknowledged.append(email)

    started = [threading.Thread(target=sign_up, daemon=True) for _ in range(threads)]
    for thread in started:
        thread.start()
    return started


def _mails_sent(log: Path) -> list[str]:
    """The addresses in the mailers' shared journal (``ADDRESS PID`` lines), one per mail sent."""
    lines = log.read_text().split("\n")[:-1] if log.exists() else []  # (not a line still being written)
    return [line.split()[0] for line in lines]


@pytest.mark.parametrize("mailers", ["during-burst", "after-crash"])
def test_web_offload_app_killed_mid_burst_loses_no_mail(example: Any, tmp_path: Path, mailers: str) -> None:
    """The web app is SIGKILLed while a burst of sign-ups comes in (mailers running, or none until after the
    crash); started again on the same outbox, it sends what is left: every sign-up the app answered 200 gets
    its welcome mail exactly once, and no mail goes out twice."""
    outbox, log = tmp_path / "outbox.sqlite", tmp_path / "sent.log"
    ex = example("web_offload", MAILER_OUTBOX=str(outbox), MAILER_LOG=str(log), MAIL_DELAY="0.01-0.05")
    ex.in_readme("pyrorpc outbox status outbox.sqlite", "kill -9 $APP")
    if mailers == "during-burst":
        ex.workers("worker:Mailer", "worker:Mailer")  # (a re-send must reach the mailer that had it, not the other)
    app, ready = ex.start("app.py", "--port", "0", ready=r"sign-up app on (http://[\d.:]+)/")
    assert ready is not None
    emails = [f"burst{i}@example.com" for i in range(600)]
    acknowledged: list[str] = []
    threads = _sign_up_burst(ready.group(1), emails, acknowledged)
    wait_for(lambda: len(acknowledged) >= 200, 20, message="200 sign-ups answered")
    app.kill()
    for thread in threads:
        thread.join(15)
    answered = list(acknowledged)
    assert 200 <= len(answered) < len(emails)  # cut off mid-burst
    left = pyrorpc.outbox.outbox_status(outbox)
    assert left["pending"] + left["in_flight"] > 0, left  # the crash left mails for the next app to send
    if mailers == "during-burst":
        assert _mails_sent(log), "no mail went out during the burst"
    else:
        assert not log.exists()

    _app, ready = ex.start("app.py", "--port", "0", ready=r"outbox .*: (\d+) mail\(s\) waiting from before")
    assert ready is not None and int(ready.group(1)) > 0
    if mailers == "after-crash":
        ex.workers("worker:Mailer", "worker:Mailer")

    def all_sent() -> bool:
        status = pyrorpc.outbox.outbox_status(outbox)
        return not (status["pending"] or status["in_flight"] or status["accepted"]) \
            and set(answered) <= set(_mails_sent(log))
    try:
        wait_for(all_sent, 20)
    except TimeoutError:
        missing = sorted(set(answered) - set(_mails_sent(log)))
        status = pyrorpc.outbox.outbox_status(outbox)
        pytest.fail(f"{len(missing)} of {len(answered)} answered sign-ups got no mail (e.g. {missing[:3]}); "
                    f"outbox: { {k: v for k, v in status.items() if k != 'entries'} }")
    sent = collections.Counter(_mails_sent(log))
    twice = sorted(a for a, n in sent.items() if n > 1)
    assert not twice, f"{len(twice)} mails sent twice, e.g. {twice[:5]}"
    assert set(answered) <= set(sent)  # (and the unanswered ones that made it into the outbox before the kill)
    assert set(sent) <= set(emails)
    status = pyrorpc.outbox.outbox_status(outbox)
    assert status["failed"] == 0 and status["lost"] == 0, status


# 2. thumbnails -----------------------------------------------------------------------------------------

def test_thumbnails(example: Any, tmp_path: Path) -> None:
    image = pytest.importorskip("PIL.Image")
    ex = example("thumbnails")
    ex.in_readme("pyrorpc worker start worker:Thumbnailer --processes 2", "python client.py --images 48 --size 128")
    w1, w2 = ex.workers("worker:Thumbnailer", "worker:Thumbnailer")
    out_dir = tmp_path / "thumbs"
    out = ex.run("client.py", "--images", "30", "--size", "96", "--out", str(out_dir))

    assert "checked: 30/30 thumbnails fit 96x96" in out, out
    per_worker = re.search(r"per worker pid: (\{.*\})", out)
    assert per_worker, out
    counts = ast.literal_eval(per_worker.group(1))
    assert set(counts) == {w1.worker_pid, w2.worker_pid}, out  # the map was spread over both workers
    assert sum(counts.values()) == 30
    files = sorted(out_dir.glob("thumb-*.jpg"))
    assert len(files) == 30
    for path in files[:5]:
        with image.open(path) as img:
            assert max(img.size) == 96 and img.format == "JPEG"


# 3. crawler --------------------------------------------------------------------------------------------

def test_crawler(example: Any, tmp_path: Path) -> None:
    ex = example("crawler")
    ex.in_readme("python website.py --port 8001", "pyrorpc worker start worker:Crawler --processes 2",
                 "python client.py http://127.0.0.1:8001/")
    website = load_module(ex.dir / "website.py")
    _site, ready = ex.start("website.py", "--port", "0", ready=r"serving \d+ pages on (http://[\d.:]+)/")
    assert ready is not None
    root = ready.group(1)
    ex.workers("worker:Crawler", "worker:Crawler")
    out = ex.run("client.py", root + "/", "--out", str(tmp_path / "pages.json"))

    pages = {p["url"]: p for p in json.loads((tmp_path / "pages.json").read_text())}
    expected_ok = {root + path for path in website.PAGES}
    assert {u for u, p in pages.items() if p["status"] == 200} == expected_ok
    assert {u for u, p in pages.items() if p["status"] != 200} == {root + path for path in website.BROKEN}
    assert all(pages[root + path]["title"] == title for path, (title, _links) in website.PAGES.items())
    assert not [u for u in pages if not u.startswith(root)]  # never left the local site
    assert len({p["worker"] for p in pages.values()}) == 2, out  # fetched by both workers
    n = len(website.PAGES) + len(website.BROKEN)
    assert f"crawled {n} pages" in out and f"{len(website.PAGES)} ok, {len(website.BROKEN)} broken" in out, out
    assert f"{len(website.EXTERNAL)} external link(s) not followed" in out, out


# 4. scheduled ------------------------------------------------------------------------------------------

def test_scheduled_one_leader_fires_and_the_other_takes_over(example: Any, tmp_path: Path) -> None:
    pytest.importorskip("croniter")
    ex = example("scheduled", NEWSLETTER_DB=str(tmp_path / "newsletter.sqlite"))
    ex.in_readme("pyrorpc worker start worker:Newsletter", '--cron "* * * * * *" --id sched-a --lock-ttl 2',
                 '--cron "* * * * * *" --id sched-b --lock-ttl 2')
    ex.workers("worker:Newsletter")
    every_second = ("--cron", "* * * * * *", "--lock-ttl", "2")
    a, _ = ex.start("client.py", *every_second, "--id", "sched-a", ready=r"\[sched-a\] leader")
    b, _ = ex.start("client.py", *every_second, "--id", "sched-b", ready=r"\[sched-b\] standby")

    with ex.pool("newsletter") as newsletter:
        def fired_by(owner: str) -> list[dict[str, Any]]:
            return [h for h in newsletter.history() if h["scheduler"] == owner]

        wait_for(lambda: len(fired_by("sched-a")) >= 3, 10, message="three ticks fired by the leader")
        assert not fired_by("sched-b"), "the standby scheduler fired while the leader was alive"
        a.stop(signal.SIGKILL)  # the leader dies without releasing its lock
        wait_for(lambda: len(fired_by("sched-b")) >= 2, 15, message="the standby took over")
        b.expect(r"\[sched-b\] leader")
        assert b.stop(signal.SIGTERM) == 0
        assert "[sched-b] released lock 'scheduler.newsletter'" in b.output
        history = newsletter.history()

    editions = [h["edition"] for h in history]
    assert len(editions) == len(set(editions)), f"an edition was fired twice: {history}"
    # one leader at a time: all of a's editions, then all of b's
    owners = [h["scheduler"] for h in sorted(history, key=lambda h: h["edition"])]
    assert owners == sorted(owners), history
    # and no tick lost in the takeover: b caught up what a's lock covered after a died
    ticks = sorted(datetime.datetime.strptime(e, "%Y-%m-%dT%H:%M:%SZ") for e in editions)
    gaps = [(t1, t2) for t1, t2 in zip(ticks, ticks[1:], strict=False) if (t2 - t1).total_seconds() != 1]
    assert not gaps, f"ticks missing between {gaps}:\n{a.output}\n{b.output}"


# 5. workflow -------------------------------------------------------------------------------------------

def test_workflow_survives_a_killed_middle_worker(example: Any, tmp_path: Path) -> None:
    db = tmp_path / "store.sqlite"
    ex = example("workflow", WORKFLOW_DB=str(db), WORKFLOW_STAGE_SECONDS="0.1")
    ex.in_readme("pyrorpc worker start worker:Resizer --processes 2",
                 "pyrorpc worker start worker:Watermarker --processes 2",
                 "pyrorpc worker start worker:Store --processes 2", "python client.py --items 40")
    procs = ex.workers(*["worker:Resizer", "worker:Watermarker", "worker:Store"] * 2)
    watermarkers = [p for p in procs if p.service == "watermark"]
    items = 40
    client, _ = ex.start("client.py", "--items", str(items), "--batch", "t")

    def watermarked_by(item: dict[str, Any]) -> int:
        return int(item["steps"][1].split("@")[1])

    with ex.pool("store") as store:
        def eight_stored() -> list[dict[str, Any]] | None:
            got = store.items()
            return got if len(got) >= 8 else None

        stored = wait_for(eight_stored, 20, message="the pipeline is running")
        # kill a watermark worker that has been doing its share: it has more calls queued
        busy = {watermarked_by(item) for item in stored}
        victim = next(p for p in watermarkers if p.worker_pid in busy)
        survivor = next(p for p in watermarkers if p is not victim)
        victim.kill()  # SIGKILL, mid-run: the calls it had in flight are lost with it
        stored_at_kill = store.summary()["items"]
    assert stored_at_kill < items, "the run was over before the kill"

    assert client.wait(45) == 0, client.output
    assert (f"store holds {items}/{items} items, one copy each, with one resize, one watermark and one store step; "
            "0 wrong") in client.output

    with sqlite3.connect(db) as conn:
        rows = [json.loads(r[0]) for r in conn.execute("SELECT item FROM items WHERE id LIKE 't-%'")]
    assert sorted(r["id"] for r in rows) == [f"t-{i:04d}" for i in range(items)]  # each once (primary key)
    for row in rows:
        assert [s.split("@")[0] for s in row["steps"]] == ["resize", "watermark", "store"], row
        assert max(row["width"], row["height"]) == 256 and row["watermark"] == "(c) pyrorpc"
    pids = {watermarked_by(r) for r in rows}
    assert pids == {victim.worker_pid, survivor.worker_pid}


# 6. callbacks ------------------------------------------------------------------------------------------

def test_callbacks(example: Any) -> None:
    ex = example("callbacks", JOBS_STEP_SECONDS="0.05")
    ex.in_readme("pyrorpc worker start worker:Jobs", "python client.py --steps 5")
    (worker,) = ex.workers("worker:Jobs")
    out = ex.run("client.py", "--steps", "4")

    lines = out.splitlines()
    for job in ("report-1", "report-2"):
        progress = [int(m.group(1)) for line in lines if (m := re.search(rf"\[{job}\] #* *(\d+)%", line))]
        assert progress == [25, 50, 75, 100], out
        assert f"on pid {worker.worker_pid}" in out
    assert "result: {'job': 'report-1', 'steps': 4" in out
    # the oneway start() returned before any of its progress arrived, and done() brought the result
    assert lines.index("  start() returned; waiting for done()") < next(
        i for i, line in enumerate(lines) if "[report-2]" in line), out
    assert "done: {'job': 'report-2', 'steps': 4" in out


# 7. quotes ---------------------------------------------------------------------------------------------

def test_quotes_async_calls_streams_and_call_context(example: Any) -> None:
    ex = example("quotes", QUOTES_DELAY="0.5")
    ex.in_readme("pyrorpc worker start worker:Quotes --threads 4", "python client.py --quotes 2000 --days 1000000")
    ex.workers("worker:Quotes", args=("--threads", "4"))
    out = ex.run("client.py", "--quotes", "2000", "--days", "200000")

    quotes = re.search(r"^2000 quotes awaited at once in ([\d.]+) s .*; 2000 carried request id ([0-9a-f]{8})$",
                       out, re.M)
    assert quotes, out
    # 2,000 calls of a 0.5 s async method on one worker with 4 threads: about one delay, not 2,000 / 4 of them
    assert 0.5 <= float(quotes.group(1)) < 5, out
    left = re.search(r"^the worker saw each call's deadline: ([\d.]+)-([\d.]+) s of 30 s left$", out, re.M)
    assert left and 0 < float(left.group(1)) <= float(left.group(2)) < 30, out
    assert re.search(r"^200000 history rows streamed in [\d.]+ s \([\d,]+ rows/s\); last day 199999$", out, re.M), out
    assert "stopped a stream after 10 rows" in out.splitlines(), out
    assert "20 ticks streamed in order: True" in out.splitlines(), out
    with ex.pool("quotes") as quotes_pool:  # the stream stopped early was closed on the worker (its finally ran)
        wait_for(lambda: quotes_pool.open_streams() == 0, 5, message="the worker closed every history stream")

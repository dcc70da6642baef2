"""Supervisor and worker process hardening (issue 10, items 11 and 12), with real processes.

11. Children of ``worker start --processes N`` drain and exit when their supervisor is SIGKILLed: through the
    parent-death signal (Linux) and through the supervisor's pipe (everywhere), each proven on its own.
12. A class whose ``__init__`` raises: one ``Error:`` line per failure, the supervisor gives up after repeated
    fast failures (``--max-restarts`` / ``--restart-window``) and exits non-zero, also on SIGTERM.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

import pyrorpc
from pyrorpc.supervisor import Supervisor
from pyrorpc.testing import ChildProcess, wait_for

pytestmark = pytest.mark.timeout(60)

LINUX = sys.platform.startswith("linux")
BROKEN_LINE = "Error: cannot start services:Broken: RuntimeError: broken on purpose"
SERVING = re.compile(r"^worker (\S+) serving \S+ on \S+ \(pid (\d+)\)")


# helpers ---------------------------------------------------------------------------------------------

def pyrorpc_env() -> dict[str, str]:
    return {**os.environ, "PYRORPC_CONNECT_TIMEOUT": "3", "PYTHONUNBUFFERED": "1"}


def live_workers(ns: str, service: str = "calc") -> list[pyrorpc.WorkerInfo]:
    return pyrorpc.NameServerClient(pyrorpc.Settings(ns=ns, connect_timeout=3)).service_workers(service)


def running(pid: int) -> bool:
    """True while ``pid`` runs (an exited orphan that nobody reaped yet, a zombie, does not count)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return not LINUX


def group_members(pgid: int) -> list[int]:
    """Running processes of process group ``pgid`` (Linux /proc; elsewhere an empty list)."""
    found = []
    for entry in os.listdir("/proc") if LINUX else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                found.append(int(entry))
    return found


class Spawned(ChildProcess):
    """``python -m pyrorpc ARGS`` in a session of its own (so the whole tree can be SIGKILLed); with
    ``backoff_cli`` the same command through FAST_BACKOFF_CLI."""

    def __init__(self, args: Sequence[str], *, backoff_cli: bool = False) -> None:
        command = ["-c", FAST_BACKOFF_CLI] if backoff_cli else ["-m", "pyrorpc"]
        super().__init__([sys.executable, *command, *args], env=pyrorpc_env())


@pytest.fixture
def spawn() -> Iterator[Callable[..., Spawned]]:
    made: list[Spawned] = []

    def factory(*args: str, backoff_cli: bool = False) -> Spawned:
        s = Spawned(args, backoff_cli=backoff_cli)
        made.append(s)
        return s

    yield factory
    for s in made:
        s.kill()  # the whole session: the supervisor and every worker it started
        print(f"--- output of pyrorpc {' '.join(s.argv[3:])}:\n{s.output}")  # shown if the test failed


class Piped:
    """A process started with ``pass_fds`` (ChildProcess cannot pass descriptors); output read in a thread."""

    def __init__(self, argv: Sequence[str], pass_fds: Sequence[int]) -> None:
        self.proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=pyrorpc_env(),
                                     pass_fds=tuple(pass_fds), start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def line(self, pattern: re.Pattern[str], timeout: float = 15.0) -> re.Match[str]:
        def found() -> re.Match[str] | None:
            assert self.proc.poll() is None or any(pattern.search(x) for x in self.lines), \
                f"exited ({self.proc.returncode}) first:\n{self.output}"
            return next((m for m in map(pattern.search, list(self.lines)) if m), None)
        return wait_for(found, timeout=timeout, message=f"{pattern.pattern!r} printed")

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self._reader.join(5)


@pytest.fixture
def piped() -> Iterator[Callable[..., Piped]]:
    made: list[Piped] = []

    def factory(argv: Sequence[str], pass_fds: Sequence[int]) -> Piped:
        p = Piped(argv, pass_fds)
        made.append(p)
        return p

    yield factory
    for p in made:
        p.kill()
        print(f"--- output of {p.proc.args}:\n{p.output}")


def worker_argv(ns: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pyrorpc", "worker", "start", "services:Calculator", "--ns", ns, *extra]


# 11. children die with their supervisor -----------------------------------------------------------------

def test_supervisor_sigkill_children_finish_calls_deregister_and_exit(ns_addr: str,
                                                                      spawn: Callable[..., Spawned]) -> None:
    sup = spawn("worker", "start", "services:Calculator", "--processes", "2", "--ns", ns_addr,
                "--drain-timeout", "10")

    def two_workers() -> list[pyrorpc.WorkerInfo] | None:
        assert sup.alive(), f"supervisor exited:\n{sup.output}"
        found = live_workers(ns_addr)
        return found if len(found) == 2 else None

    workers = wait_for(two_workers, timeout=15, interval=0.1, message="2 supervised workers registered")
    busy = workers[0]
    proxy = pyrorpc.connect(busy.name, ns=ns_addr, timeout=20)
    try:
        call = proxy.slow.future(3)
        # the lease report (every TTL/3 = 1 s) shows the call once the worker has read it
        wait_for(lambda: any(w.in_flight for w in live_workers(ns_addr) if w.name == busy.name), timeout=10,
                 interval=0.05, message="the slow call in flight on the worker")
        os.kill(sup.pid, signal.SIGKILL)
        assert sup.wait(10) == -signal.SIGKILL

        # nobody reaps the orphans here, so "exited" means gone or a zombie
        try:
            wait_for(lambda: not any(running(w.pid) for w in workers), timeout=10, interval=0.05)
        except TimeoutError:
            pytest.fail(f"children {[w.pid for w in workers]} still running 10 s after their supervisor was "
                        f"SIGKILLed; registered: {[w.name for w in live_workers(ns_addr)]}")
        assert call.result(timeout=10) == busy.pid  # the call in flight was finished, not cut off
    finally:
        proxy.close()
    assert live_workers(ns_addr) == []
    wait_for(lambda: all(f"worker {w.name} stopped" in sup.output for w in workers), timeout=5,
             message="each child drained and said so")  # stop(): deregister, drain, then this line
    assert "drain timeout" not in sup.output and "Traceback" not in sup.output, sup.output
    assert group_members(sup.pid) == []


def test_worker_drains_and_exits_when_supervisor_pipe_closes(ns_addr: str, piped: Callable[..., Piped]) -> None:
    """The portable fallback alone: this test process (the parent) stays alive, only the pipe closes."""
    read_end, write_end = os.pipe()
    try:
        child = piped(worker_argv(ns_addr, "--parent-fd", str(read_end)), pass_fds=[read_end])
    finally:
        os.close(read_end)
    try:
        name = child.line(SERVING).group(1)
        assert [w.name for w in live_workers(ns_addr)] == [name]
    finally:
        os.close(write_end)
    assert child.proc.wait(15) == 0, child.output
    child._reader.join(5)
    assert f"worker {name} stopped" in child.output and "Traceback" not in child.output, child.output
    assert live_workers(ns_addr) == []


@pytest.mark.skipif(not LINUX, reason="PR_SET_PDEATHSIG is Linux only")
def test_worker_drains_and_exits_on_parent_death_signal(ns_addr: str, piped: Callable[..., Piped]) -> None:
    """The Linux parent-death signal alone: the parent is SIGKILLed while this test keeps the pipe open."""
    read_end, write_end = os.pipe()
    parent_code = ("import subprocess, sys; fd = int(sys.argv[1]); "
                   "subprocess.Popen(sys.argv[2:], pass_fds=[fd]); import signal; signal.pause()")
    try:
        parent = piped([sys.executable, "-c", parent_code, str(read_end),
                        *worker_argv(ns_addr, "--parent-fd", str(read_end))], pass_fds=[read_end])
        os.close(read_end)
        match = parent.line(SERVING)
        name, pid = match.group(1), int(match.group(2))
        os.kill(parent.proc.pid, signal.SIGKILL)  # only the parent: the worker must notice by itself
        assert parent.proc.wait(10) == -signal.SIGKILL
        try:
            wait_for(lambda: not running(pid), timeout=10, interval=0.05)
        except TimeoutError:
            pytest.fail(f"worker {pid} still running 10 s after its parent was SIGKILLed:\n{parent.output}")
        parent._reader.join(5)
        assert f"worker {name} stopped" in parent.output and "Traceback" not in parent.output, parent.output
        assert live_workers(ns_addr) == []
    finally:
        os.close(write_end)


# 12. a class that cannot be instantiated ----------------------------------------------------------------

def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if "Error" in line or "broken on purpose" in line]


def test_broken_class_single_process_exits_at_once_with_one_error_line(ns_addr: str) -> None:
    result = subprocess.run([sys.executable, "-m", "pyrorpc", "worker", "start", "services:Broken", "--ns", ns_addr],
                            capture_output=True, text=True, timeout=30, env=pyrorpc_env())
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.splitlines() == [BROKEN_LINE], result.stderr
    assert result.stdout == ""
    assert live_workers(ns_addr, "broken") == []


# ``python -m pyrorpc ARGS`` with the supervisor's restart backoff at 0.1 s instead of its default 0.5 s doubling
# up to 8 s (15.5 s of waiting before the sixth exit): the CLI has no option for it, so the child swaps in a
# Supervisor with that one keyword set; everything else (the CLI's restart budget, the workers) is the real one
FAST_BACKOFF_CLI = ("import functools, sys\n"
                    "import pyrorpc.supervisor\n"
                    "pyrorpc.supervisor.Supervisor = functools.partial(pyrorpc.supervisor.Supervisor, backoff=0.1,\n"
                    "                                                   max_backoff=0.1)\n"
                    "from pyrorpc.cli import main\n"
                    "main(sys.argv[1:], prog_name='pyrorpc')\n")


def test_broken_class_supervisor_gives_up_after_repeated_fast_failures(ns_addr: str,
                                                                       spawn: Callable[..., Spawned]) -> None:
    """Defaults: more than 5 restarts within 60 s -> one final Error line, exit 1."""
    sup = spawn("worker", "start", "services:Broken", "--processes", "2", "--ns", ns_addr, backoff_cli=True)
    try:
        status = sup.wait(40)
    except subprocess.TimeoutExpired:
        pytest.fail("the supervisor kept restarting a worker that cannot start:\n"
                    + "\n".join(sup.lines[-12:]))
    assert status == 1, sup.output
    assert "Traceback" not in sup.output, sup.output
    delays = re.findall(r"restarting in (\S+)s$", sup.output, re.M)
    assert delays and set(delays) == {"0.1"}, sup.output  # the short backoff was the one used
    lines = error_lines(sup.output)
    child_lines = [line for line in lines if line != lines[-1]]
    # one whole line per failed child (no interleaving), at least the 6 that used up the budget
    assert len(child_lines) >= 6 and set(child_lines) == {BROKEN_LINE}, sup.output
    assert re.fullmatch(r"Error: worker [01] exited 6 times within 60s \(--max-restarts 5, "
                        r"--restart-window 60\); giving up", lines[-1]), lines[-1]
    assert group_members(sup.pid) == []


def test_default_backoff_lets_the_default_budget_run_out() -> None:
    """The default backoff (doubling from ``backoff`` up to ``max_backoff``) spaces the restarts that use up
    the default budget well within the default window, so a class that cannot start is given up on (the
    test above runs the CLI's defaults with a shorter backoff)."""
    sup = Supervisor(["true"], 1)
    waited = sum(min(sup.max_backoff, sup.backoff * 2 ** k) for k in range(sup.max_restarts))
    assert (sup.max_restarts, sup.restart_window) == (5, 60)
    assert waited <= sup.restart_window / 2, waited


def test_max_restarts_and_restart_window_options(ns_addr: str, spawn: Callable[..., Spawned]) -> None:
    sup = spawn("worker", "start", "services:Broken", "--processes", "2", "--ns", ns_addr,
                "--max-restarts", "1", "--restart-window", "30", backoff_cli=True)
    assert sup.wait(30) == 1, sup.output
    assert re.fullmatch(r"Error: worker [01] exited 2 times within 30s \(--max-restarts 1, "
                        r"--restart-window 30\); giving up", sup.output.splitlines()[-1]), sup.output
    assert "Traceback" not in sup.output


def test_sigterm_while_crash_looping_exits_non_zero(ns_addr: str, spawn: Callable[..., Spawned]) -> None:
    sup = spawn("worker", "start", "services:Broken", "--processes", "2", "--ns", ns_addr,
                "--max-restarts", "1000")
    wait_for(lambda: sup.output.count(BROKEN_LINE) >= 2 or not sup.alive(), timeout=15,
             message="two failed starts")
    assert sup.alive(), sup.output
    sup.signal(signal.SIGTERM)
    assert sup.wait(15) == 1, sup.output
    assert "Traceback" not in sup.output


def test_restart_budget_counts_only_failures_inside_the_window() -> None:
    """Supervisor API, tiny real processes that exit 3 at once."""
    argv = [sys.executable, "-c", "raise SystemExit(3)"]
    quiet: list[str] = []
    fast = Supervisor(argv, 1, max_restarts=2, restart_window=60, backoff=0.01, echo=quiet.append)
    assert fast.run(handle_signals=False) == 1
    assert fast.failure is not None and "3 times within 60s" in fast.failure
    assert fast.restarts == 2

    # failures at least `backoff` (0.2 s) apart never fill a 0.1 s window: restarted, not given up
    slow = Supervisor(argv, 1, max_restarts=1, restart_window=0.1, backoff=0.2, max_backoff=0.2,
                      echo=quiet.append)
    result: list[int] = []
    runner = threading.Thread(target=lambda: result.append(slow.run(handle_signals=False)))
    runner.start()
    try:
        wait_for(lambda: slow.restarts >= 3 or not runner.is_alive(), timeout=15, message="3 restarts")
        assert runner.is_alive() and slow.failure is None, quiet
    finally:
        slow.stop()
        runner.join(15)
    assert not runner.is_alive()


@pytest.mark.parametrize("kwargs, name", [({"max_restarts": -1}, "max_restarts"),
                                          ({"restart_window": 0}, "restart_window")])
def test_supervisor_options_checked_up_front(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        Supervisor(["true"], 1, **kwargs)


def test_worker_start_help_documents_restart_budget() -> None:
    result = subprocess.run([sys.executable, "-m", "pyrorpc", "worker", "start", "--help"], capture_output=True,
                            text=True, timeout=30, env=pyrorpc_env())
    text = " ".join(result.stdout.split())
    assert result.returncode == 0 and "--max-restarts" in text and "--restart-window" in text, result.stdout
    assert "supervisor" in text.lower() and "exits 1" in text


def test_a_short_outage_every_process_trips_over_once_is_ridden_out(tmp_path) -> None:
    """Six processes that each fail once (say the name server is still starting): the budget is per
    process, so the supervisor restarts them instead of giving up at the sixth exit of the fleet."""
    marker = tmp_path / "name-server-is-up"
    argv = [sys.executable, "-c",
            "import os, sys, time\n"
            "if not os.path.exists(sys.argv[1]): sys.exit(1)\n"
            "time.sleep(60)\n", str(marker)]
    lines: list[str] = []
    sup = Supervisor(argv, 6, max_restarts=2, restart_window=60, backoff=0.3, max_backoff=0.3,
                     echo=lines.append)
    result: list[int] = []
    runner = threading.Thread(target=lambda: result.append(sup.run(handle_signals=False)))
    runner.start()
    try:
        wait_for(lambda: sum("exited with 1" in line for line in lines) >= 6, timeout=20,
                 message="every process failed once")
        marker.write_text("up")
        wait_for(lambda: sup.restarts >= 6 and all(c.proc is not None and c.proc.poll() is None
                                                     for c in sup.children), timeout=20,
                 message="all six restarted and running")
        assert sup.failure is None and runner.is_alive()
    finally:
        sup.stop()
        runner.join(30)
    assert not runner.is_alive()

"""Supervisor: runs N worker processes, restarts crashed ones with backoff, passes SIGTERM on.

Children never outlive it: each gets the read end of a pipe whose only write end the supervisor holds, so
its death (even SIGKILL) is an end-of-file the child sees (``watch_parent``), and on Linux also a SIGTERM
from the kernel (``set_parent_death_signal``); either way the child drains as on SIGTERM.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["PARENT_FD_OPTION", "Supervisor", "set_parent_death_signal", "watch_parent"]

log = logging.getLogger("pyrorpc.supervisor")

PARENT_FD_OPTION = "--parent-fd"  # how a child learns the descriptor of its supervisor's pipe


class _Child:
    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.failures = 0
        self.next_start = 0.0
        self.last_code: int | None = None
        self.exits: collections.deque[float] = collections.deque()  # within the restart window


class Supervisor:
    """Keeps ``processes`` copies of ``argv`` running until told to stop.

    A child that exits while the supervisor is running is restarted after a backoff that doubles on
    each quick failure (``backoff`` .. ``max_backoff`` seconds) and resets once a child has run for
    ``healthy_after`` seconds. When one child exits more than ``max_restarts`` times within
    ``restart_window`` seconds (counted per process, so a short outage every child trips over once, say a
    name server still starting, is ridden out whatever the number of processes), the supervisor gives up:
    ``failure`` says why, the other children are stopped and ``run()`` returns 1. ``stop()`` (SIGTERM/SIGINT
    inside ``run()``) sends SIGTERM to every child and waits ``grace`` seconds for them to drain before
    SIGKILL.

    On POSIX each child gets ``--parent-fd FD`` appended to ``argv``: the read end of a pipe that reaches
    end-of-file when the supervisor dies, whatever kills it. Each child's environment has
    ``PYRORPC_WORKER_SLOT``, its index 0..processes-1 (kept across restarts). With ``heartbeats`` (the
    workers' ``pyrorpc.Settings``) the children's lease renewals come to the supervisor over a pipe each and
    go to the name server together, one request per period (``pyrorpc.heartbeats``).

    Raises:
        ValueError: a bad ``processes``, ``max_restarts`` or ``restart_window``.
    """

    def __init__(self, argv: Sequence[str], processes: int, *, grace: float = 30.0, backoff: float = 0.5,
                 max_backoff: float = 30.0, healthy_after: float = 30.0, max_restarts: int = 5,
                 restart_window: float = 60.0, env: dict[str, str] | None = None,
                 echo: Callable[[str], None] = print, heartbeats: Any = None) -> None:
        if processes < 1:
            raise ValueError(f"`processes` must be >= 1, got {processes}")
        if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
            raise ValueError(f"`max_restarts` must be an integer >= 0, got {max_restarts!r}")
        if isinstance(restart_window, bool) or not isinstance(restart_window, (int, float)) \
                or not restart_window > 0:
            raise ValueError(f"`restart_window` must be > 0 seconds, got {restart_window!r}")
        self.argv = list(argv)
        self.env = env
        self.children = [_Child(i) for i in range(processes)]
        self.grace = grace
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.healthy_after = healthy_after
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self.echo = echo
        self.restarts = 0
        self.failure: str | None = None  # why run() gave up, if it did
        self._stop = threading.Event()
        self._lifeline: int | None = None  # read end handed to every child; the write end dies with us
        self.heartbeats_settings = heartbeats  # pyrorpc.Settings: renew the children's leases together
        self.heartbeats: Any = None  # pyrorpc.heartbeats.SharedHeartbeats while running

    def _spawn(self, child: _Child) -> None:
        # its slot, 0..processes-1, the same when it is restarted (e.g. for a port of its own: --metrics-port)
        env = dict(self.env if self.env is not None else os.environ, PYRORPC_WORKER_SLOT=str(child.slot))
        beat_fd = None
        if self.heartbeats is not None:
            beat_fd, beat_env = self.heartbeats.open_pipe()
            env.update(beat_env)
        try:
            if self._lifeline is None:
                child.proc = subprocess.Popen(self.argv, env=env)
            else:
                child.proc = subprocess.Popen(self.argv + [PARENT_FD_OPTION, str(self._lifeline)], env=env,
                                              pass_fds=(self._lifeline,) if beat_fd is None
                                              else (self._lifeline, beat_fd))
        finally:
            if beat_fd is not None:
                self.heartbeats.child_started(beat_fd)  # (our copy of its end goes: its exit is an EOF there)
        child.started = time.monotonic()

    def pids(self) -> list[int]:
        return [c.proc.pid for c in self.children if c.proc is not None and c.proc.poll() is None]

    def run(self, *, handle_signals: bool = True) -> int:
        """Supervise until stopped; returns 0 when every child drained and exited cleanly, 1 otherwise
        (also when it gave up on children that keep failing: see ``failure``)."""
        previous: dict[int, Any] = {}
        if handle_signals:
            def on_signal(_signo: int, _frame: Any) -> None:
                self._stop.set()
            for signo in (signal.SIGTERM, signal.SIGINT):
                previous[signo] = signal.signal(signo, on_signal)
        write_end = None
        if os.name == "posix":
            # os.pipe() descriptors are not inheritable: only pass_fds hands the read end to children, and no
            # child ever holds the write end, so it closes exactly when this process ends
            self._lifeline, write_end = os.pipe()
            if self.heartbeats_settings is not None:
                from .heartbeats import SharedHeartbeats
                self.heartbeats = SharedHeartbeats(self.heartbeats_settings)
        try:
            for child in self.children:
                self._spawn(child)
            while not self._stop.wait(0.2) and self.failure is None:
                self._check(time.monotonic())
            return max(self._terminate(), 1 if self.failure else 0)
        finally:
            for fd in (self._lifeline, write_end):
                if fd is not None:
                    os.close(fd)
            self._lifeline = None
            if self.heartbeats is not None:
                self.heartbeats.close()
                self.heartbeats = None
            for number, handler in previous.items():  # (the process's own handlers again)
                signal.signal(number, handler)

    def _check(self, now: float) -> None:
        for child in self.children:
            proc = child.proc
            if proc is not None and proc.poll() is None:
                if child.failures and now - child.started > self.healthy_after:
                    child.failures = 0
                continue
            if proc is not None:
                child.last_code = proc.returncode
                child.proc = None
                child.failures += 1
                exits = child.exits
                exits.append(now)
                while exits[0] <= now - self.restart_window:
                    exits.popleft()
                if len(exits) > self.max_restarts:
                    self.failure = f"worker {child.slot} exited {len(exits)} times within {self.restart_window:g}s"
                    self.echo(f"supervisor: worker {child.slot} (pid {proc.pid}) exited with "
                              f"{child.last_code}; not restarting")
                    return
                delay = min(self.max_backoff, self.backoff * 2 ** (child.failures - 1))
                child.next_start = now + delay
                self.echo(f"supervisor: worker {child.slot} (pid {proc.pid}) exited with {child.last_code}; "
                          f"restarting in {delay:.1f}s")
            if now >= child.next_start:
                self._spawn(child)
                self.restarts += 1

    def stop(self) -> None:
        self._stop.set()

    def _terminate(self) -> int:
        procs = [c.proc for c in self.children if c.proc is not None]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        # a slot waiting out its backoff has no worker: its last one failed and nothing replaced it
        status = 1 if len(procs) < len(self.children) else 0
        deadline = time.monotonic() + self.grace
        for proc in procs:
            try:
                code = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            if code != 0:
                status = 1
        return status


# the child's side -----------------------------------------------------------------------------------

def set_parent_death_signal(signo: int = signal.SIGTERM, *, parent: int | None = None) -> bool:
    """Ask the kernel to send ``signo`` to this process when its parent dies (Linux ``PR_SET_PDEATHSIG``).

    ``parent`` is the pid this process was started by: if it died before this call (the kernel would never
    send the signal then), ``signo`` is sent at once. Install the handler first. Returns False where the
    kernel cannot do this; ``watch_parent`` covers every POSIX system."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(signo), 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
            return False
    except (OSError, AttributeError):
        return False
    if parent is not None and os.getppid() != parent:  # orphaned already: adopted by init or a subreaper
        os.kill(os.getpid(), signo)
    return True


def watch_parent(fd: int, on_gone: Callable[[], None]) -> threading.Thread:
    """Call ``on_gone()`` in a daemon thread once the pipe ``fd`` (from a supervisor) reaches end-of-file,
    i.e. once the supervisor is gone, however it died; also at once if it already is."""
    def watch() -> None:
        try:
            while os.read(fd, 512):  # the supervisor never writes: any return is its end
                pass
        except OSError as exc:
            log.warning("supervisor pipe %d: %s", fd, exc)
        finally:
            try:
                os.close(fd)
            except OSError:
                pass
        on_gone()

    thread = threading.Thread(target=watch, name="supervisor-watch", daemon=True)
    thread.start()
    return thread

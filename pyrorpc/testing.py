"""Test helpers users get too: real name server and worker processes, and pytest fixtures for them.

Use the fixtures with ``pytest_plugins = ["pyrorpc.testing"]`` in a ``conftest.py``:
``nameserver`` (factory -> NameServerProcess), ``worker_factory`` (-> WorkerProcess) and
``pool_factory`` (-> Pool); everything they start is stopped at the end of the test.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .config import Address

__all__ = ["ChildProcess", "NameServerProcess", "WorkerProcess", "start_nameserver", "start_worker", "wait_for"]

_SIGTERM = signal.SIGTERM  # (the name `signal` is a method inside ChildProcess)
_NS_READY = re.compile(r"^NS running on (\S+)")
_WORKER_READY = re.compile(r"^worker (\S+) serving (\S+) on (\S+) \(pid (\d+)\)")


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
             message: str = "condition") -> Any:
    """Poll ``predicate`` until it returns a truthy value (returned) or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{message} not met within {timeout}s")
        time.sleep(interval)


class ChildProcess:
    """A child process in a session of its own, whose output is read line by line in a thread (so its pipe
    never fills); ``expect(pattern, timeout)`` waits for the next matching line, ``output`` is everything
    printed so far (all of it once ``wait``/``stop``/``kill`` returned). With ``stdin=True`` the test can
    talk to it: ``send("STOP\\n")`` writes to its standard input (a test hook for scripted clients)."""

    def __init__(self, argv: Sequence[str], env: dict[str, str] | None = None,
                 cwd: str | os.PathLike[str] | None = None, *, stdin: bool = False) -> None:
        full_env = dict(os.environ if env is None else env)
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        self.argv = list(argv)
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE if stdin else None, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, env=full_env, cwd=cwd, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def expect(self, pattern: str | re.Pattern[str], timeout: float = 15.0) -> re.Match[str]:
        """Wait for the next output line matching ``pattern`` (lines before it are passed over).

        Raises:
            RuntimeError: the process exited first.
            TimeoutError: no such line within ``timeout``.
        """
        if isinstance(pattern, str):
            pattern = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                line = self._queue.get(timeout=max(0.01, left))
            except queue.Empty:
                line = ""
            if line is None:
                self._queue.put(None)  # keep the end mark for a later expect()
                raise RuntimeError(f"{self.argv[1:]} exited ({self.proc.wait()}) before printing "
                                   f"{pattern.pattern!r}:\n" + "\n".join(self.lines[-30:]))
            match = pattern.search(line) if line else None
            if match:
                return match
            if left <= 0:
                raise TimeoutError(f"{self.argv[1:]} did not print {pattern.pattern!r} within {timeout}s:\n"
                                   + "\n".join(self.lines[-30:]))

    def send(self, text: str) -> None:
        """Write ``text`` to the process's standard input (made with ``stdin=True``) and flush it.

        Raises:
            RuntimeError: the process was made without ``stdin=True``.
        """
        if self.proc.stdin is None:
            raise RuntimeError("send() needs ChildProcess(..., stdin=True)")
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, signo: int) -> None:
        """Send ``signo``. For SIGSTOP, return only once every thread of the process has stopped.

        The kernel stops a process's threads one after another once one of them runs: on a busy
        machine a thread can still answer a request for a few milliseconds after ``kill()``
        returned, which a test that then expects silence must not see.
        """
        if not self.alive():
            return
        self.proc.send_signal(signo)
        if signo == getattr(signal, "SIGSTOP", None):
            self._wait_stopped(5.0)

    def _wait_stopped(self, timeout: float) -> None:
        task_dir = f"/proc/{self.proc.pid}/task"
        if not os.path.isdir(task_dir):
            return  # not Linux: nothing to poll
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                states = []
                for tid in os.listdir(task_dir):
                    with open(f"{task_dir}/{tid}/stat") as f:
                        states.append(f.read().rsplit(")", 1)[1].split()[0])
            except OSError:
                return  # the process went away
            if states and all(s in ("T", "t") for s in states):
                return
            time.sleep(0.001)
        raise RuntimeError(f"process {self.proc.pid} did not stop within {timeout} s of SIGSTOP")

    def kill(self) -> int:
        """SIGKILL it and everything it started (its session), reap it; returns its exit status."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return self.wait(10)

    def stop(self, signo: int = _SIGTERM, timeout: float = 30.0) -> int:
        """Send ``signo`` and wait (SIGKILL after ``timeout``); returns the exit status."""
        self.signal(signo)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            return self.kill()

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait (SIGKILL after ``timeout``); returns the exit status."""
        return self.stop(signal.SIGTERM, timeout)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the exit; returns the status, with ``output`` complete."""
        status = self.proc.wait(timeout)
        self._reader.join(5)
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        return status

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.alive():
            self.terminate(10)


class NameServerProcess(ChildProcess):
    """``python -m nameserver`` in a child process; ``address`` is where it listens."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, storage: str = "memory",
                 lease_ttl: float = 10.0, env: dict[str, str] | None = None, timeout: float = 15.0) -> None:
        super().__init__([sys.executable, "-m", "nameserver", "--host", host, "--port", str(port),
                          "--storage", storage, "--lease-ttl", str(lease_ttl)], env, None)
        self.storage = storage
        self.lease_ttl = lease_ttl
        match = self.expect(_NS_READY, timeout)
        self.address = Address.parse(match.group(1))

    @property
    def ns(self) -> str:
        return str(self.address)

    def restart(self, timeout: float = 15.0) -> "NameServerProcess":
        """Stop this one (SIGTERM) and start a new one on the same address and storage."""
        self.terminate()
        return NameServerProcess(self.address.host, self.address.port, storage=self.storage,
                                 lease_ttl=self.lease_ttl, timeout=timeout)


class WorkerProcess(ChildProcess):
    """``pyrorpc worker start SPEC`` in a child process (one worker, no supervisor)."""

    def __init__(self, spec: str, ns: str | Address, *, args: Sequence[str] = (), env: dict[str, str] | None = None,
                 cwd: str | None = None, timeout: float = 15.0) -> None:
        super().__init__([sys.executable, "-m", "pyrorpc", "worker", "start", spec, "--ns", str(ns), *args], env, cwd)
        match = self.expect(_WORKER_READY, timeout)
        self.name, self.service, self.uri = match.group(1), match.group(2), match.group(3)
        self.worker_pid = int(match.group(4))


def start_nameserver(**kwargs: Any) -> NameServerProcess:
    """Start a name server process on 127.0.0.1 (ephemeral port unless ``port=``); see NameServerProcess."""
    return NameServerProcess(**kwargs)


def start_worker(spec: str, ns: str | Address, **kwargs: Any) -> WorkerProcess:
    """Start one worker process of ``MODULE:CLASS``; returns once it is registered."""
    return WorkerProcess(spec, ns, **kwargs)


try:
    import pytest
except ImportError:  # pragma: no cover - pytest is only needed for the fixtures
    pytest = None  # type: ignore[assignment]

def _made_by(make: Callable[..., Any], cleanup: Callable[[Any], Any]) -> Iterator[Callable[..., Any]]:
    """A factory that remembers what it made, and cleans all of it up when the test ends."""
    made: list[Any] = []

    def factory(*args: Any, **kwargs: Any) -> Any:
        thing = make(*args, **kwargs)
        made.append(thing)
        return thing

    yield factory
    for thing in made:
        cleanup(thing)


if pytest is not None:

    @pytest.fixture
    def nameserver() -> Iterator[Callable[..., NameServerProcess]]:
        """Factory: ``nameserver(lease_ttl=3, storage="memory")`` -> a running NameServerProcess."""
        yield from _made_by(NameServerProcess, NameServerProcess.kill)

    @pytest.fixture
    def worker_factory() -> Iterator[Callable[..., WorkerProcess]]:
        """Factory: ``worker_factory("mod:Cls", ns)`` -> a registered WorkerProcess."""
        yield from _made_by(WorkerProcess, WorkerProcess.kill)

    @pytest.fixture
    def pool_factory() -> Iterator[Callable[..., Any]]:
        """Factory: ``pool_factory("service", ns=...)`` -> a Pool, closed after the test."""
        from .pool import Pool
        yield from _made_by(Pool, Pool.close)

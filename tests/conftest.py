"""Shared fixtures: pyrorpc.testing's factories, a clean environment, an in-thread name server."""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Iterator

import Pyro5
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

pytest_plugins = ["pyrorpc.testing"]


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No PYRORPC_* / PYRO_* leaks between tests; Pyro5's config back to defaults; SIGINT/SIGTERM handlers
    back as they were; tests/ importable by worker subprocesses."""
    for key in list(os.environ):
        if key.startswith(("PYRORPC_", "PYRO_")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("PYTHONPATH", HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    Pyro5.config.reset(use_environment=False)
    handlers = {signo: signal.getsignal(signo) for signo in (signal.SIGINT, signal.SIGTERM)}
    yield
    Pyro5.config.reset(use_environment=False)
    for signo, handler in handlers.items():  # (a test that served in the main thread left its handler behind?)
        if signal.getsignal(signo) is not handler:
            signal.signal(signo, handler)


@pytest.fixture
def ns_daemon() -> Iterator["object"]:
    """A pyrorpc name server served from a thread of this process (lease TTL 3 s); yields the daemon."""
    from nameserver import NameServerDaemon
    with NameServerDaemon("127.0.0.1", 0, lease_ttl=3.0) as daemon:
        daemon.start()
        yield daemon


@pytest.fixture
def ns_addr(ns_daemon: "object") -> str:
    host, port = ns_daemon.address  # type: ignore[attr-defined]
    return f"{host}:{port}"


@pytest.fixture
def dead_ns() -> Iterator[str]:
    """A name-server address where nothing listens while the test runs (bound, never listening: refused),
    unlike a fixed port such as 1 that another process may hold."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"

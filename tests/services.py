"""Services the tests serve, in worker threads and in worker processes (``services:Calculator``)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence

import pyrorpc


class CustomError(Exception):
    pass


@pyrorpc.service("calc")
class Calculator:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.logged: list[str] = []
        self.secret_value = 42

    def add(self, a, b):
        return a + b

    def pid(self):
        return os.getpid()

    def div(self, a, b):
        return a / b

    @pyrorpc.oneway
    def log(self, msg):
        with self.lock:
            self.logged.append(msg)

    def logs(self):
        with self.lock:
            return list(self.logged)

    @pyrorpc.idempotent
    def get(self, key):
        return f"value-{key}"

    def slow(self, seconds):
        time.sleep(seconds)
        return os.getpid()

    @pyrorpc.idempotent
    def slow_idem(self, x, seconds=0.01):
        time.sleep(seconds)
        return x * x

    def fail(self, message):
        raise ValueError(message)

    def fail_custom(self):
        raise CustomError("custom")

    def close(self):
        return "remote close"

    def _private(self):
        return "private"


@pyrorpc.service("journal")
class Journal:
    """Non-idempotent: appends each execution to a file, to prove nothing runs twice."""

    def record(self, token, seconds=0.01):
        path = os.environ["JOURNAL_FILE"]
        time.sleep(seconds)
        with open(path, "a") as fh:
            fh.write(f"{token}\n")
        return token


@pyrorpc.service("sleeper")
class Sleeper:
    def sleep(self, ms=10):
        time.sleep(ms / 1000)
        return os.getpid()


class Plain:
    """No @service: needs --service."""

    def hello(self):
        return "hello"


@pyrorpc.service("where")
class Where:
    """Says which address served the call (for the network-partition test)."""

    @pyrorpc.idempotent
    def where(self, token):
        from Pyro5.callcontext import current_context
        time.sleep(0.005)
        return current_context.client.sock.getsockname()[0]


@pyrorpc.service("broken")
class Broken:
    """Its constructor fails, so a worker of it can never start (supervisor give-up tests)."""

    def __init__(self) -> None:
        raise RuntimeError("broken on purpose")

    def ping(self):
        return "pong"


class Steer:
    """A balancing strategy (the public Strategy protocol) that picks the worker named ``target`` whenever
    it is a candidate, else the first by name: lets a test choose which worker a call goes to."""

    def __init__(self, target: str | None = None) -> None:
        self.target = target

    def choose(self, candidates: Sequence[pyrorpc.balancing.Candidate]) -> pyrorpc.balancing.Candidate:
        for c in candidates:
            if c.name == self.target:
                return c
        return min(candidates, key=lambda c: c.name)

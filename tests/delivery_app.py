"""A mail service for the delivery tests (send(), the outbox): every run is appended to a journal file of
its worker process (``DELIVERY_JOURNAL`` directory, one file per pid), or to ``Mailer.runs`` in-process."""

from __future__ import annotations

import os
import threading
import time

import pyrorpc

_lock = threading.Lock()


def _journal(kind: str, uid: str) -> None:
    folder = os.environ.get("DELIVERY_JOURNAL")
    with _lock:
        Mailer.runs.append((kind, uid))
        if folder:
            with open(os.path.join(folder, f"{os.getpid()}.log"), "a") as f:
                f.write(f"{kind} {uid}\n")
                f.flush()


def journal_runs(folder: str, kind: str = "done") -> dict[str, list[str]]:
    """``{pid file: [uid, ...]}`` of the runs in ``folder`` (lines of ``kind``)."""
    out: dict[str, list[str]] = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".log"):
            with open(os.path.join(folder, name)) as f:
                out[name] = [line.split(" ", 1)[1].strip() for line in f if line.startswith(kind + " ")]
    return out


@pyrorpc.service("mailer")
class Mailer:
    runs: list[tuple[str, str]] = []

    def mail(self, uid, seconds=0.0):
        _journal("start", uid)
        if seconds:
            time.sleep(seconds)
        _journal("done", uid)
        return uid

    @pyrorpc.idempotent
    def mail_idem(self, uid, seconds=0.0):
        return self.mail(uid, seconds)

    async def amail(self, uid, seconds=0.0):
        import asyncio
        _journal("start", uid)
        await asyncio.sleep(seconds)
        _journal("done", uid)
        return uid

    def fail(self, uid):
        raise ValueError(f"cannot mail {uid}")

    def pid(self):
        return os.getpid()

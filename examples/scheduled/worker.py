"""The newsletter service: sends one edition of the nightly newsletter; an edition is sent at most once.

Editions are recorded in a SQLite file (``$NEWSLETTER_DB``, default ``newsletter.sqlite`` here) that all
newsletter workers on this machine share; every call is also logged, so duplicates would show.
"""

from __future__ import annotations

import os
import sqlite3
import time
from typing import Any

import pyrorpc

SUBSCRIBERS = [f"reader{i}@example.com" for i in range(1000)]


@pyrorpc.service("newsletter")
class Newsletter:
    def __init__(self) -> None:
        self.path = os.environ.get("NEWSLETTER_DB", "newsletter.sqlite")
        with self._db() as db:
            db.execute("CREATE TABLE IF NOT EXISTS editions (edition TEXT PRIMARY KEY, scheduler TEXT, "
                       "worker INTEGER, recipients INTEGER, sent_at REAL)")
            db.execute("CREATE TABLE IF NOT EXISTS calls (edition TEXT, scheduler TEXT, worker INTEGER, at REAL)")

    def _db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=10)

    @pyrorpc.idempotent  # keyed by edition: a second call for the same edition sends nothing
    def send_newsletter(self, edition: str, scheduler: str) -> dict[str, Any]:
        """Send edition ``edition`` (the cron tick, ISO 8601 UTC) to every subscriber, once."""
        with self._db() as db:
            db.execute("INSERT INTO calls VALUES (?, ?, ?, ?)", (edition, scheduler, os.getpid(), time.time()))
            fresh = db.execute("INSERT OR IGNORE INTO editions VALUES (?, ?, ?, ?, ?)",
                               (edition, scheduler, os.getpid(), len(SUBSCRIBERS), time.time())).rowcount == 1
        if fresh:
            # A real batch would render the edition and hand each mail to a mailer pool here (and record
            # per-recipient progress, so a batch cut short resumes where it stopped).
            print(f"newsletter {os.getpid()}: edition {edition} to {len(SUBSCRIBERS)} subscribers "
                  f"(fired by {scheduler})", flush=True)
        return {"edition": edition, "duplicate": not fresh, "recipients": len(SUBSCRIBERS) if fresh else 0,
                "worker": os.getpid()}

    def last_edition(self) -> str | None:
        """The newest edition sent, or None."""
        with self._db() as db:
            return db.execute("SELECT max(edition) FROM editions").fetchone()[0]

    def history(self) -> list[dict[str, Any]]:
        """Every call received, oldest first: ``{edition, scheduler, worker}``."""
        with self._db() as db:
            rows = db.execute("SELECT edition, scheduler, worker FROM calls ORDER BY at").fetchall()
        return [{"edition": e, "scheduler": s, "worker": w} for e, s, w in rows]

"""A three-stage pipeline: resize -> watermark -> store. Each stage is its own service with its own
workers, and hands its output to the next stage's Pool (a worker is also a client of other services).

Every stage is ``@pyrorpc.idempotent``: its output depends only on its input, and the store is keyed by
item id, so a call lost with a killed worker is simply run again on another worker of that stage.

Start each stage with ``pyrorpc worker start worker:Resizer`` (``Watermarker``, ``Store``); the stages
find each other through the name server in ``$PYRORPC_NS``.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from typing import Any

import pyrorpc

STAGE_SECONDS = float(os.environ.get("WORKFLOW_STAGE_SECONDS", "0.1"))  # the work each stage does per item
STORE_DB = os.environ.get("WORKFLOW_DB", "store.sqlite")


class Stage:
    """What the stages share: the work (one item at a time per worker, like a CPU-bound step) and a
    Pool to the next stage, made on first use and shared by all calls."""

    next_service: str | None = None

    def __init__(self) -> None:
        self._cpu = threading.Lock()
        self._next: pyrorpc.Pool | None = None
        self._next_lock = threading.Lock()

    def _work(self) -> None:
        with self._cpu:
            time.sleep(STAGE_SECONDS)

    def _hand_on(self, item: dict[str, Any]) -> Any:
        assert self.next_service is not None
        with self._next_lock:
            if self._next is None:
                self._next = pyrorpc.Pool(self.next_service)  # name server from $PYRORPC_NS
        return self._next.process(item)  # idempotent downstream: retried elsewhere if that worker dies


def _step(item: dict[str, Any], what: str) -> dict[str, Any]:
    return {**item, "steps": [*item["steps"], f"{what}@{os.getpid()}"]}


@pyrorpc.service("resize")
class Resizer(Stage):
    next_service = "watermark"

    @pyrorpc.idempotent
    def process(self, item: dict[str, Any]) -> dict[str, Any]:
        """Shrink the image to fit 256 px, then hand it to the watermark stage; returns the store receipt."""
        self._work()
        scale = min(1.0, 256 / max(item["width"], item["height"]))
        resized = _step({**item, "width": round(item["width"] * scale), "height": round(item["height"] * scale)},
                        "resize")
        return self._hand_on(resized)


@pyrorpc.service("watermark")
class Watermarker(Stage):
    next_service = "store"

    @pyrorpc.idempotent
    def process(self, item: dict[str, Any]) -> dict[str, Any]:
        """Stamp the watermark, then hand the image to the store; returns the store receipt."""
        self._work()
        return self._hand_on(_step({**item, "watermark": "(c) pyrorpc"}, "watermark"))


@pyrorpc.service("store")
class Store(Stage):
    """Keeps finished images in a SQLite file (``$WORKFLOW_DB``) shared by the store workers, keyed by item
    id: storing an item again changes nothing. Every delivery is logged, so retries show."""

    def __init__(self) -> None:
        super().__init__()
        with self._db() as db:
            db.execute("CREATE TABLE IF NOT EXISTS items (id TEXT PRIMARY KEY, item TEXT, worker INTEGER)")
            db.execute("CREATE TABLE IF NOT EXISTS deliveries (id TEXT, worker INTEGER, at REAL)")

    def _db(self) -> sqlite3.Connection:
        return sqlite3.connect(STORE_DB, timeout=10)

    @pyrorpc.idempotent
    def process(self, item: dict[str, Any]) -> dict[str, Any]:
        """Store the finished image once; returns ``{id, stored (False: it was already there), steps}``."""
        with self._db() as db:
            db.execute("INSERT INTO deliveries VALUES (?, ?, ?)", (item["id"], os.getpid(), time.time()))
            stored = db.execute("INSERT OR IGNORE INTO items VALUES (?, ?, ?)",
                                (item["id"], json.dumps(_step(item, "store")), os.getpid())).rowcount == 1
        return {"id": item["id"], "stored": stored, "steps": _step(item, "store")["steps"]}

    def summary(self) -> dict[str, int]:
        """``{items: distinct items stored, deliveries: store calls received}``."""
        with self._db() as db:
            items = db.execute("SELECT count(*) FROM items").fetchone()[0]
            deliveries = db.execute("SELECT count(*) FROM deliveries").fetchone()[0]
        return {"items": items, "deliveries": deliveries}

    def items(self) -> list[dict[str, Any]]:
        """Every stored item."""
        with self._db() as db:
            return [json.loads(row[0]) for row in db.execute("SELECT item FROM items ORDER BY id")]

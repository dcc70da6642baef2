"""The quotes service: an I/O-bound lookup as an ``async def`` method, and two streams.

``quote`` stands for a call to a slow upstream API (``$QUOTES_DELAY`` seconds, default 0.2): it awaits,
so one worker process serves thousands of them at once whatever its ``--threads``. ``history`` is a
generator: ``stream()`` sends its rows as they are produced, a window ahead of the reader, so a
million rows never sit in memory on either side. ``ticks`` is an async generator. Every method can see
the call it serves with ``pyrorpc.current_call()``: the caller's deadline and metadata.
"""

from __future__ import annotations

import asyncio
import os
import threading
import zlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pyrorpc

DELAY = float(os.environ.get("QUOTES_DELAY", "0.2"))


def _price(symbol: str, day: int) -> float:
    """A made-up but repeatable closing price."""
    base = zlib.crc32(symbol.encode()) % 900 + 100
    return round(base + 10 * ((day * 7919) % 101 - 50) / 50, 2)


@pyrorpc.service("quotes")
class Quotes:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = 0  # history() streams running now

    async def quote(self, symbol: str) -> dict[str, Any]:
        """The latest price of ``symbol``, from a (simulated) upstream API."""
        await asyncio.sleep(DELAY)  # the upstream request: no worker thread waits for it
        call = pyrorpc.current_call()
        return {"symbol": symbol, "price": _price(symbol, 0),
                "request_id": call.metadata.get("request_id") if call else None,
                "budget_left": round(call.remaining() or 0, 3) if call else None}

    def history(self, symbol: str, days: int) -> Iterator[dict[str, Any]]:
        """One row per day, oldest first: streamed with ``stream()`` / ``astream()``."""
        with self._lock:
            self._open += 1
        try:
            for day in range(days):
                yield {"day": day, "close": _price(symbol, day)}
        finally:  # runs when the stream ends, and when the client stops it early
            with self._lock:
                self._open -= 1

    def open_streams(self) -> int:
        """How many ``history`` streams are running now."""
        with self._lock:
            return self._open

    async def ticks(self, symbol: str, count: int, interval: float = 0.01) -> AsyncIterator[dict[str, Any]]:
        """``count`` live ticks, one every ``interval`` seconds."""
        for n in range(count):
            await asyncio.sleep(interval)
            yield {"n": n, "price": _price(symbol, n)}

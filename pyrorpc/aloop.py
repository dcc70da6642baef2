"""The event loop a server runs its ``async def`` methods on: one thread, started on first use."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["AsyncRunner"]

log = logging.getLogger("pyrorpc.server")


class AsyncRunner:
    """An asyncio event loop in a daemon thread of its own (``name-async``), for a server's coroutines."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            with self._lock:
                if self._closed:
                    raise RuntimeError(f"{self.name}: closed")
                if self._loop is None:
                    new = asyncio.new_event_loop()
                    ready = threading.Event()

                    def run() -> None:
                        asyncio.set_event_loop(new)
                        new.call_soon(ready.set)
                        try:
                            new.run_forever()
                        finally:
                            try:
                                new.run_until_complete(new.shutdown_asyncgens())
                            except Exception:  # pragma: no cover - best effort at exit
                                pass
                            new.close()

                    self._thread = threading.Thread(target=run, name=f"{self.name}-async", daemon=True)
                    self._thread.start()
                    ready.wait(5)
                    self._loop = new
                loop = self._loop
        return loop

    @property
    def started(self) -> bool:
        return self._loop is not None

    def in_loop(self) -> bool:
        return self._thread is threading.current_thread()

    def submit(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        """Run ``coro`` on the loop; a concurrent future of its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def close(self, timeout: float = 2.0) -> None:
        """Cancel what still runs (their ``finally`` blocks run), stop the loop, wait for its thread."""
        with self._lock:
            self._closed = True
            loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=timeout)

        try:
            asyncio.run_coroutine_threadsafe(cancel_all(), loop).result(timeout + 1)
        except Exception:
            pass
        try:
            loop.call_soon_threadsafe(loop.stop)
        except RuntimeError:
            pass
        thread.join(timeout)

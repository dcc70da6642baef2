"""The event loop a server runs its ``async def`` methods on: one thread, started on first use."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

__all__ = ["AsyncRunner", "PeerGone", "Raised", "guarded", "wait"]

log = logging.getLogger("pyrorpc.server")

_SLICE = 0.25  # seconds between two looks at whether the caller is still there (``wait``)
# SystemExit and KeyboardInterrupt escape asyncio's run_forever (the loop thread would die with them), and a
# GeneratorExit is no error of the loop either: a coroutine run for a caller hands them back as a value
_FATAL = (SystemExit, KeyboardInterrupt, GeneratorExit)


class Raised:
    """What a ``guarded`` coroutine returns instead of raising SystemExit, KeyboardInterrupt or GeneratorExit."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class PeerGone(Exception):
    """The caller went away while ``wait`` waited (its coroutine was cancelled)."""


async def guarded(aw: Awaitable[Any]) -> Any:
    """Await ``aw``; SystemExit, KeyboardInterrupt and GeneratorExit come back as ``Raised`` (re-raise them in
    the thread that waits for the result, not on the event loop)."""
    try:
        return await aw
    except _FATAL as exc:
        return Raised(exc)


def wait(future: concurrent.futures.Future[Any], timeout: float | None, gone: Callable[[], bool]) -> Any:
    """The result of ``future`` (a ``Raised`` is raised), waited for in slices: between two, ``gone()`` says
    whether the caller went away.

    Raises:
        concurrent.futures.TimeoutError: ``timeout`` ran out (the future is cancelled), or the coroutine raised
            it (the future is not cancelled).
        PeerGone: ``gone()`` said so (the future is cancelled).
    """
    deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
    while True:
        step = _SLICE if deadline is None else min(_SLICE, deadline - time.monotonic())
        try:
            value = future.result(max(step, 0.0))
        except concurrent.futures.TimeoutError:
            if future.done():  # it finished meanwhile, or the coroutine raised TimeoutError itself
                value = future.result()
            elif deadline is not None and time.monotonic() >= deadline:
                if future.cancel():
                    raise
                continue  # it finished just now
            elif gone():
                if future.cancel():
                    raise PeerGone from None
                continue
            else:
                continue
        if type(value) is Raised:
            raise value.exc
        return value


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
                    self._thread = threading.Thread(target=self._run, args=(new, ready), name=f"{self.name}-async",
                                                    daemon=True)
                    self._thread.start()
                    ready.wait(5)
                    self._loop = new
                loop = self._loop
        return loop

    def _run(self, loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        try:
            while True:
                try:
                    loop.run_forever()
                    return  # stopped: close()
                except _FATAL as exc:
                    # raised out of a callback or a task not run through ``guarded``: that one failed (a task
                    # has it as its exception), the loop serves on
                    log.error("%s: %s raised on the event loop; it keeps running", self.name, type(exc).__name__)
                    if self._closed:
                        return
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            except BaseException:  # pragma: no cover - best effort at exit
                pass
            loop.close()

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

    def close(self, timeout: float = 0.3) -> None:
        """Cancel what still runs (their ``finally`` blocks run), waiting at most ``timeout`` for it, stop the
        loop and wait 0.2 s more for its thread: about half a second at most, whatever the coroutines do. A
        loop still stuck in a method (blocking it, or ignoring cancellation) is abandoned (a daemon thread)."""
        with self._lock:
            self._closed = True
            loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        began = time.monotonic()
        if thread is threading.current_thread():  # (from a coroutine: it cannot wait for itself)
            loop.stop()
            return

        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=timeout)

        try:
            asyncio.run_coroutine_threadsafe(cancel_all(), loop).result(timeout + 0.05)
        except Exception:  # a loop blocked by a method, or gone already
            pass
        try:
            loop.call_soon_threadsafe(loop.stop)
        except RuntimeError:  # closed already
            pass
        thread.join(0.2)
        if thread.is_alive():
            log.warning("%s: the event loop is still busy in a method after %.1fs; its thread is abandoned",
                        self.name, time.monotonic() - began)

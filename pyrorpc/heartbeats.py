"""Shared heartbeats: a supervisor renews the leases of all its workers in one request to the name server.

A worker started by ``pyrorpc worker start --processes N`` registers itself (its first lease goes straight
to the name server, so it knows it is registered before it says so), then hands each heartbeat to its
supervisor over a pipe: one JSON line with what ``NameServerClient.lease`` would send. The supervisor
(``SharedHeartbeats``) collects the lines that arrive within ``WINDOW`` of each other and renews them with
one ``NameServerClient.lease_many`` (a ``renew_many`` of tokens and changed load fields), so N workers cost
the name server one request per period instead of N. The workers of one supervisor beat in step
(``PYRORPC_HEARTBEAT_PHASE``: the same offset on the shared monotonic clock); supervisors pick their offsets
at random, so hosts do not all beat at once.

A worker is only renewed while it reports: one that hangs, dies or is SIGKILLed stops reporting and its lease
expires as if it had renewed for itself. One that stops says ``bye`` before it deregisters, and a renewal of
it that raced with its deregistration is taken back. A worker whose supervisor is gone (the pipe breaks)
renews for itself again.
"""

from __future__ import annotations

import json
import logging
import os
import random
import select
import stat
import threading
import time
from typing import Any

from .config import Settings
from .errors import NameServerUnavailableError

__all__ = ["FD_ENV", "PHASE_ENV", "WINDOW", "Relay", "SharedHeartbeats", "next_beat"]

log = logging.getLogger("pyrorpc.heartbeats")

FD_ENV = "PYRORPC_HEARTBEAT_FD"  # the pipe a supervised worker writes its heartbeats to
PHASE_ENV = "PYRORPC_HEARTBEAT_PHASE"  # the fraction of a period the supervisor's workers beat at
WINDOW = 0.05  # seconds the supervisor waits after a heartbeat for its other workers' before it renews
_MAX_LINE = 4096  # PIPE_BUF: a write up to this size is never interleaved with another worker's
_MAX_GONE = 10_000  # workers that said bye, remembered (each worker process has a name of its own)


_UNSET = object()
_RELAY: Any = _UNSET  # this process's Relay (None: not supervised with shared heartbeats), read once


def next_beat(now: float, period: float, phase: float | None) -> float:
    """When the next heartbeat is due: ``period`` after ``now``, or with a ``phase`` (0..1) the next point
    of the grid ``(k + phase) * period`` of the shared monotonic clock at least half a period away."""
    if phase is None:
        return now + period
    at = (int(now / period) + phase) * period
    while at < now + period / 2:
        at += period
    return at


class Relay:
    """A supervised worker's end of the pipe: ``beat()`` hands one heartbeat to the supervisor."""

    def __init__(self, fd: int, phase: float | None) -> None:
        self.fd = fd
        self.phase = phase
        self.broken = False

    @classmethod
    def from_env(cls) -> "Relay | None":
        """The relay ``SharedHeartbeats`` set up for this process, or None (not supervised that way). Read
        once per process (every WorkerHost in it shares it) and taken out of the environment, so that the
        process's own children do not mistake some other descriptor for it."""
        global _RELAY
        if _RELAY is not _UNSET:
            return _RELAY  # type: ignore[return-value]
        raw = os.environ.pop(FD_ENV, None)
        raw_phase = os.environ.pop(PHASE_ENV, "")
        _RELAY = None
        if not raw:
            return None
        try:
            fd = int(raw)
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                return None
        except (ValueError, OSError):
            return None
        try:
            phase: float | None = float(raw_phase)
            if not 0.0 <= phase < 1.0:  # type: ignore[operator]
                phase = None
        except ValueError:
            phase = None
        _RELAY = cls(fd, phase)
        return _RELAY

    def beat(self, name: str, uri: str, metadata: Any, load: dict[str, Any], ttl: float | None) -> bool:
        """Hand a heartbeat to the supervisor; False when it cannot take it (renew directly then)."""
        return self._write({"name": name, "uri": uri, "tags": sorted(metadata), "load": load, "ttl": ttl})

    def bye(self, name: str) -> None:
        """This worker deregisters now: the supervisor renews it no more (and takes back a racing renewal)."""
        self._write({"name": name, "bye": True})

    def _write(self, message: dict[str, Any]) -> bool:
        if self.broken:
            return False
        line = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        if len(line) > _MAX_LINE:
            return False  # (a huge load report: it goes to the name server directly)
        try:
            os.write(self.fd, line)
            return True
        except OSError as exc:
            log.warning("heartbeat pipe to the supervisor: %s; renewing directly from now on", exc)
            self.broken = True
            try:
                os.close(self.fd)
            except OSError:
                pass
            return False


class SharedHeartbeats:
    """The supervisor's side: reads every child's heartbeats and renews them together (see the module).

    ``open_pipe()`` gives the descriptors and environment for a child about to be started (``child_started``
    with its pid once it is); ``close()`` stops the thread and closes the client."""

    def __init__(self, settings: Settings, *, phase: float | None = None) -> None:
        from .naming import NameServerClient  # (naming imports config only; kept lazy like the CLI)

        self.client = NameServerClient(settings)
        self.phase = random.random() if phase is None else phase
        self._lock = threading.Lock()
        self._pipes: dict[int, bytearray] = {}  # read fd -> bytes of an unfinished line
        self._names: dict[int, set[str]] = {}  # read fd -> the names that reported on it
        self._pending: dict[str, tuple[str, str, list[str], dict[str, Any], float | None]] = {}
        self._first_pending = 0.0
        self._gone: dict[str, None] = {}  # said bye (the latest _MAX_GONE): never renewed again
        self._failing = False
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        self.renewals = 0  # heartbeats renewed, and the requests it took (for tests and the curious)
        self.requests = 0
        self._thread = threading.Thread(target=self._run, name="shared-heartbeats", daemon=True)
        self._thread.start()

    def open_pipe(self) -> tuple[int, dict[str, str]]:
        """A new pipe for a child: ``(write_fd, env)``; pass ``write_fd`` to the child (``pass_fds``) and
        close it here once the child runs (``child_started``)."""
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        with self._lock:
            self._pipes[read_fd] = bytearray()
            self._names[read_fd] = set()
        self._kick()
        return write_fd, {FD_ENV: str(write_fd), PHASE_ENV: repr(self.phase)}

    def child_started(self, write_fd: int) -> None:
        """The child holds its end now: ours goes, so its death is an end-of-file here."""
        try:
            os.close(write_fd)
        except OSError:
            pass

    def close(self) -> None:
        self._stop.set()
        self._kick()
        self._thread.join(5)
        with self._lock:
            fds = list(self._pipes)
            self._pipes.clear()
        for fd in (*fds, self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self.client.close()

    def _kick(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    # the thread ------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                fds = list(self._pipes)
            timeout = None
            if self._pending:
                timeout = max(0.0, self._first_pending + WINDOW - time.monotonic())
            poller = select.poll()  # (not select(): a descriptor numbered over 1023 would stop it)
            for fd in (self._wake_r, *fds):
                poller.register(fd, select.POLLIN)
            try:
                readable = [fd for fd, _ev in poller.poll(None if timeout is None else timeout * 1000)]
            except (OSError, ValueError):  # a descriptor closed under us: look again
                time.sleep(0.01)
                continue
            for fd in readable:
                if fd == self._wake_r:
                    try:
                        os.read(self._wake_r, 4096)
                    except OSError:
                        pass
                else:
                    self._read(fd)
            if self._pending and time.monotonic() >= self._first_pending + WINDOW:
                self._flush()

    def _read(self, fd: int) -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        with self._lock:
            buf = self._pipes.get(fd)
            if buf is None:
                return
            if not data:  # the child is gone: its names are renewed no more
                del self._pipes[fd]
                for name in self._names.pop(fd, ()):
                    self._pending.pop(name, None)
                try:
                    os.close(fd)
                except OSError:
                    pass
                return
            buf += data
            lines = buf.split(b"\n")
            self._pipes[fd] = bytearray(lines.pop())
            names = self._names[fd]
        for line in lines:
            try:
                msg = json.loads(line)
                name = msg["name"]
                if not isinstance(name, str):
                    raise TypeError("name")
                if msg.get("bye"):
                    self._gone[name] = None
                    if len(self._gone) > _MAX_GONE:
                        del self._gone[next(iter(self._gone))]
                    self._pending.pop(name, None)
                    continue
                report = (name, str(msg["uri"]), list(msg["tags"]), dict(msg["load"] or {}), msg.get("ttl"))
            except (ValueError, TypeError, KeyError) as exc:
                log.warning("heartbeat pipe: a line that is no heartbeat (%s): %.100r", exc, bytes(line))
                continue
            if name in self._gone:
                continue
            names.add(name)
            if not self._pending:
                self._first_pending = time.monotonic()
            self._pending[name] = report

    def _flush(self) -> None:
        batch = list(self._pending.values())
        self._pending.clear()
        try:
            results = self.client.lease_many(batch)
        except NameServerUnavailableError as exc:
            if not self._failing:
                log.warning("shared heartbeats: cannot renew %d leases: %s", len(batch), exc)
            self._failing = True
            return
        except Exception as exc:  # a name server refusing the whole request: say so, keep beating
            log.warning("shared heartbeats: renewal of %d leases failed: %s: %s", len(batch), type(exc).__name__, exc)
            return
        if self._failing:
            log.info("shared heartbeats: the name server answers again; %d leases renewed", len(batch))
            self._failing = False
        self.requests += 1
        for (name, *_rest), result in zip(batch, results, strict=True):
            if isinstance(result, ValueError):
                log.warning("shared heartbeats: %s: lease refused: %s", name, result)
            else:
                self.renewals += 1
        # a worker that said bye while its renewal was on the way (it may have deregistered before the renewal
        # arrived): read what has come, and take back the renewal of any that left
        with self._lock:
            fds = list(self._pipes)
        for fd in fds:
            self._read(fd)
        for name, *_rest in batch:
            if name in self._gone:
                try:
                    self.client.remove(name)
                except Exception as exc:  # its lease expires anyway
                    log.info("shared heartbeats: could not take back the renewal of %s: %s", name, exc)

"""The etcd client of the name server's etcd storage: etcd3gw over one HTTP session, with failover between
the members of a cluster and group commit (concurrent writes go to etcd together, in one transaction).

One write alone costs etcd about 1.4 ms of CPU and this process 1 ms (a request through its HTTP gateway); a
hundred in one transaction cost 80 and 17 us each. So a write that finds another one under way waits for it
and goes with the next batch: nothing waits when writes are rare, many share a request when they are not.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import threading
import time
from typing import Any

import Pyro5.errors

log = logging.getLogger("pyrorpc.nameserver.etcd")

DEFAULT_PREFIX = "/pyrorpc/ns/"
MAX_BATCH = 100  # writes per transaction (etcd refuses more than 128 operations in one)

# etcd unreachable or refusing an operation: a NamingError, which every Pyro5 client can decode (a subclass
# defined here would reach a stock client as an undecodable class)
EtcdError = Pyro5.errors.NamingError


def parse_url(url: str) -> tuple[list[tuple[str, int]], str]:
    """``etcd://HOST:PORT[,HOST:PORT...][/PREFIX]`` -> ([(host, port), ...], key prefix ending in ``/``).

    Raises:
        ValueError: not such a URL (the message names the bad part).
    """
    if not url.startswith("etcd://"):
        raise ValueError(f"an etcd storage URL starts with etcd://, got {url!r}")
    rest = url[len("etcd://"):]
    hosts, slash, path = rest.partition("/")
    endpoints = []
    for item in hosts.split(","):
        host, colon, port = item.strip().rpartition(":")
        host = host.strip("[]")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"etcd endpoints are HOST:PORT[,HOST:PORT...], got {item.strip()!r} in {url!r}")
        endpoints.append((host, int(port)))
    prefix = "/" + path.strip("/") + "/" if slash and path.strip("/") else DEFAULT_PREFIX
    return endpoints, prefix


def etcd_ttl(ttl: float) -> int:
    """The etcd lease TTL for a registration TTL: whole seconds, rounded up (etcd raises it to its minimum)."""
    return max(1, math.ceil(ttl))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _range_end(prefix: bytes) -> bytes:
    return prefix[:-1] + bytes([prefix[-1] + 1])


def _detail(exc: BaseException) -> str:
    detail = getattr(exc, "detail_text", None)
    if detail:
        try:
            return str(json.loads(detail).get("message") or detail)[:300]
        except (ValueError, AttributeError):
            return str(detail)[:300]
    return str(exc)[:300] or type(exc).__name__


class EtcdClient:
    """The members of one etcd cluster, talked to over one HTTP session (kept-alive connections, no
    connection per request) through etcd3gw. An operation that cannot reach the current member moves on to
    the next one and is retried until ``retry_for`` seconds have passed (an election takes about a second)."""

    def __init__(self, endpoints: list[tuple[str, int]], *, timeout: float = 3.0, retry_for: float = 6.0) -> None:
        try:
            import etcd3gw
            import requests
            from etcd3gw import exceptions
        except ImportError:
            raise ValueError("etcd storage needs etcd3gw: pip install 'pyrorpc[etcd]'") from None
        self.session = requests.Session()
        self.session.trust_env = False  # no proxy from the environment between us and etcd
        self.session.mount("http://", requests.adapters.HTTPAdapter(pool_connections=len(endpoints),
                                                                    pool_maxsize=64))
        self.clients = [etcd3gw.Etcd3Client(host=h, port=p, timeout=timeout, session=self.session)
                        for h, p in endpoints]
        self.names = [f"{h}:{p}" for h, p in endpoints]
        self.retry_for = retry_for
        self.transient = (exceptions.ConnectionFailedError, exceptions.ConnectionTimeoutError,
                          exceptions.InternalServerError)
        self.error = exceptions.Etcd3Exception
        self._current = 0
        self._lock = threading.Lock()
        self._batch = _GroupCommit(self)

    def current(self) -> Any:
        return self.clients[self._current]

    def failed(self, client: Any, why: object) -> None:
        """``client``'s member failed: use the next endpoint (unless another thread moved on already)."""
        with self._lock:
            i = self._current
            if self.clients[i] is client and len(self.clients) > 1:
                self._current = (i + 1) % len(self.clients)
                log.warning("etcd %s failed (%s); using %s", self.names[i], why, self.names[self._current])

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body`` to the v3 API ``path`` of the current member, moving on as needed.

        Raises:
            EtcdError: no member answered within ``retry_for``, or etcd refused the request.
        """
        deadline = time.monotonic() + self.retry_for
        delay = 0.02
        while True:
            client = self.current()
            try:
                reply: dict[str, Any] = client.post(client.get_url(path), json=body)
                return reply
            except self.transient as exc:
                why = _detail(exc)
                self.failed(client, why)
                if time.monotonic() + delay > deadline:
                    raise EtcdError(f"etcd unavailable ({', '.join(self.names)}): {why}") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.25)
            except self.error as exc:
                raise EtcdError(f"etcd refused {path}: {_detail(exc)}") from None

    # the v3 operations the storage needs
    def range(self, key: bytes, end: bytes | None = None, **options: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"key": _b64(key), **options}
        if end is not None:
            body["range_end"] = _b64(end)
        return self.post("/kv/range", body)

    def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        """Write ``key`` (attached to ``lease`` unless 0), together with the writes of other threads; returns
        the revision of the write.

        Raises:
            EtcdError: etcd unavailable, or refused this write (an unknown lease: "lease not found")."""
        op: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            op["lease"] = lease
        return self._batch.submit(op)

    def delete(self, key: bytes, end: bytes | None = None) -> int:
        body: dict[str, Any] = {"key": _b64(key)}
        if end is not None:
            body["range_end"] = _b64(end)
        return int(self.post("/kv/deleterange", body)["header"]["revision"])

    def txn(self, compare: list[dict[str, Any]], success: list[dict[str, Any]],
            failure: list[dict[str, Any]]) -> tuple[bool, dict[str, Any]]:
        reply = self.post("/kv/txn", {"compare": compare, "success": success, "failure": failure})
        return bool(reply.get("succeeded", False)), reply

    def grant(self, ttl: int) -> int:
        return int(self.post("/lease/grant", {"TTL": ttl, "ID": 0})["ID"])

    def keepalive(self, lease: int) -> int:
        """The lease's TTL after renewal, or -1 when it no longer exists (and its keys are gone)."""
        return int(self.post("/lease/keepalive", {"ID": lease})["result"].get("TTL", -1))

    def revoke(self, lease: int) -> int:
        """Revoke ``lease`` (its keys are deleted); returns the revision after it, 0 if it was gone."""
        try:
            return int(self.post("/kv/lease/revoke", {"ID": lease})["header"]["revision"])
        except EtcdError as exc:
            if "lease not found" in str(exc):
                return 0
            raise

    def close(self) -> None:
        self.session.close()


class _Write:
    __slots__ = ("op", "revision", "error")

    def __init__(self, op: dict[str, Any]) -> None:
        self.op = op
        self.revision = 0
        self.error: Exception | None = None


class _GroupCommit:
    """Puts from many threads, sent in transactions of up to MAX_BATCH (each key once per transaction).

    The thread whose write finds no transaction under way sends every write waiting then (its own included)
    and the others wait for it; when it is done, the next waiting thread sends what gathered meanwhile. A
    transaction that etcd refuses as a whole (one write's lease is gone) is sent again write by write, so
    only that write fails.
    """

    def __init__(self, client: EtcdClient) -> None:
        self.client = client
        self._cond = threading.Condition()
        self._pending: list[_Write] = []
        self._sending = False

    def submit(self, op: dict[str, Any]) -> int:
        mine = _Write(op)
        with self._cond:
            self._pending.append(mine)
            while mine.revision == 0 and mine.error is None:
                if self._sending:
                    self._cond.wait()
                    continue
                batch = self._take()
                self._sending = True
                self._cond.release()
                try:
                    self._send(batch)
                finally:
                    self._cond.acquire()
                    self._sending = False
                    self._cond.notify_all()
        if mine.error is not None:
            raise mine.error
        return mine.revision

    def _take(self) -> list[_Write]:
        batch: list[_Write] = []
        keys: set[str] = set()
        for write in self._pending:
            if len(batch) == MAX_BATCH or write.op["key"] in keys:  # etcd refuses a key twice in one txn
                break
            batch.append(write)
            keys.add(write.op["key"])
        del self._pending[:len(batch)]
        return batch

    def _send(self, batch: list[_Write]) -> None:
        try:
            if len(batch) == 1:
                batch[0].revision = int(self.client.post("/kv/put", batch[0].op)["header"]["revision"])
                return
            try:
                _ok, reply = self.client.txn([], [{"request_put": w.op} for w in batch], [])
            except EtcdError as exc:
                if "lease not found" not in str(exc):
                    raise
                for write in batch:  # one write's lease is gone: find which, the others go through
                    self._send([write])
                return
            for write in batch:
                write.revision = int(reply["header"]["revision"])
        except Exception as exc:  # every write of the batch learns it
            for write in batch:
                if write.revision == 0:
                    write.error = exc if isinstance(exc, EtcdError) else EtcdError(f"etcd write failed: {exc}")

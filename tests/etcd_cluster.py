"""A real etcd cluster on 127.0.0.1 for the tests: N ``etcd`` processes on free ports, data in a temp dir."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

ETCD = "etcd"


def etcd_binary() -> str | None:
    """The ``etcd`` server binary, installing Debian's ``etcd-server`` when it is missing and we are root
    with apt-get (as ``.ci/run`` does); None when there is none and it cannot be installed."""
    found = shutil.which(ETCD)
    if found or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "install", "-y", "-q", "etcd-server"], ["apt-get", "update", "-q"],
                 ["apt-get", "install", "-y", "-q", "etcd-server"]):
        try:
            subprocess.run(argv, env=env, capture_output=True, timeout=600, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if shutil.which(ETCD):
            break
    return shutil.which(ETCD)


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports that were free a moment ago (bound together, then released)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class EtcdMember:
    """One ``etcd`` process of the cluster."""

    def __init__(self, name: str, client_port: int, peer_port: int, data_dir: Path) -> None:
        self.name = name
        self.client_port = client_port
        self.peer_port = peer_port
        self.data_dir = data_dir
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def start(self, binary: str, initial_cluster: str, token: str) -> None:
        client_url = f"http://{self.endpoint}"
        argv = [binary, "--name", self.name, "--data-dir", str(self.data_dir),
                "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
                "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
                "--initial-cluster", initial_cluster, "--initial-cluster-state", "new",
                "--initial-cluster-token", token, "--logger", "zap", "--log-level", "warn",
                "--log-outputs", "stderr"]
        self._log = open(self.data_dir.parent / f"{self.name}.log", "ab")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.endpoint}/health", timeout=1) as reply:
                return bool(json.loads(reply.read()).get("health") == "true")
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def kill(self, signo: int = signal.SIGKILL) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signo)
        self.wait()

    def wait(self) -> None:
        if self.proc is not None:
            self.proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log(self) -> str:
        path = self.data_dir.parent / f"{self.name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


class EtcdCluster:
    """``size`` etcd members on 127.0.0.1 under ``base`` (a temp dir); ``url`` is the ``etcd://`` storage URL.

    A context manager; ``kill(i)`` SIGKILLs member ``i`` (the others keep a quorum of a 3-member cluster).

    Raises:
        RuntimeError: the cluster did not become healthy within ``timeout`` (its logs in the message).
    """

    def __init__(self, base: Path, size: int = 3, *, binary: str = ETCD, timeout: float = 20.0) -> None:
        ports = free_ports(2 * size)
        self.members = [EtcdMember(f"m{i}", ports[2 * i], ports[2 * i + 1], base / f"m{i}") for i in range(size)]
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        token = f"pyrorpc-test-{os.getpid()}-{ports[0]}"
        try:
            for m in self.members:
                m.start(binary, initial, token)
            deadline = time.monotonic() + timeout
            while not all(m.healthy() for m in self.members):
                dead = [m for m in self.members if not m.alive()]
                if dead or time.monotonic() > deadline:
                    why = f"exited: {dead[0].name}" if dead else f"not healthy within {timeout}s"
                    raise RuntimeError(f"etcd cluster {why}\n" + "\n".join(m.log() for m in self.members))
                time.sleep(0.05)
        except BaseException:
            self.close()
            raise

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    @property
    def url(self) -> str:
        return "etcd://" + ",".join(self.endpoints)

    def leader(self) -> int:
        """The index of the member that is the Raft leader now (asked of a live member).

        Raises:
            RuntimeError: no live member knows a leader.
        """
        ids: dict[str, int] = {}
        leader = None
        for i, m in enumerate(self.members):
            if not m.alive():
                continue
            try:
                req = urllib.request.Request(f"http://{m.endpoint}/v3/maintenance/status", data=b"{}",
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=2) as reply:
                    status = json.loads(reply.read())
            except (OSError, ValueError):
                continue
            ids[status["header"]["member_id"]] = i
            leader = status.get("leader", leader)
        if leader not in ids:
            raise RuntimeError(f"no leader known to the live members ({leader!r})")
        return ids[leader]

    def kill(self, index: int) -> EtcdMember:
        """SIGKILL member ``index``; returns it."""
        member = self.members[index]
        member.kill()
        return member

    def close(self) -> None:
        for m in self.members:
            m.kill()

    def __enter__(self) -> "EtcdCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

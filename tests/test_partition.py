"""A real network partition: four hosts in network namespaces on one bridge; cut one worker's link.

Name server on host ``ns``, workers on ``w1`` and ``w2``, the client on ``cl``, all on an isolated
bridge inside a namespace of its own (nothing leaves this machine). Skipped where network namespaces
cannot be made (not root, no iproute2).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

PREFIX = "prp" + uuid.uuid4().hex[:5]
SUBNET = "10.213.77"
HOSTS = {"ns": 1, "w1": 2, "w2": 3, "cl": 4}


def ip(*args, ns=None, check=True):
    cmd = (["ip", "netns", "exec", ns] if ns else []) + ["ip", *args]
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=20)


def netns_available():
    if os.geteuid() != 0 or not shutil.which("ip"):
        return False
    probe = PREFIX + "probe"
    ok = subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return ok


pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not netns_available(), reason="network namespaces unavailable (needs root + ip)")]


@pytest.fixture
def lan():
    switch = f"{PREFIX}sw"
    names = {h: f"{PREFIX}{h}" for h in HOSTS}
    made = []
    try:
        subprocess.run(["ip", "netns", "add", switch], check=True, timeout=20)
        made.append(switch)
        ip("link", "add", "br0", "type", "bridge", ns=switch)
        ip("link", "set", "br0", "up", ns=switch)
        for host, n in HOSTS.items():
            name = names[host]
            subprocess.run(["ip", "netns", "add", name], check=True, timeout=20)
            made.append(name)
            ip("link", "set", "lo", "up", ns=name)
            # veth pair: eth0 inside the host, <host>-p on the switch's bridge
            ip("link", "add", "eth0", "netns", name, "type", "veth", "peer", "name", f"{host}-p",
               "netns", switch)
            ip("addr", "add", f"{SUBNET}.{n}/24", "dev", "eth0", ns=name)
            ip("link", "set", "eth0", "up", ns=name)
            ip("link", "set", f"{host}-p", "master", "br0", ns=switch)
            ip("link", "set", f"{host}-p", "up", ns=switch)
        yield {"switch": switch, **names}
    finally:
        for name in reversed(made):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)


def in_ns(ns, argv):
    return ["ip", "netns", "exec", ns, *argv]


CLIENT = textwrap.dedent("""
    import json, sys, threading, time
    import pyrorpc
    ns, seconds = sys.argv[1], float(sys.argv[2])
    pool = pyrorpc.Pool("where", ns=ns, timeout=10, refresh=0.3)
    ok, failures, timeline = 0, [], []
    lock = threading.Lock()
    stop = time.monotonic() + seconds
    t0 = time.monotonic()
    def run(k):
        global ok
        i = 0
        while time.monotonic() < stop:
            i += 1
            try:
                host = pool.where(k * 10**6 + i)
                with lock:
                    ok += 1
                    timeline.append((round(time.monotonic() - t0, 2), host))
            except Exception as exc:
                with lock:
                    failures.append(repr(exc))
    print("READY", flush=True)
    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    pool.close()
    print(json.dumps({"ok": ok, "failures": failures, "timeline": timeline}), flush=True)
""")


def test_partitioned_worker_is_routed_around_and_rejoins(lan, tmp_path):
    env = dict(os.environ)
    ns_addr = f"{SUBNET}.1:9090"
    nsproc = subprocess.Popen(in_ns(lan["ns"], [sys.executable, "-m", "nameserver", "--host", f"{SUBNET}.1",
                                                "--port", "9090", "--lease-ttl", "2"]),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    procs = [nsproc]
    try:
        assert nsproc.stdout is not None
        assert "NS running" in nsproc.stdout.readline()
        workers = {}
        for host in ("w1", "w2"):
            addr = f"{SUBNET}.{HOSTS[host]}"
            workers[host] = subprocess.Popen(
                in_ns(lan[host], [sys.executable, "-m", "pyrorpc", "worker", "start", "services:Where", "--ns",
                                  ns_addr, "--host", addr, "--lease-ttl", "2"]),
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            procs.append(workers[host])
            assert "serving" in workers[host].stdout.readline()
        script = tmp_path / "client.py"
        script.write_text(CLIENT)
        client = subprocess.Popen(in_ns(lan["cl"], [sys.executable, str(script), ns_addr, "14"]),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        procs.append(client)
        assert client.stdout.readline().strip() == "READY"
        started = time.monotonic()
        time.sleep(3)  # steady state with both workers (the client records its own timeline)
        cut_at = time.monotonic() - started
        ip("link", "set", "w1-p", "down", ns=lan["switch"])
        time.sleep(5)
        heal_at = time.monotonic() - started
        ip("link", "set", "w1-p", "up", ns=lan["switch"])
        out, _ = client.communicate(timeout=60)
        result = json.loads(out.strip().splitlines()[-1])
    finally:
        for p in procs:
            p.kill()
            p.wait(10)
    assert result["failures"] == [], result["failures"][:3]
    timeline = result["timeline"]
    w1 = f"{SUBNET}.2"
    before = [t for t, h in timeline if h == w1 and t < cut_at]
    during = [t for t, h in timeline if h == w1 and cut_at + 3.0 < t < heal_at]  # lease 2 s + refresh
    after = [t for t, h in timeline if h == w1 and t > heal_at]
    assert before, "w1 served before the cut"
    assert not during, "w1 still got calls long after it was cut off"
    assert after, "w1 rejoined after the link came back"
    assert [t for t, h in timeline if h != w1 and cut_at < t < heal_at], "w2 kept serving"

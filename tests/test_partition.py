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

from pyrorpc.testing import ChildProcess

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


W1, W2 = f"{SUBNET}.{HOSTS['w1']}", f"{SUBNET}.{HOSTS['w2']}"

# The client calls without pause from 4 threads and reports 10 times a second what the test waits on (calls
# served per worker address and per thread; the workers in its pool, and those it deems healthy); the test
# drives it through stdin: MARK prints the client's clock (the timeline's), STOP ends it with the timeline.
CLIENT = textwrap.dedent("""
    import json, sys, threading, time
    import pyrorpc
    pool = pyrorpc.Pool("where", ns=sys.argv[1], timeout=10, refresh=0.3)
    ok, failures, timeline, served, per_thread = 0, [], [], {}, [0] * 4
    lock = threading.Lock()
    stop = threading.Event()
    t0 = time.monotonic()
    def now():
        return round(time.monotonic() - t0, 3)
    def run(k):
        global ok
        i = 0
        while not stop.is_set():
            i += 1
            try:
                host = pool.where(k * 10**6 + i)
                with lock:
                    ok += 1
                    served[host] = served.get(host, 0) + 1
                    per_thread[k] += 1
                    timeline.append((now(), host))
            except Exception as exc:
                with lock:
                    failures.append(repr(exc))
    def report():
        while not stop.wait(0.1):
            workers = pool.workers()
            members = sorted(w.uri.rsplit("@", 1)[1].rsplit(":", 1)[0] for w in workers)
            healthy = sorted(w.uri.rsplit("@", 1)[1].rsplit(":", 1)[0] for w in workers if not w.ejected)
            with lock:
                print("TICK", json.dumps({"t": now(), "served": served, "threads": per_thread, "members": members,
                                          "healthy": healthy}), flush=True)
    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)] + [threading.Thread(target=report)]
    [t.start() for t in threads]
    print("READY", flush=True)
    for line in sys.stdin:
        if line.strip() == "MARK":
            print("MARK", now(), flush=True)
        elif line.strip() == "STOP":
            break
    stop.set()
    [t.join() for t in threads]
    pool.close()
    print("RESULT", json.dumps({"ok": ok, "failures": failures, "timeline": timeline}), flush=True)
""")


def tick_when(client, predicate, timeout, what):
    """The client's first report from now on that satisfies ``predicate``."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{what}: not seen within {timeout}s\n" + "\n".join(client.lines[-5:]))
        tick = json.loads(client.expect(r"^TICK (.*)", left).group(1))
        if predicate(tick):
            return tick


def mark(client):
    client.send("MARK\n")
    return float(client.expect(r"^MARK (\S+)", 10).group(1))


def test_partitioned_worker_is_routed_around_and_rejoins(lan, tmp_path):
    ns_addr = f"{SUBNET}.1:9090"
    procs = []
    try:
        procs.append(ChildProcess(in_ns(lan["ns"], [sys.executable, "-m", "nameserver", "--host", f"{SUBNET}.1",
                                                    "--port", "9090", "--lease-ttl", "2"])))
        procs[-1].expect(r"^NS running", 15)
        for host, addr in (("w1", W1), ("w2", W2)):
            procs.append(ChildProcess(in_ns(lan[host], [sys.executable, "-m", "pyrorpc", "worker", "start",
                                                        "services:Where", "--ns", ns_addr, "--host", addr,
                                                        "--lease-ttl", "2"])))
            procs[-1].expect(r"^worker \S+ serving", 15)
        script = tmp_path / "client.py"
        script.write_text(CLIENT)
        client = ChildProcess(in_ns(lan["cl"], [sys.executable, str(script), ns_addr]), stdin=True)
        procs.append(client)
        client.expect(r"^READY", 15)

        tick_when(client, lambda t: t["healthy"] == [W1, W2] and min(t["served"].get(W1, 0),
                                                                     t["served"].get(W2, 0)) >= 20,
                  15, "both workers serving")
        cut_at = mark(client)
        ip("link", "set", "w1-p", "down", ns=lan["switch"])
        # its heartbeats stop: first the pool leaves it out (suspect), then its lease expires and it is dropped,
        # which cuts off the calls stuck on it (they are idempotent: they go to w2); every thread moves on
        out = tick_when(client, lambda t: W1 not in t["healthy"], 10, "w1 left out after the cut")
        gone = tick_when(client, lambda t: W1 not in t["members"], 10, "w1 dropped when its lease expired")
        alone = tick_when(client, lambda t: t["served"][W2] >= gone["served"][W2] + 50
                          and all(n >= before + 5 for n, before in zip(t["threads"], gone["threads"], strict=True)),
                          5, "every client thread served by w2 alone")
        heal_at = mark(client)
        ip("link", "set", "w1-p", "up", ns=lan["switch"])
        # it renews its lease again (registering anew), the pool takes it back and sends it calls
        tick_when(client, lambda t: W1 in t["healthy"] and t["served"][W1] >= alone["served"][W1] + 20, 15,
                  "w1 serving again after the heal")
        client.send("STOP\n")
        result = json.loads(client.expect(r"^RESULT (.*)", 30).group(1))
        assert client.wait(30) == 0
    finally:
        for p in procs:
            p.kill()
    assert result["failures"] == [], result["failures"][:3]
    assert out["t"] < gone["t"], "w1 was not left out on its missed heartbeats before its lease expired"
    assert gone["t"] - cut_at <= 3.5, "w1 dropped later than its lease (2 s) and a refresh (0.3 s) allow"
    # a check of the set-up: with the link down, nothing can come back from w1
    assert not [t for t, h in result["timeline"] if h == W1 and out["t"] < t < heal_at], "the cut did not cut"

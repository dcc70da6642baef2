"""Bad input at the worker and name-server ports: nothing dies, memory stays flat, good calls still work.

Frames: random bytes, truncated frames, valid headers with absurd lengths, wrong message types and
serializer ids (marshal included: it is not safe against malicious input), malformed serpent payloads;
sent before the handshake and after a valid one. ``PYRORPC_FUZZ_FRAMES`` (default 10,000) frames per port.
"""

from __future__ import annotations

import os
import random
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from Pyro5 import protocol, serializers

import pyrorpc

FRAMES = int(os.environ.get("PYRORPC_FUZZ_FRAMES", "10000"))
SERPENT = serializers.serializers["serpent"]
HEADER = "!4sHBBHHII16sHH"


def header(msg_type=protocol.MSG_INVOKE, serializer_id=1, flags=0, seq=1, data_size=0, ann_size=0,
           magic=0x4DC5, version=protocol.PROTOCOL_VERSION, tag=b"PYRO"):
    return struct.pack(HEADER, tag, version, msg_type, serializer_id, flags, seq, data_size, ann_size,
                       b"\0" * 16, 0, magic)


def random_frame(rng: random.Random) -> bytes:
    kind = rng.randrange(8)
    if kind == 0:  # noise
        return rng.randbytes(rng.randrange(1, 200))
    if kind == 1:  # absurd lengths
        return header(data_size=rng.choice([2**31, 2**32 - 1, 80 * 1024 * 1024, rng.randrange(2**32)]),
                      ann_size=rng.randrange(2**32))
    if kind == 2:  # wrong serializer, valid-looking payload
        payload = rng.randbytes(rng.randrange(0, 64))
        return header(serializer_id=rng.choice([0, 2, 3, 4, 5, 99, 255]), data_size=len(payload)) + payload
    if kind == 3:  # malformed serpent
        payload = rng.choice([b"(", b"{'a':", b"\xff\xfe", b"#serpent\n" + rng.randbytes(30), b"[1,2" * 50])
        return header(data_size=len(payload)) + payload
    if kind == 4:  # truncated valid call
        data = SERPENT.dumpsCall("obj", "add", (1, 2), {})
        full = header(data_size=len(data)) + data
        return full[:rng.randrange(1, len(full))]
    if kind == 5:  # bad magic / version / type
        return header(magic=rng.randrange(65536), version=rng.randrange(65536), msg_type=rng.randrange(256))
    if kind == 6:  # annotations claiming more than present
        return header(ann_size=rng.randrange(8, 1000), data_size=0) + b"XXXX" + struct.pack("!I", 10**9)
    # well-formed call to a private / unknown method / unknown object
    data = SERPENT.dumpsCall(rng.choice(["obj", "Pyro.Daemon", "Pyro.NameServer"]),
                             rng.choice(["_private", "__init__", "nope", "__getattr__"]), ("x",), {})
    return header(data_size=len(data)) + data


def handshake_frame(obj: str) -> bytes:
    data = SERPENT.dumps({"handshake": "hello", "object": obj})
    return protocol.SendingMessage(protocol.MSG_CONNECT, 0, 0, SERPENT.serializer_id, data).data


def send(addr, frames, handshake_obj=None):
    with socket.create_connection(addr, timeout=5) as sock:
        if handshake_obj is not None:
            sock.sendall(handshake_frame(handshake_obj))
            _drain(sock)
        for frame in frames:
            try:
                sock.sendall(frame)
            except OSError:
                return
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # the server already hung up on us: fine
            return
        _drain(sock)


def _drain(sock):
    try:
        sock.settimeout(0.5)
        sock.recv(65536)
    except OSError:
        pass


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture
def targets(nameserver, worker_factory):
    ns = nameserver(lease_ttl=3)
    worker = worker_factory("services:Calculator", ns.ns)
    host, port = worker.uri.rsplit("@", 1)[1].rsplit(":", 1)
    return ns, worker, (host, int(port)), (ns.address.host, ns.address.port)


def check_alive(ns, worker):
    assert ns.alive() and worker.alive()
    with pyrorpc.Pool("calc", ns=ns.ns, timeout=10) as pool:
        assert pool.add(2, 3) == 5
        assert list(pool.add.map([(i, i) for i in range(20)])) == [2 * i for i in range(20)]


@pytest.mark.slow
def test_fuzzed_frames_at_both_ports(targets):
    ns, worker, worker_addr, ns_addr = targets
    check_alive(ns, worker)  # warm up both before taking the memory baseline
    before = {p.pid: rss_kib(p.pid) for p in (ns, worker)}
    rng = random.Random(20261127)
    object_id = worker.uri.split(":", 1)[1].split("@", 1)[0]
    for addr, obj in ((worker_addr, object_id), (ns_addr, "Pyro.NameServer")):
        sent = 0
        while sent < FRAMES:
            batch = [random_frame(rng) for _ in range(rng.randrange(1, 4))]
            send(addr, batch, handshake_obj=obj if rng.random() < 0.5 else None)
            sent += len(batch)
    check_alive(ns, worker)
    for proc in (ns, worker):
        growth_mib = (rss_kib(proc.pid) - before[proc.pid]) / 1024
        assert growth_mib < 20, f"{proc.argv[2:4]} grew by {growth_mib:.1f} MiB"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(min_size=1, max_size=300), st.booleans())
def test_hypothesis_bytes_after_handshake(targets, payload, after_handshake):
    ns, worker, worker_addr, ns_addr = targets
    send(ns_addr, [payload], handshake_obj="Pyro.NameServer" if after_handshake else None)
    send(worker_addr, [header(data_size=len(payload)) + payload], handshake_obj=None)
    assert ns.alive() and worker.alive()


def test_oversized_argument_is_refused_and_worker_survives(targets):
    ns, worker, _, _ = targets
    with pyrorpc.Pool("calc", ns=ns.ns, timeout=30) as pool:
        with pytest.raises(pyrorpc.MessageTooLargeError, match="exceeds"):
            pool.add(b"x" * (80 * 1024 * 1024), b"")
        assert pool.add(1, 2) == 3
        # a worker with a larger limit than the reply's receiver: refused on the worker side, clearly
    with pyrorpc.Pool("calc", ns=ns.ns, timeout=30, max_message_size=100 * 1024 * 1024) as big:
        # the request passes our client's check; the worker (64 MiB) refuses it while reading
        with pytest.raises((pyrorpc.WorkerLostError, pyrorpc.MessageTooLargeError)):
            big.add(b"x" * (70 * 1024 * 1024), b"")
        assert big.add(2, 2) == 4
    assert worker.alive()


def test_marshal_serializer_is_refused(targets):
    ns, worker, worker_addr, ns_addr = targets
    data = serializers.serializers["marshal"].dumps({"handshake": "hello", "object": "Pyro.NameServer"})
    frame = protocol.SendingMessage(protocol.MSG_CONNECT, 0, 0, 2, data).data
    with socket.create_connection(ns_addr, timeout=5) as sock:
        sock.sendall(frame)
        reply = sock.recv(65536)
    assert reply == b"" or reply[6] == protocol.MSG_CONNECTFAIL
    check_alive(ns, worker)

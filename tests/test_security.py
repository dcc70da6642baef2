"""Shared secret (HMAC handshake, replay refusal, server proof) and TLS / mutual TLS, end to end."""

from __future__ import annotations

import socket

import Pyro5.api
import Pyro5.errors
import pytest
from Pyro5 import protocol, serializers
from services import Calculator

import pyrorpc
from nameserver import NameServerDaemon
from pyrorpc.security import HandshakeVerifier, make_token

SECRET = "s3cr3t-for-tests"


@pytest.fixture
def secure_ns():
    settings = pyrorpc.Settings(secret=SECRET)
    with NameServerDaemon("127.0.0.1", 0, lease_ttl=3, settings=settings) as daemon:
        daemon.start()
        yield "{}:{}".format(*daemon.address)


def raw_handshake(host, port, token, obj="Pyro.NameServer"):
    """Send one Pyro5 connect handshake carrying ``token``; returns (accepted, reply)."""
    ser = serializers.serializers["serpent"]
    with socket.create_connection((host, port), timeout=5) as sock:
        conn = Pyro5.socketutil.SocketConnection(sock, obj, keep_open=True)
        data = ser.dumps({"handshake": token, "object": obj})
        conn.send(protocol.SendingMessage(protocol.MSG_CONNECT, 0, 0, ser.serializer_id, data).data)
        msg = protocol.recv_stub(conn, [protocol.MSG_CONNECTOK, protocol.MSG_CONNECTFAIL])
        return msg.type == protocol.MSG_CONNECTOK, ser.loads(msg.data)


def test_verifier_unit():
    v = HandshakeVerifier("k", freshness=30)
    token = make_token("k", now=1000.0)
    assert "proof" in v.verify(token, now=1000.0)
    with pytest.raises(pyrorpc.AuthenticationError, match="replayed"):
        v.verify(token, now=1001.0)
    with pytest.raises(pyrorpc.AuthenticationError, match="wrong secret"):
        v.verify(make_token("other", now=1000.0), now=1000.0)
    with pytest.raises(pyrorpc.AuthenticationError, match="stale"):
        v.verify(make_token("k", now=900.0), now=1000.0)
    with pytest.raises(pyrorpc.AuthenticationError, match="no token"):
        v.verify("hello")
    with pytest.raises(pyrorpc.AuthenticationError, match="malformed"):
        v.verify({"ts": 1, "nonce": [], "mac": None})
    tampered = dict(make_token("k", now=1000.0), ts="1000.500000")
    with pytest.raises(pyrorpc.AuthenticationError, match="wrong secret"):
        v.verify(tampered, now=1000.0)


def test_secret_everywhere_works(secure_ns):
    with pyrorpc.WorkerHost(Calculator, ns=secure_ns, settings=pyrorpc.Settings(secret=SECRET)):
        with pyrorpc.connect("calc", ns=secure_ns, secret=SECRET) as calc:
            assert calc.add(2, 3) == 5
        with pyrorpc.Pool("calc", ns=secure_ns, secret=SECRET) as pool:
            assert pool.add(1, 1) == 2
            assert list(pool.get.map(["a"])) == ["value-a"]


def test_missing_or_wrong_secret_is_refused(secure_ns):
    with pyrorpc.WorkerHost(Calculator, ns=secure_ns, settings=pyrorpc.Settings(secret=SECRET)) as host:
        for kwargs in ({}, {"secret": "wrong"}):
            with pytest.raises(pyrorpc.AuthenticationError):
                pyrorpc.connect("calc", ns=secure_ns, **kwargs)
            with pytest.raises(pyrorpc.AuthenticationError):
                pyrorpc.Pool("calc", ns=secure_ns, **kwargs)
            # straight to the worker, past the name server: the worker refuses too
            with pyrorpc.connect(host.uri, **kwargs) as direct:
                with pytest.raises(pyrorpc.AuthenticationError):
                    direct.add(1, 2)
        with pytest.raises(pyrorpc.AuthenticationError):
            pyrorpc.WorkerHost(Calculator, ns=secure_ns, settings=pyrorpc.Settings(secret="wrong")).start()


def test_plain_pyro5_client_cannot_do_anything(secure_ns):
    with pyrorpc.WorkerHost(Calculator, ns=secure_ns, settings=pyrorpc.Settings(secret=SECRET)) as host:
        for action in (lambda ns: ns.list(), lambda ns: ns.lookup(host.name),
                       lambda ns: ns.register("evil", "PYRO:x@127.0.0.1:1"), lambda ns: ns.remove(host.name),
                       lambda ns: ns.yplookup(meta_all={"pyrorpc.service:calc"})):
            with Pyro5.api.Proxy(f"PYRO:Pyro.NameServer@{secure_ns}") as ns:
                with pytest.raises(Pyro5.errors.CommunicationError, match="authentication failed"):
                    action(ns)
        with Pyro5.api.Proxy(host.uri) as plain:
            with pytest.raises(Pyro5.errors.CommunicationError, match="authentication failed"):
                plain.add(1, 2)
        # nothing changed: the worker is still registered, nothing else is
        client = pyrorpc.NameServerClient(pyrorpc.Settings(ns=secure_ns, secret=SECRET))
        assert set(client.list()) == {"Pyro.NameServer", host.name}


def test_replayed_handshake_is_refused(secure_ns):
    host, port = secure_ns.rsplit(":", 1)
    token = make_token(SECRET, target="Pyro.NameServer")
    ok, reply = raw_handshake(host, int(port), token)
    assert ok and "proof" in reply["handshake"]
    ok, reply = raw_handshake(host, int(port), token)
    assert not ok and "replayed" in reply
    ok, reply = raw_handshake(host, int(port), make_token("wrong", target="Pyro.NameServer"))
    assert not ok and "wrong secret" in reply


def test_token_for_one_server_is_refused_by_another(secure_ns):
    """Each server remembers the nonces it saw, so a token is bound to the object it was made for: one
    sent to a worker cannot be replayed to the name server or to another worker."""
    host, port = secure_ns.rsplit(":", 1)
    with pyrorpc.WorkerHost(Calculator, ns=secure_ns, secret=SECRET) as a, \
            pyrorpc.WorkerHost(Calculator, ns=secure_ns, secret=SECRET) as b:
        token = make_token(SECRET, target=a.name)
        a_host, a_port = a.uri.rsplit("@", 1)[1].rsplit(":", 1)
        b_host, b_port = b.uri.rsplit("@", 1)[1].rsplit(":", 1)
        ok, _reply = raw_handshake(a_host, int(a_port), token, obj=a.name)
        assert ok
        for target_host, target_port, obj in ((b_host, b_port, b.name), (host, port, "Pyro.NameServer")):
            ok, reply = raw_handshake(target_host, int(target_port), token, obj=obj)
            assert not ok and "authentication failed" in reply, (obj, reply)
        ok, reply = raw_handshake(b_host, int(b_port), token, obj=a.name)  # B does not serve A's object
        assert not ok and "unknown object" in reply


def test_client_refuses_server_without_the_secret(ns_addr):
    # an impostor worker (no secret) cannot prove it knows the secret: the client refuses it
    with pyrorpc.WorkerHost(Calculator, ns=ns_addr) as host:
        with pyrorpc.connect(host.uri, secret=SECRET) as calc:
            with pytest.raises(pyrorpc.AuthenticationError, match="prove"):
                calc.add(1, 2)


# TLS ----------------------------------------------------------------------------------------------

@pytest.fixture
def pki(tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("client@pyrorpc")
    paths = {}
    for name, blob in (("ca", ca.cert_pem), ("server_key", server.private_key_pem),
                       ("client_key", client.private_key_pem)):
        paths[name] = tmp_path / f"{name}.pem"
        blob.write_to_path(str(paths[name]))
    paths["server_cert"] = tmp_path / "server_cert.pem"
    paths["client_cert"] = tmp_path / "client_cert.pem"
    paths["server_cert"].write_bytes(b"".join(b.bytes() for b in server.cert_chain_pems))
    paths["client_cert"].write_bytes(b"".join(b.bytes() for b in client.cert_chain_pems))
    return {k: str(v) for k, v in paths.items()}


def test_tls_calls_work(pki):
    server = pyrorpc.Settings(tls_cert=pki["server_cert"], tls_key=pki["server_key"])
    with NameServerDaemon("127.0.0.1", 0, settings=server) as d:
        d.start()
        ns = "{}:{}".format(*d.address)
        client = dict(tls_ca=pki["ca"])
        # the worker is a TLS server and a TLS client of the name server
        with pyrorpc.WorkerHost(Calculator, settings=pyrorpc.Settings(
                ns=ns, tls_cert=pki["server_cert"], tls_key=pki["server_key"], tls_ca=pki["ca"])) as host:
            with pyrorpc.connect("calc", ns=ns, **client) as calc:
                assert calc.add(20, 22) == 42
            # a client that does not speak TLS gets nowhere
            with pytest.raises(pyrorpc.NameServerUnavailableError):
                pyrorpc.connect("calc", ns=ns, connect_timeout=2)
            with Pyro5.api.Proxy(host.uri) as plain:
                plain._pyroTimeout = 2
                with pytest.raises(Pyro5.errors.CommunicationError):
                    plain.add(1, 2)


def test_tls_worker_needs_tls_ns_trust(pki):
    """With TLS on both sides and secret on top, everything still works."""
    both = dict(tls_cert=pki["server_cert"], tls_key=pki["server_key"], tls_ca=pki["ca"], secret=SECRET)
    with NameServerDaemon("127.0.0.1", 0, settings=pyrorpc.Settings(
            tls_cert=pki["server_cert"], tls_key=pki["server_key"], secret=SECRET)) as d:
        d.start()
        ns = "{}:{}".format(*d.address)
        with pyrorpc.WorkerHost(Calculator, settings=pyrorpc.Settings(ns=ns, **both)):
            with pyrorpc.Pool("calc", ns=ns, tls_ca=pki["ca"], secret=SECRET) as pool:
                assert pool.add(1, 2) == 3


def test_mutual_tls_refuses_client_without_certificate(pki):
    mtls_server = dict(tls_cert=pki["server_cert"], tls_key=pki["server_key"], tls_ca=pki["ca"], tls_mutual=True)
    with NameServerDaemon("127.0.0.1", 0, settings=pyrorpc.Settings(**mtls_server)) as d:
        d.start()
        ns = "{}:{}".format(*d.address)
        # the worker presents the server cert as its client cert (same CA)
        with pyrorpc.WorkerHost(Calculator, settings=pyrorpc.Settings(ns=ns, **mtls_server)) as host:
            with pytest.raises((pyrorpc.NameServerUnavailableError, pyrorpc.WorkerLostError)):
                pyrorpc.connect("calc", ns=ns, tls_ca=pki["ca"], connect_timeout=2)
            with pyrorpc.connect(host.uri, tls_ca=pki["ca"], connect_timeout=2) as anon:
                with pytest.raises(pyrorpc.WorkerLostError):
                    anon.add(1, 2)
            with pyrorpc.connect("calc", ns=ns, tls_ca=pki["ca"], tls_cert=pki["client_cert"],
                                 tls_key=pki["client_key"]) as calc:
                assert calc.add(2, 2) == 4


def test_refusal_is_logged_on_the_server(secure_ns, caplog):
    import logging
    caplog.set_level(logging.WARNING, logger="pyrorpc.security")
    with pytest.raises(pyrorpc.AuthenticationError):
        pyrorpc.NameServerClient(pyrorpc.Settings(ns=secure_ns, secret="wrong")).ping()
    assert any("refused connection from" in r.getMessage() and "wrong secret" in r.getMessage()
               for r in caplog.records)


def test_cli_secret_everywhere(tmp_path):
    import os
    import subprocess
    import sys

    from pyrorpc.testing import NameServerProcess, WorkerProcess
    env = dict(os.environ, PYRORPC_SECRET=SECRET)
    with NameServerProcess(lease_ttl=3, env=env) as ns, WorkerProcess("services:Calculator", ns.ns, env=env):
        ok = subprocess.run([sys.executable, "-m", "pyrorpc", "call", "calc", "add", "2", "3", "--ns", ns.ns],
                            env=env, capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0 and ok.stdout.strip() == "5"
        flag = subprocess.run([sys.executable, "-m", "pyrorpc", "call", "calc", "add", "2", "3", "--ns", ns.ns,
                               "--secret", SECRET], capture_output=True, text=True, timeout=60)
        assert flag.returncode == 0 and flag.stdout.strip() == "5"
        bad = subprocess.run([sys.executable, "-m", "pyrorpc", "ns", "list", "--ns", ns.ns, "--secret", "nope"],
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 1 and bad.stderr.startswith("Error: AuthenticationError")
        assert "Traceback" not in bad.stderr + bad.stdout
        bare = subprocess.run([sys.executable, "-m", "pyrorpc", "call", "calc", "add", "1", "1", "--ns", ns.ns],
                              capture_output=True, text=True, timeout=60)
        assert bare.returncode == 1 and "AuthenticationError" in bare.stderr

"""The public face: __all__ matches the public names; every module imports alone (no cycles)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import nameserver
import pyrorpc


def test_all_matches_public_names():
    public = {name for name in vars(pyrorpc) if not name.startswith("_")}
    submodules = {m.name for m in pkgutil.iter_modules(pyrorpc.__path__)}
    assert sorted(pyrorpc.__all__) == pyrorpc.__all__
    # `errors` is exported as a module; `service` is the decorator (its module is pyrorpc.service)
    assert set(pyrorpc.__all__) == public - (submodules - {"errors", "service"})


def test_service_attribute_is_the_decorator_even_after_importing_every_module():
    code = ("import importlib, pkgutil, pyrorpc\n"
            "[importlib.import_module('pyrorpc.' + m.name) for m in pkgutil.iter_modules(pyrorpc.__path__)"
            " if m.name != '__main__']\n"
            "import pyrorpc.service\n"
            "assert callable(pyrorpc.service) and pyrorpc.service.__name__ == 'service', pyrorpc.service\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_design_api_names_exist():
    for name in ("service", "oneway", "idempotent", "WorkerHost", "connect", "Pool", "errors", "Settings"):
        assert hasattr(pyrorpc, name), name
    for name in ("NoWorkersError", "WorkerLostError", "CallTimeoutError", "AuthenticationError"):
        cls = getattr(pyrorpc.errors, name)
        assert issubclass(cls, pyrorpc.errors.RpcError)
    import Pyro5.errors
    assert issubclass(pyrorpc.errors.RpcError, Pyro5.errors.PyroError)
    assert issubclass(pyrorpc.CallTimeoutError, Pyro5.errors.TimeoutError)
    assert issubclass(pyrorpc.WorkerLostError, Pyro5.errors.CommunicationError)
    assert nameserver.NameServer.__mro__[1].__module__ == "Pyro5.nameserver"


@pytest.mark.parametrize("module", sorted(
    [f"pyrorpc.{m.name}" for m in pkgutil.iter_modules(pyrorpc.__path__)]
    + [f"nameserver.{m.name}" for m in pkgutil.iter_modules(nameserver.__path__)]
    + ["pyrorpc", "nameserver"]))
def test_module_imports_in_fresh_interpreter(module):
    if module.endswith("__main__"):
        pytest.skip("entry point")
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, timeout=60)


def _pyrorpc_imports(path):
    import ast
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level and "pyrorpc" in path.split("/")[-2]:  # relative import inside pyrorpc
                if not mod:  # from . import protocol
                    found.update("pyrorpc." + a.name for a in node.names)
                    continue
                mod = "pyrorpc." + mod
            if mod.startswith("pyrorpc"):
                found.add(mod)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("pyrorpc"))
    return found


def test_imports_flow_one_way():
    """Layers (STYLE 2, 20): protocol and codec (no I/O) -> wire (transport) -> security -> server ->
    naming/worker/proxy/pool -> cli; nameserver uses only config/errors/security/server/metrics/context."""
    import glob
    import os
    ns_dir = os.path.dirname(nameserver.__file__)
    for path in glob.glob(os.path.join(ns_dir, "*.py")):
        assert _pyrorpc_imports(path) <= {"pyrorpc.config", "pyrorpc.errors", "pyrorpc.security",
                                          "pyrorpc.server", "pyrorpc.metrics", "pyrorpc.context"}, path
    pkg = os.path.dirname(pyrorpc.__file__)

    def imports(name: str) -> set[str]:
        return _pyrorpc_imports(os.path.join(pkg, name))

    assert imports("protocol.py") == set()
    assert imports("codec.py") == set()
    assert imports("compat.py") == set()
    assert imports("errors.py") == set()
    assert imports("stats.py") == set()
    assert imports("httpd.py") == set()
    assert imports("metrics.py") <= {"pyrorpc.errors", "pyrorpc.stats", "pyrorpc.httpd"}  # (the name server uses it)
    assert imports("logs.py") == set()
    assert imports("config.py") == set()
    assert imports("wire.py") <= {"pyrorpc.errors", "pyrorpc.protocol", "pyrorpc.codec", "pyrorpc.compat"}
    assert imports("security.py") <= {"pyrorpc.config", "pyrorpc.errors", "pyrorpc.wire", "pyrorpc.protocol"}
    # the server core: ioloop (connections, handshakes) -> calls (running requests) -> server
    assert imports("connection.py") <= {"pyrorpc.protocol"}
    assert imports("ioloop.py") <= {"pyrorpc.connection", "pyrorpc.errors", "pyrorpc.protocol", "pyrorpc.wire"}
    assert imports("context.py") <= {"pyrorpc.codec", "pyrorpc.protocol"}
    assert imports("tracing.py") <= {"pyrorpc.context", "pyrorpc.protocol"}  # (OpenTelemetry: imported by users)
    assert imports("aloop.py") == set()
    assert imports("streams.py") <= {"pyrorpc.aloop", "pyrorpc.connection", "pyrorpc.protocol", "pyrorpc.wire"}
    assert imports("calls.py") <= {"pyrorpc.aloop", "pyrorpc.compat", "pyrorpc.connection", "pyrorpc.context",
                                    "pyrorpc.errors", "pyrorpc.codec", "pyrorpc.tracing", "pyrorpc.stats",
                                    "pyrorpc.protocol", "pyrorpc.streams", "pyrorpc.wire"}
    # mux (multiplexed connections) sits beside calls: both are mixins of the server
    assert imports("push.py") <= {"pyrorpc.aloop", "pyrorpc.connection", "pyrorpc.context", "pyrorpc.errors",
                                  "pyrorpc.protocol", "pyrorpc.wire", "pyrorpc.tracing"}
    assert imports("acks.py") == set()  # (send(): what worker and client share, no I/O)
    assert imports("mux.py") <= {"pyrorpc.acks", "pyrorpc.aloop", "pyrorpc.calls", "pyrorpc.connection",
                                 "pyrorpc.context", "pyrorpc.errors", "pyrorpc.protocol", "pyrorpc.push",
                                 "pyrorpc.wire", "pyrorpc.tracing", "pyrorpc.stats"}
    # the outbox sends through a pool's endpoints, each entry to its own worker (a Pool made with outbox=
    # imports it when it needs it)
    assert imports("outbox.py") <= {"pyrorpc.acks", "pyrorpc.codec", "pyrorpc.compat", "pyrorpc.config",
                                    "pyrorpc.endpoint", "pyrorpc.errors", "pyrorpc.proxy", "pyrorpc.pool"}
    # shared heartbeats: a supervisor's name-server client, no server parts
    assert imports("heartbeats.py") <= {"pyrorpc.config", "pyrorpc.errors", "pyrorpc.naming"}
    assert imports("server.py") <= {"pyrorpc.aloop", "pyrorpc.calls", "pyrorpc.connection", "pyrorpc.ioloop",
                                    "pyrorpc.mux", "pyrorpc.protocol", "pyrorpc.push", "pyrorpc.streams"}
    for low in ("naming.py", "worker.py", "proxy.py", "endpoint.py", "pool.py", "server.py", "callbacks.py",
                "ioloop.py", "calls.py", "connection.py"):
        assert "pyrorpc.cli" not in imports(low)
        assert "pyrorpc.testing" not in imports(low)
        assert "pyrorpc.pool" not in imports(low) or low == "pool.py"


def test_errors_survive_the_serializer():
    from Pyro5.serializers import SerpentSerializer
    ser = SerpentSerializer()
    for cls in (pyrorpc.NoWorkersError, pyrorpc.WorkerLostError, pyrorpc.CallTimeoutError,
                pyrorpc.AuthenticationError, pyrorpc.WorkerDrainingError):
        back = ser.loads(ser.dumps(cls("msg")))
        assert type(back) is cls and str(back) == "msg"

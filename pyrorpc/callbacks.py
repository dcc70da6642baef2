"""CallbackServer: serves objects of a client process, so workers can call them back (DRb's undumped objects).

Register an object and pass it as an argument: it travels as a reference (a Pyro5 proxy description, so
a stock Pyro5 peer gets a working ``Pyro5.api.Proxy``), and a pyrorpc worker receives a thread-safe
``pyrorpc.Proxy`` to it that connects back with the worker's own secret and TLS settings. The server is
pyrorpc's server core, with the same secret, TLS and limits as a worker.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from Pyro5.serializers import SerializerBase

from .config import Settings, resolve
from .errors import ConfigurationError
from .proxy import set_callback_settings
from .security import server_ssl_context, server_verifier
from .server import Server

__all__ = ["CallbackServer"]

_PROXY_CLASS = "Pyro5.client.Proxy"
_registered: "weakref.WeakKeyDictionary[Any, tuple[str, dict[str, Any]]]" = weakref.WeakKeyDictionary()
_by_id: dict[int, tuple[str, dict[str, Any]]] = {}  # for objects that cannot be weakly referenced
_hooked: set[type] = set()
_lock = threading.Lock()


def _reference(obj: Any) -> dict[str, Any]:
    """The wire form of a registered object: Pyro5's proxy description (uri, oneway, methods, attrs,
    handshake, serializer); an object of the same class that is not registered travels as a copy."""
    try:
        found = _registered.get(obj)
    except TypeError:
        found = None
    if found is None:
        found = _by_id.get(id(obj))
    if found is None:
        copy: dict[str, Any] = dict(vars(obj)) if hasattr(obj, "__dict__") else {}
        copy["__class__"] = f"{type(obj).__module__}.{type(obj).__qualname__}"
        return copy
    uri, meta = found
    return {"__class__": _PROXY_CLASS, "state": (uri, tuple(sorted(meta["oneway"])), tuple(sorted(meta["methods"])),
                                                  tuple(sorted(meta["attrs"])), "hello", "serpent")}


class CallbackServer:
    """Serves this process's objects to workers that call back (progress reports, results, events).

    ::

        with pyrorpc.CallbackServer() as callbacks:
            callbacks.register(reporter)          # from now on `reporter` is passed by reference
            pool.run("job-1", reporter)           # the worker calls reporter.progress(...) back here

    Public methods (no leading ``_``) of a registered object are callable; ``@pyrorpc.oneway`` ones
    are oneway. Calls run on the server's call threads, so make the object thread safe.

    Args:
        host, port: where to listen; the workers must be able to reach ``host`` (default: settings.host).
        threads, max_connections, idle_timeout: as for a WorkerHost.
        settings: a ``pyrorpc.Settings``; keyword arguments (``secret=``, ``tls_cert=``...) override it.
    """

    def __init__(self, *, host: str | None = None, port: int = 0, threads: int | None = None,
                 max_connections: int | None = None, idle_timeout: float | None = None,
                 settings: Settings | None = None, **options: Any) -> None:
        try:
            self.settings = resolve(settings, host=host, threads=threads, max_connections=max_connections,
                                    idle_timeout=idle_timeout, **options)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
        s = self.settings
        self.server = Server(s.host, port, threads=s.threads, max_connections=s.max_connections,
                             idle_timeout=s.idle_timeout, handshake_timeout=s.connect_timeout,
                             max_message_size=s.max_message_size, ssl_context=server_ssl_context(s),
                             verify=server_verifier(s), send_timeout=s.timeout, name="callbacks")
        set_callback_settings(s)
        self._objects: dict[str, Any] = {}
        self.server.start()

    def __repr__(self) -> str:
        return f"<pyrorpc.CallbackServer {self.server.location}>"

    @property
    def location(self) -> str:
        return self.server.location

    def register(self, obj: Any, name: str | None = None) -> str:
        """Serve ``obj`` (under ``name``, default a unique id); returns its ``PYRO:`` URI. From now on the
        object is passed by reference wherever it is an argument or a result."""
        if isinstance(obj, type):
            raise ConfigurationError("register an instance, not a class")
        uri = self.server.register(obj, name, only_exposed=False)
        object_id = uri[len("PYRO:"):].rsplit("@", 1)[0]
        self._objects[object_id] = obj
        meta = self.server.metadata(object_id)
        with _lock:
            try:
                _registered[obj] = (uri, meta)
            except TypeError:
                _by_id[id(obj)] = (uri, meta)
            cls = type(obj)
            if cls not in _hooked:
                SerializerBase.register_class_to_dict(cls, _reference)
                _hooked.add(cls)
        return uri

    def unregister(self, obj: Any) -> None:
        """Stop serving ``obj``; it is passed by value again."""
        for object_id, known in list(self._objects.items()):
            if known is obj:
                self.server.unregister(object_id)
                del self._objects[object_id]
        with _lock:
            try:
                _registered.pop(obj, None)
            except TypeError:
                pass
            _by_id.pop(id(obj), None)

    def close(self) -> None:
        """Stop serving: calls in flight get a moment to finish, then every connection is closed."""
        for obj in list(self._objects.values()):
            self.unregister(obj)
        self.server.stop_accepting()
        self.server.drain(min(2.0, self.settings.drain_timeout))
        self.server.close()

    def __enter__(self) -> "CallbackServer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

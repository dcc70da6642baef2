"""The error tree of pyrorpc, rooted in Pyro5's so ``except CommunicationError`` keeps working.

::

    Pyro5.errors.PyroError
     └── RpcError
          ├── NoWorkersError            no live worker for the service (also: unknown service)
          ├── WorkerLostError           (CommunicationError) worker died after the call was sent
          ├── WorkerDrainingError       the worker is stopping; the call did not run (safe to resend)
          ├── CallTimeoutError          (Pyro5 TimeoutError) a call took longer than its timeout
          ├── AuthenticationError       (Pyro5 SecurityError) missing, wrong or replayed secret
          ├── RemoteError               a remote exception whose class this client cannot rebuild
          ├── NameServerUnavailableError (CommunicationError) the name server cannot be reached
          ├── MessageTooLargeError      a request or reply over max_message_size, refused before sending
          └── ConfigurationError        bad settings, bad target, unimportable MODULE:CLASS

Every class is registered with Pyro5's serializers, so a worker can raise one and the caller gets
the same type back.
"""

from __future__ import annotations

from typing import Any

import Pyro5.errors
from Pyro5.serializers import SerializerBase

__all__ = [
    "AuthenticationError",
    "CallTimeoutError",
    "ConfigurationError",
    "MessageTooLargeError",
    "NameServerUnavailableError",
    "NoWorkersError",
    "RemoteError",
    "RpcError",
    "WorkerDrainingError",
    "WorkerLostError",
]


class RpcError(Pyro5.errors.PyroError):
    """Base class of every pyrorpc error."""


class NoWorkersError(RpcError):
    """No live worker serves the service (or the service/worker name is unknown)."""


class WorkerLostError(RpcError, Pyro5.errors.CommunicationError):
    """The worker died or the connection broke after the call was sent; it may or may not have run."""


class WorkerDrainingError(RpcError):
    """The worker is shutting down and refused the call before running it."""


class CallTimeoutError(RpcError, Pyro5.errors.TimeoutError):
    """The call did not complete within its timeout."""


class AuthenticationError(RpcError, Pyro5.errors.SecurityError):
    """The peer refused our credentials, or sent none or wrong ones."""


class RemoteError(RpcError):
    """The remote method raised an exception of a class this process has not imported; ``remote_type``
    names it (``module.Class``). Import that module in the client to get the original type instead."""

    remote_type: str = ""

    def __str__(self) -> str:
        text = ", ".join(str(a) for a in self.args) if len(self.args) != 1 else str(self.args[0])
        return f"{self.remote_type}: {text}" if self.remote_type else text


class NameServerUnavailableError(RpcError, Pyro5.errors.CommunicationError):
    """The name server could not be reached (down, wrong address, or timed out)."""


class MessageTooLargeError(RpcError):
    """A request or reply is larger than ``max_message_size``; it was refused before sending, so the
    connection stays usable. (An oversized *incoming* message is a Pyro5 ProtocolError and the
    connection is dropped, since its payload was never read.)"""


class ConfigurationError(RpcError):
    """A setting, target or MODULE:CLASS given by the user is not usable."""


def _register(cls: type[BaseException]) -> None:
    name = f"{cls.__module__}.{cls.__name__}"

    def rebuild(_classname: str, data: dict[str, Any]) -> Any:
        return SerializerBase.make_exception(cls, data)

    SerializerBase.register_dict_to_class(name, rebuild)


def make_portable(cls: type[BaseException]) -> None:
    """Let instances of a user-defined exception class cross the network (worker side): they travel as
    ``RemoteError`` naming their class, and the caller rebuilds the original class if it has imported it."""
    if cls in _portable or cls.__module__ in ("builtins", "exceptions") \
            or cls.__module__.startswith(("Pyro5.", "pyrorpc.", "sqlite3")):
        return
    _portable.add(cls)

    def to_dict(exc: BaseException) -> dict[str, Any]:
        attributes = dict(vars(exc))
        attributes["remote_type"] = f"{type(exc).__module__}.{type(exc).__qualname__}"
        return {"__class__": "pyrorpc.errors.RemoteError", "__exception__": True, "args": exc.args,
                "attributes": attributes}

    SerializerBase.register_class_to_dict(cls, to_dict)


_portable: set[type] = set()


def _rebuild_remote(_classname: str, data: dict[str, Any]) -> BaseException:
    import sys
    remote_type = str((data.get("attributes") or {}).get("remote_type", ""))
    module_name, _, qualname = remote_type.rpartition(".")
    # only classes the caller has imported (no import by name), and only when the arguments came along
    cls: Any = sys.modules.get(module_name) if not (data.get("attributes") or {}).get("args_lost") else None
    for part in qualname.split(".") if cls is not None else ():
        cls = getattr(cls, part, None)
    if not (isinstance(cls, type) and issubclass(cls, BaseException)):
        cls = RemoteError
    try:
        return SerializerBase.make_exception(cls, data)
    except Exception:  # a constructor that does not take its own args back
        return SerializerBase.make_exception(RemoteError, {"args": (f"{remote_type}{data.get('args')!r}",),
                                                           "attributes": data.get("attributes", {})})


SerializerBase.register_dict_to_class("pyrorpc.errors.RemoteError", _rebuild_remote)

for _cls in (RpcError, NoWorkersError, WorkerLostError, WorkerDrainingError, CallTimeoutError,
             AuthenticationError, NameServerUnavailableError, MessageTooLargeError, ConfigurationError):
    _register(_cls)

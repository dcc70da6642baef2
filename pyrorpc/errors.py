"""The error tree of pyrorpc, rooted in Pyro5's so ``except CommunicationError`` keeps working.

::

    Pyro5.errors.PyroError
     └── RpcError
          ├── NoWorkersError            no live worker for the service (also: unknown service)
          ├── WorkerLostError           (CommunicationError) worker died after the call was sent
          ├── WorkerDrainingError       the worker is stopping; the call did not run (safe to resend)
          ├── CallTimeoutError          (Pyro5 TimeoutError) a call took longer than its timeout
          ├── AuthenticationError       (Pyro5 SecurityError) missing, wrong or replayed secret
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


for _cls in (RpcError, NoWorkersError, WorkerLostError, WorkerDrainingError, CallTimeoutError,
             AuthenticationError, NameServerUnavailableError, MessageTooLargeError, ConfigurationError):
    _register(_cls)

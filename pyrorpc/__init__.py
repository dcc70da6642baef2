"""pyrorpc: distributed objects on Pyro5 — named services, worker hosts, proxies and load-balanced pools."""

from . import errors
from .callbacks import CallbackServer
from .config import Address, Settings
from .context import CallInfo, call_metadata, current_call
from .errors import (
                     AuthenticationError,
                     CallTimeoutError,
                     ConfigurationError,
                     MessageTooLargeError,
                     NameServerUnavailableError,
                     NoWorkersError,
                     RemoteError,
                     RpcError,
                     WorkerDrainingError,
                     WorkerLostError,
)
from .naming import NameServerClient, WorkerInfo
from .outbox import Outbox
from .pool import Pool
from .proxy import Proxy, RemoteMethod, connect
from .service import idempotent, oneway, service
from .worker import WorkerHost

__version__ = "0.1.0"

__all__ = [
    "Address",
    "AuthenticationError",
    "CallInfo",
    "CallTimeoutError",
    "CallbackServer",
    "ConfigurationError",
    "MessageTooLargeError",
    "NameServerClient",
    "NameServerUnavailableError",
    "NoWorkersError",
    "Outbox",
    "Pool",
    "Proxy",
    "RemoteError",
    "RemoteMethod",
    "RpcError",
    "Settings",
    "WorkerDrainingError",
    "WorkerHost",
    "WorkerInfo",
    "WorkerLostError",
    "call_metadata",
    "connect",
    "current_call",
    "errors",
    "idempotent",
    "oneway",
    "service",
]

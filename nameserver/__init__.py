"""pyrorpc's name server: Pyro5's NameServer extended with leases, load reports and a service index."""

from .daemon import NameServerDaemon, open_storage, run
from .registry import LEASE_TAG, SERVICE_TAG, IndexedStorage, NameServer

__all__ = ["IndexedStorage", "LEASE_TAG", "NameServer", "NameServerDaemon", "SERVICE_TAG", "open_storage", "run"]

"""Settings: one frozen dataclass of explicit values, read from keywords and ``PYRORPC_*`` variables."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

DEFAULT_NS = "127.0.0.1:9090"
ENV_PREFIX = "PYRORPC_"
# every timeout is a kernel timeout in the end: below a millisecond it would round to 0 (= forever), above
# about a year it is not a timeout (and overflows the kernel's struct)
MIN_TIMEOUT = 0.001
MAX_TIMEOUT = 3e7


class Address(NamedTuple):
    """A ``host:port`` pair."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: "str | Address | tuple[str, int]", *, what: str = "address") -> "Address":
        """Parse ``HOST:PORT`` (``[v6]:PORT`` for IPv6) into an Address.

        Raises:
            ValueError: naming ``what`` when the text is not a valid ``HOST:PORT``.
        """
        if isinstance(text, tuple):
            host, port = text
            return cls._checked(str(host), port, what, f"{host}:{port}")
        if not isinstance(text, str):
            raise ValueError(f"{what} must be HOST:PORT, got {text!r}")
        raw = text.strip()
        if raw.startswith("["):
            host, sep, rest = raw[1:].partition("]")
            if not sep or not rest.startswith(":"):
                raise ValueError(f"{what} must be HOST:PORT, got {text!r}")
            port_text = rest[1:]
        else:
            host, sep, port_text = raw.rpartition(":")
            if not sep:
                raise ValueError(f"{what} must be HOST:PORT, got {text!r}")
            if ":" in host and not _is_ipv6(host):  # "127.0.0.1:9090:1" is not an IPv6 address and a port
                raise ValueError(f"{what} must be HOST:PORT (an IPv6 address as [ADDRESS]:PORT), got {text!r}")
        try:
            port = int(port_text)
        except ValueError:
            raise ValueError(f"{what} must be HOST:PORT with a numeric port, got {text!r}") from None
        return cls._checked(host, port, what, text)

    @classmethod
    def _checked(cls, host: str, port: Any, what: str, text: str) -> "Address":
        if not host or any(c.isspace() for c in host):
            raise ValueError(f"{what} must be HOST:PORT with a host name, got {text!r}")
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"{what} port must be 0-65535, got {text!r}")
        return cls(host, port)


MAX_NAME_SERVERS = 16


class Addresses(tuple[Address, ...]):
    """One or more name-server addresses, the first being the primary: ``HOST:PORT[,HOST:PORT...]``.

    Where one address is meant it stands for its first: ``host`` and ``port`` are the primary's, and a
    list of one compares equal to that Address (``Settings().ns == Address("127.0.0.1", 9090)``).
    ``str()`` gives the comma-separated list, as ``--ns`` and ``PYRORPC_NS`` take it.
    """

    def __new__(cls, items: "Any" = ()) -> "Addresses":
        return super().__new__(cls, items)

    @property
    def primary(self) -> Address:
        return self[0]

    @property
    def host(self) -> str:
        return self[0].host

    @property
    def port(self) -> int:
        return self[0].port

    def __str__(self) -> str:
        return ",".join(str(a) for a in self)

    def __repr__(self) -> str:
        return f"Addresses({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        if len(self) == 1 and isinstance(other, tuple) and not isinstance(other, Addresses) and len(other) == 2 \
                and isinstance(other[0], str):
            return self[0] == other
        return tuple.__eq__(self, other)

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash(self[0]) if len(self) == 1 else tuple.__hash__(self)

    @classmethod
    def parse(cls, value: Any, *, what: str = "ns") -> "Addresses":
        """``HOST:PORT[,HOST:PORT...]``, an Address, a ``(host, port)`` pair, or a list of these.

        Raises:
            ValueError: naming ``what``: an empty list or entry, a malformed address, one given twice, or
                more than MAX_NAME_SERVERS.
        """
        if isinstance(value, Addresses):
            return value
        if isinstance(value, Address) or (isinstance(value, tuple) and len(value) == 2
                                          and isinstance(value[0], str) and isinstance(value[1], int)):
            items: list[Any] = [value]
        elif isinstance(value, str):
            if not value.strip():
                raise ValueError(f"{what} must be HOST:PORT or a comma-separated list of them, got {value!r}")
            items = value.split(",")
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise ValueError(f"{what} must be HOST:PORT or a comma-separated list of them, got {value!r}")
        if not items:
            raise ValueError(f"{what} must name at least one HOST:PORT")
        if len(items) > MAX_NAME_SERVERS:
            raise ValueError(f"{what} lists {len(items)} addresses; at most {MAX_NAME_SERVERS} are allowed")
        parsed: list[Address] = []
        for item in items:
            if isinstance(item, str) and not item.strip():
                raise ValueError(f"{what} has an empty entry: {value!r}")
            try:
                address = Address.parse(item, what=what)
            except ValueError as exc:
                if len(items) == 1:
                    raise
                raise ValueError(f"{exc} (in the list {value!r})") from None
            if address in parsed:
                raise ValueError(f"{what} lists {address} twice: {value!r}")
            parsed.append(address)
        return cls(parsed)


def _is_ipv6(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every tunable of pyrorpc, as explicit values passed to WorkerHost, Proxy, Pool and the name server.

    Pyro5's global ``Pyro5.config`` is never changed by the library: these values are applied per proxy
    and per daemon.

    ================  =====================  ==================  ==================================================
    field             env variable           default             meaning
    ================  =====================  ==================  ==================================================
    ns                PYRORPC_NS             127.0.0.1:9090      name server HOST:PORT, or several: a:9090,b:9090
    host              PYRORPC_HOST           127.0.0.1           interface a worker binds to
    timeout           PYRORPC_TIMEOUT        30.0                seconds a call may take before CallTimeoutError
    connect_timeout   PYRORPC_CONNECT_TIMEOUT 5.0                seconds to connect + handshake, name server calls
    lease_ttl         PYRORPC_LEASE_TTL      None                worker lease TTL; None = the name server's (10 s)
    drain_timeout     PYRORPC_DRAIN_TIMEOUT  10.0                seconds a stopping worker waits for in-flight calls
    threads           PYRORPC_THREADS        64                  calls a worker runs at once (its call threads)
    max_connections   PYRORPC_MAX_CONNECTIONS 4096               client connections a worker or name server keeps
    idle_timeout      PYRORPC_IDLE_TIMEOUT   300.0               seconds before a server closes an idle connection
    max_in_flight     PYRORPC_MAX_IN_FLIGHT  16                  calls in flight per worker from one Proxy/Pool
    refresh           PYRORPC_REFRESH        2.0                 seconds between pool membership refreshes
    max_message_size  PYRORPC_MAX_MESSAGE_SIZE 64 MiB            largest request/reply, checked on both sides
    secret            PYRORPC_SECRET         None                shared secret for the handshake token
    tls_cert          PYRORPC_TLS_CERT       None                PEM certificate (server: enables TLS; client: mTLS)
    tls_key           PYRORPC_TLS_KEY        None                PEM private key for tls_cert (if not inside it)
    tls_ca            PYRORPC_TLS_CA         None                CA bundle to verify peers (client: enables TLS)
    tls_mutual        PYRORPC_TLS_MUTUAL     False               servers require client certificates from tls_ca
    ================  =====================  ==================  ==================================================

    ``ns`` may list several name servers (``"a:9090,b:9090"``, a list, or an ``Addresses``): clients and
    workers use whichever answers, starting with the first, and stay with one that works. Name servers
    that are to serve one registry need shared storage (``ns start --storage etcd://...``); with memory
    storage each keeps its own.
    """

    ns: Addresses = Addresses([Address("127.0.0.1", 9090)])
    host: str = "127.0.0.1"
    timeout: float = 30.0
    connect_timeout: float = 5.0
    lease_ttl: float | None = None
    drain_timeout: float = 10.0
    threads: int = 64
    max_connections: int = 4096
    idle_timeout: float = 300.0
    max_in_flight: int = 16
    refresh: float = 2.0
    max_message_size: int = 64 * 1024 * 1024
    secret: str | None = dataclasses.field(default=None, repr=False)  # never shown in logs or reprs
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    tls_mutual: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "ns", Addresses.parse(self.ns, what="ns"))
        for name in ("timeout", "connect_timeout", "lease_ttl", "refresh", "idle_timeout"):
            value = getattr(self, name)
            if value is None and name == "lease_ttl":
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) \
                    or not MIN_TIMEOUT <= value <= MAX_TIMEOUT:
                raise ValueError(f"`{name}` must be {MIN_TIMEOUT:g}-{MAX_TIMEOUT:g} seconds, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not isinstance(self.drain_timeout, (int, float)) or isinstance(self.drain_timeout, bool) \
                or not 0 <= self.drain_timeout <= MAX_TIMEOUT:
            raise ValueError(f"`drain_timeout` must be 0-{MAX_TIMEOUT:g} seconds, got {self.drain_timeout!r}")
        for name in ("threads", "max_in_flight", "max_message_size", "max_connections"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
        if self.threads > 100_000:  # the name server refuses a lease reporting more than 1,000,000
            raise ValueError(f"`threads` must be at most 100000, got {self.threads!r}")
        if not isinstance(self.host, str) or not self.host:
            raise ValueError(f"`host` must be a host name or address, got {self.host!r}")
        if self.secret is not None and (not isinstance(self.secret, str) or not self.secret):
            raise ValueError("`secret` must be a non-empty string or None")
        for name in ("tls_cert", "tls_key", "tls_ca"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not os.path.isfile(value)):
                raise ValueError(f"`{name}` must be the path of a readable PEM file, got {value!r}")
        if self.tls_key and not self.tls_cert:
            raise ValueError("`tls_key` needs `tls_cert`")
        if not isinstance(self.tls_mutual, bool):
            raise ValueError(f"`tls_mutual` must be True or False, got {self.tls_mutual!r}")
        if self.tls_mutual and not (self.tls_ca and self.tls_cert):
            raise ValueError("`tls_mutual` needs `tls_ca` (to check clients) and `tls_cert` (to serve TLS)")

    def replace(self, **changes: Any) -> "Settings":
        """A copy with the given fields changed; ``None`` values are ignored."""
        changes = {k: v for k, v in changes.items() if v is not None}
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes) if changes else self

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        """Defaults, then ``PYRORPC_*`` variables, then the given keyword overrides (``None`` = not given).

        Raises:
            ValueError: naming the variable whose value is malformed.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            raw = env.get(ENV_PREFIX + field.name.upper())
            if raw is None or raw == "":
                continue
            try:
                values[field.name] = _convert(field.name, raw)
            except ValueError as exc:
                raise ValueError(f"{ENV_PREFIX}{field.name.upper()}: {exc}") from None
        try:
            base = cls(**values)
        except ValueError as exc:
            raise ValueError(f"bad PYRORPC_* environment: {exc}") from None
        return base.replace(**overrides)


def _convert(name: str, raw: str) -> Any:
    if name == "ns":
        return Addresses.parse(raw, what="ns")
    if name in ("threads", "max_in_flight", "max_message_size", "max_connections"):
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"expected an integer, got {raw!r}") from None
    if name in ("host", "secret", "tls_cert", "tls_key", "tls_ca"):
        return raw
    if name == "tls_mutual":
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got {raw!r}")
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"expected a number of seconds, got {raw!r}") from None


def resolve(settings: Settings | None, **overrides: Any) -> Settings:
    """The settings an object runs with: ``settings`` (or ``Settings.from_env()``) plus keyword overrides."""
    if settings is not None and not isinstance(settings, Settings):
        raise TypeError(f"`settings` must be a pyrorpc.Settings, got {type(settings).__name__}")
    base = settings if settings is not None else Settings.from_env()
    return base.replace(**overrides)

"""Service decorators: ``@service(name)``, ``@oneway`` and ``@idempotent``, and what they record."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable
from typing import Any, TypeVar

import Pyro5.server

from .compat import is_oneway

__all__ = ["idempotent", "oneway", "public_methods", "service", "service_name_of"]

T = TypeVar("T", bound=type)
F = TypeVar("F", bound=Callable[..., Any])

SERVICE_ATTR = "_pyrorpc_service"
IDEMPOTENT_ATTR = "_pyrorpc_idempotent"
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*(\.[A-Za-z_][A-Za-z0-9_\-]*)*$")


def check_service_name(name: Any) -> str:
    """Return ``name`` if it is a valid service name (dotted identifiers), else raise ValueError."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"service name must be dotted identifiers like 'calc' or 'img.resize', got {name!r}")
    return name


def service(name: str) -> Callable[[T], T]:
    """Class decorator: name the service and expose its public methods (those without a leading ``_``).

    Args:
        name: the service name workers register under (``name.<worker-id>`` in the name server).

    Raises:
        ValueError: if the name is not made of dotted identifiers.
        TypeError: if applied to something other than a class.
    """
    check_service_name(name)

    def decorate(cls: T) -> T:
        if not inspect.isclass(cls):
            raise TypeError("@pyrorpc.service decorates a class")
        setattr(cls, SERVICE_ATTR, name)
        Pyro5.server.expose(cls)
        return cls

    return decorate


def oneway(method: F) -> F:
    """Method decorator: callers never wait for this method; it returns None at once (at-most-once)."""
    return Pyro5.server.oneway(method)


def idempotent(method: F) -> F:
    """Method decorator: safe to run again on another worker if a worker dies mid-call."""
    setattr(method, IDEMPOTENT_ATTR, True)
    return method


def service_name_of(cls: type) -> str | None:
    """The name given by ``@service``, or None."""
    return getattr(cls, SERVICE_ATTR, None)


def public_methods(cls: type) -> dict[str, dict[str, bool]]:
    """Public callables of ``cls`` with their flags: ``{name: {"oneway": bool, "idempotent": bool}}``."""
    result: dict[str, dict[str, bool]] = {}
    for name in dir(cls):
        if name.startswith("_"):
            continue
        attr = inspect.getattr_static(cls, name)
        func = attr.__func__ if isinstance(attr, (staticmethod, classmethod)) else attr
        if not callable(func) or inspect.isclass(func):
            continue
        result[name] = {
            "oneway": is_oneway(func),
            "idempotent": bool(getattr(func, IDEMPOTENT_ATTR, False)),
        }
    return result

"""Every use of a Pyro5 name that is not public API, in one place (each one pinned by tests/test_compat.py).

Pyro5 marks exposed and oneway members with the attributes ``_pyroExposed`` and ``_pyroOneway`` (set by
its public ``expose``/``oneway`` decorators), ships a remote traceback in an exception's
``_pyroTraceback`` attribute, and wraps an exception inside a batch reply as
``Pyro5.core._ExceptionWrapper``. These are conventions of its protocol: pyrorpc must read and write them
to interoperate, so they live here and nowhere else.
"""

from __future__ import annotations

import inspect
import threading
from typing import Any

import Pyro5.core
import Pyro5.errors

__all__ = [
    "EXCEPTION_WRAPPER",
    "exposed_members",
    "is_exception_wrapper",
    "is_oneway",
    "remote_traceback",
    "set_remote_traceback",
    "unwrap_exception",
    "wrap_exception",
]

EXPOSED_ATTR = "_pyroExposed"
ONEWAY_ATTR = "_pyroOneway"
TRACEBACK_ATTR = "_pyroTraceback"
EXCEPTION_WRAPPER = "Pyro5.core._ExceptionWrapper"

_private_dunders = frozenset(("__init__", "__init_subclass__", "__class__", "__module__", "__weakref__",
                              "__call__", "__new__", "__del__", "__repr__", "__str__", "__format__",
                              "__nonzero__", "__bool__", "__coerce__", "__cmp__", "__eq__", "__ne__",
                              "__hash__", "__ge__", "__gt__", "__le__", "__lt__", "__dir__", "__enter__",
                              "__exit__", "__copy__", "__deepcopy__", "__sizeof__", "__getattr__",
                              "__setattr__", "__hasattr__", "__getattribute__", "__delattr__",
                              "__instancecheck__", "__subclasscheck__", "__getinitargs__",
                              "__getnewargs__", "__getstate__", "__setstate__", "__reduce__",
                              "__reduce_ex__", "__subclasshook__"))


def is_private(name: str) -> bool:
    """Pyro5's rule: names starting with ``_`` are private, except ``__dunder__`` ones not in its list."""
    if name in _private_dunders:
        return True
    if not name.startswith("_"):
        return False
    return not (len(name) > 4 and name.startswith("__") and name.endswith("__"))


_members_cache: dict[tuple[type, bool], dict[str, frozenset[str]]] = {}
_members_lock = threading.Lock()


def exposed_members(cls: type, only_exposed: bool = True) -> dict[str, frozenset[str]]:
    """``{"methods", "oneway", "attrs"}`` of a class as Pyro5 computes them (the metadata a proxy gets);
    with ``only_exposed=False`` every member whose name has no leading underscore."""
    key = (cls, only_exposed)
    found = _members_cache.get(key)
    if found is not None:
        return found
    methods, oneway, attrs = set(), set(), set()
    for name in dir(cls):
        if is_private(name) or (not only_exposed and name.startswith("_")):
            continue
        try:
            value = getattr(cls, name)
        except AttributeError:
            continue
        if inspect.ismethod(value) or inspect.isfunction(value) or inspect.ismethoddescriptor(value):
            if getattr(value, EXPOSED_ATTR, not only_exposed):
                methods.add(name)
                if getattr(value, ONEWAY_ATTR, False):
                    oneway.add(name)
        elif inspect.isdatadescriptor(value):
            func = getattr(value, "fget", None) or getattr(value, "fset", None) or getattr(value, "fdel", None)
            if func is not None and getattr(func, EXPOSED_ATTR, not only_exposed):
                attrs.add(name)
    found = {"methods": frozenset(methods), "oneway": frozenset(oneway), "attrs": frozenset(attrs)}
    with _members_lock:
        _members_cache[key] = found
    return found


def is_oneway(func: Any) -> bool:
    return bool(getattr(func, ONEWAY_ATTR, False))


def set_remote_traceback(exc: BaseException, lines: list[str]) -> None:
    """Attach the traceback the caller will see as the remote one."""
    try:
        setattr(exc, TRACEBACK_ATTR, lines)
    except Exception:  # an exception class with __slots__ or a read-only __setattr__
        pass


def remote_traceback(exc: BaseException) -> list[str] | None:
    """The remote traceback of an exception that came over the wire, or None for a local one."""
    tb = getattr(exc, TRACEBACK_ATTR, None)
    return tb if isinstance(tb, list) else None


def wrap_exception(exc: BaseException) -> dict[str, Any]:
    """An exception inside a batch reply, in the form Pyro5 clients rebuild as their exception wrapper."""
    return {"__class__": EXCEPTION_WRAPPER, "exception": exc}


def is_exception_wrapper(value: Any) -> bool:
    return isinstance(value, Pyro5.core._ExceptionWrapper)


def unwrap_exception(value: Any) -> BaseException:
    exc: BaseException = value.exception
    return exc


def format_traceback() -> list[str]:
    """The current exception's traceback lines, as Pyro5 sends them."""
    return list(Pyro5.errors.format_traceback(detailed=False))

"""Serpent, as pyrorpc speaks it: bytes travel as bytes literals, and a fast decoder for the common case.

``serpent.loads`` is ``ast.literal_eval``: it builds a whole syntax tree for every message, which costs
about 15 µs for a small call. ``loads`` here scans the literal with one regular expression and builds
the values directly; anything it does not handle exactly (escaped strings aside, which it hands to
``ast.literal_eval`` one token at a time: complex numbers, malformed input, odd spacing) goes to
``serpent.loads``, so the result is always what serpent itself would return. Like Pyro5, dicts carrying
a ``__class__`` key are turned back into objects (exceptions, URIs, proxies) afterwards.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from typing import Any

import serpent
from Pyro5 import serializers

__all__ = ["SERIALIZER", "BytesSerpent", "dumps", "loads", "loads_call", "loads_call_flat", "set_proxy_factory"]


class BytesSerpent(serializers.SerpentSerializer):
    """Pyro5's serpent serializer, except that ``bytes`` travel as bytes literals and arrive as ``bytes``
    (Pyro5's default sends them as ``{"data": base64, "encoding": "base64"}`` dicts; both decode alike),
    and decoding takes the fast path of ``loads``."""

    def dumpsCall(self, obj: Any, method: str, vargs: Any, kwargs: Any) -> bytes:  # noqa: N802 - Pyro5 API
        return dumps((obj, method, vargs, kwargs))

    def dumps(self, data: Any) -> bytes:
        return dumps(data)

    def loads(self, data: Any) -> Any:
        return loads(data)

    def loadsCall(self, data: Any) -> Any:  # noqa: N802 - Pyro5 API
        return loads_call(data)

    @classmethod
    def dict_to_class(cls, data: dict[str, Any]) -> Any:
        # a reference to a remote object becomes what the proxy factory makes of it (pyrorpc's Proxy)
        if data.get("__class__") == "Pyro5.client.Proxy" and _proxy_factory is not None:
            return _proxy_factory(data)
        return super().dict_to_class(data)


_proxy_factory: Callable[[dict[str, Any]], Any] | None = None


def set_proxy_factory(factory: Callable[[dict[str, Any]], Any] | None) -> None:
    """What a ``Pyro5.client.Proxy`` reference decodes into on pyrorpc's decoding path (default: Pyro5's
    own Proxy)."""
    global _proxy_factory
    _proxy_factory = factory


SERIALIZER = BytesSerpent()
_recreate = SERIALIZER.recreate_classes


def dumps(data: Any) -> bytes:
    """Serpent bytes for ``data``: plain builtins (str, bytes, int, float, bool, None, and tuples, lists
    and dicts of them) are written directly, anything else (sets, classes, exceptions, subclasses of
    builtins, deep or circular structures) by ``serpent.dumps``; both read back alike."""
    out = [_HEADER]
    try:
        _encode(data, out, 0)
    except _Fallback:
        return serpent.dumps(data, module_in_classname=True, bytes_repr=True)
    return "".join(out).encode("utf-8")


_MAX_DEPTH = 40


def _encode(obj: Any, out: list[str], depth: int) -> None:
    t = type(obj)
    if t is str or t is int or t is bool or obj is None or t is bytes:
        out.append(repr(obj))
    elif t is float:
        if obj - obj != 0.0:  # inf and nan have no literal: serpent's own forms
            raise _Fallback
        out.append(repr(obj))
    elif t is tuple or t is list:
        if depth > _MAX_DEPTH:
            raise _Fallback
        out.append("(" if t is tuple else "[")
        for item in obj:
            _encode(item, out, depth + 1)
            out.append(",")
        if len(obj) == 1 and t is tuple:
            out.append(")")
        elif obj:
            out[-1] = ")" if t is tuple else "]"
        else:
            out.append(")" if t is tuple else "]")
    elif t is dict:
        if depth > _MAX_DEPTH:
            raise _Fallback
        out.append("{")
        for key, value in obj.items():
            _encode(key, out, depth + 1)
            out.append(":")
            _encode(value, out, depth + 1)
            out.append(",")
        if obj:
            out[-1] = "}"
        else:
            out.append("}")
    else:
        raise _Fallback


# ASCII digits only (\d would take other scripts' digits, which Python literals do not); an integer has
# no leading zeros (007 is not a literal), a float may (00.5 is)
_NUM = r"-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?"
_TOKENS = re.compile(rf"""
    (?P<str>'[^'\\\n\r]*'|"[^"\\\n\r]*")
  | (?P<num>{_NUM})(?![\w.+\-])
  | (?P<punct>[()\[\]{{}},:])
  | (?P<name>True|False|None)(?!\w)
  | (?P<esc>b?['"])
  | (?P<other>\S)
""", re.VERBOSE | re.ASCII)
# serpent writes a complex number as (REAL+IMAGj); checked before the tokens, at an opening parenthesis
_COMPLEX = re.compile(rf"\((?P<re>{_NUM})(?P<sign>[+-])(?P<im>[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)j\)",
                      re.ASCII)
_MAX_NESTING = 100  # Python's own parser gives up near 200 nested brackets
_AST_LIMIT = 64 * 1024  # larger input the fast path refuses is never handed to ast (memory: ~1 KB a node)
_HEADER = "# serpent utf-8 python3.2\n"
_NAMES = {"True": True, "False": False, "None": None}


class _Fallback(Exception):
    pass


# whole messages common enough to skip the parser: a reply of None, True or False
_COMMON: dict[bytes, Any] = {(_HEADER + text).encode(): value for text, value in _NAMES.items()}
_MISSING = object()


def loads(data: bytes | bytearray | memoryview, *, fallback: bool = True) -> Any:
    """Decode serpent bytes (what ``SerpentSerializer.loads`` returns, classes recreated).

    With ``fallback`` (the default) input the fast path does not handle is handed to ``serpent.loads``,
    but only up to 64 KiB: ``ast`` needs about a kilobyte per element, so a large malformed message is
    refused instead of costing gigabytes. Without ``fallback`` only the fast path runs (bounded work;
    for input from unauthenticated peers).

    Raises:
        ValueError / SyntaxError: not a serpent literal (as ``serpent.loads`` raises).
    """
    if type(data) is bytes and len(data) < 32:
        value = _COMMON.get(data, _MISSING)
        if value is not _MISSING:
            return value
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("serpent data is not valid UTF-8") from None
    if text.startswith(_HEADER):
        try:
            value, classes = _parse(text, len(_HEADER))
            return _recreate(value) if classes else value
        except (_Fallback, TypeError, ValueError, SyntaxError, IndexError, MemoryError, RecursionError):
            pass
    if not fallback or len(text) > _AST_LIMIT:
        raise ValueError(f"malformed or unsupported serpent data ({len(text):,} bytes)")
    return _recreate(serpent.loads(data))


# a request body starts with its object id and method name, plain strings in every call pyrorpc or Pyro5 makes
_CALL = re.compile(r"\('([^'\\\n\r\x00]*)','([^'\\\n\r\x00]*)',")
_CALL_START = len(_HEADER)
_NO_ARGUMENTS = "(),{})"


def loads_call(data: bytes | bytearray | memoryview) -> Any:
    """``loads`` for a request body, ``(object_id, method, args, kwargs)``: the object id and method name
    are read with one regular expression, and a call without arguments costs nothing more; the rest
    is parsed as ``loads`` would (same result, same errors)."""
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("serpent data is not valid UTF-8") from None
    if text.startswith(_HEADER):
        call = _CALL.match(text, _CALL_START)
        if call is not None:
            end = call.end()
            if len(text) - end == 6 and text.endswith(_NO_ARGUMENTS):
                return call.group(1), call.group(2), (), {}
            if len(text) - end <= _FLAT_MAX and _FLAT_CALL.fullmatch(text, end) is not None \
                    and "__class__" not in text:
                vargs, kwargs = _flat(_FLAT_TOKEN.findall(text, end))
                return call.group(1), call.group(2), vargs, kwargs
            try:
                value, classes = _parse(text, end, [call.group(1), call.group(2)])
                return _recreate(value) if classes else value
            except (_Fallback, TypeError, ValueError, SyntaxError, IndexError, MemoryError, RecursionError):
                pass
    return loads(data)


# arguments that are scalars (strings without escapes, numbers, True/False/None), flat lists of them or
# flat dicts of them, and keyword arguments that are a flat dict: checked whole by one regular expression,
# then read token by token without further checks (the usual request: ``lease``, ``renew``, ``add(1, 2)``)
_SCALAR = (r"""(?:'[^'\\\n\r\x00]*'|"[^"\\\n\r\x00]*"|True|False|None"""
           r"|-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)")
_FLAT_DICT = rf"\{{(?:{_SCALAR}:{_SCALAR},)*(?:{_SCALAR}:{_SCALAR})?\}}"
_ITEM = rf"(?:{_SCALAR}|\[(?:{_SCALAR},)*(?:{_SCALAR})?\]|{_FLAT_DICT})"
_FLAT_CALL = re.compile(rf"(?:\(\)|\((?:{_ITEM},)+(?:{_ITEM})?\)),{_FLAT_DICT}\)", re.ASCII)
_FLAT_MAX = 4096  # characters of arguments the flat path takes on (its expression backtracks on long input)
_FLAT_TOKEN = re.compile(r"""'[^']*'|"[^"]*"|[^,:'"()\[\]{}]+|[\[\]{})]""")


def _flat(tokens: list[str]) -> tuple[tuple[Any, ...], dict[Any, Any]]:
    """The arguments and keyword arguments of a request body ``_FLAT_CALL`` matched, from its tokens."""
    top: list[Any] = []  # the items of the arguments' tuple
    items = top
    vargs: tuple[Any, ...] | None = None
    for tok in tokens:
        c = tok[0]
        if c == "'" or c == '"':
            items.append(tok[1:-1])
        elif c == "[" or c == "{":
            items = []
        elif c == "]":
            top.append(items)
            items = top
        elif c == "}":
            value = dict(zip(items[::2], items[1::2], strict=False))
            if vargs is not None:
                return vargs, value  # the keyword arguments: the last item
            top.append(value)
            items = top
        elif c == ")":
            vargs = tuple(top)
        elif tok in _NAMES:
            items.append(_NAMES[tok])
        elif "." in tok or "e" in tok or "E" in tok:
            items.append(float(tok))
        else:
            items.append(int(tok))
    raise _Fallback  # (unreachable for a body _FLAT_CALL matched)


def loads_call_flat(data: bytes | bytearray | memoryview) -> Any:
    """``loads_call`` for a request whose arguments take the flat path (scalars, flat lists and dicts, at
    most ``_FLAT_MAX`` characters), else None: bounded work, for the server's I/O thread."""
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not text.startswith(_HEADER):
        return None
    call = _CALL.match(text, _CALL_START)
    if call is None:
        return None
    end = call.end()
    if len(text) - end == 6 and text.endswith(_NO_ARGUMENTS):
        return call.group(1), call.group(2), (), {}
    if len(text) - end <= _FLAT_MAX and _FLAT_CALL.fullmatch(text, end) is not None and "__class__" not in text:
        vargs, kwargs = _flat(_FLAT_TOKEN.findall(text, end))
        return call.group(1), call.group(2), vargs, kwargs
    return None


def _parse(text: str, start: int, call: list[Any] | None = None) -> tuple[Any, bool]:
    """(value, whether a dict with ``__class__`` was seen); raises _Fallback for anything unusual.

    With ``call`` the text from ``start`` continues a tuple whose first items (``call``) were read
    already, each followed by its comma (``loads_call``)."""
    if "\x00" in text:
        raise _Fallback
    stack: list[list[Any]] = []  # [opener, items, commas, colons]
    top: list[Any] | None = None
    if call is not None:
        top = ["(", call, len(call), 0]
        stack.append(top)
    result: Any = _Fallback
    classes = False
    pos = start
    value: Any
    match = _TOKENS.search
    while True:
        m = match(text, pos)
        if m is None:
            break
        pos = m.end()
        kind = m.lastgroup
        tok = m.group(kind)  # type: ignore[arg-type]
        if kind == "punct" and tok == "(" and "j" in text[pos:pos + 64]:
            c = _COMPLEX.match(text, m.start())
            if c is not None:
                pos = c.end()
                real, imag = float(c.group("re")), complex(0.0, float(c.group("im")))
                kind, tok, value = "value", "", (real + imag if c.group("sign") == "+" else real - imag)
        if kind == "punct":
            if tok == ",":
                # a comma follows an item (in a dict: a value), never another comma
                if top is None:
                    raise _Fallback
                n = len(top[1])
                if top[3]:
                    if n % 2 or top[2] != n // 2 - 1:
                        raise _Fallback
                elif n != top[2] + 1:
                    raise _Fallback
                top[2] += 1
                continue
            if tok == ":":
                # a colon follows a dict key
                if top is None or top[0] != "{" or len(top[1]) % 2 == 0 or top[3] != len(top[1]) // 2 \
                        or top[2] != len(top[1]) // 2:
                    raise _Fallback
                top[3] += 1
                continue
            if tok in "([{":
                if len(stack) >= _MAX_NESTING:  # serpent (ast) cannot read deeper either: refuse early
                    raise _Fallback
                top = [tok, [], 0, 0]
                stack.append(top)
                continue
            # a closer
            if top is None:
                raise _Fallback
            opener, items, commas, colons = stack.pop()
            n = len(items)
            if opener == "(":
                if tok != ")" or not (commas == n or (commas == n - 1 and n != 1)):
                    raise _Fallback
                value = tuple(items)
            elif opener == "[":
                if tok != "]" or not (commas == n or commas == n - 1):
                    raise _Fallback
                value = items
            else:
                if tok != "}":
                    raise _Fallback
                if colons:
                    pairs = n // 2
                    if n % 2 or colons != pairs or not (commas == pairs or commas == pairs - 1):
                        raise _Fallback
                    value = dict(zip(items[::2], items[1::2], strict=True))
                    if "__class__" in value:
                        classes = True
                elif n:
                    if not (commas == n or commas == n - 1):
                        raise _Fallback
                    value = set(items)
                else:
                    value = {}
            top = stack[-1] if stack else None
        elif kind == "str":
            value = tok[1:-1]
        elif kind == "num":
            if "." in tok or "e" in tok or "E" in tok:
                value = float(tok)
            else:
                digits = tok.lstrip("-")
                if len(digits) > 1 and digits[0] == "0" and digits.strip("0"):
                    raise _Fallback  # 007: not a Python literal (00 is)
                value = int(tok)
        elif kind == "name":
            value = _NAMES[tok]
        elif kind == "value":
            pass
        elif kind == "esc":
            # a string or bytes literal with escapes (or a bytes literal): find its end with str.find,
            # then let ast read that one literal (no per-character regex work on big payloads)
            quote = tok[-1]
            close = m.end()
            while True:
                close = text.find(quote, close)
                if close < 0:
                    raise _Fallback
                slashes = 0
                while text[close - 1 - slashes] == "\\":
                    slashes += 1
                if not slashes % 2:
                    break
                close += 1
            tok = text[m.start():close + 1]
            pos = close + 1
            if "\n" in tok or "\r" in tok:
                raise _Fallback
            if tok[0] == "b" and "\\" not in tok:
                value = tok[2:-1].encode("ascii")
            else:
                value = ast.literal_eval(tok)
            if not isinstance(value, (str, bytes)):
                raise _Fallback
        else:
            raise _Fallback
        if top is None:
            if result is not _Fallback:
                raise _Fallback
            result = value
        else:
            items = top[1]
            n = len(items)
            if top[3]:  # a dict: key after "," (or first), value after ":"
                if top[3] != (n + 1) // 2 or top[2] != n // 2:
                    raise _Fallback
            elif top[2] != n:
                raise _Fallback
            items.append(value)
    if stack or result is _Fallback:
        raise _Fallback
    return result, classes

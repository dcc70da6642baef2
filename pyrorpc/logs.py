"""Log output of the ``pyrorpc`` processes: one JSON object a line (``--log-format json``), stdlib only.

``JsonFormatter`` writes ``ts`` (UTC, ISO 8601 with milliseconds), ``level``, ``logger``, ``message``, then
the fields pyrorpc attaches to its records where it knows them (``service``, ``worker``, ``method``,
``outcome``, ``duration_ms``, ``event``...: anything passed as ``extra=``) and ``exc`` for an exception.
What is logged: each failed call on a worker (logger ``pyrorpc.calls``: INFO, timeouts WARNING), lease
events (``pyrorpc.nameserver``: registered, expired; ``pyrorpc.worker``: renewal failing) and drains.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import IO, Any

__all__ = ["LOG_FORMATS", "JsonFormatter", "setup_logging"]

LOG_FORMATS = ("text", "json")
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """A record as one line of JSON: ``ts``, ``level``, ``logger``, ``message`` and its extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_") and value is not None:
                out[key] = value if isinstance(value, (str, int, float, bool)) else str(value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        return json.dumps(out, ensure_ascii=False, default=str)


def setup_logging(log_format: str = "text", *, level: int = logging.INFO, stream: IO[str] | None = None) -> None:
    """Configure the root logger of a ``pyrorpc`` process: ``json`` sends every record at ``level`` and above
    to ``stream`` (stderr) as one JSON object a line; ``text`` leaves logging as it is (warnings and errors
    on stderr, as before).

    Raises:
        ValueError: an unknown ``log_format``.
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"`log_format` must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    if log_format == "text":
        return
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # what would bypass logging goes through it too, so every line stays JSON: warnings.warn(), and an
    # exception nobody caught in a thread or in the main thread
    logging.captureWarnings(True)

    def thread_hook(args: Any) -> None:
        if args.exc_type is SystemExit:
            return
        logging.getLogger("pyrorpc.uncaught").error(
            "uncaught exception in thread %s", getattr(args.thread, "name", "?"),
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    def main_hook(exc_type: Any, exc_value: Any, tb: Any) -> None:
        if issubclass(exc_type, KeyboardInterrupt):
            sys.__excepthook__(exc_type, exc_value, tb)
            return
        logging.getLogger("pyrorpc.uncaught").critical("uncaught exception", exc_info=(exc_type, exc_value, tb))

    threading.excepthook = thread_hook
    sys.excepthook = main_hook

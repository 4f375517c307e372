"""Structured logging: JSON lines for machines, plain text for a person at a terminal.

Extra context goes in ``extra={...}``; every key that is not a standard LogRecord attribute is
emitted as a field (JSON) or as ``key=value`` (text).

Format ``auto`` (the default) writes text when stderr is a terminal and JSON lines otherwise; an
explicit ``json`` or ``text`` always wins.

Warnings that every process would repeat are said once: log them with ``extra={"once": KEY}``.
A record with a ``once`` key is written only the first time in a process, and the key is added
to the environment variable :data:`SAID_ONCE_ENV`, which child processes inherit, so a child
started afterwards (``plaudit up``'s services) stays quiet about it too.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, Literal, TextIO

_STANDARD_ATTRS = set(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "once",
}

LogFormat = Literal["auto", "json", "text"]
SAID_ONCE_ENV = "PLAUDIT_LOG_SAID_ONCE"
"""Comma-separated ``once`` keys already said by this process or a parent."""

_active_format: Literal["json", "text"] | None = None


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {
        k: v
        for k, v in record.__dict__.items()
        if k not in _STANDARD_ATTRS and not k.startswith("_")
    }


class JsonFormatter(logging.Formatter):
    """Formats a record as a single-line JSON object."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, default=str, ensure_ascii=False)


def _short(value: Any) -> str:
    """A value as a person reads it: floats rounded to 4 significant digits."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class TextFormatter(logging.Formatter):
    """Human-readable lines with the structured fields appended as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{k}={_short(v)}" for k, v in extras.items())
        return line


def said_once() -> set[str]:
    """The ``once`` keys already said (by this process or a parent)."""
    return {k for k in os.environ.get(SAID_ONCE_ENV, "").split(",") if k}


class SayOnceFilter(logging.Filter):
    """Drops a record whose ``once`` key was already said; marks new keys as said."""

    def filter(self, record: logging.LogRecord) -> bool:
        key = getattr(record, "once", None)
        if not key:
            return True
        said = said_once()
        if key in said:
            return False
        os.environ[SAID_ONCE_ENV] = ",".join(sorted(said | {str(key)}))
        return True


def resolve_format(fmt: str, stream: TextIO | None = None) -> Literal["json", "text"]:
    """``auto`` becomes ``text`` on a terminal and ``json`` otherwise; others stay as given."""
    if fmt == "json":
        return "json"
    if fmt == "text":
        return "text"
    stream = sys.stderr if stream is None else stream
    try:
        return "text" if stream.isatty() else "json"
    except (AttributeError, ValueError):  # closed or replaced stream
        return "json"


def active_format() -> LogFormat:
    """The format :func:`configure_logging` chose in this process (``auto`` before that): child
    processes are started with it, so ``--log-format`` reaches them."""
    return _active_format or "auto"


def configure_logging(level: str = "INFO", fmt: str = "auto") -> None:
    """Install one stderr handler on the root logger (idempotent); ``fmt``: auto, json, text."""
    global _active_format
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_plaudit", False):
            root.removeHandler(handler)
    _active_format = resolve_format(fmt)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if _active_format == "json" else TextFormatter())
    handler.addFilter(SayOnceFilter())
    handler._plaudit = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    # libraries that narrate routine work at INFO (alembic: "Context impl SQLiteImpl.")
    for noisy in ("alembic", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.getLevelName(level), logging.WARNING))

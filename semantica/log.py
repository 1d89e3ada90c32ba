"""Structured logging: one event name plus fields, rendered pretty or as JSON lines.

`log.event("job_state_changed", job_id=..., state="DONE")` is the only call the rest
of the code needs. Payloads and secrets are never passed here (SPEC §9).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import msgspec

LOGGER_NAME = "semantica"
_encode = msgspec.json.Encoder().encode

_LEVEL_COLOURS = {"DEBUG": "\x1b[2m", "INFO": "", "WARNING": "\x1b[33m", "ERROR": "\x1b[31m"}


def _timestamp(record: logging.LogRecord) -> str:
    ms = int(record.created * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{ms:03d}Z"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        doc.update(getattr(record, "fields", {}))
        if record.exc_info:
            doc["traceback"] = self.formatException(record.exc_info)
        return _encode(doc).decode()


class PrettyFormatter(logging.Formatter):
    def __init__(self, colour: bool) -> None:
        super().__init__()
        self.colour = colour

    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(
            f"{k}={_pretty_value(v)}" for k, v in getattr(record, "fields", {}).items()
        )
        line = f"{_timestamp(record)} {record.levelname:<7} {record.getMessage()}"
        if fields:
            line += " " + fields
        if self.colour and (start := _LEVEL_COLOURS.get(record.levelname)):
            line = f"{start}{line}\x1b[0m"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _pretty_value(value: Any) -> str:
    text = value if isinstance(value, str) else _encode(value).decode()
    return repr(text) if (" " in text or not text) else text


def setup(fmt: str = "pretty", level: str = "info", stream=None) -> None:
    """Send the daemon's events to `stream` (stderr) in `fmt` at `level`."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    colour = fmt == "pretty" and hasattr(stream, "isatty") and stream.isatty()
    handler.setFormatter(JsonFormatter() if fmt == "json" else PrettyFormatter(colour))
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False


_logger = logging.getLogger(LOGGER_NAME)


def event(name: str, *, level: int = logging.INFO, exc_info: bool = False, **fields: Any) -> None:
    """Log one structured event."""
    if _logger.isEnabledFor(level):
        _logger.log(level, name, extra={"fields": fields}, exc_info=exc_info)


def enabled(level: int) -> bool:
    """Whether events at `level` are written: a loop can ask once, not per event."""
    return _logger.isEnabledFor(level)


def warning(name: str, **fields: Any) -> None:
    event(name, level=logging.WARNING, **fields)


def error(name: str, *, exc_info: bool = False, **fields: Any) -> None:
    event(name, level=logging.ERROR, exc_info=exc_info, **fields)


def debug(name: str, **fields: Any) -> None:
    event(name, level=logging.DEBUG, **fields)

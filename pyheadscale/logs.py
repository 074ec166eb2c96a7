"""The server's log output: Headscale's levels and its two formats (`log.level`, `log.format`).

Headscale logs with zerolog: `text` is its console writer on stderr
(`2025-01-02T03:04:05Z INF message key=value`), `json` one object per line on stdout
(`{"level":"info","time":1735787045,"message":"...","key":"value"}`). Structured fields travel
in a record's `fields` attribute (`log.info("http request", extra=fields(method="GET"))`), so
both formats show them as fields instead of text baked into the message.

zerolog has levels Python's logging lacks: `trace` (below debug), `fatal` (logging's CRITICAL)
and `panic` (above it); `disabled` turns all output off. Alembic's chatter about migrations is
debug here, not info, and so are the SQL statements `database.debug` logs (as in Headscale,
they need `log.level: debug`).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from typing import IO, Any

import orjson

TRACE = 5
PANIC = 60
DISABLED = 100
LEVELS: Mapping[str, int] = {
    "trace": TRACE, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
    "error": logging.ERROR, "fatal": logging.CRITICAL, "panic": PANIC, "disabled": DISABLED,
}
_NAMES = {TRACE: "trace", logging.DEBUG: "debug", logging.INFO: "info",
          logging.WARNING: "warn", logging.ERROR: "error", logging.CRITICAL: "fatal",
          PANIC: "panic"}
_SHORT = {"trace": "TRC", "debug": "DBG", "info": "INF", "warn": "WRN", "error": "ERR",
          "fatal": "FTL", "panic": "PNC"}
# Loggers whose INFO lines are operational detail: shown from `debug` on.
_DEMOTED = frozenset({"alembic", "sqlalchemy"})  # database.debug SQL lines: debug
# Libraries whose DEBUG lines come several per request (hpack: one per header coded), which
# would drown the server's own debug lines: shown only at `trace`. Set on the loggers
# themselves, so below trace their calls stop at the level check and cost nothing.
_TRACE_ONLY = ("hpack",)
_HANDLER_MARK = "_pyheadscale_handler"

logging.addLevelName(TRACE, "TRACE")
logging.addLevelName(PANIC, "PANIC")


def fields(**values: object) -> dict[str, dict[str, object]]:
    """`extra=` for a structured log line: `log.info("msg", extra=fields(k=v))`."""
    return {"fields": values}


def level_name(levelno: int) -> str:
    """zerolog's name for a record's level (the nearest one at or below it)."""
    for number in sorted(_NAMES, reverse=True):
        if levelno >= number:
            return _NAMES[number]
    return "trace"


def _record_fields(record: logging.LogRecord) -> dict[str, object]:
    values = getattr(record, "fields", None)
    return dict(values) if isinstance(values, Mapping) else {}


def _text_value(value: object) -> str:
    text = str(value)
    if text == "" or any(c.isspace() or c in '"=' for c in text):
        return orjson.dumps(text).decode()
    return text


class TextFormatter(logging.Formatter):
    """zerolog's console layout: time, three-letter level, logger, message, key=value."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.created))
        parts = [stamp, _SHORT[level_name(record.levelno)], f"{record.name}:",
                 record.getMessage()]
        parts += [f"{k}={_text_value(v)}" for k, v in _record_fields(record).items()]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JSONFormatter(logging.Formatter):
    """One JSON object per line, zerolog's keys (`level`, `time` in Unix seconds, `message`);
    the logger's name is `logger`, an exception is `error` plus its traceback in `stack`."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {"level": level_name(record.levelno),
                                  "time": int(record.created), "logger": record.name}
        out.update(_record_fields(record))
        if record.exc_info and record.exc_info[1] is not None:
            out["error"] = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
            out["stack"] = self.formatException(record.exc_info)
        out["message"] = record.getMessage()
        return orjson.dumps(out, default=str).decode()


class _Demote(logging.Filter):
    """On the handler: INFO records of the demoted loggers count as DEBUG ones. (A filter on
    the `alembic` logger itself would miss its children's records, which only propagate.)"""

    def __init__(self, handler: logging.Handler) -> None:
        super().__init__()
        self.handler = handler

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.INFO and record.name.partition(".")[0] in _DEMOTED:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return record.levelno >= self.handler.level
        return True


def configure(level: str, fmt: str, stream: IO[str] | None = None) -> logging.Handler:
    """Install the server's one log handler on the root logger (replacing an earlier one).

    `level` and `fmt` are validated config values (config/checks.py); `json` goes to stdout
    and `text` to stderr unless `stream` says otherwise, as Headscale does.
    """
    json = fmt == "json"
    handler = logging.StreamHandler(stream or (sys.stdout if json else sys.stderr))
    handler.setFormatter(JSONFormatter() if json else TextFormatter())
    number = LEVELS.get(level, logging.INFO)
    handler.setLevel(number)
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(min(number, DISABLED))
    for name in _TRACE_ONLY:
        logging.getLogger(name).setLevel(number if number <= TRACE else max(number, logging.INFO))
    handler.addFilter(_Demote(handler))
    return handler


def trace(logger: logging.Logger, msg: str, *args: Any, **kw: Any) -> None:
    """A trace-level line (zerolog's level below debug)."""
    if logger.isEnabledFor(TRACE):
        logger.log(TRACE, msg, *args, **kw)

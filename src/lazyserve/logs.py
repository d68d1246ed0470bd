"""Logs: lazyserve writes to the `lazyserve` logger, each line with the request's context
(cold_start, request_id, model_sha256).

On Lambda its lines are JSON objects, one per line on stdout, with an RFC 3339 `timestamp` and a
`level`: with Lambda's JSON log format Lambda filters them by that level, and in the Text format
each is one event ("Log-level filtering" in the Lambda developer guide). The runtime's own root
handler is left exactly as the runtime set it up: lazyserve's logger has its own handler and does
not propagate to the root logger, as Powertools' Logger does. Elsewhere, when the app has
configured logging (the root logger has handlers) lazyserve's records go there, carrying the
context fields as attributes; when it has not, lazyserve writes readable text to stderr."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from lazyserve.environment import on_lambda

__all__ = ["bind", "configure_logging", "lambda_log_level", "request_id", "set_global"]

_context: ContextVar[Mapping[str, Any] | None] = ContextVar("lazyserve_log_context", default=None)
_global: dict[str, Any] = {}
_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
# Lambda's level names (AWS_LAMBDA_LOG_LEVEL) in Python's terms.
_LAMBDA_LEVELS = {
    "TRACE": logging.DEBUG,
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARN": logging.WARNING,
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
    "FATAL": logging.CRITICAL,
    "CRITICAL": logging.CRITICAL,
}
_LOGGER = "lazyserve"


class bind:
    """Add fields to every log line written inside the block (this task or thread)."""

    # A class rather than @contextmanager: it runs on every invocation, and a generator-based
    # context manager costs several times as much to enter and leave.
    __slots__ = ("_fields", "_token")

    def __init__(self, **fields: Any) -> None:
        self._fields = fields

    def __enter__(self) -> None:
        self._token = _context.set({**(_context.get() or {}), **self._fields})

    def __exit__(self, *exc: object) -> None:
        _context.reset(self._token)


def set_global(**fields: Any) -> None:
    """Add fields to every later log line of the process (e.g. the served model's sha256)."""
    _global.update(fields)


def request_id() -> str | None:
    """The request id bound to this task or thread (a Lambda invocation's), if any."""
    found = (_context.get() or {}).get("request_id")
    return str(found) if found else None


def _context_fields() -> dict[str, Any]:
    return {**_global, **(_context.get() or {})}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    extra = {k: v for k, v in vars(record).items() if k not in _RESERVED}
    return {**_context_fields(), **extra}


# Lambda's level names (TRACE, DEBUG, INFO, WARN, ERROR, FATAL): a JSON line whose level Lambda
# does not know counts as INFO, and would be dropped under AWS_LAMBDA_LOG_LEVEL=WARN.
_LAMBDA_NAMES = {"WARNING": "WARN", "CRITICAL": "FATAL"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: timestamp, level (Lambda's name for it), logger, message,
    then the context fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": _LAMBDA_NAMES.get(record.levelname, record.levelname),
            "logger": record.name,
            "message": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """`12:00:00.123 INFO lazyserve: model loaded bytes=69488 ...` for a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        pairs = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        text = f"{when} {record.levelname:<7} {record.name}: {record.getMessage()}"
        text = f"{text} {pairs}" if pairs else text
        if record.exc_info:
            text = f"{text}\n{self.formatException(record.exc_info)}"
        return text


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """lazyserve's own handler: stdout on Lambda, stderr elsewhere, followed when replaced (a
    runtime's wrapper, pytest's capture)."""

    def __init__(self, stdout: bool) -> None:
        super().__init__(sys.stdout if stdout else sys.stderr)
        self.stdout = stdout

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout if self.stdout else sys.stderr
        super().emit(record)


class _Context(logging.Filter):
    """Puts the context fields on records that go to the app's own handlers."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context_fields().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


def lambda_log_level(environ: Mapping[str, str] | None = None) -> int | None:
    """Lambda's application log level (AWS_LAMBDA_LOG_LEVEL) as a logging level, if set."""
    env = os.environ if environ is None else environ
    return _LAMBDA_LEVELS.get(env.get("AWS_LAMBDA_LOG_LEVEL", "").strip().upper())


def configure_logging(level: str = "INFO", *, json_lines: bool | None = None) -> None:
    """Set up the `lazyserve` logger as the module docstring says: JSON lines on Lambda (or when
    asked), the app's handlers or text elsewhere; `level`, never below Lambda's
    AWS_LAMBDA_LOG_LEVEL. Touches no other logger; safe to call more than once."""
    wanted = logging.getLevelName(level.upper())
    if not isinstance(wanted, int):
        raise ValueError(f"log level {level!r} is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
    lambda_level = lambda_log_level()
    if json_lines is None:
        json_lines = on_lambda()
    logger = logging.getLogger(_LOGGER)
    logger.setLevel(max(wanted, lambda_level or logging.NOTSET))
    for handler in [h for h in logger.handlers if isinstance(h, _Handler)]:
        logger.removeHandler(handler)
    for found in [f for f in logger.filters if isinstance(f, _Context)]:
        logger.removeFilter(found)
    if not json_lines and logging.getLogger().handlers:
        logger.propagate = True  # the app configured logging: its handlers format the lines
        logger.addFilter(_Context())
        return
    handler = _Handler(stdout=json_lines)
    handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    logger.addHandler(handler)
    logger.propagate = False

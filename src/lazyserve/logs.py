"""Logs: one JSON object per line on Lambda, readable text in a terminal, with the request's
context on each line (cold_start, request_id, model_sha256).

The standard library rather than Powertools' Logger: the library logs to a plain
`logging.getLogger("lazyserve")` that any app can route. On Lambda the runtime client
(awslambdaric) has already put a handler on the root logger, which writes each formatted record
to stdout as it is (no newline added) or as one frame of Lambda's telemetry log; lazyserve keeps
that handler and only sets what it formats:
- with Lambda's JSON log format (`LoggingConfig: LogFormat: JSON`, i.e. AWS_LAMBDA_LOG_FORMAT=JSON)
  the runtime's own JSON formatter stays (requestId, the frame types Lambda filters levels by)
  and lazyserve's fields are added to each record it formats;
- with the Text format (the default), lazyserve's JSON, one newline-terminated object a record.
Elsewhere lazyserve adds a handler of its own to stderr only if the root logger has none, so a
handler the app configured is never reformatted.
"""

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

__all__ = ["bind", "configure_logging", "set_global"]

_context: ContextVar[Mapping[str, Any] | None] = ContextVar("lazyserve_log_context", default=None)
_global: dict[str, Any] = {}
_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
# What awslambdaric's handler filter puts on every record (awslambdaric/bootstrap.py,
# LambdaLoggerFilter), renamed as Lambda's own JSON format names them; `_frame_type` is its
# JSON formatter's note to the handler.
_RUNTIME_FIELDS = {"aws_request_id": "requestId", "tenant_id": "tenantId"}
_HIDDEN = {"_frame_type"}
# awslambdaric's root handlers (awslambdaric/bootstrap.py, `_setup_logging`): the pip package
# (container images) and the bootstrap module of older managed runtimes.
_RUNTIME_HANDLERS = {"LambdaLoggerHandler", "LambdaLoggerHandlerWithFrameType"}
_RUNTIME_MODULES = {"awslambdaric.bootstrap", "bootstrap"}
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
# Their INFO lines (credentials found, endpoint resolved) are not for a person reading the
# service's log, and at DEBUG botocore logs request headers: the access key id and the token.
_QUIET = ("botocore", "boto3", "s3transfer", "urllib3")


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
    """Add fields to every later log line of the process (e.g. the loaded model's sha256)."""
    _global.update(fields)


def _context_fields() -> dict[str, Any]:
    return {**_global, **(_context.get() or {})}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    for key, value in vars(record).items():
        if key in _RESERVED or key in _HIDDEN:
            continue
        if key in _RUNTIME_FIELDS:
            if value not in (None, ""):  # no request id during INIT, no tenant id mostly
                extra[_RUNTIME_FIELDS[key]] = value
            continue
        extra[key] = value
    return {**_context_fields(), **extra}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, then the context fields;
    `newline=True` ends it with a newline, for handlers that write records as they are."""

    def __init__(self, *, newline: bool = False) -> None:
        super().__init__()
        self.end = "\n" if newline else ""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str) + self.end


class TextFormatter(logging.Formatter):
    """`12:00:00.123 INFO lazyserve: model loaded bytes=69488 ...` for a terminal."""

    def __init__(self, *, newline: bool = False) -> None:
        super().__init__()
        self.end = "\n" if newline else ""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created).strftime("%H:%M:%S.%f")[:-3]
        pairs = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        text = f"{when} {record.levelname:<7} {record.name}: {record.getMessage()}"
        text = f"{text} {pairs}" if pairs else text
        if record.exc_info:
            text = f"{text}\n{self.formatException(record.exc_info)}"
        return text + self.end


class WithContext(logging.Formatter):
    """Another formatter (Lambda's JSON one) given lazyserve's fields as record attributes."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        # `extra=` fields are record attributes already and win, as in JsonFormatter.
        fields = {k: v for k, v in _context_fields().items() if k not in vars(record)}
        if not fields:
            return self.inner.format(record)
        # A copy: other handlers of the same record must not see the added attributes.
        copy = logging.makeLogRecord(vars(record))
        vars(copy).update(fields)
        text = self.inner.format(copy)
        # awslambdaric's JSON formatter marks the record with its frame type, which its
        # handler reads from the record it holds (the original).
        if hasattr(copy, "_frame_type"):
            record._frame_type = copy._frame_type
        return text


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler lazyserve adds (to stderr) when nothing else handles the root logger."""

    def emit(self, record: logging.LogRecord) -> None:
        # Follow sys.stderr when something replaces it (pytest's capture, a runtime's wrapper).
        self.stream = sys.stderr
        super().emit(record)


def is_runtime_handler(handler: logging.Handler) -> bool:
    """Whether `handler` is the one Lambda's runtime client (awslambdaric) installed."""
    kind = type(handler)
    return kind.__name__ in _RUNTIME_HANDLERS and kind.__module__ in _RUNTIME_MODULES


def lambda_log_level(environ: Mapping[str, str] | None = None) -> int | None:
    """Lambda's application log level (AWS_LAMBDA_LOG_LEVEL) as a logging level, if set."""
    env = os.environ if environ is None else environ
    return _LAMBDA_LEVELS.get(env.get("AWS_LAMBDA_LOG_LEVEL", "").strip().upper())


def configure_logging(level: str = "INFO", *, json_lines: bool | None = None) -> None:
    """JSON lines on Lambda (or when asked), text elsewhere; `level` for lazyserve's logger,
    never below Lambda's AWS_LAMBDA_LOG_LEVEL. Safe to call more than once."""
    if json_lines is None:
        json_lines = on_lambda()
    lambda_json = os.environ.get("AWS_LAMBDA_LOG_FORMAT", "").strip().upper() == "JSON"
    lambda_level = lambda_log_level()
    root = logging.getLogger()
    runtime = [h for h in root.handlers if is_runtime_handler(h)]
    for handler in runtime:
        current = handler.formatter
        if lambda_json:
            if current is not None and not isinstance(current, WithContext):
                handler.setFormatter(WithContext(current))
        else:
            handler.setFormatter(
                JsonFormatter(newline=True) if json_lines else TextFormatter(newline=True)
            )
        if lambda_level is not None:
            handler.setLevel(lambda_level)
    if runtime:
        # A warning printed to stderr would be a line of plain text among the JSON ones.
        logging.captureWarnings(True)
    else:
        ours = [h for h in root.handlers if isinstance(h, _Handler)]
        if not root.handlers:
            ours = [_Handler(sys.stderr)]
            root.addHandler(ours[0])
            root.setLevel(logging.INFO)
        for handler in ours:
            handler.setFormatter(JsonFormatter() if json_lines else TextFormatter())
    wanted = logging.getLevelName(level.upper())
    if not isinstance(wanted, int):
        raise ValueError(f"log level {level!r} is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
    logging.getLogger("lazyserve").setLevel(max(wanted, lambda_level or logging.NOTSET))
    for name in _QUIET:
        noisy = logging.getLogger(name)
        if noisy.level == logging.NOTSET:
            noisy.setLevel(logging.WARNING)
        elif noisy.level < logging.INFO:
            noisy.setLevel(logging.INFO)

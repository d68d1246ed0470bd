"""Logs: JSON lines on Lambda, readable text in a terminal, with the request's context on each
line (cold_start, request_id, model_sha256).

The standard library rather than Powertools' Logger: the library logs to a plain
`logging.getLogger("lazyserve")` that any app can route, the same records render as JSON on
Lambda and as text under uvicorn by swapping a formatter, and awslambdaric's own root handler
is kept (it tags lines with the request id in CloudWatch) instead of being replaced.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

__all__ = ["bind", "configure_logging", "set_global"]

_context: ContextVar[Mapping[str, Any] | None] = ContextVar("lazyserve_log_context", default=None)
_global: dict[str, Any] = {}
_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


@contextmanager
def bind(**fields: Any) -> Iterator[None]:
    """Add fields to every log line written inside the block (this task or thread)."""
    token = _context.set({**(_context.get() or {}), **fields})
    try:
        yield
    finally:
        _context.reset(token)


def set_global(**fields: Any) -> None:
    """Add fields to every later log line of the process (e.g. the loaded model's sha256)."""
    _global.update(fields)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    extra = {k: v for k, v in vars(record).items() if k not in _RESERVED}
    return {**_global, **(_context.get() or {}), **extra}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then the context fields."""

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


def configure_logging(level: str = "INFO", *, json_lines: bool | None = None) -> None:
    """JSON lines on Lambda (or when asked), text elsewhere; `level` for lazyserve's logger."""
    if json_lines is None:
        json_lines = "AWS_LAMBDA_FUNCTION_NAME" in os.environ
    formatter: logging.Formatter = JsonFormatter() if json_lines else TextFormatter()
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler(sys.stderr))
        root.setLevel(logging.INFO)
    for handler in root.handlers:
        handler.setFormatter(formatter)
    logging.getLogger("lazyserve").setLevel(level)
    # At DEBUG, botocore logs request headers: the access key id and the session token.
    for name in ("botocore", "boto3", "s3transfer", "urllib3"):
        noisy = logging.getLogger(name)
        if noisy.getEffectiveLevel() < logging.INFO:
            noisy.setLevel(logging.INFO)

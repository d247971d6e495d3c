"""Logging to stdout: JSON lines in containers, readable lines in a terminal.

Fields passed as ``extra={...}`` become keys of the line; the current trace id is
added so a log line leads to its trace in Jaeger.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson
from opentelemetry import trace

from services.common.config import LogSettings

_STANDARD_ATTRIBUTES = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRIBUTES}
    span_context = trace.get_current_span().get_span_context()
    if span_context.is_valid and "trace_id" not in fields:
        fields["trace_id"] = format(span_context.trace_id, "032x")
    return fields


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_fields(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        fields = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        line = f"{stamp} {record.levelname:<7} {record.name}: {record.getMessage()}"
        line = f"{line}  {fields}" if fields else line
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return line


def setup_logging(settings: LogSettings) -> None:
    """Send all logs to stdout in the configured format."""
    use_json = settings.format == "json" or (settings.format == "auto" and not sys.stdout.isatty())
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level)
    # The access log repeats what our canonical request line says.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # aio-pika warns at every reconnection attempt (every 2 s of an outage); the
    # broker module says once that the connection is lost and once that it is back.
    logging.getLogger("aio_pika.robust_connection").setLevel(logging.ERROR)
    # aiormq logs every failed connection attempt as an error; the broker module says what
    # an operator needs (quietly while the broker starts, then why it is unreachable or refused).
    logging.getLogger("aiormq.connection").addFilter(_not_a_connection_attempt)


def _not_a_connection_attempt(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("error when creating transport")

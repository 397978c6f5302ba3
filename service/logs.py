"""How the service's log lines look: `text` for a person at a terminal, `json` for a log collector (one JSON
object per line). Every logger (ours, uvicorn's, Python's warnings) writes through the one handler set here.

A record may carry structured fields, `log.info(..., extra={"fields": {...}})`: in JSON they are keys of the
line's object (the access log's request id, route, status, duration); in text the message already says them."""
from __future__ import annotations

import json
import logging
import sys
import threading
from datetime import datetime, timezone

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
log = logging.getLogger("vitserve")


class JsonFormatter(logging.Formatter):
    """One line per record: time (UTC, ISO 8601), level, logger, message, the record's fields, and the traceback
    as a string (a multi-line traceback in a text log would break a line-per-record collector)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
                 "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        for key, value in getattr(record, "fields", {}).items():
            entry.setdefault(key, value)  # a field never hides the line's own keys
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure_logging(level: str, log_format: str) -> None:
    """Route every log record to stderr in `log_format` ("text" or "json"); uvicorn must be started with
    `log_config=None`, so that its loggers reach this handler instead of installing their own."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # warnings.warn(...) becomes a record of the "py.warnings" logger
    if log_format == "json":
        # an exception nobody caught would otherwise print a bare traceback between the JSON lines
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_uncaught_in_thread


def _log_uncaught(kind, error, trace) -> None:
    log.critical("uncaught exception", exc_info=(kind, error, trace))


def _log_uncaught_in_thread(hook: threading.ExceptHookArgs) -> None:
    if not issubclass(hook.exc_type, SystemExit):  # as Python's own hook: a thread's SystemExit ends it quietly
        name = hook.thread.name if hook.thread else "?"
        log.error("uncaught exception in thread %s", name, exc_info=(hook.exc_type, hook.exc_value, hook.exc_traceback))

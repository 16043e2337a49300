"""Structured JSON log lines. Callers pass only paths, codes, counts and ids - never values."""

from __future__ import annotations

import logging
import sys
import time
from contextvars import ContextVar

import orjson

# the request being handled (set by the aiohttp handler): every line logged while handling it carries it
REQUEST_ID: ContextVar[str | None] = ContextVar("fhircrypt_request_id", default=None)

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + "Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        request_id = REQUEST_ID.get()
        if request_id:
            line["request_id"] = request_id
        line.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info and record.exc_info[0] is not None:  # the type only: messages may quote values
            line["error"] = record.exc_info[0].__name__
        return orjson.dumps(line, default=str).decode()


def configure(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # every request logs a line: skip what the JSON lines never show (the logging HOWTO's "Optimization":
    # no caller lookup through stack frames, no thread or multiprocessing names)
    logging._srcfile = None
    logging.logThreads = logging.logMultiprocessing = False
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)  # its lines carry full URLs (search values)

"""Structured JSON logs that carry the service name and the correlation id, and the trace and
span ids while tracing is on and a span is in progress (booking.runtime.tracing)."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from pythonjsonlogger.json import JsonFormatter

from booking.runtime import context, tracing


class _ContextFilter(logging.Filter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        record.service = self.service
        record.correlation_id = context.correlation_id.get()
        record.causation_id = context.causation_id.get()
        ids = tracing.log_ids()
        if ids is not None:
            record.trace_id, record.span_id = ids
        return True


class QuietBrokerClient(logging.Filter):
    """The broker client logs each failed reconnect (twice), and the end of a connection with a
    stack trace: during an outage that is a few lines a second from every process. Each kind of
    line passes once per `interval`, saying how many like it were held back, and without its
    trace (the outage itself is reported by booking.runtime.outages)."""

    def __init__(self, interval: float = 10.0) -> None:
        super().__init__()
        self.interval = interval
        self._last: dict[str, float] = {}
        self._held_back: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info = None
        record.exc_text = None
        key = f"{record.name}:{record.msg}"
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._held_back[key] = self._held_back.get(key, 0) + 1
            return False
        self._last[key] = now
        held_back = self._held_back.pop(key, 0)
        if held_back:
            record.held_back = held_back  # a field of the JSON line
        return True


BROKER_CLIENT_LOGGERS = ("aiormq.connection", "aio_pika.robust_connection", "aio_pika.tools")


class _StdoutHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever `sys.stdout` is when it writes, not the one it was built with.

    A test runner swaps `sys.stdout` for each test and closes the old one: a handler holding it
    failed every write from then on, and the logging module printed each failure's traceback
    (formatting one parses source with `ast` on Python 3.11, which raced another thread's parse:
    "AST constructor recursion depth mismatch" in a property test).
    """

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self) -> Any:
        return sys.stdout

    @stream.setter
    def stream(self, _given: Any) -> None:
        pass  # always the current one


def configure_logging(service: str, level: str = "INFO") -> None:
    handler = _StdoutHandler()
    handler.addFilter(_ContextFilter(service))
    handler.setFormatter(
        JsonFormatter(
            "%(levelname)s %(name)s %(message)s %(service)s %(correlation_id)s",
            rename_fields={"levelname": "level", "name": "logger"},
            timestamp="time",  # ISO 8601, UTC
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Chatty libraries: their INFO lines are noise at our volume.
    for name in ("aio_pika", "aiormq", "uvicorn.access", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    quiet = QuietBrokerClient()
    for name in BROKER_CLIENT_LOGGERS:
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, QuietBrokerClient)]:
            logger.removeFilter(old)
        logger.addFilter(quiet)

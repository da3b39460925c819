"""The logs stay readable through an outage: the broker client's repeats are held back."""

from __future__ import annotations

import logging
import sys

from booking.runtime.logs import QuietBrokerClient


def record(name: str, message: str, *, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ConnectionError("broker forced connection closure")
        except ConnectionError:
            exc_info = sys.exc_info()
    return logging.LogRecord(name, logging.WARNING, __file__, 1, message, (), exc_info)


def test_each_kind_of_line_passes_once_per_interval_with_the_count_held_back():
    quiet = QuietBrokerClient(interval=60)
    attempt = "Connection attempt to %s failed"
    attempts = [record("aio_pika.robust_connection", attempt) for _ in range(5)]
    passed = [r for r in attempts if quiet.filter(r)]
    assert passed == attempts[:1]
    other = record("aiormq.connection", "error when creating transport: %r")
    assert quiet.filter(other)  # another kind of line is not held back by the first

    quiet.interval = 0  # the interval has passed
    later = record("aio_pika.robust_connection", attempt)
    assert quiet.filter(later)
    assert later.held_back == 4


def test_the_stack_trace_of_a_lost_connection_is_dropped():
    quiet = QuietBrokerClient()
    lost = record("aiormq.connection", "Cancelling cause reader exited abnormally", exc=True)
    assert quiet.filter(lost)
    assert lost.exc_info is None and lost.exc_text is None
    formatted = logging.Formatter().format(lost)
    assert "Traceback" not in formatted

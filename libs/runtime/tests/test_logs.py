"""The logs stay readable through an outage: the broker client's repeats are held back."""

from __future__ import annotations

import io
import logging
import sys

from booking.runtime.logs import QuietBrokerClient, configure_logging


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


def test_lines_go_to_the_stdout_of_the_moment_not_the_one_at_configuration(monkeypatch):
    """A test runner swaps sys.stdout and closes the old one: lines must follow the swap."""
    root = logging.getLogger()
    kept_handlers, kept_level = root.handlers[:], root.level
    first, then = io.StringIO(), io.StringIO()
    try:
        monkeypatch.setattr(sys, "stdout", first)
        configure_logging("test-service")
        first.close()
        monkeypatch.setattr(sys, "stdout", then)
        logging.getLogger("booking.test").warning("after the swap")
    finally:
        root.handlers[:] = kept_handlers
        root.setLevel(kept_level)
    assert "after the swap" in then.getvalue()

"""Telling "a dependency cannot be reached" apart from "this work is wrong", and saying so quietly.

A handler, a relay, a sweeper or a request that fails because Postgres or RabbitMQ is away has
done nothing wrong: it waits for the dependency instead of spending a message's retry budget,
and its logs say so once in a while, not once per failure with a stack trace (an outage of a
minute under load otherwise writes hundreds of megabytes of the same trace).

Nothing here imports a driver: the gateway, which has no database, uses it too.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator

# Postgres (asyncpg) errors that mean the server is going away, not that a statement was wrong.
_ASYNCPG_UNREACHABLE = (
    "PostgresConnectionError",  # and its subclasses: connection failures, ConnectionDoesNotExist
    "InterfaceError",  # "connection is closed", "cannot perform operation: another operation"
    # "cannot switch to state ...; another operation is in progress": a BEGIN on a connection
    # the server dropped mid-operation (met on the driver itself, without SQLAlchemy's wrapper)
    "InternalClientError",
    "CannotConnectNowError",  # 57P03: starting up or shutting down
    "AdminShutdownError",  # 57P01
    "CrashShutdownError",  # 57P02
    "TooManyConnectionsError",  # 53300
)
# aiormq's errors of a connection or channel that is gone.
_AIORMQ_UNREACHABLE = ("AMQPConnectionError", "ChannelInvalidStateError", "ConnectionClosed")


_FILE_ERRORS = (
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _is_one_of(exc: BaseException, module: str, names: tuple[str, ...]) -> bool:
    loaded = sys.modules.get(module)
    if loaded is None:
        return False
    classes = tuple(c for name in names if isinstance(c := getattr(loaded, name, None), type))
    return isinstance(exc, classes)


def is_unreachable(exc: BaseException) -> bool:
    """Whether `exc`, or what caused it, says a server could not be reached or went away.

    Sockets (refused, reset, timed out), a connection the driver found closed, Postgres
    shutting down or out of connections, SQLAlchemy's pool timing out or invalidating a
    connection, RabbitMQ's connection or channel gone. An error about the work itself (a
    constraint, bad SQL, a validation) is not one.
    """
    for error in _chain(exc):
        # Sockets: ConnectionError, TimeoutError, socket.gaierror, "Multiple exceptions" (a
        # connect to several addresses), no route to host... but not a file that is missing.
        if isinstance(error, OSError) and not isinstance(error, _FILE_ERRORS):
            return True
        if getattr(error, "connection_invalidated", False):
            return True
        if _is_one_of(error, "sqlalchemy.exc", ("TimeoutError",)):  # the pool's
            return True
        if _is_one_of(error, "asyncpg.exceptions", _ASYNCPG_UNREACHABLE):
            return True
        if _is_one_of(error, "asyncpg", _ASYNCPG_UNREACHABLE):
            return True
        if _is_one_of(error, "aiormq.exceptions", _AIORMQ_UNREACHABLE):
            return True
    return False


def describe(exc: BaseException) -> str:
    """One line for a log: the error's type and message, without its trace."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


class OutageLog:
    """Logs that something is unreachable at most once per `interval`, with how often since.

    `recovered()` logs once that it answers again (if an outage was logged).
    """

    def __init__(self, logger: logging.Logger, what: str, interval: float = 10.0) -> None:
        self.logger = logger
        self.what = what
        self.interval = interval
        self._last_logged: float | None = None
        self._since_last = 0
        self._in_outage = False
        self._started: float | None = None

    def failed(self, exc: BaseException, doing: str = "") -> None:
        now = time.monotonic()
        self._since_last += 1
        if not self._in_outage:
            self._in_outage = True
            self._started = now
        if self._last_logged is not None and now - self._last_logged < self.interval:
            return
        context = f" while {doing}" if doing else ""
        count = self._since_last
        repeats = f" ({count} times since the last report)" if count > 1 else ""
        self.logger.warning("%s unreachable%s: %s%s", self.what, context, describe(exc), repeats)
        self._last_logged = now
        self._since_last = 0

    def recovered(self) -> None:
        if not self._in_outage:
            return
        lasted = time.monotonic() - (self._started or time.monotonic())
        self.logger.warning("%s answers again (unreachable for %.1fs)", self.what, lasted)
        self._in_outage = False
        self._last_logged = None
        self._since_last = 0

    @property
    def in_outage(self) -> bool:
        return self._in_outage

"""Telling "a server cannot be reached" apart from "this work is wrong"."""

from __future__ import annotations

import asyncpg
import pytest
import sqlalchemy.exc

from booking.runtime.outages import is_unreachable


def wrapped(cause: BaseException) -> Exception:
    """`cause` as SQLAlchemy raises it: a DBAPIError whose cause is the driver's error."""
    try:
        try:
            raise cause
        except BaseException as inner:
            raise sqlalchemy.exc.OperationalError("SELECT 1", {}, inner) from inner
    except sqlalchemy.exc.OperationalError as outer:
        return outer


@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefusedError(111, "Connect call failed"),
        ConnectionResetError(104, "reset by peer"),
        TimeoutError(),
        OSError("Multiple exceptions: [Errno 111] Connect call failed"),
        asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
        asyncpg.exceptions.AdminShutdownError("terminating connection"),
        asyncpg.exceptions.TooManyConnectionsError("too many clients"),
        asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"),
        asyncpg.exceptions.InterfaceError("connection is closed"),
        asyncpg.exceptions._base.InternalClientError(
            "cannot switch to state 15; another operation (2) is in progress"
        ),
        wrapped(ConnectionRefusedError(111, "refused")),
        sqlalchemy.exc.TimeoutError("QueuePool limit reached"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_server_out_of_reach_is_unreachable(error):
    assert is_unreachable(error)


@pytest.mark.parametrize(
    "error",
    [
        ValueError("a rule broken"),
        KeyError("a bug"),
        FileNotFoundError(2, "no such file"),
        PermissionError(13, "denied"),
        asyncpg.exceptions.UniqueViolationError("duplicate key"),
        wrapped(asyncpg.exceptions.UndefinedColumnError("no such column")),
    ],
    ids=lambda e: type(e).__name__,
)
def test_an_error_of_the_work_itself_is_not(error):
    assert not is_unreachable(error)

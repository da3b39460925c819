"""The calendar schema's tables: mentors, their Google connections, the single-use consent
states, the bookings of paid sessions and each attempt at them, and the messaging tables.
Times are timestamptz."""

from datetime import datetime
from uuid import UUID

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    Column,
    ForeignKey,
    Index,
    Integer,
    PrimaryKeyConstraint,
    Table,
    Text,
    Uuid,
    text,
)
from sqlmodel import Field, SQLModel

from booking.calendar.domain import PRIMARY_CALENDAR, BookingStatus
from booking.contracts import CalendarFailureReason
from booking.runtime.tables import MessagingTables, one_of, time_column

SCHEMA = "calendar"

BOOKING_STATUSES = tuple(status.value for status in BookingStatus)
FAILURE_REASONS = tuple(reason.value for reason in CalendarFailureReason)
ATTEMPT_OUTCOMES = ("confirmed", "failed", "meet_pending")

messaging = MessagingTables(SQLModel.metadata, SCHEMA)


class MentorRow(SQLModel, table=True):
    """A mentor as MentorRegistered and MentorIdentityLinked told us: the calendar's own record
    (no other schema)."""

    __tablename__ = "mentors"
    __table_args__ = {"schema": SCHEMA}

    id: UUID = Field(sa_column=Column(Uuid, primary_key=True))
    name: str = Field(sa_column=Column(Text, nullable=False))
    email: str = Field(sa_column=Column(Text, nullable=False))
    timezone: str = Field(sa_column=Column(Text, nullable=False))  # IANA name
    registered_at: datetime = Field(sa_column=time_column(nullable=False, default_now=True))
    # The identity-provider subject that acts as the mentor. Not unique here: orders keeps one
    # mentor per subject, and its events may arrive out of order for a moment.
    identity_subject: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    # The sequence of the MentorIdentityLinked it came from (0: as registered): a link is
    # applied only over a lower one.
    identity_sequence: int = Field(
        sa_column=Column(Integer, nullable=False, server_default=text("0"))
    )


class ConnectionRow(SQLModel, table=True):
    """A mentor's Google connection. The refresh token is stored only Fernet-encrypted."""

    __tablename__ = "connections"
    __table_args__ = {"schema": SCHEMA}

    mentor_id: UUID = Field(
        sa_column=Column(Uuid, ForeignKey(f"{SCHEMA}.mentors.id"), primary_key=True)
    )
    calendar_id: str = Field(
        sa_column=Column(Text, nullable=False, server_default=text(f"'{PRIMARY_CALENDAR}'"))
    )
    refresh_token_encrypted: str = Field(sa_column=Column(Text, nullable=False))
    scope: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    connected_at: datetime = Field(sa_column=time_column(nullable=False))
    # Google answered invalid_grant: the mentor must connect again.
    revoked_at: datetime | None = Field(default=None, sa_column=time_column(nullable=True))


class OAuthStateRow(SQLModel, table=True):
    """One consent round trip: its `state` is good once, until it expires."""

    __tablename__ = "oauth_states"
    __table_args__ = (
        Index("ix_oauth_states_expires_at", "expires_at"),
        {"schema": SCHEMA},
    )

    nonce: str = Field(sa_column=Column(Text, primary_key=True))
    mentor_id: UUID = Field(sa_column=Column(Uuid, nullable=False))
    expires_at: datetime = Field(sa_column=time_column(nullable=False))
    used_at: datetime | None = Field(default=None, sa_column=time_column(nullable=True))
    created_at: datetime = Field(sa_column=time_column(nullable=False, default_now=True))


class CalendarBookingRow(SQLModel, table=True):
    """One paid session to put in its mentor's calendar: pending, confirmed, failed or cancelled."""

    __tablename__ = "calendar_bookings"
    __table_args__ = (
        # The sweeper's query: pending bookings whose lease lapsed or that nobody claimed.
        Index(
            "ix_calendar_bookings_pending",
            "updated_at",
            postgresql_where=text("status = 'pending'"),
        ),
        # The recovery's query: a mentor's failed bookings.
        Index(
            "ix_calendar_bookings_failed_mentor",
            "mentor_id",
            postgresql_where=text("status = 'failed'"),
        ),
        # The sweeper's: failed bookings whose next attempt on the schedule is due.
        Index(
            "ix_calendar_bookings_retry_due",
            "next_attempt_at",
            postgresql_where=text(
                "status = 'failed' AND NOT final AND next_attempt_at IS NOT NULL"
            ),
        ),
        # The sweeper's: bookings waiting for a reconnect, final once their session begins.
        Index(
            "ix_calendar_bookings_waiting",
            "start_at",
            postgresql_where=text("status = 'failed' AND NOT final AND next_attempt_at IS NULL"),
        ),
        # The sweeper's: cancelled bookings whose Google event is still to delete.
        Index(
            "ix_calendar_bookings_delete_pending",
            "updated_at",
            postgresql_where=text("event_delete_pending"),
        ),
        CheckConstraint(one_of("status", BOOKING_STATUSES), name="ck_calendar_bookings_status"),
        CheckConstraint(
            f"reason IS NULL OR {one_of('reason', FAILURE_REASONS)}",
            name="ck_calendar_bookings_reason",
        ),
        {"schema": SCHEMA},
    )

    # One booking per session, however often OrderPaid arrives.
    session_id: UUID = Field(sa_column=Column(Uuid, primary_key=True))
    order_id: UUID = Field(sa_column=Column(Uuid, nullable=False))
    # No foreign key: a booking for a mentor we do not know is kept (failed store_not_found).
    mentor_id: UUID = Field(sa_column=Column(Uuid, nullable=False))
    # The session as OrderPaid told it; NULL in a tombstone (OrderCancelled came first).
    mentee_email: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    title: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    start_at: datetime | None = Field(default=None, sa_column=time_column(nullable=True))
    end_at: datetime | None = Field(default=None, sa_column=time_column(nullable=True))
    # Derived from the session id before Google is asked: the same on every attempt.
    event_id: str = Field(sa_column=Column(Text, nullable=False))
    status: str = Field(sa_column=Column(Text, nullable=False))
    reason: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    detail: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    # Attempts recorded (scheduling_attempts): counted at each outcome, so a run lost before
    # its outcome (a crash, our database away) costs nothing.
    attempts: int = Field(sa_column=Column(Integer, nullable=False, server_default=text("0")))
    # Failures on the retry schedule since it (re)started (an admin's retry restarts it).
    schedule_failures: int = Field(
        sa_column=Column(Integer, nullable=False, server_default=text("0"))
    )
    # Scheduling gave up (status failed): an admin decides.
    final: bool = Field(sa_column=Column(Boolean, nullable=False, server_default=text("false")))
    # A failed booking on the schedule is run again from then.
    next_attempt_at: datetime | None = Field(default=None, sa_column=time_column(nullable=True))
    # Cancelled, and Google may have its event: deleted once no run holds the lease.
    event_delete_pending: bool = Field(
        sa_column=Column(Boolean, nullable=False, server_default=text("false"))
    )
    meet_link: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    html_link: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    # The lease of the replica scheduling it (status pending), or deleting its event
    # (cancelled); its value is the holder's token.
    claimed_until: datetime | None = Field(default=None, sa_column=time_column(nullable=True))
    # The booking's correlation id: every event about it carries it.
    correlation_id: str = Field(sa_column=Column(Text, nullable=False))
    created_at: datetime = Field(sa_column=time_column(nullable=False, default_now=True))
    updated_at: datetime = Field(sa_column=time_column(nullable=False, default_now=True))


class SchedulingAttemptRow(SQLModel, table=True):
    """One attempt at scheduling a booking, as it ended: what an admin reads to see its story."""

    __tablename__ = "scheduling_attempts"
    __table_args__ = (
        # The attempt's number is the booking's count, taken under its row lock: once each.
        PrimaryKeyConstraint("session_id", "attempt", name="pk_scheduling_attempts"),
        CheckConstraint(one_of("outcome", ATTEMPT_OUTCOMES), name="ck_scheduling_attempts_outcome"),
        CheckConstraint(
            f"reason IS NULL OR {one_of('reason', FAILURE_REASONS)}",
            name="ck_scheduling_attempts_reason",
        ),
        {"schema": SCHEMA},
    )

    session_id: UUID = Field(
        sa_column=Column(Uuid, ForeignKey(f"{SCHEMA}.calendar_bookings.session_id"), nullable=False)
    )
    attempt: int = Field(sa_column=Column(Integer, nullable=False))
    at: datetime = Field(sa_column=time_column(nullable=False))
    outcome: str = Field(sa_column=Column(Text, nullable=False))
    reason: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    detail: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    # Whether the scheduling gave up with this failure, and when it tries next.
    final: bool = Field(sa_column=Column(Boolean, nullable=False, server_default=text("false")))
    next_attempt_at: datetime | None = Field(default=None, sa_column=time_column(nullable=True))


# SQLModel sets `__table__` on table classes; its type stubs do not say so.
mentors: Table = MentorRow.__table__  # type: ignore[attr-defined]
connections: Table = ConnectionRow.__table__  # type: ignore[attr-defined]
oauth_states: Table = OAuthStateRow.__table__  # type: ignore[attr-defined]
calendar_bookings: Table = CalendarBookingRow.__table__  # type: ignore[attr-defined]
scheduling_attempts: Table = SchedulingAttemptRow.__table__  # type: ignore[attr-defined]

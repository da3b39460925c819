"""Recovery: the outbox's retry time for unroutable events, the dead letters an admin may
replay or discard, and the audit trail of admin actions; for the calendar, the retry schedule
of failed bookings (final, next attempt, each attempt recorded), cancelled bookings (and
tombstones of sessions cancelled before they were paid) whose Google event is owed a delete.

Revision ID: 0003
Revises: 0002
"""

from typing import Any

import sqlalchemy as sa
from alembic import op

from booking.runtime.migrations import create_recovery_tables, drop_recovery_tables

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

SCHEMA = "calendar"

_REASONS = (
    "'store_not_found', 'mentor_not_integrated', 'integration_revoked', 'calendar_api_error',"
    " 'unexpected_error'"
)
# What a tombstone does not know: the session as OrderPaid tells it.
_SESSION_COLUMNS = ("mentee_email", "title", "start_at", "end_at")


def _time(name: str, *, nullable: bool = True) -> sa.Column[Any]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    create_recovery_tables(SCHEMA)

    for column in (
        sa.Column("schedule_failures", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("final", sa.Boolean, nullable=False, server_default=sa.text("false")),
        _time("next_attempt_at"),
        sa.Column(
            "event_delete_pending", sa.Boolean, nullable=False, server_default=sa.text("false")
        ),
    ):
        op.add_column("calendar_bookings", column, schema=SCHEMA)
    for name in _SESSION_COLUMNS:
        op.alter_column("calendar_bookings", name, nullable=True, schema=SCHEMA)
    op.drop_constraint(
        "ck_calendar_bookings_status", "calendar_bookings", type_="check", schema=SCHEMA
    )
    op.create_check_constraint(
        "ck_calendar_bookings_status",
        "calendar_bookings",
        "status IN ('pending', 'confirmed', 'failed', 'cancelled')",
        schema=SCHEMA,
    )
    # Before the retry schedule these failures were final at once, and stay so: whoever wants
    # them tried again asks for it (an admin's retry).
    op.execute(
        f"UPDATE {SCHEMA}.calendar_bookings SET final = true WHERE status = 'failed'"
        " AND reason IN ('calendar_api_error', 'unexpected_error', 'store_not_found')"
    )
    op.create_index(
        "ix_calendar_bookings_retry_due",
        "calendar_bookings",
        ["next_attempt_at"],
        schema=SCHEMA,
        postgresql_where=sa.text(
            "status = 'failed' AND NOT final AND next_attempt_at IS NOT NULL"
        ),
    )
    op.create_index(
        "ix_calendar_bookings_waiting",
        "calendar_bookings",
        ["start_at"],
        schema=SCHEMA,
        postgresql_where=sa.text("status = 'failed' AND NOT final AND next_attempt_at IS NULL"),
    )
    op.create_index(
        "ix_calendar_bookings_delete_pending",
        "calendar_bookings",
        ["updated_at"],
        schema=SCHEMA,
        postgresql_where=sa.text("event_delete_pending"),
    )

    op.create_table(
        "scheduling_attempts",
        sa.Column(
            "session_id",
            sa.Uuid,
            sa.ForeignKey(f"{SCHEMA}.calendar_bookings.session_id"),
            nullable=False,
        ),
        sa.Column("attempt", sa.Integer, nullable=False),
        _time("at", nullable=False),
        sa.Column("outcome", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("detail", sa.Text, nullable=True),
        sa.Column("final", sa.Boolean, nullable=False, server_default=sa.text("false")),
        _time("next_attempt_at"),
        sa.PrimaryKeyConstraint("session_id", "attempt", name="pk_scheduling_attempts"),
        sa.CheckConstraint(
            "outcome IN ('confirmed', 'failed', 'meet_pending')",
            name="ck_scheduling_attempts_outcome",
        ),
        sa.CheckConstraint(
            f"reason IS NULL OR reason IN ({_REASONS})", name="ck_scheduling_attempts_reason"
        ),
        schema=SCHEMA,
    )


def downgrade() -> None:
    op.drop_table("scheduling_attempts", schema=SCHEMA)
    for index in (
        "ix_calendar_bookings_delete_pending",
        "ix_calendar_bookings_waiting",
        "ix_calendar_bookings_retry_due",
    ):
        op.drop_index(index, table_name="calendar_bookings", schema=SCHEMA)
    # The schema before knows no cancellation: cancelled bookings and tombstones go (their
    # orders keep the story), and what waited on the schedule is failed as it was then.
    op.execute(f"DELETE FROM {SCHEMA}.calendar_bookings WHERE status = 'cancelled'")
    op.drop_constraint(
        "ck_calendar_bookings_status", "calendar_bookings", type_="check", schema=SCHEMA
    )
    op.create_check_constraint(
        "ck_calendar_bookings_status",
        "calendar_bookings",
        "status IN ('pending', 'confirmed', 'failed')",
        schema=SCHEMA,
    )
    for name in _SESSION_COLUMNS:
        op.alter_column("calendar_bookings", name, nullable=False, schema=SCHEMA)
    for name in ("event_delete_pending", "next_attempt_at", "final", "schedule_failures"):
        op.drop_column("calendar_bookings", name, schema=SCHEMA)
    drop_recovery_tables(SCHEMA)

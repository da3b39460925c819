"""Mentors, Google connections, consent states and calendar bookings.

Revision ID: 0002
Revises: 0001
"""

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

SCHEMA = "calendar"


def _time(name: str, *, nullable: bool = True, default_now: bool = False) -> sa.Column[Any]:
    return sa.Column(
        name,
        sa.DateTime(timezone=True),
        nullable=nullable,
        server_default=sa.text("now()") if default_now else None,
    )


def upgrade() -> None:
    op.create_table(
        "mentors",
        sa.Column("id", sa.Uuid, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("email", sa.Text, nullable=False),
        sa.Column("timezone", sa.Text, nullable=False),
        _time("registered_at", nullable=False, default_now=True),
        schema=SCHEMA,
    )
    op.create_table(
        "connections",
        sa.Column(
            "mentor_id", sa.Uuid, sa.ForeignKey(f"{SCHEMA}.mentors.id"), primary_key=True
        ),
        sa.Column("calendar_id", sa.Text, nullable=False, server_default=sa.text("'primary'")),
        sa.Column("refresh_token_encrypted", sa.Text, nullable=False),
        sa.Column("scope", sa.Text, nullable=True),
        _time("connected_at", nullable=False),
        _time("revoked_at"),
        schema=SCHEMA,
    )
    op.create_table(
        "oauth_states",
        sa.Column("nonce", sa.Text, primary_key=True),
        sa.Column("mentor_id", sa.Uuid, nullable=False),
        _time("expires_at", nullable=False),
        _time("used_at"),
        _time("created_at", nullable=False, default_now=True),
        schema=SCHEMA,
    )
    op.create_index(
        "ix_oauth_states_expires_at", "oauth_states", ["expires_at"], schema=SCHEMA
    )
    op.create_table(
        "calendar_bookings",
        sa.Column("session_id", sa.Uuid, primary_key=True),
        sa.Column("order_id", sa.Uuid, nullable=False),
        sa.Column("mentor_id", sa.Uuid, nullable=False),
        sa.Column("mentee_email", sa.Text, nullable=False),
        sa.Column("title", sa.Text, nullable=False),
        _time("start_at", nullable=False),
        _time("end_at", nullable=False),
        sa.Column("event_id", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("detail", sa.Text, nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("meet_link", sa.Text, nullable=True),
        sa.Column("html_link", sa.Text, nullable=True),
        _time("claimed_until"),
        sa.Column("correlation_id", sa.Text, nullable=False),
        _time("created_at", nullable=False, default_now=True),
        _time("updated_at", nullable=False, default_now=True),
        sa.CheckConstraint(
            "status IN ('pending', 'confirmed', 'failed')", name="ck_calendar_bookings_status"
        ),
        sa.CheckConstraint(
            "reason IS NULL OR reason IN ('store_not_found', 'mentor_not_integrated',"
            " 'integration_revoked', 'calendar_api_error', 'unexpected_error')",
            name="ck_calendar_bookings_reason",
        ),
        schema=SCHEMA,
    )
    op.create_index(
        "ix_calendar_bookings_pending",
        "calendar_bookings",
        ["updated_at"],
        schema=SCHEMA,
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_index(
        "ix_calendar_bookings_failed_mentor",
        "calendar_bookings",
        ["mentor_id"],
        schema=SCHEMA,
        postgresql_where=sa.text("status = 'failed'"),
    )


def downgrade() -> None:
    op.drop_table("calendar_bookings", schema=SCHEMA)
    op.drop_table("oauth_states", schema=SCHEMA)
    op.drop_table("connections", schema=SCHEMA)
    op.drop_table("mentors", schema=SCHEMA)

"""The admin notifications: stored, deduplicated by fingerprint, listed newest first.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

SCHEMA = "notifications"
TABLE = "admin_notifications"


def upgrade() -> None:
    # Type 0..4: IntegrationFailure, PaymentAnomaly, SessionIssue, SystemError,
    # HealthCheckFailure. Severity 0..3: Info, Warning, Error, Critical.
    op.create_table(
        TABLE,
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("type", sa.SmallInteger, nullable=False),
        sa.Column("severity", sa.SmallInteger, nullable=False),
        sa.Column("title", sa.Text, nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column(
            "metadata",
            postgresql.JSONB,
            nullable=False,
            server_default=sa.text("'{}'::jsonb"),
        ),
        sa.Column("is_read", sa.Boolean, nullable=False, server_default=sa.text("false")),
        sa.Column("read_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("fingerprint", sa.Text, nullable=False),
        sa.Column("occurrences", sa.Integer, nullable=False, server_default=sa.text("1")),
        sa.Column("last_occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("is_open", sa.Boolean, nullable=False, server_default=sa.text("true")),
        sa.CheckConstraint("type BETWEEN 0 AND 4", name="ck_admin_notifications_type"),
        sa.CheckConstraint("severity BETWEEN 0 AND 3", name="ck_admin_notifications_severity"),
        sa.CheckConstraint("occurrences >= 1", name="ck_admin_notifications_occurrences"),
        sa.CheckConstraint(
            "is_read = (read_at IS NOT NULL)", name="ck_admin_notifications_read_at"
        ),
        schema=SCHEMA,
    )
    # The feed, newest first by id: the primary key serves the unfiltered list; these serve
    # "unread of a severity" (the admins' main view), a severity, a type, `since` and the summary.
    op.create_index(
        "ix_admin_notifications_unread_severity",
        TABLE,
        ["severity", "id"],
        schema=SCHEMA,
        postgresql_where=sa.text("NOT is_read"),
    )
    op.create_index("ix_admin_notifications_severity", TABLE, ["severity", "id"], schema=SCHEMA)
    op.create_index("ix_admin_notifications_type", TABLE, ["type", "id"], schema=SCHEMA)
    op.create_index(
        "ix_admin_notifications_last_occurred_at", TABLE, ["last_occurred_at"], schema=SCHEMA
    )
    op.create_index("ix_admin_notifications_created_at", TABLE, ["created_at"], schema=SCHEMA)
    # Dedup: at most one open notification per fingerprint; a repeat conflicts and counts up.
    op.create_index(
        "ux_admin_notifications_open_fingerprint",
        TABLE,
        ["fingerprint"],
        unique=True,
        schema=SCHEMA,
        postgresql_where=sa.text("is_open"),
    )


def downgrade() -> None:
    op.drop_table(TABLE, schema=SCHEMA)

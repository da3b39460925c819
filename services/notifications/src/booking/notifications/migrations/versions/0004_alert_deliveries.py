"""Alert deliveries: each notification's occurrences on their way to people (webhook, email).

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

SCHEMA = "notifications"
TABLE = "alert_deliveries"


def upgrade() -> None:
    # One row per (notification, occurrence, channel), queued in the transaction that stores or
    # counts up the notification: never lost, never queued twice for one occurrence.
    op.create_table(
        TABLE,
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column(
            "notification_id",
            sa.BigInteger,
            sa.ForeignKey(f"{SCHEMA}.admin_notifications.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("occurrence", sa.Integer, nullable=False),
        sa.Column("channel", sa.Text, nullable=False),
        sa.Column("idempotency_key", sa.Text, nullable=False, unique=True),
        sa.Column("status", sa.Text, nullable=False, server_default=sa.text("'pending'")),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("payload", postgresql.JSONB, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint(
            "notification_id", "occurrence", "channel", name="ux_alert_deliveries_occurrence"
        ),
        sa.CheckConstraint("channel IN ('webhook', 'email')", name="ck_alert_deliveries_channel"),
        sa.CheckConstraint(
            "status IN ('pending', 'sending', 'sent', 'failed', 'superseded')",
            name="ck_alert_deliveries_status",
        ),
        sa.CheckConstraint("occurrence >= 1", name="ck_alert_deliveries_occurrence"),
        sa.CheckConstraint("attempts >= 0", name="ck_alert_deliveries_attempts"),
        sa.CheckConstraint(
            "(status = 'sent') = (sent_at IS NOT NULL)", name="ck_alert_deliveries_sent_at"
        ),
        schema=SCHEMA,
    )
    # The dispatcher's claim: unsent rows by when they are due.
    op.create_index(
        "ix_alert_deliveries_due",
        TABLE,
        ["next_attempt_at"],
        schema=SCHEMA,
        postgresql_where=sa.text("status IN ('pending', 'sending')"),
    )


def downgrade() -> None:
    op.drop_table(TABLE, schema=SCHEMA)

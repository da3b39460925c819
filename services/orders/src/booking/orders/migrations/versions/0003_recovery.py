"""Recovery: the outbox's retry time for unroutable events, the dead letters an admin may
replay or discard, and the audit trail of admin actions. Orders also keep their escrow's status
(of the highest sequence heard of) and their booking's correlation id, and pending orders are
indexed for the sweeper that fails payments that never opened.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

from booking.runtime.migrations import create_recovery_tables, drop_recovery_tables

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

SCHEMA = "orders"

# Written out, not imported: a migration must not change when the code does.
ESCROW_STATUSES = ("held", "frozen", "released", "refund_due", "refunded")


def _in(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{v}'" for v in values)


def upgrade() -> None:
    create_recovery_tables(SCHEMA)

    op.add_column("orders", sa.Column("escrow_status", sa.Text, nullable=True), schema=SCHEMA)
    op.add_column(
        "orders",
        sa.Column("escrow_sequence", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        schema=SCHEMA,
    )
    op.add_column("orders", sa.Column("correlation_id", sa.Text, nullable=True), schema=SCHEMA)
    op.create_check_constraint(
        "ck_orders_escrow_status",
        "orders",
        f"escrow_status IS NULL OR escrow_status IN ({_in(ESCROW_STATUSES)})",
        schema=SCHEMA,
    )
    op.create_check_constraint(
        "ck_orders_escrow_sequence_not_negative", "orders", "escrow_sequence >= 0", schema=SCHEMA
    )
    op.create_index(
        "ix_orders_pending_created_at",
        "orders",
        ["created_at"],
        schema=SCHEMA,
        postgresql_where=sa.text("status = 'pending'"),
    )


def downgrade() -> None:
    op.drop_index("ix_orders_pending_created_at", table_name="orders", schema=SCHEMA)
    op.drop_constraint("ck_orders_escrow_sequence_not_negative", "orders", schema=SCHEMA)
    op.drop_constraint("ck_orders_escrow_status", "orders", schema=SCHEMA)
    op.drop_column("orders", "correlation_id", schema=SCHEMA)
    op.drop_column("orders", "escrow_sequence", schema=SCHEMA)
    op.drop_column("orders", "escrow_status", schema=SCHEMA)
    drop_recovery_tables(SCHEMA)

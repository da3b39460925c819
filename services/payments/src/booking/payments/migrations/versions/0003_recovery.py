"""Recovery: the outbox's retry time for unroutable events, the dead letters an admin may
replay or discard, and the audit trail of admin actions. For payments: underpaid payments,
escrow that follows the session (sequence, why frozen, refunds owed and recorded), and the
orders that ended without their payment.

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

SCHEMA = "payments"

PAYMENT_STATUSES = (
    "status IN ('initiating', 'initiation_failed', 'pending', 'underpaid', 'completed', 'failed',"
    " 'expired')"
)
PAYMENT_STATUSES_0002 = (
    "status IN ('initiating', 'initiation_failed', 'pending', 'completed', 'failed', 'expired')"
)
ESCROW_STATUSES = "status IN ('held', 'released', 'frozen', 'refund_due', 'refunded')"
ESCROW_STATUSES_0002 = "status IN ('held', 'released', 'cancelled', 'frozen')"


def _time(name: str, *, nullable: bool = True, default_now: bool = False) -> sa.Column[Any]:
    return sa.Column(
        name,
        sa.DateTime(timezone=True),
        nullable=nullable,
        server_default=sa.text("now()") if default_now else None,
    )


def upgrade() -> None:
    create_recovery_tables(SCHEMA)

    # Payments: money short of the amount leaves a payment open (underpaid) until it expires,
    # and the sweeper asks Konnect about those too.
    op.drop_constraint("ck_payments_status", "payments", schema=SCHEMA)
    op.create_check_constraint("ck_payments_status", "payments", PAYMENT_STATUSES, schema=SCHEMA)
    op.drop_index("ix_payments_pending_checked", table_name="payments", schema=SCHEMA)
    op.create_index(
        "ix_payments_open_checked",
        "payments",
        ["last_checked_at"],
        schema=SCHEMA,
        postgresql_where=sa.text("status IN ('pending', 'underpaid')"),
    )

    # Escrow holds follow the session.
    op.drop_constraint("ck_escrow_holds_status", "escrow_holds", schema=SCHEMA)
    op.drop_constraint("ck_escrow_holds_amount", "escrow_holds", schema=SCHEMA)
    op.add_column("escrow_holds", sa.Column("amount_paid", sa.BigInteger), schema=SCHEMA)
    op.add_column(
        "escrow_holds",
        sa.Column("sequence", sa.Integer, nullable=False, server_default=sa.text("1")),
        schema=SCHEMA,
    )
    for name in ("frozen_reason", "reason", "decided_by", "refund_reference"):
        op.add_column("escrow_holds", sa.Column(name, sa.Text), schema=SCHEMA)
    op.add_column("escrow_holds", sa.Column("refund_amount", sa.BigInteger), schema=SCHEMA)
    op.add_column("escrow_holds", _time("refunded_at"), schema=SCHEMA)
    op.add_column(
        "escrow_holds", _time("updated_at", nullable=False, default_now=True), schema=SCHEMA
    )
    # What the mentee paid is the payment's; a hold made before always had a completed one.
    op.execute(
        f"""
        UPDATE {SCHEMA}.escrow_holds h
        SET amount_paid = COALESCE(p.amount_paid, h.amount), updated_at = h.created_at
        FROM {SCHEMA}.payments p
        WHERE p.id = h.payment_id
        """
    )
    op.alter_column("escrow_holds", "amount_paid", nullable=False, schema=SCHEMA)
    # A cancelled session's hold was never to be released: frozen for an admin to settle. The
    # frozen ones (money that came late or short) wait for an admin as they did.
    op.execute(
        f"""
        UPDATE {SCHEMA}.escrow_holds
        SET status = 'frozen', frozen_reason = 'order_cancelled', release_due_at = NULL,
            reason = 'the session was cancelled (before the recovery rules)'
        WHERE status = 'cancelled'
        """
    )
    op.execute(
        f"""
        UPDATE {SCHEMA}.escrow_holds
        SET frozen_reason = 'payment_anomaly',
            reason = 'money that came late or short (before the recovery rules)'
        WHERE status = 'frozen' AND frozen_reason IS NULL
        """
    )
    # A held hold's release is due only once OrderConfirmed says its session was scheduled:
    # the due times 0002 set from the booking are kept (those sessions were booked and paid
    # under the old rules, which released them on that time).
    op.create_check_constraint(
        "ck_escrow_holds_status", "escrow_holds", ESCROW_STATUSES, schema=SCHEMA
    )
    op.create_check_constraint(
        "ck_escrow_holds_amount",
        "escrow_holds",
        "amount >= 0 AND amount_paid >= amount AND refund_amount >= 0",
        schema=SCHEMA,
    )
    op.create_check_constraint(
        "ck_escrow_holds_frozen_reason",
        "escrow_holds",
        "(status <> 'frozen' OR frozen_reason IS NOT NULL) AND (frozen_reason IS NULL OR "
        "frozen_reason IN ('scheduling_abandoned', 'order_cancelled', 'overpaid', "
        "'payment_anomaly'))",
        schema=SCHEMA,
    )
    op.create_check_constraint(
        "ck_escrow_holds_refund_reference",
        "escrow_holds",
        "status <> 'refunded' OR refund_reference IS NOT NULL",
        schema=SCHEMA,
    )
    op.create_check_constraint(
        "ck_escrow_holds_sequence", "escrow_holds", "sequence >= 1", schema=SCHEMA
    )

    op.create_table(
        "order_endings",
        sa.Column("order_id", sa.Uuid, primary_key=True),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("by", sa.Text, nullable=True),
        _time("ended_at", nullable=False),
        schema=SCHEMA,
    )


def downgrade() -> None:
    op.drop_table("order_endings", schema=SCHEMA)

    for name in (
        "ck_escrow_holds_sequence",
        "ck_escrow_holds_refund_reference",
        "ck_escrow_holds_frozen_reason",
        "ck_escrow_holds_amount",
        "ck_escrow_holds_status",
    ):
        op.drop_constraint(name, "escrow_holds", schema=SCHEMA)
    # 0002 knew no refunds: money owed or given back stays out of reach of the sweeper, frozen.
    op.execute(
        f"UPDATE {SCHEMA}.escrow_holds SET status = 'frozen', release_due_at = NULL "
        "WHERE status IN ('refund_due', 'refunded')"
    )
    for name in (
        "updated_at",
        "refunded_at",
        "refund_amount",
        "refund_reference",
        "decided_by",
        "reason",
        "frozen_reason",
        "sequence",
        "amount_paid",
    ):
        op.drop_column("escrow_holds", name, schema=SCHEMA)
    op.create_check_constraint(
        "ck_escrow_holds_status", "escrow_holds", ESCROW_STATUSES_0002, schema=SCHEMA
    )
    op.create_check_constraint(
        "ck_escrow_holds_amount", "escrow_holds", "amount >= 0", schema=SCHEMA
    )

    op.drop_index("ix_payments_open_checked", table_name="payments", schema=SCHEMA)
    op.create_index(
        "ix_payments_pending_checked",
        "payments",
        ["last_checked_at"],
        schema=SCHEMA,
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.drop_constraint("ck_payments_status", "payments", schema=SCHEMA)
    # An underpaid payment is a pending one with money recorded to 0002.
    op.execute(f"UPDATE {SCHEMA}.payments SET status = 'pending' WHERE status = 'underpaid'")
    op.create_check_constraint(
        "ck_payments_status", "payments", PAYMENT_STATUSES_0002, schema=SCHEMA
    )

    drop_recovery_tables(SCHEMA)

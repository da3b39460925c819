"""Payments and escrow holds.

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

SCHEMA = "payments"


def _time(name: str, *, nullable: bool = True, default_now: bool = False) -> sa.Column[Any]:
    return sa.Column(
        name,
        sa.DateTime(timezone=True),
        nullable=nullable,
        server_default=sa.text("now()") if default_now else None,
    )


def upgrade() -> None:
    op.create_table(
        "payments",
        sa.Column("id", sa.Uuid, primary_key=True),
        sa.Column("order_id", sa.Uuid, nullable=False, unique=True),
        sa.Column("session_id", sa.Uuid, nullable=False),
        sa.Column("mentor_id", sa.Uuid, nullable=False),
        _time("session_end_at", nullable=False),
        sa.Column("amount", sa.BigInteger, nullable=False),
        sa.Column("currency", sa.Text, nullable=False),
        sa.Column("title", sa.Text, nullable=False),
        sa.Column("mentee_first_name", sa.Text, nullable=False),
        sa.Column("mentee_last_name", sa.Text, nullable=False),
        sa.Column("mentee_email", sa.Text, nullable=False),
        sa.Column("mentee_phone", sa.Text, nullable=True),
        sa.Column("correlation_id", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("payment_ref", sa.Text, nullable=True, unique=True),
        sa.Column("pay_url", sa.Text, nullable=True),
        _time("expires_at"),
        sa.Column("amount_paid", sa.BigInteger, nullable=True),
        sa.Column("platform_fee", sa.BigInteger, nullable=True),
        sa.Column("escrow_amount", sa.BigInteger, nullable=True),
        _time("paid_at"),
        _time("claimed_until"),
        _time("last_checked_at"),
        _time("created_at", nullable=False, default_now=True),
        _time("updated_at", nullable=False, default_now=True),
        sa.CheckConstraint(
            "status IN ('initiating', 'initiation_failed', 'pending', 'completed', 'failed',"
            " 'expired')",
            name="ck_payments_status",
        ),
        sa.CheckConstraint(
            "amount >= 0 AND amount_paid >= 0 AND platform_fee >= 0 AND escrow_amount >= 0",
            name="ck_payments_money",
        ),
        schema=SCHEMA,
    )
    op.create_index(
        "ix_payments_pending_checked",
        "payments",
        ["last_checked_at"],
        schema=SCHEMA,
        postgresql_where=sa.text("status = 'pending'"),
    )
    op.create_index(
        "ix_payments_initiating",
        "payments",
        ["created_at"],
        schema=SCHEMA,
        postgresql_where=sa.text("status = 'initiating'"),
    )
    op.create_table(
        "escrow_holds",
        sa.Column("id", sa.Uuid, primary_key=True),
        sa.Column("order_id", sa.Uuid, nullable=False, unique=True),
        sa.Column(
            "payment_id", sa.Uuid, sa.ForeignKey(f"{SCHEMA}.payments.id"), nullable=False
        ),
        sa.Column("mentor_id", sa.Uuid, nullable=False),
        sa.Column("amount", sa.BigInteger, nullable=False),
        sa.Column("currency", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        _time("release_due_at"),
        _time("released_at"),
        _time("created_at", nullable=False, default_now=True),
        sa.CheckConstraint(
            "status IN ('held', 'released', 'cancelled', 'frozen')",
            name="ck_escrow_holds_status",
        ),
        sa.CheckConstraint("amount >= 0", name="ck_escrow_holds_amount"),
        schema=SCHEMA,
    )
    op.create_index(
        "ix_escrow_holds_due",
        "escrow_holds",
        ["release_due_at"],
        schema=SCHEMA,
        postgresql_where=sa.text("status = 'held'"),
    )


def downgrade() -> None:
    op.drop_table("escrow_holds", schema=SCHEMA)
    op.drop_table("payments", schema=SCHEMA)

"""The payments schema's tables: payments, escrow holds, order endings, and the runtime's tables.

Money is BIGINT minor units (millimes for TND), never a float. Times are timestamptz.
"""

from datetime import datetime
from uuid import UUID

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    ForeignKey,
    Index,
    Integer,
    Table,
    Text,
    Uuid,
    text,
)
from sqlmodel import Field, SQLModel

from booking.payments.domain import EscrowStatus, FreezeKind, PaymentState
from booking.runtime.tables import MessagingTables, one_of, time_column

SCHEMA = "payments"

PAYMENT_STATUSES = tuple(state.value for state in PaymentState)
ESCROW_STATUSES = tuple(status.value for status in EscrowStatus)
FREEZE_KINDS = tuple(kind.value for kind in FreezeKind)

messaging = MessagingTables(SQLModel.metadata, SCHEMA)


class PaymentRow(SQLModel, table=True):
    """One Konnect payment for one order, from `initiating` to `completed` or its end."""

    __tablename__ = "payments"
    __table_args__ = (
        # The sweeper's queries: open ones to ask Konnect about, initiations to repair.
        Index(
            "ix_payments_open_checked",
            "last_checked_at",
            postgresql_where=text("status IN ('pending', 'underpaid')"),
        ),
        Index(
            "ix_payments_initiating",
            "created_at",
            postgresql_where=text("status = 'initiating'"),
        ),
        CheckConstraint(one_of("status", PAYMENT_STATUSES), name="ck_payments_status"),
        CheckConstraint(
            "amount >= 0 AND amount_paid >= 0 AND platform_fee >= 0 AND escrow_amount >= 0",
            name="ck_payments_money",
        ),
        {"schema": SCHEMA},
    )

    id: UUID = Field(sa_column=Column(Uuid, primary_key=True))
    # Exactly one payment per order, however often BookingRequested arrives.
    order_id: UUID = Field(sa_column=Column(Uuid, nullable=False, unique=True))
    session_id: UUID = Field(sa_column=Column(Uuid, nullable=False))
    mentor_id: UUID = Field(sa_column=Column(Uuid, nullable=False))
    session_end_at: datetime = Field(sa_column=time_column(nullable=False))
    amount: int = Field(sa_column=Column(BigInteger, nullable=False))
    currency: str = Field(sa_column=Column(Text, nullable=False))
    title: str = Field(sa_column=Column(Text, nullable=False))
    mentee_first_name: str = Field(sa_column=Column(Text, nullable=False))
    mentee_last_name: str = Field(sa_column=Column(Text, nullable=False))
    mentee_email: str = Field(sa_column=Column(Text, nullable=False))
    mentee_phone: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    # The booking's correlation id: every later event about this payment carries it.
    correlation_id: str = Field(sa_column=Column(Text, nullable=False))
    # The booking's trace (W3C traceparent) while tracing is on: the webhook, which Konnect
    # sends with no trace, joins it.
    traceparent: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    status: str = Field(sa_column=Column(Text, nullable=False))
    payment_ref: str | None = Field(
        default=None, sa_column=Column(Text, nullable=True, unique=True)
    )
    pay_url: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    expires_at: datetime | None = Field(default=None, sa_column=time_column(nullable=True))
    amount_paid: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    platform_fee: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    escrow_amount: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    paid_at: datetime | None = Field(default=None, sa_column=time_column(nullable=True))
    # The lease of the replica initiating it (status initiating).
    claimed_until: datetime | None = Field(default=None, sa_column=time_column(nullable=True))
    # When Konnect was last asked about it (status pending or underpaid).
    last_checked_at: datetime | None = Field(default=None, sa_column=time_column(nullable=True))
    created_at: datetime = Field(sa_column=time_column(nullable=False, default_now=True))
    updated_at: datetime = Field(sa_column=time_column(nullable=False, default_now=True))


class EscrowHoldRow(SQLModel, table=True):
    """The mentor's share of an order's payment: held until the scheduled session ended plus a
    delay, frozen for an admin, or owed back to the mentee (docs/recovery.md section 4)."""

    __tablename__ = "escrow_holds"
    __table_args__ = (
        # The sweeper's query: held ones that are due (a hold never scheduled has no due time).
        Index(
            "ix_escrow_holds_due",
            "release_due_at",
            postgresql_where=text("status = 'held'"),
        ),
        CheckConstraint(one_of("status", ESCROW_STATUSES), name="ck_escrow_holds_status"),
        CheckConstraint(
            "amount >= 0 AND amount_paid >= amount AND refund_amount >= 0",
            name="ck_escrow_holds_amount",
        ),
        # A frozen hold says why; a hold settled from frozen keeps why it had been frozen.
        CheckConstraint(
            f"(status <> 'frozen' OR frozen_reason IS NOT NULL) AND "
            f"(frozen_reason IS NULL OR {one_of('frozen_reason', FREEZE_KINDS)})",
            name="ck_escrow_holds_frozen_reason",
        ),
        CheckConstraint(
            "status <> 'refunded' OR refund_reference IS NOT NULL",
            name="ck_escrow_holds_refund_reference",
        ),
        CheckConstraint("sequence >= 1", name="ck_escrow_holds_sequence"),
        {"schema": SCHEMA},
    )

    id: UUID = Field(sa_column=Column(Uuid, primary_key=True))
    order_id: UUID = Field(sa_column=Column(Uuid, nullable=False, unique=True))
    payment_id: UUID = Field(
        sa_column=Column(Uuid, ForeignKey(f"{SCHEMA}.payments.id"), nullable=False)
    )
    mentor_id: UUID = Field(sa_column=Column(Uuid, nullable=False))
    # The mentor's share; and all the mentee paid, the fee included (what a refund gives back).
    amount: int = Field(sa_column=Column(BigInteger, nullable=False))
    amount_paid: int = Field(sa_column=Column(BigInteger, nullable=False))
    currency: str = Field(sa_column=Column(Text, nullable=False))
    status: str = Field(sa_column=Column(Text, nullable=False))
    # Counts the transitions from 1; every Escrow* event carries it.
    sequence: int = Field(sa_column=Column(Integer, nullable=False, server_default=text("1")))
    frozen_reason: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    # Why, and by whom (an admin's id; NULL: the system), the last transition was made.
    reason: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    decided_by: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    refund_amount: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    refund_reference: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    # Set by OrderConfirmed (the session's end plus the delay); NULL: never released on its own.
    release_due_at: datetime | None = Field(default=None, sa_column=time_column(nullable=True))
    released_at: datetime | None = Field(default=None, sa_column=time_column(nullable=True))
    refunded_at: datetime | None = Field(default=None, sa_column=time_column(nullable=True))
    created_at: datetime = Field(sa_column=time_column(nullable=False, default_now=True))
    updated_at: datetime = Field(sa_column=time_column(nullable=False, default_now=True))


class OrderEndingRow(SQLModel, table=True):
    """An order that ended without its payment (an admin's cancel, or orders failing an order
    whose payment never opened): no payment is opened for it afterwards, and money that still
    comes for it is owed back."""

    __tablename__ = "order_endings"
    __table_args__ = ({"schema": SCHEMA},)

    order_id: UUID = Field(sa_column=Column(Uuid, primary_key=True))
    reason: str = Field(sa_column=Column(Text, nullable=False))
    # The admin who cancelled it; NULL when orders ended it itself.
    by: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    ended_at: datetime = Field(sa_column=time_column(nullable=False))


# SQLModel sets `__table__` on table classes; its type stubs do not say so.
payments: Table = PaymentRow.__table__  # type: ignore[attr-defined]
escrow_holds: Table = EscrowHoldRow.__table__  # type: ignore[attr-defined]
order_endings: Table = OrderEndingRow.__table__  # type: ignore[attr-defined]

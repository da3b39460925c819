"""The payments schema's tables: payments, escrow holds, and the messaging tables.

Money is BIGINT minor units (millimes for TND), never a float. Times are timestamptz.
"""

from datetime import datetime
from uuid import UUID

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Text,
    Uuid,
    text,
)
from sqlmodel import Field, SQLModel

from booking.payments.domain import EscrowStatus, PaymentState
from booking.runtime.tables import MessagingTables

SCHEMA = "payments"

PAYMENT_STATUSES = tuple(state.value for state in PaymentState)
ESCROW_STATUSES = tuple(status.value for status in EscrowStatus)

messaging = MessagingTables(SQLModel.metadata, SCHEMA)


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def _time(*, nullable: bool, default_now: bool = False) -> Column:
    return Column(
        DateTime(timezone=True),
        nullable=nullable,
        server_default=text("now()") if default_now else None,
    )


class PaymentRow(SQLModel, table=True):
    """One Konnect payment for one order, from `initiating` to `completed` or its end."""

    __tablename__ = "payments"
    __table_args__ = (
        # The sweeper's queries: pending ones to ask Konnect about, initiations to repair.
        Index(
            "ix_payments_pending_checked",
            "last_checked_at",
            postgresql_where=text("status = 'pending'"),
        ),
        Index(
            "ix_payments_initiating",
            "created_at",
            postgresql_where=text("status = 'initiating'"),
        ),
        CheckConstraint(_one_of("status", PAYMENT_STATUSES), name="ck_payments_status"),
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
    session_end_at: datetime = Field(sa_column=_time(nullable=False))
    amount: int = Field(sa_column=Column(BigInteger, nullable=False))
    currency: str = Field(sa_column=Column(Text, nullable=False))
    title: str = Field(sa_column=Column(Text, nullable=False))
    mentee_first_name: str = Field(sa_column=Column(Text, nullable=False))
    mentee_last_name: str = Field(sa_column=Column(Text, nullable=False))
    mentee_email: str = Field(sa_column=Column(Text, nullable=False))
    mentee_phone: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    # The booking's correlation id: every later event about this payment carries it.
    correlation_id: str = Field(sa_column=Column(Text, nullable=False))
    status: str = Field(sa_column=Column(Text, nullable=False))
    payment_ref: str | None = Field(
        default=None, sa_column=Column(Text, nullable=True, unique=True)
    )
    pay_url: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    expires_at: datetime | None = Field(default=None, sa_column=_time(nullable=True))
    amount_paid: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    platform_fee: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    escrow_amount: int | None = Field(default=None, sa_column=Column(BigInteger, nullable=True))
    paid_at: datetime | None = Field(default=None, sa_column=_time(nullable=True))
    # The lease of the replica initiating it (status initiating).
    claimed_until: datetime | None = Field(default=None, sa_column=_time(nullable=True))
    # When Konnect was last asked about it (status pending).
    last_checked_at: datetime | None = Field(default=None, sa_column=_time(nullable=True))
    created_at: datetime = Field(sa_column=_time(nullable=False, default_now=True))
    updated_at: datetime = Field(sa_column=_time(nullable=False, default_now=True))


class EscrowHoldRow(SQLModel, table=True):
    """The mentor's share of a completed payment, held until the session ended plus a delay."""

    __tablename__ = "escrow_holds"
    __table_args__ = (
        # The sweeper's query: held ones that are due.
        Index(
            "ix_escrow_holds_due",
            "release_due_at",
            postgresql_where=text("status = 'held'"),
        ),
        CheckConstraint(_one_of("status", ESCROW_STATUSES), name="ck_escrow_holds_status"),
        CheckConstraint("amount >= 0", name="ck_escrow_holds_amount"),
        {"schema": SCHEMA},
    )

    id: UUID = Field(sa_column=Column(Uuid, primary_key=True))
    order_id: UUID = Field(sa_column=Column(Uuid, nullable=False, unique=True))
    payment_id: UUID = Field(
        sa_column=Column(Uuid, ForeignKey(f"{SCHEMA}.payments.id"), nullable=False)
    )
    mentor_id: UUID = Field(sa_column=Column(Uuid, nullable=False))
    amount: int = Field(sa_column=Column(BigInteger, nullable=False))
    currency: str = Field(sa_column=Column(Text, nullable=False))
    status: str = Field(sa_column=Column(Text, nullable=False))
    release_due_at: datetime | None = Field(default=None, sa_column=_time(nullable=True))
    released_at: datetime | None = Field(default=None, sa_column=_time(nullable=True))
    created_at: datetime = Field(sa_column=_time(nullable=False, default_now=True))


payments = PaymentRow.__table__
escrow_holds = EscrowHoldRow.__table__

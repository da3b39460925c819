"""The orders schema's tables: mentors, offerings, orders, their booked sessions, idempotency keys.

A mentor may be linked to its identity-provider subject, one mentor per subject.

An order also keeps what it last heard of its escrow (status and sequence, from payments' events)
and the correlation id of its booking, which the events orders sends about it later carry.

Money is BIGINT in minor units (millimes for TND). Statuses are the domain's values as text. The
migrations (`migrations/versions`) are what creates these; the models here say the same thing
for the code that reads and writes them, which is `repository.py` alone.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Text,
    UniqueConstraint,
    Uuid,
    literal_column,
)
from sqlalchemy import func as sql
from sqlalchemy.dialects.postgresql import JSONB, ExcludeConstraint
from sqlmodel import Field, SQLModel

from booking.orders.domain import LIVE_SESSION_STATUSES
from booking.runtime.tables import MessagingTables

SCHEMA = "orders"

messaging = MessagingTables(SQLModel.metadata, SCHEMA)

NO_OVERLAP = "booked_sessions_no_overlap"
"""The exclusion constraint that keeps one mentor's live sessions apart (409 when violated)."""


def _timestamp(**kwargs: Any) -> Any:
    return Field(sa_type=DateTime(timezone=True), **kwargs)


def _money(**kwargs: Any) -> Any:
    return Field(sa_type=BigInteger, **kwargs)


SUBJECT_TAKEN = "uq_mentors_identity_subject"
"""The unique constraint that gives an identity-provider subject to one mentor (409 when
violated)."""


class MentorRow(SQLModel, table=True):
    __tablename__ = "mentors"
    __table_args__ = (UniqueConstraint("identity_subject", name=SUBJECT_TAKEN), {"schema": SCHEMA})

    id: UUID = Field(primary_key=True)
    name: str = Field(sa_type=Text)
    email: str = Field(sa_type=Text)
    timezone: str = Field(sa_type=Text)
    created_at: datetime = _timestamp()
    # The mentor's `sub` at the identity provider: a token with it acts as this mentor.
    identity_subject: str | None = Field(default=None, sa_type=Text)
    # How many times an admin linked a subject (MentorIdentityLinked's sequence).
    identity_sequence: int = Field(default=0)


class OfferingRow(SQLModel, table=True):
    __tablename__ = "offerings"
    __table_args__ = (Index("ix_offerings_mentor_id", "mentor_id"), {"schema": SCHEMA})

    id: UUID = Field(primary_key=True)
    mentor_id: UUID = Field(foreign_key=f"{SCHEMA}.mentors.id")
    title: str = Field(sa_type=Text)
    duration_minutes: int
    price_amount: int = _money()
    price_currency: str = Field(sa_type=Text)
    created_at: datetime = _timestamp()


class OrderRow(SQLModel, table=True):
    __tablename__ = "orders"
    __table_args__ = (
        Index("ix_orders_mentee_id", "mentee_id"),
        # The sweeper's search for payments that never opened: pending orders, oldest first.
        Index(
            "ix_orders_pending_created_at",
            "created_at",
            postgresql_where=literal_column("status = 'pending'"),
        ),
        {"schema": SCHEMA},
    )

    id: UUID = Field(primary_key=True)
    mentee_id: str = Field(sa_type=Text)  # the booking token's sub
    mentor_id: UUID = Field(foreign_key=f"{SCHEMA}.mentors.id")
    offering_id: UUID = Field(foreign_key=f"{SCHEMA}.offerings.id")
    title: str = Field(sa_type=Text)  # the offering's, as it was when booked
    amount: int = _money()
    currency: str = Field(sa_type=Text)
    status: str = Field(sa_type=Text)
    amount_paid: int = _money(default=0)
    payment_ref: str | None = Field(default=None, sa_type=Text)
    pay_url: str | None = Field(default=None, sa_type=Text)
    # null until payments answers; then a domain.PaymentStatus
    payment_status: str | None = Field(default=None, sa_type=Text)
    platform_fee: int | None = _money(default=None)
    escrow_amount: int | None = _money(default=None)
    # The escrow's status of the highest sequence heard of (domain.Escrow); 0: no escrow event.
    escrow_status: str | None = Field(default=None, sa_type=Text)
    escrow_sequence: int = Field(default=0, sa_type=BigInteger)
    # The booking's correlation id: later events about the order (cancelled, failed) carry it.
    correlation_id: str | None = Field(default=None, sa_type=Text)
    # Grows by one with every change of what the order view shows (its session and escrow
    # included), in the UPDATE that makes it: OrderChanged's and the order stream's id.
    version: int = Field(default=1, sa_type=BigInteger)
    mentee_first_name: str = Field(sa_type=Text)
    mentee_last_name: str = Field(sa_type=Text)
    mentee_email: str = Field(sa_type=Text)
    mentee_phone: str | None = Field(default=None, sa_type=Text)
    created_at: datetime = _timestamp()
    updated_at: datetime = _timestamp()


_col = literal_column
_LIVE = ", ".join(f"'{status.value}'" for status in sorted(LIVE_SESSION_STATUSES))


class BookedSessionRow(SQLModel, table=True):
    __tablename__ = "booked_sessions"
    __table_args__ = (
        # No two live sessions of one mentor overlap; '[)' so back-to-back sessions do not.
        ExcludeConstraint(
            ("mentor_id", "="),
            (sql.tstzrange(_col("start_at"), _col("end_at"), literal_column("'[)'")), "&&"),
            using="gist",
            where=literal_column(f"status IN ({_LIVE})"),
            name=NO_OVERLAP,
        ),
        {"schema": SCHEMA},
    )

    id: UUID = Field(primary_key=True)
    order_id: UUID = Field(
        sa_column=Column(Uuid, ForeignKey(f"{SCHEMA}.orders.id"), nullable=False, unique=True)
    )
    mentor_id: UUID = Field(foreign_key=f"{SCHEMA}.mentors.id")
    start_at: datetime = _timestamp()
    end_at: datetime = _timestamp()
    status: str = Field(sa_type=Text)
    meet_link: str | None = Field(default=None, sa_type=Text)
    calendar_event_id: str | None = Field(default=None, sa_type=Text)


class IdempotencyKeyRow(SQLModel, table=True):
    """The first answer to a POST /api/bookings sent with an Idempotency-Key, per mentee.

    Inserted in the booking's own transaction, so two requests with one key serialise on the
    primary key and a failed booking leaves no key behind.
    """

    __tablename__ = "idempotency_keys"
    __table_args__ = {"schema": SCHEMA}

    mentee_id: str = Field(sa_type=Text, primary_key=True)
    key: str = Field(sa_type=Text, primary_key=True)
    request_fingerprint: str = Field(sa_type=Text)
    response_status: int | None = None
    response_body: dict | None = Field(default=None, sa_type=JSONB)
    created_at: datetime = _timestamp()

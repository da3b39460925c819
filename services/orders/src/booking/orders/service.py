"""The orders service's units of work: booking a session, reading an order, an admin's cancel,
registering a mentor and an admin's link of a mentor to its identity-provider subject.

Each use case is one transaction: its state changes, its events (through the outbox) and, for
an admin's action, its audit row commit together or not at all. An order and its session are
locked together (`lock_order`, the order first, as everywhere), so a use case and a handler
working on one order take turns. No outside system is called here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from booking.contracts import (
    AdminAction,
    BookingRequested,
    MenteeContact,
    MentorIdentityLinked,
    MentorRegistered,
    OrderCancelled,
    http,
)
from booking.contracts import Offering as OfferingSnapshot
from booking.orders.domain import (
    BookedSession,
    Money,
    Order,
    cancel_booking,
    plan_session,
)
from booking.orders.tables import (
    NO_OVERLAP,
    SUBJECT_TAKEN,
    BookedSessionRow,
    IdempotencyKeyRow,
    MentorRow,
    OfferingRow,
    OrderRow,
)
from booking.runtime.audit import record_admin_action
from booking.runtime.context import correlated, current_correlation_id
from booking.runtime.db import Database
from booking.runtime.domain import EventIds
from booking.runtime.outbox import Outbox
from booking.runtime.tables import MessagingTables

log = logging.getLogger(__name__)

# Namespace of the ids of the events orders sends (uuid5 of the fact they report), so that
# recording one fact twice stores it once.
_EVENTS = uuid.UUID("9c4f3a56-2be1-4d0b-8f43-6a1e0c7d5b21")


# The message id of the event reporting a fact (e.g. "OrderCancelled:<order id>").
event_id = EventIds(_EVENTS)


class NoSuchOrder(Exception):
    """There is no order with this id."""


class NoSuchOffering(Exception):
    """There is no offering with this id."""


class SlotTaken(Exception):
    """The mentor already has a live session overlapping the requested one."""


class IdempotencyKeyReused(Exception):
    """An Idempotency-Key already used with another request body."""


class IdempotencyKeyUnanswered(Exception):
    """An Idempotency-Key whose first request stored no answer (never written by this code)."""


class NoSuchMentor(Exception):
    """There is no mentor with this id."""


class SubjectTaken(Exception):
    """The identity-provider subject acts as another mentor already (or is another's id)."""


@dataclass(frozen=True, slots=True)
class FirstAnswer:
    """What the first request sent with an Idempotency-Key was answered, to answer it again."""

    status: int
    body: dict[str, Any]


async def lock_order(
    session: AsyncSession, order_id: uuid.UUID
) -> tuple[OrderRow, BookedSessionRow] | None:
    """The order and its session (created together, never deleted), locked in one round trip;
    None when there is no such order. Postgres takes the locks in the order of `OF`: the order
    first, as everywhere else."""
    found = (
        await session.execute(
            select(OrderRow, BookedSessionRow)
            .join(BookedSessionRow, BookedSessionRow.order_id == OrderRow.id)
            .where(OrderRow.id == order_id)
            .with_for_update(of=[OrderRow, BookedSessionRow])
        )
    ).one_or_none()
    if found is None:
        return None
    order, booked = found
    return order, booked


class OrderService:
    def __init__(
        self, db: Database, outbox: Outbox, tables: MessagingTables, *, horizon: timedelta
    ) -> None:
        self.db = db
        self.outbox = outbox
        self.tables = tables
        self.horizon = horizon  # how far ahead a session may start (BOOKING_HORIZON_DAYS)

    # --- booking ------------------------------------------------------------------------------

    async def book(
        self,
        request: http.BookingCreate,
        *,
        mentee_id: str,
        idempotency_key: str | None,
        now: datetime,
    ) -> http.BookingAccepted | FirstAnswer:
        """The Order, its BookedSession and BookingRequested, in one transaction.

        The slot is the exclusion constraint's to guard: the insert either holds it or fails
        (`SlotTaken`), with no check before it to race. With an Idempotency-Key, the key is
        claimed first in the same transaction, so a second request with that key waits for the
        first to end and then gets what it got (`FirstAnswer`); a booking that fails leaves no
        key behind. Raises `NoSuchOffering`, `InvalidBooking` (the times), `SlotTaken`,
        `IdempotencyKeyReused` or `IdempotencyKeyUnanswered`.
        """
        fingerprint = _fingerprint(request)
        try:
            async with self.db.transaction() as session:
                if idempotency_key is not None:
                    first = await _claim_key(session, mentee_id, idempotency_key, fingerprint, now)
                    if first is not None:
                        return first
                accepted = await self._book(session, request, mentee_id, now)
                if idempotency_key is not None:
                    await session.execute(
                        update(IdempotencyKeyRow)
                        .where(
                            IdempotencyKeyRow.mentee_id == mentee_id,
                            IdempotencyKeyRow.key == idempotency_key,
                        )
                        .values(response_status=202, response_body=accepted.model_dump(mode="json"))
                    )
        except IntegrityError as exc:
            if _violated_constraint(exc) == NO_OVERLAP:
                raise SlotTaken(request.start_at.astimezone(UTC).isoformat()) from None
            raise
        return accepted

    async def _book(
        self,
        session: AsyncSession,
        request: http.BookingCreate,
        mentee_id: str,
        now: datetime,
    ) -> http.BookingAccepted:
        offering = await session.get(OfferingRow, request.offering_id)
        if offering is None:
            raise NoSuchOffering(request.offering_id)
        end_at = plan_session(
            offering.duration_minutes, request.start_at, now, horizon=self.horizon
        )
        order = Order(
            id=uuid.uuid4(),
            mentee_id=mentee_id,
            mentor_id=offering.mentor_id,
            offering_id=offering.id,
            amount=Money(offering.price_amount, offering.price_currency),
            created_at=now,
            updated_at=now,
        )
        booked = BookedSession(
            id=uuid.uuid4(),
            order_id=order.id,
            mentor_id=order.mentor_id,
            start_at=request.start_at.astimezone(UTC),
            end_at=end_at.astimezone(UTC),
        )
        mentee = request.mentee
        session.add(
            OrderRow(
                id=order.id,
                mentee_id=mentee_id,
                mentor_id=order.mentor_id,
                offering_id=order.offering_id,
                title=offering.title,
                amount=order.amount.amount,
                currency=order.amount.currency,
                status=order.status.value,
                amount_paid=order.amount_paid,
                mentee_first_name=mentee.first_name,
                mentee_last_name=mentee.last_name,
                mentee_email=mentee.email,
                mentee_phone=mentee.phone,
                # BookingRequested carries it; so will every later event about this order.
                correlation_id=current_correlation_id(),
                created_at=now,
                updated_at=now,
            )
        )
        await session.flush()  # the order before its session (the session's foreign key)
        session.add(
            BookedSessionRow(
                id=booked.id,
                order_id=booked.order_id,
                mentor_id=booked.mentor_id,
                start_at=booked.start_at,
                end_at=booked.end_at,
                status=booked.status.value,
            )
        )
        await session.flush()  # here the exclusion constraint says whether the slot is free
        await self.outbox.record(
            session,
            BookingRequested(
                order_id=order.id,
                session_id=booked.id,
                mentor_id=order.mentor_id,
                offering=OfferingSnapshot(
                    offering_id=offering.id,
                    title=offering.title,
                    duration_minutes=offering.duration_minutes,
                ),
                amount=order.amount.amount,
                currency=order.amount.currency,
                mentee=MenteeContact(
                    first_name=mentee.first_name,
                    last_name=mentee.last_name,
                    email=mentee.email,
                    phone=mentee.phone,
                ),
                start_at=booked.start_at,
                end_at=booked.end_at,
            ),
        )
        return http.BookingAccepted(
            order_id=order.id, session_id=booked.id, status=order.status.value
        )

    # --- orders -------------------------------------------------------------------------------

    async def find(self, order_id: uuid.UUID) -> tuple[OrderRow, BookedSessionRow] | None:
        """The order and its session, or None."""
        # One statement, no transaction: the order and its session (created together, never
        # deleted) from the same snapshot, in one round trip. Clients poll this.
        async with self.db.single_statement() as session:
            found = (
                await session.execute(
                    select(OrderRow, BookedSessionRow)
                    .join(BookedSessionRow, BookedSessionRow.order_id == OrderRow.id)
                    .where(OrderRow.id == order_id)
                )
            ).one_or_none()
        if found is None:
            return None
        order, booked = found
        return order, booked

    async def cancel(
        self, order_id: uuid.UUID, *, by: str, reason: str, now: datetime
    ) -> tuple[OrderRow, BookedSessionRow]:
        """An admin cancels an order: cancelled, its slot freed, OrderCancelled, audited.

        All in one transaction, under the order's lock, so a handler applying a payment or a
        calendar booking to the same order waits for it (and then finds it cancelled), or goes
        first. Payments freezes a paid order's escrow and calendar deletes the session's event
        on OrderCancelled. A repeat finds it cancelled and changes nothing: no event, no audit
        row. Raises `NoSuchOrder`, or `IllegalTransition` for an order whose payment failed.
        """
        async with self.db.transaction() as session:
            locked = await lock_order(session, order_id)
            if locked is None:
                raise NoSuchOrder(order_id)
            row, booked_row = locked
            order, booked = row.to_domain(), booked_row.to_domain()
            was = f"order {order.status.value}, session {booked.status.value}"
            if not cancel_booking(order, booked, now):
                return row, booked_row
            row.record(order)
            booked_row.record(booked)
            # The booking's trail: BookingRequested and every event since carry its id.
            with correlated(row.correlation_id):
                await self.outbox.record(
                    session,
                    OrderCancelled(
                        order_id=order.id,
                        session_id=booked.id,
                        mentor_id=order.mentor_id,
                        reason=reason,
                        by=by,
                    ),
                    message_id=event_id(f"OrderCancelled:{order.id}"),
                )
                await record_admin_action(
                    session,
                    self.tables,
                    self.outbox,
                    action=AdminAction.CANCEL_ORDER,
                    by=by,
                    reason=reason,
                    at=now,
                    order_id=order.id,
                    session_id=booked.id,
                    detail=f"was {was}",
                )
        log.warning("order %s cancelled by %s (was %s): %s", order_id, by, was, reason)
        return row, booked_row


class MentorService:
    """Registering mentors and linking them to their identity-provider subject.

    A subject acts as one mentor: the unique constraint decides (`SubjectTaken`), not a check
    before it, and a subject that is another mentor's id is refused too (that mentor's own
    tokens carry their id as `sub`).
    """

    def __init__(self, db: Database, outbox: Outbox, tables: MessagingTables) -> None:
        self.db = db
        self.outbox = outbox
        self.tables = tables

    async def register(self, request: http.MentorCreate, *, now: datetime) -> MentorRow:
        """The mentor and its MentorRegistered, in one transaction. Raises `SubjectTaken`."""
        mentor = MentorRow(
            id=uuid.uuid4(),
            name=request.name,
            email=request.email,
            timezone=request.timezone,
            identity_subject=request.identity_subject,
            created_at=now,
        )
        subject = mentor.identity_subject
        async with self._subject_guarded(subject), self.db.transaction() as session:
            if subject is not None:
                await _refuse_another_mentors_id(session, subject, mentor.id)
            session.add(mentor)
            await session.flush()  # here the unique constraint says whether the subject is free
            await self.outbox.record(
                session,
                MentorRegistered(
                    mentor_id=mentor.id,
                    name=mentor.name,
                    email=mentor.email,
                    timezone=mentor.timezone,
                    identity_subject=subject,
                ),
            )
        return mentor

    async def link_identity(
        self, mentor_id: uuid.UUID, subject: str, *, by: str, reason: str, now: datetime
    ) -> MentorRow:
        """An admin links the mentor to `subject` (replacing any other): MentorIdentityLinked
        and the audit row, in one transaction under the mentor's lock. A repeat (the subject is
        the mentor's already) changes nothing: no event, no audit row. Raises `NoSuchMentor` or
        `SubjectTaken`."""
        async with self._subject_guarded(subject), self.db.transaction() as session:
            mentor = await session.get(MentorRow, mentor_id, with_for_update=True)
            if mentor is None:
                raise NoSuchMentor(mentor_id)
            if mentor.identity_subject == subject:
                return mentor
            await _refuse_another_mentors_id(session, subject, mentor_id)
            previous = mentor.identity_subject
            mentor.identity_subject = subject
            mentor.identity_sequence += 1
            sequence = mentor.identity_sequence
            await session.flush()  # here the unique constraint says whether the subject is free
            await self.outbox.record(
                session,
                MentorIdentityLinked(
                    mentor_id=mentor_id,
                    identity_subject=subject,
                    previous_subject=previous,
                    by=by,
                    reason=reason,
                    linked_at=now,
                    sequence=sequence,
                ),
                message_id=event_id(f"MentorIdentityLinked:{mentor_id}:{sequence}"),
            )
            await record_admin_action(
                session,
                self.tables,
                self.outbox,
                action=AdminAction.LINK_MENTOR_IDENTITY,
                by=by,
                reason=reason,
                at=now,
                detail=f"mentor {mentor_id}: identity subject {subject!r}, was {previous!r}",
            )
        log.warning(
            "mentor %s linked to identity subject %r by %s (was %r): %s",
            mentor_id,
            subject,
            by,
            previous,
            reason,
        )
        return mentor

    @staticmethod
    @asynccontextmanager
    async def _subject_guarded(subject: str | None) -> AsyncIterator[None]:
        """`SubjectTaken` for the unique constraint's refusal, raised once the transaction has
        rolled back."""
        try:
            yield
        except IntegrityError as exc:
            if subject is not None and _violated_constraint(exc) == SUBJECT_TAKEN:
                raise SubjectTaken(subject) from None
            raise


async def _refuse_another_mentors_id(
    session: AsyncSession, subject: str, mentor_id: uuid.UUID
) -> None:
    """`SubjectTaken` if `subject` is the id of another mentor: that mentor's tokens (whose `sub`
    is their id) would act as this one too."""
    try:
        named = uuid.UUID(subject)
    except ValueError:
        return
    if named != mentor_id and await session.get(MentorRow, named) is not None:
        raise SubjectTaken(subject)


async def _claim_key(
    session: AsyncSession, mentee_id: str, key: str, fingerprint: str, now: datetime
) -> FirstAnswer | None:
    """Claim `key` for this request (None), or the first answer given under it.

    The insert waits while another transaction holds the key; once that one commits the key is
    taken and its answer readable, once it rolls back the key is ours.
    """
    claimed = await session.execute(
        insert(IdempotencyKeyRow)
        .values(mentee_id=mentee_id, key=key, request_fingerprint=fingerprint, created_at=now)
        .on_conflict_do_nothing()
        .returning(IdempotencyKeyRow.key)
    )
    if claimed.first() is not None:
        return None
    first = await session.get(IdempotencyKeyRow, (mentee_id, key))
    assert first is not None  # committed by the request that claimed it
    if first.request_fingerprint != fingerprint:
        raise IdempotencyKeyReused(key)
    if first.response_status is None or first.response_body is None:
        # Not written by this code (a claim always stores its answer in the same transaction).
        raise IdempotencyKeyUnanswered(key)
    return FirstAnswer(first.response_status, first.response_body)


def _fingerprint(request: http.BookingCreate) -> str:
    """What makes two requests "the same": the parsed body, with the start as a UTC instant."""
    canonical = request.model_dump(mode="json")
    canonical["start_at"] = request.start_at.astimezone(UTC).isoformat()
    encoded = json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()


def _violated_constraint(exc: IntegrityError) -> str | None:
    """The name of the constraint asyncpg reported, through SQLAlchemy's wrapper."""
    for error in (exc.orig, getattr(exc.orig, "__cause__", None)):
        name = getattr(error, "constraint_name", None)
        if name:
            return name
    return None

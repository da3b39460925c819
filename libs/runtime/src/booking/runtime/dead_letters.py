"""Dead letters: kept in the service's own schema, where an admin inspects, replays or discards
them.

Whatever reaches a consumer's dead-letter queue is moved into the `dead_letters` table by the
service's `DeadLetterKeeper`, which also reports it (SystemErrorReported), in one transaction:
the consumer's own dead letters (retries spent, unreadable) and the broker's (a message
delivered `x-delivery-limit` times without an ack, because the consumer kept dying on it).

A replay sends the message, byte for byte, back to its consumer's queue through the outbox (so
it is sent once the replay commits, and only then): it goes through the inbox like any
delivery, so a message that was in fact applied before changes nothing. The inbox keeps the id
of every kept dead letter, whatever its retention (housekeeping), until it is replayed or
discarded. Each id is `<service>:<n>`, which the gateway routes by.
"""

from __future__ import annotations

import base64
import json
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from aio_pika.abc import AbstractIncomingMessage
from fastapi import APIRouter, Body, Depends, HTTPException, Path, Query
from faststream.rabbit import RabbitQueue
from sqlalchemy import Row, and_, or_, select, update
from sqlalchemy.dialects.postgresql import insert

from booking.contracts import (
    AdminAction,
    Envelope,
    MalformedMessage,
    SystemErrorReported,
    http,
    parse_envelope,
)
from booking.runtime import metrics
from booking.runtime.audit import record_admin_action
from booking.runtime.auth import Identity, Role, require_roles
from booking.runtime.broker import Broker
from booking.runtime.consumer import Consumer, QueueWorker
from booking.runtime.context import correlated
from booking.runtime.db import Database
from booking.runtime.outbox import Outbox
from booking.runtime.tables import MessagingTables

log = logging.getLogger(__name__)

# Namespaces of message ids: the report of a dead letter, and the replay of one.
_REPORTED = uuid.UUID("4f7c8f0e-6d0b-4a3e-9a51-8b1f5d0d2c11")
_REPLAYED = uuid.UUID("c2d9e8a4-5b1f-4e6c-8a73-9d0e1f2b3c45")

KEPT, REPLAYED, DISCARDED = "kept", "replayed", "discarded"


class DeadLetterKeeper(QueueWorker):
    """Moves what reaches a consumer's dead-letter queue into the dead-letters table."""

    def __init__(
        self,
        *,
        consumer: Consumer,
        db: Database,
        tables: MessagingTables,
        outbox: Outbox,
        broker: Broker,
    ) -> None:
        super().__init__(
            name=consumer.queues.dead_letter,
            db=db,
            broker=broker,
            prefetch=32,
            concurrency=1,
            max_batch=32,
        )
        self.consumer = consumer.name
        self.queues = consumer.queues
        self.tables = tables
        self.outbox = outbox
        self._subscribe()

    def queue_definition(self) -> RabbitQueue:
        return self.queues.dead_letter_queue()

    async def handle(self, messages: list[AbstractIncomingMessage]) -> None:
        for position, message in enumerate(messages):
            try:
                await self.keep(message)
            except Exception as exc:
                if await self.dependency_failed(exc, "keeping a dead letter"):
                    await self._hand_back(messages[position:])
                    return
                # Not the database: a bug here. The message stays in the dead-letter queue,
                # whose depth health reports, and is tried again.
                log.exception("could not keep dead letter %s of %s", message.message_id, self.name)
                await self._hand_back([message])
                continue
            await message.ack()

    async def keep(self, message: AbstractIncomingMessage) -> int:
        """Store one dead letter and report it, in one transaction; its id in the table."""
        headers = message.headers or {}
        envelope = _envelope_of(message.body)
        ours = "x-dead-letter-reason" in headers
        reason = str(headers["x-dead-letter-reason"]) if ours else "delivery_limit"
        deliveries = _deliveries(headers)
        error = (
            str(headers.get("x-error") or "")
            if ours
            else (
                f"delivered {deliveries or 'too many'} times without being acknowledged (the "
                "queue's delivery limit): the consumer stopped or crashed while handling it"
            )
        )
        recorded: Any = headers.get("x-attempt")
        attempts = int(recorded or deliveries or 1)
        message_id = str(envelope.message_id) if envelope else message.message_id
        event_type = envelope.type if envelope else message.type
        routing_key = (
            envelope.routing_key if envelope else str(headers.get("x-original-routing-key") or "")
        ) or None
        now = datetime.now(UTC)
        dead = self.tables.dead_letters
        values = {
            "consumer": self.consumer,
            "message_id": message_id,
            "event_type": event_type,
            "routing_key": routing_key,
            "correlation_id": envelope.correlation_id if envelope else message.correlation_id,
            "body": message.body,
            "headers": _json_safe(dict(headers)),
            "reason": reason,
            "error": error or "no error was recorded",
            "attempts": attempts,
            "status": KEPT,
            "dead_lettered_at": now,
        }
        inserting = insert(dead).values(**values)
        # Dead-lettered again after a replay: back to its row, kept again.
        statement = inserting.on_conflict_do_update(
            constraint="uq_dead_letters_message",
            set_={
                **{name: inserting.excluded[name] for name in values if name != "consumer"},
                "times": dead.c.times + 1,
                "replayed_at": None,
                "discarded_at": None,
                "decided_by": None,
                "decision_reason": None,
            },
        ).returning(dead.c.id, dead.c.times)
        async with self.db.transaction() as session:
            stored = (await session.execute(statement)).one()
            dead_letter_id = f"{self.outbox.producer}:{stored.id}"
            if event_type == SystemErrorReported.__name__:
                # Reporting a report that could not be handled would feed the same failing
                # handler again, in a loop; it is kept (and counted by health), not reported.
                log.critical(
                    "SystemErrorReported %s kept as dead letter %s; not reported again: %s",
                    message_id,
                    dead_letter_id,
                    values["error"][:500],
                )
            else:
                with correlated(values["correlation_id"], message_id):
                    await self.outbox.record(
                        session,
                        SystemErrorReported(
                            service=self.outbox.producer,
                            consumer=self.consumer,
                            message_type=event_type,
                            error=values["error"][:8000],
                            dead_lettered_message_id=message_id,
                            attempts=max(1, attempts),
                            dead_letter_id=dead_letter_id,
                        ),
                        message_id=uuid.uuid5(
                            _REPORTED, f"{self.consumer}:{message_id or stored.id}:{stored.times}"
                        ),
                    )
        metrics.DEAD_LETTERS_KEPT.labels(self.consumer, event_type or "unreadable").inc()
        log.error(
            "kept dead letter %s (%s %s, %s): %s",
            dead_letter_id,
            event_type,
            message_id,
            reason,
            values["error"].strip().splitlines()[-1][:300] if values["error"].strip() else "",
        )
        return int(stored.id)


def _envelope_of(body: bytes) -> Envelope | None:
    try:
        return parse_envelope(body)
    except MalformedMessage:
        return None


def _deliveries(headers: dict[str, Any]) -> int | None:
    """How often the broker delivered it: its x-delivery-count, or the x-death count."""
    count = headers.get("x-delivery-count")
    if isinstance(count, int):
        return count
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        value = deaths[0].get("count")
        return int(value) if isinstance(value, int) else None
    return None


def _json_safe(value: Any) -> Any:
    """AMQP header values (bytes, times, decimals) as JSON."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


# --- what admins do with them ---------------------------------------------------------------


class NoSuchDeadLetter(Exception):
    pass


class DeadLetterRefused(Exception):
    """The move is not allowed from the dead letter's status (409)."""


@dataclass
class DeadLetters:
    """The dead letters of one service: list, read, replay, discard (each audited)."""

    service: str
    db: Database
    tables: MessagingTables
    outbox: Outbox

    def _id(self, number: int) -> str:
        return f"{self.service}:{number}"

    def summary(self, row: Row[Any]) -> http.DeadLetter:
        return http.DeadLetter(
            id=self._id(row.id),
            service=self.service,
            message_id=row.message_id,
            type=row.event_type,
            error=row.error,
            attempts=row.attempts,
            dead_lettered_at=row.dead_lettered_at,
            status=row.status,
        )

    def detail(self, row: Row[Any]) -> http.DeadLetterDetail:
        envelope = None
        body = None
        try:
            envelope = json.loads(row.body)
            if not isinstance(envelope, dict):
                raise ValueError
        except ValueError:
            envelope = None
            try:
                body = bytes(row.body).decode()
            except UnicodeDecodeError:
                body = "base64:" + base64.b64encode(bytes(row.body)).decode()
        return http.DeadLetterDetail(
            **self.summary(row).model_dump(),
            consumer=row.consumer,
            reason=row.reason,
            routing_key=row.routing_key,
            envelope=envelope,
            body=body,
            replayed_at=row.replayed_at,
            discarded_at=row.discarded_at,
            decided_by=row.decided_by,
            decision_reason=row.decision_reason,
        )

    async def page(
        self,
        *,
        event_type: str | None,
        status: str | None,
        limit: int,
        cursor: http.DeadLetterCursor | None,
    ) -> http.DeadLetterPage:
        dead = self.tables.dead_letters
        query = select(dead).order_by(dead.c.dead_lettered_at.desc(), dead.c.id.desc())
        if event_type is not None:
            query = query.where(dead.c.event_type == event_type)
        if status is not None:
            query = query.where(dead.c.status == status)
        if cursor is not None:
            query = query.where(
                or_(
                    dead.c.dead_lettered_at < cursor.at,
                    and_(dead.c.dead_lettered_at == cursor.at, dead.c.id < cursor.id),
                )
            )
        async with self.db.single_statement() as session:
            rows = (await session.execute(query.limit(limit + 1))).all()
        more = len(rows) > limit
        rows = rows[:limit]
        next_cursor = (
            http.DeadLetterCursor(rows[-1].dead_lettered_at, rows[-1].id).encode() if more else None
        )
        return http.DeadLetterPage(items=[self.summary(r) for r in rows], next_cursor=next_cursor)

    async def get(self, number: int) -> http.DeadLetterDetail:
        dead = self.tables.dead_letters
        async with self.db.single_statement() as session:
            row = (await session.execute(select(dead).where(dead.c.id == number))).one_or_none()
        if row is None:
            raise NoSuchDeadLetter(self._id(number))
        return self.detail(row)

    async def replay(self, number: int, *, by: str, reason: str) -> http.DeadLetterDetail:
        """Send it back to its consumer (once: a replayed one answers as it is)."""
        now = datetime.now(UTC)
        async with self.db.transaction() as session:
            row = await self._locked(session, number)
            if row.status == REPLAYED:
                return self.detail(row)
            if row.status == DISCARDED:
                raise DeadLetterRefused(
                    f"dead letter {self._id(number)} was discarded; it cannot be replayed"
                )
            row = await self._replay_locked(session, row, by=by, reason=reason, now=now)
        return self.detail(row)

    async def replay_matching(self, *, event_type: str | None, by: str, reason: str) -> int:
        """Replay every kept dead letter (of `event_type`); how many."""
        dead = self.tables.dead_letters
        now = datetime.now(UTC)
        query = select(dead).where(dead.c.status == KEPT).order_by(dead.c.id)
        if event_type is not None:
            query = query.where(dead.c.event_type == event_type)
        async with self.db.transaction() as session:
            rows = (await session.execute(query.with_for_update(skip_locked=True))).all()
            for row in rows:
                await self._replay_locked(session, row, by=by, reason=reason, now=now)
        return len(rows)

    async def discard(self, number: int, *, by: str, reason: str) -> http.DeadLetterDetail:
        now = datetime.now(UTC)
        async with self.db.transaction() as session:
            row = await self._locked(session, number)
            if row.status == DISCARDED:
                return self.detail(row)
            if row.status == REPLAYED:
                raise DeadLetterRefused(
                    f"dead letter {self._id(number)} was replayed; there is nothing to discard"
                )
            row = await self._decide(
                session,
                row,
                AdminAction.DISCARD_DEAD_LETTER,
                by=by,
                reason=reason,
                now=now,
                status=DISCARDED,
                discarded_at=now,
            )
        return self.detail(row)

    async def _locked(self, session: Any, number: int) -> Row[Any]:
        dead = self.tables.dead_letters
        row: Row[Any] | None = (
            await session.execute(select(dead).where(dead.c.id == number).with_for_update())
        ).one_or_none()
        if row is None:
            raise NoSuchDeadLetter(self._id(number))
        return row

    async def _replay_locked(
        self, session: Any, row: Row[Any], *, by: str, reason: str, now: datetime
    ) -> Row[Any]:
        try:
            body = bytes(row.body).decode()
        except UnicodeDecodeError:
            raise DeadLetterRefused(
                f"dead letter {self._id(row.id)} is not text; it cannot be replayed"
            ) from None
        await session.execute(
            insert(self.tables.outbox)
            .values(
                # Its own id (a replay is a new send), the message inside unchanged.
                message_id=uuid.uuid5(_REPLAYED, f"{row.consumer}:{row.id}:{row.times}"),
                exchange="",  # straight to the consumer's queue
                routing_key=row.consumer,
                event_type=row.event_type or "unreadable",
                correlation_id=row.correlation_id or str(uuid.uuid4()),
                body=body,
            )
            .on_conflict_do_nothing(index_elements=[self.tables.outbox.c.message_id])
        )
        return await self._decide(
            session,
            row,
            AdminAction.REPLAY_DEAD_LETTER,
            by=by,
            reason=reason,
            now=now,
            status=REPLAYED,
            replayed_at=now,
        )

    async def _decide(
        self,
        session: Any,
        row: Row[Any],
        action: AdminAction,
        *,
        by: str,
        reason: str,
        now: datetime,
        **stamps: Any,
    ) -> Row[Any]:
        """An admin's decision on a dead letter: its new status (`stamps`), who and why, and
        the audit of it, in the caller's transaction; the row as it now is."""
        dead = self.tables.dead_letters
        decided: Row[Any] = (
            await session.execute(
                update(dead)
                .where(dead.c.id == row.id)
                .values(**stamps, decided_by=by, decision_reason=reason)
                .returning(*dead.c)
            )
        ).one()
        await record_admin_action(
            session,
            self.tables,
            self.outbox,
            action=action,
            by=by,
            reason=reason,
            at=now,
            dead_letter_id=self._id(row.id),
            detail=f"{row.event_type or 'unreadable message'} {row.message_id}",
        )
        log.warning("dead letter %s: %s by %s: %s", self._id(row.id), action.value, by, reason)
        return decided


def dead_letters_router(dead_letters: DeadLetters) -> APIRouter:
    """The admin routes of one service's dead letters (the gateway merges the services')."""
    router = APIRouter(prefix="/api/admin/dead-letters", tags=["dead letters"])
    admin = require_roles(Role.ADMIN)
    service = dead_letters.service

    def number_of(dead_letter_id: str) -> int:
        prefix, _, number = dead_letter_id.partition(":")
        if prefix != service or not number.isdigit() or not 0 < int(number) < 2**63:
            raise HTTPException(404, f"there is no dead letter {dead_letter_id} in {service}")
        return int(number)

    def refused(exc: DeadLetterRefused) -> HTTPException:
        return HTTPException(409, str(exc))

    @router.get("", response_model=http.DeadLetterPage)
    async def list_dead_letters(
        # No NUL: Postgres cannot compare text holding one (a 500, not the caller's 422).
        type: str | None = Query(None, max_length=100, pattern=r"^[^\x00]*$"),
        status: http.DeadLetterStatus | None = Query(None),
        limit: int = Query(50, ge=1, le=200),
        cursor: str | None = Query(None, max_length=200),
        _: Identity = Depends(admin),
    ) -> http.DeadLetterPage:
        try:
            position = None if cursor is None else http.DeadLetterCursor.decode(cursor)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        return await dead_letters.page(event_type=type, status=status, limit=limit, cursor=position)

    @router.post("/replay", response_model=http.Replayed)
    async def replay_dead_letters(
        body: http.DeadLetterFilter = Body(default_factory=http.DeadLetterFilter),
        identity: Identity = Depends(admin),
    ) -> http.Replayed:
        if body.service not in (None, service):
            return http.Replayed(replayed=0)
        replayed = await dead_letters.replay_matching(
            event_type=body.type, by=identity.sub, reason="replay of every kept dead letter"
        )
        return http.Replayed(replayed=replayed)

    @router.get("/{dead_letter_id}", response_model=http.DeadLetterDetail)
    async def get_dead_letter(
        dead_letter_id: str = Path(max_length=60), _: Identity = Depends(admin)
    ) -> http.DeadLetterDetail:
        try:
            return await dead_letters.get(number_of(dead_letter_id))
        except NoSuchDeadLetter:
            raise HTTPException(404, f"there is no dead letter {dead_letter_id}") from None

    @router.post("/{dead_letter_id}/replay", response_model=http.DeadLetterDetail)
    async def replay_dead_letter(
        dead_letter_id: str = Path(max_length=60),
        body: http.OptionalReason = Body(default_factory=http.OptionalReason),
        identity: Identity = Depends(admin),
    ) -> http.DeadLetterDetail:
        try:
            return await dead_letters.replay(
                number_of(dead_letter_id), by=identity.sub, reason=body.reason or "replayed"
            )
        except NoSuchDeadLetter:
            raise HTTPException(404, f"there is no dead letter {dead_letter_id}") from None
        except DeadLetterRefused as exc:
            raise refused(exc) from None

    @router.post("/{dead_letter_id}/discard", response_model=http.DeadLetterDetail)
    async def discard_dead_letter(
        body: http.AdminReason,
        dead_letter_id: str = Path(max_length=60),
        identity: Identity = Depends(admin),
    ) -> http.DeadLetterDetail:
        try:
            return await dead_letters.discard(
                number_of(dead_letter_id), by=identity.sub, reason=body.reason
            )
        except NoSuchDeadLetter:
            raise HTTPException(404, f"there is no dead letter {dead_letter_id}") from None
        except DeadLetterRefused as exc:
            raise refused(exc) from None

    return router

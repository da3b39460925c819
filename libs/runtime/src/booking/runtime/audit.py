"""The audit trail of admin actions: who did what, when and why, in the action's own transaction.

Every admin action a service carries out is written to its `admin_actions` table and announced
as AdminActionRecorded (the notifications service raises an Info notification), in the same
transaction as the action itself: an action is audited if and only if it took effect. An action
repeated after it took effect changes nothing and is not audited again.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncSession

from booking.contracts import AdminAction, AdminActionRecorded
from booking.runtime.outbox import Outbox
from booking.runtime.tables import MessagingTables

# Namespace of AdminActionRecorded message ids: uuid5 of "<schema>:<audit row id>".
_AUDIT = uuid.UUID("3e6b2f7d-91c4-4a0e-b5d8-6f2a1c9e0b47")


async def record_admin_action(
    session: AsyncSession,
    tables: MessagingTables,
    outbox: Outbox,
    *,
    action: AdminAction,
    by: str,
    reason: str,
    at: datetime,
    order_id: uuid.UUID | None = None,
    session_id: uuid.UUID | None = None,
    dead_letter_id: str | None = None,
    detail: str = "",
) -> int:
    """Write the audit row and its AdminActionRecorded in the caller's transaction; its id."""
    audit_id: int = (
        await session.execute(
            tables.admin_actions.insert()
            .values(
                action=action.value,
                by=by,
                reason=reason,
                at=at,
                order_id=order_id,
                session_id=session_id,
                dead_letter_id=dead_letter_id,
                detail=detail,
            )
            .returning(tables.admin_actions.c.id)
        )
    ).scalar_one()
    await outbox.record(
        session,
        AdminActionRecorded(
            action=action,
            service=outbox.producer,
            by=by,
            reason=reason,
            at=at,
            order_id=order_id,
            session_id=session_id,
            dead_letter_id=dead_letter_id,
            detail=detail,
        ),
        message_id=uuid.uuid5(_AUDIT, f"{tables.schema}:{audit_id}"),
    )
    return audit_id

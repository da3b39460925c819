"""What the notifications service makes of each failure event.

Each event becomes a stored notification with the type, severity, title, message and metadata of
the mapping table, published to the admin alerts fanout; repeats count up instead of flooding;
a redelivery never counts twice; and a failure to handle a failure report does not loop.

The events reach the service's subscribers on FastStream's TestRabbitBroker (the `handling`
harness), and what it publishes is read from its outbox, where the handler's transaction records
it. The tests whose point is the broker (replicas sharing a queue; retries, dead letters and the
reports the relay brings back) run on the real RabbitMQ (the `notifications` harness).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from booking.contracts import (
    AdminAction,
    AdminActionRecorded,
    CalendarBookingFailed,
    CalendarFailureReason,
    EscrowFrozen,
    EscrowRefundDue,
    EscrowRefunded,
    EscrowUnfrozen,
    Event,
    HealthCheckFailed,
    HealthCheckRecovered,
    PaymentAnomalyDetected,
    PaymentAnomalyKind,
    PaymentInitiationFailed,
    SessionIssueDetected,
    SessionIssueKind,
    SystemErrorKind,
    SystemErrorReported,
)
from booking.devtools.fixtures import eventually, serving
from booking.notifications import repository
from booking.notifications.app import create_app
from booking.notifications.domain import alert_for

TYPES = [
    "IntegrationFailure",
    "PaymentAnomaly",
    "SessionIssue",
    "SystemError",
    "HealthCheckFailure",
]
SEVERITIES = ["Info", "Warning", "Error", "Critical"]

TRACE = (
    "Traceback (most recent call last):\n"
    '  File "service.py", line 10, in schedule\n'
    "KeyError: 'calendar_id'\n"
)


@dataclass
class Case:
    """An event, and the notification the mapping says it raises."""

    event: Event
    type: str
    severity: str
    title: str
    message: str
    metadata: dict[str, Any]
    producer: str | None = None


def calendar_case(
    reason: str,
    severity: str,
    title: str,
    detail: str = "",
    line: str = "",
    *,
    final: bool = False,
) -> Case:
    o, s, m = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    detail = detail or f"{reason} for mentor {m}"
    event = CalendarBookingFailed(
        session_id=s,
        order_id=o,
        mentor_id=m,
        reason=CalendarFailureReason(reason),
        detail=detail,
        attempts=3,
        final=final,
    )
    ending = (
        " The calendar has given up: the session will not take place as paid and its escrow "
        "is frozen until an admin retries the scheduling, releases or refunds it."
        if final
        else ""
    )
    return Case(
        event,
        "IntegrationFailure",
        severity,
        f"Calendar booking {'abandoned' if final else 'failed'}: {title}",
        f"Session {s} of order {o} (mentor {m}) could not be put in the mentor's Google "
        f"Calendar after 3 attempts: {line or detail}{ending}",
        {
            "order_id": str(o),
            "session_id": str(s),
            "mentor_id": str(m),
            "reason": reason,
            "detail": detail,
            "attempts": 3,
            "final": final,
            "next_attempt_at": None,
        },
    )


def anomaly_case(kind: str, severity: str, title: str) -> Case:
    ref, order = uuid.uuid4().hex[:24], uuid.uuid4()
    detail = f"{kind} on {ref}"
    event = PaymentAnomalyDetected(
        payment_ref=ref, order_id=order, kind=PaymentAnomalyKind(kind), detail=detail
    )
    return Case(
        event,
        "PaymentAnomaly",
        severity,
        title,
        f"Payment {ref} (order {order}): {detail}",
        {
            "payment_ref": ref,
            "order_id": str(order),
            "reason": kind,
            "detail": detail,
        },
    )


def unknown_ref_case() -> Case:
    """One webhook for a ref none of the payments has, reported by itself (the first of a
    quiet spell): payments reports the ref among the refs it lists."""
    ref = uuid.uuid4().hex[:24]
    detail = f"a webhook named {ref}, which no payment of ours has"
    event = PaymentAnomalyDetected(
        payment_ref=ref,
        order_id=None,
        kind=PaymentAnomalyKind.UNKNOWN_PAYMENT_REF,
        detail=detail,
        payment_refs=[ref],
    )
    return Case(
        event,
        "PaymentAnomaly",
        "Warning",
        "Payment notifications for unknown references",
        f"A webhook named payment {ref}, which none of our payments has: forged or mistaken. "
        "Konnect only sends the refs we create, so it was not asked.",
        {
            "payment_ref": ref,
            "order_id": None,
            "reason": "unknown_payment_ref",
            "detail": detail,
            "webhooks": 1,
            "first_payment_refs": [ref],
            "last_payment_refs": [],
        },
    )


def session_case(kind: str, severity: str, title: str) -> Case:
    o, s = uuid.uuid4(), uuid.uuid4()
    detail = f"{kind}: paid 100000 of 120000 TND"
    event = SessionIssueDetected(
        order_id=o, session_id=s, kind=SessionIssueKind(kind), detail=detail
    )
    return Case(
        event,
        "SessionIssue",
        severity,
        title,
        f"Order {o}, session {s}: {detail}",
        {"order_id": str(o), "session_id": str(s), "reason": kind, "detail": detail},
    )


def initiation_case() -> Case:
    o = uuid.uuid4()
    event = PaymentInitiationFailed(
        order_id=o, reason="konnect_rejected", detail="Konnect answered 400: wallet unknown"
    )
    return Case(
        event,
        "PaymentAnomaly",
        "Error",
        "Payment could not be opened at Konnect",
        f"Konnect would not open the payment of order {o} (konnect_rejected), so the mentee "
        "has nothing to pay with: Konnect answered 400: wallet unknown",
        {
            "order_id": str(o),
            "reason": "konnect_rejected",
            "detail": "Konnect answered 400: wallet unknown",
        },
    )


def system_case() -> Case:
    dead = str(uuid.uuid4())
    event = SystemErrorReported(
        service="orders",
        consumer="orders",
        message_type="PaymentCompleted",
        error=TRACE,
        dead_lettered_message_id=dead,
        attempts=5,
        dead_letter_id="orders:7",
    )
    return Case(
        event,
        "SystemError",
        "Critical",
        "Message dead-lettered by orders: PaymentCompleted",
        f"orders could not handle a PaymentCompleted message ({dead}) after 5 attempts; it is "
        "kept as dead letter orders:7, to replay or discard: KeyError: 'calendar_id'",
        {
            "service": "orders",
            "consumer": "orders",
            "message_type": "PaymentCompleted",
            "dead_lettered_message_id": dead,
            "dead_letter_id": "orders:7",
            "error": TRACE,
            "attempts": 5,
            "reason": "dead_lettered",
        },
        producer="orders",
    )


def unroutable_case() -> Case:
    error = "no queue is bound to 'orders.order_paid' on booking.events"
    event = SystemErrorReported(
        service="orders",
        consumer="orders outbox",
        message_type="OrderPaid",
        error=error,
        dead_lettered_message_id=None,
        attempts=1,
        kind=SystemErrorKind.UNROUTABLE,
    )
    return Case(
        event,
        "SystemError",
        "Error",
        "Events nobody receives: OrderPaid from orders",
        "orders publishes OrderPaid events that no queue takes; they wait in its outbox and go "
        f"out once a queue is bound to them: {error}",
        {
            "service": "orders",
            "consumer": "orders outbox",
            "message_type": "OrderPaid",
            "dead_lettered_message_id": None,
            "dead_letter_id": None,
            "error": error,
            "attempts": 1,
            "reason": "unroutable",
        },
        producer="orders",
    )


def escrow_case(event_type: type, severity: str, title: str, message: str, **extra: Any) -> Case:
    order, mentor = uuid.uuid4(), uuid.uuid4()
    fields: dict[str, Any] = {
        "order_id": order,
        "mentor_id": mentor,
        "escrow_amount": 102_000,
        "currency": "TND",
        "reason": "the session did not take place",
        "sequence": 2,
        **extra,
    }
    event = event_type(**fields)
    metadata = {
        name: (str(value) if isinstance(value, uuid.UUID) else value)
        for name, value in event.model_dump(mode="json").items()
        if name not in ("reason", "sequence")
    }
    metadata["reason"] = "the session did not take place"
    return Case(event, "PaymentAnomaly", severity, title, message.format(order=order), metadata)


def admin_case(action: str, type_: str, **subject: Any) -> Case:
    at = datetime(2026, 5, 1, 9, 30, tzinfo=UTC)
    event = AdminActionRecorded(
        action=AdminAction(action),
        service="payments",
        by="admin-7",
        reason="the mentee asked",
        at=at,
        detail="",
        **subject,
    )
    metadata = {
        "action": action,
        "service": "payments",
        "by": "admin-7",
        "at": "2026-05-01T09:30:00Z",
        "order_id": None,
        "session_id": None,
        "dead_letter_id": None,
        "detail": "",
        "reason": "the mentee asked",
    }
    metadata.update({k: str(v) for k, v in subject.items()})
    named = ", ".join(
        f"{label} {subject[key]}"
        for key, label in (
            ("order_id", "order"),
            ("session_id", "session"),
            ("dead_letter_id", "dead letter"),
        )
        if key in subject
    )
    return Case(
        event,
        type_,
        "Info",
        f"Admin action: {action} by admin-7",
        # An action on no order, session or dead letter (a mentor's identity link) names the
        # service that did it.
        f"admin-7 did {action} on {named or 'payments'}: the mentee asked",
        metadata,
        producer="payments",
    )


def health_case(
    event_type: type[HealthCheckFailed | HealthCheckRecovered],
    component: str,
    status: str,
    severity: str,
    reason: str,
) -> Case:
    name, _, measurement = component.partition(":")
    component = f"{name}-{uuid.uuid4().hex[:6]}:{measurement}"  # each test its own component
    event = event_type(component=component, status=status, output="no answer within 2s")
    title = (
        f"{component} is failing its health check"
        if event_type is HealthCheckFailed
        else f"{component} passes its health check again"
    )
    return Case(
        event,
        "HealthCheckFailure",
        severity,
        title,
        f"{component} reports {status}: no answer within 2s",
        {
            "component": component,
            "status": status,
            "output": "no answer within 2s",
            "reason": reason,
        },
    )


CASES: dict[str, Callable[[], Case]] = {
    "calendar store_not_found, final": lambda: calendar_case(
        "store_not_found",
        "Critical",
        "the mentor is unknown to the calendar service",
        final=True,
    ),
    "calendar mentor_not_integrated": lambda: calendar_case(
        "mentor_not_integrated", "Error", "the mentor has not connected Google Calendar"
    ),
    "calendar integration_revoked": lambda: calendar_case(
        "integration_revoked", "Error", "the mentor's Google access was revoked"
    ),
    "calendar mentor_not_integrated, final": lambda: calendar_case(
        "mentor_not_integrated",
        "Critical",
        "the mentor did not connect Google Calendar in time",
        final=True,
    ),
    "calendar calendar_api_error, final": lambda: calendar_case(
        "calendar_api_error", "Critical", "Google Calendar kept failing", final=True
    ),
    "calendar unexpected_error, final": lambda: calendar_case(
        "unexpected_error",
        "Critical",
        "unexpected error",
        detail=TRACE,
        line="KeyError: 'calendar_id'",
        final=True,
    ),
    "anomaly unknown_payment_ref": lambda: unknown_ref_case(),
    "anomaly amount_mismatch": lambda: anomaly_case(
        "amount_mismatch", "Error", "Payment amount does not match its order"
    ),
    "anomaly currency_mismatch": lambda: anomaly_case(
        "currency_mismatch", "Error", "Payment currency does not match its order"
    ),
    "anomaly underpayment": lambda: anomaly_case("underpayment", "Error", "Order underpaid"),
    "anomaly payment_for_cancelled_order": lambda: anomaly_case(
        "payment_for_cancelled_order", "Critical", "Money received for a cancelled order"
    ),
    "anomaly payment_for_ended_order": lambda: anomaly_case(
        "payment_for_ended_order", "Critical", "Money received for an order that had ended"
    ),
    "payment initiation failed": initiation_case,
    "session payment_for_unknown_order": lambda: session_case(
        "payment_for_unknown_order", "Critical", "Money received for an order we do not know"
    ),
    "session payment_for_cancelled_order": lambda: session_case(
        "payment_for_cancelled_order", "Critical", "Money received for a cancelled order"
    ),
    "session payment_for_paid_order": lambda: session_case(
        "payment_for_paid_order", "Critical", "A second payment for an order already paid"
    ),
    "session currency_mismatch": lambda: session_case(
        "currency_mismatch", "Error", "Payment in another currency than its order's"
    ),
    "session underpayment": lambda: session_case(
        "underpayment", "Error", "Order underpaid: it stays unpaid"
    ),
    "system error": system_case,
    "unroutable events": unroutable_case,
    "escrow frozen": lambda: escrow_case(
        EscrowFrozen,
        "Error",
        "Escrow frozen: release it or refund the mentee",
        "The escrow of order {order} (102000 TND (minor units)) is frozen by admin-2: the "
        "session did not take place. It is never released on its own: an admin releases it to "
        "the mentor or refunds the mentee.",
        by="admin-2",
    ),
    "escrow refund due": lambda: escrow_case(
        EscrowRefundDue,
        "Critical",
        "Refund owed: pay the mentee back, then record it",
        "120000 TND (minor units) paid for order {order} is owed back to the mentee: the "
        "session did not take place. Konnect has no refund API: pay it back, then record the "
        "refund with its reference.",
        refund_amount=120_000,
    ),
    "escrow refunded": lambda: escrow_case(
        EscrowRefunded,
        "Info",
        "Refund recorded",
        "The refund of 120000 TND (minor units) for order {order} was recorded by admin-2 "
        "(reference TRF-9): the session did not take place",
        refund_amount=120_000,
        by="admin-2",
        reference="TRF-9",
    ),
    "escrow unfrozen": lambda: escrow_case(
        EscrowUnfrozen,
        "Info",
        "Escrow held again: the session was scheduled",
        "The escrow of order {order} (102000 TND (minor units)) is held again: the session did "
        "not take place",
        release_due_at=datetime(2026, 6, 2, 10, 0, tzinfo=UTC),
    ),
    "admin cancels an order": lambda: admin_case(
        "cancel_order", "SessionIssue", order_id=uuid.uuid4(), session_id=uuid.uuid4()
    ),
    "admin replays a dead letter": lambda: admin_case(
        "replay_dead_letter", "SystemError", dead_letter_id="orders:3"
    ),
    "admin retries a scheduling": lambda: admin_case(
        "retry_scheduling", "IntegrationFailure", session_id=uuid.uuid4()
    ),
    "admin releases an escrow": lambda: admin_case(
        "release_escrow", "PaymentAnomaly", order_id=uuid.uuid4()
    ),
    "admin links a mentor's identity": lambda: admin_case("link_mentor_identity", "SystemError"),
    "health failed: a whole service": lambda: health_case(
        HealthCheckFailed, "orders:health", "fail", "Critical", "failing_vital"
    ),
    "health failed: a database": lambda: health_case(
        HealthCheckFailed, "database:responseTime", "fail", "Critical", "failing_vital"
    ),
    "health failed: an outside system": lambda: health_case(
        HealthCheckFailed, "konnect:reachable", "warn", "Error", "failing"
    ),
    "health recovered": lambda: health_case(
        HealthCheckRecovered, "orders:health", "pass", "Info", "recovered"
    ),
}


class TestMapping:
    @pytest.mark.parametrize("name", list(CASES))
    async def test_each_failure_event_raises_the_notification_of_the_mapping(
        self, handling, name: str
    ) -> None:
        case = CASES[name]()
        occurred = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
        row = await handling.raise_(case.event, occurred_at=occurred, producer=case.producer)

        assert (TYPES[row["type"]], SEVERITIES[row["severity"]]) == (case.type, case.severity)
        assert row["title"] == case.title
        assert row["message"] == case.message
        assert row["metadata"] == case.metadata
        assert (row["occurrences"], row["is_read"], row["read_at"]) == (1, False, None)
        assert row["created_at"] == row["last_occurred_at"] == occurred

        [raised] = await handling.alerts(row["id"])
        assert raised == {
            "id": row["id"],
            "type": case.type,
            "severity": case.severity,
            "title": case.title,
            "message": case.message,
            "metadata": case.metadata,
            "is_read": False,
            "read_at": None,
            "created_at": occurred.isoformat().replace("+00:00", "Z"),
            "fingerprint": row["fingerprint"],
            "occurrences": 1,
            "last_occurred_at": occurred.isoformat().replace("+00:00", "Z"),
        }
        assert await handling.reported() == [] and await handling.dead_letters() == []


def unknown_ref_report(refs: list[str], count: int) -> PaymentAnomalyDetected:
    """What payments reports of `count` webhooks for unknown refs: the first and the last 20."""
    sample = refs if len(refs) <= 40 else refs[:20] + refs[-20:]
    return PaymentAnomalyDetected(
        payment_ref=refs[0],
        order_id=None,
        kind=PaymentAnomalyKind.UNKNOWN_PAYMENT_REF,
        detail=f"{count} webhooks named refs no payment of ours has",
        occurrences=count,
        payment_refs=sample,
    )


class TestUnknownRefTallies:
    async def test_a_flood_reported_in_tallies_is_one_notification_that_counts_every_webhook(
        self, handling
    ) -> None:
        refs = [f"{n:024x}" for n in range(10_000)]
        # As payments reports a flood: the first at once, then what came each few seconds.
        chunks = [refs[:1], refs[1:2500], refs[2500:5000], refs[5000:9000], refs[9000:]]
        start = datetime.now(UTC) - timedelta(minutes=10)
        for n, chunk in enumerate(chunks):  # seconds apart, as payments sends them
            report = unknown_ref_report(chunk, len(chunk))
            await handling.raise_(report, occurred_at=start + timedelta(seconds=5 * n))

        [row] = await handling.rows()
        assert row["occurrences"] == row["metadata"]["webhooks"] == 10_000
        assert row["metadata"]["first_payment_refs"] == refs[:20]
        assert row["metadata"]["last_payment_refs"] == refs[-20:]
        assert row["metadata"]["payment_ref"] == refs[9000]
        assert row["message"].startswith("10000 webhooks named payment refs")
        assert (SEVERITIES[row["severity"]], row["created_at"]) == ("Warning", start)
        raised = await handling.alerts(row["id"])
        # Each report told the admins once, with the total so far.
        assert [r["occurrences"] for r in raised] == [1, 2500, 5000, 9000, 10_000]

    async def test_a_report_after_the_window_opens_a_notification_of_its_own_refs(
        self, handling
    ) -> None:
        start = datetime.now(UTC) - timedelta(hours=3)
        old = await handling.raise_(unknown_ref_report(["a" * 24, "b" * 24], 2), occurred_at=start)
        new = await handling.raise_(
            unknown_ref_report(["c" * 24], 1), occurred_at=start + timedelta(hours=2)
        )

        assert new["id"] != old["id"] and new["occurrences"] == 1
        assert new["metadata"]["first_payment_refs"] == ["c" * 24]

    async def test_other_payment_anomalies_stay_one_notification_per_payment(
        self, handling
    ) -> None:
        events = [
            PaymentAnomalyDetected(
                payment_ref=uuid.uuid4().hex[:24],
                order_id=uuid.uuid4(),
                kind=PaymentAnomalyKind.AMOUNT_MISMATCH,
                detail="more than the amount due",
            )
            for _ in range(3)
        ]
        await handling.handled(*[await handling.deliver(e) for e in events])

        rows = await handling.rows()
        assert sorted(r["metadata"]["payment_ref"] for r in rows) == sorted(
            e.payment_ref for e in events
        )
        assert all(r["occurrences"] == 1 for r in rows)


class TestDedup:
    async def test_the_same_alert_five_times_in_the_window_is_one_notification_raised_five_times(
        self, handling
    ) -> None:
        event = calendar_failed_event()
        start = datetime.now(UTC) - timedelta(minutes=30)
        sent = [
            await handling.deliver(event, occurred_at=start + timedelta(minutes=n))
            for n in range(5)
        ]
        await handling.handled(*sent)

        [row] = await handling.rows()
        assert row["occurrences"] == 5
        assert row["created_at"] == start
        assert row["last_occurred_at"] == start + timedelta(minutes=4)
        raised = await handling.alerts(row["id"])
        assert sorted(r["occurrences"] for r in raised) == [1, 2, 3, 4, 5]  # 1 new + 4 updates
        assert len({m["message_id"] for m in await handling.alert_messages()}) == 5

    async def test_an_event_delivered_twice_counts_once(self, handling) -> None:
        event = calendar_failed_event()
        first = await handling.deliver(event)
        await handling.deliver(event, message_id=first)  # the same message, redelivered
        await handling.handled(first)
        await eventually(
            lambda: handling.duplicates("CalendarBookingFailed") == 1,
            what="the redelivery recognised as a duplicate",
        )

        [row] = await handling.rows()
        assert row["occurrences"] == 1
        assert len(await handling.alerts(row["id"])) == 1

    async def test_alerts_about_different_bookings_stay_apart(self, handling) -> None:
        mentor = uuid.uuid4()
        one = calendar_failed_event(mentor_id=mentor)
        other = calendar_failed_event(mentor_id=mentor)
        await handling.handled(await handling.deliver(one), await handling.deliver(other))

        rows = await handling.rows()
        assert len(rows) == 2
        assert {r["metadata"]["order_id"] for r in rows} == {str(one.order_id), str(other.order_id)}
        assert all(r["occurrences"] == 1 for r in rows)

    async def test_a_repeat_after_the_window_is_a_new_notification(self, handling) -> None:
        event = calendar_failed_event()
        window = timedelta(seconds=handling.settings.notification_dedup_window_seconds)
        assert window == timedelta(hours=1)  # the default
        start = datetime.now(UTC) - timedelta(hours=3)
        first = await handling.raise_(event, occurred_at=start)
        later = start + window + timedelta(minutes=1)
        second = await handling.raise_(event, occurred_at=later)

        assert second["id"] > first["id"]
        assert second["fingerprint"] == first["fingerprint"]
        old, new = await handling.rows()
        assert (old["occurrences"], old["is_open"]) == (1, False)
        assert (new["occurrences"], new["is_open"]) == (1, True)
        # Within the window of the new one, repeats count up on it.
        third = await handling.raise_(event, occurred_at=later + timedelta(minutes=59))
        assert (third["id"], third["occurrences"]) == (second["id"], 2)

    async def test_a_late_repeat_counts_but_keeps_the_latest_message(self, handling) -> None:
        now = datetime.now(UTC)
        ids = {"order_id": uuid.uuid4(), "session_id": uuid.uuid4(), "mentor_id": uuid.uuid4()}
        await handling.raise_(calendar_failed_event(**ids, detail="latest"), occurred_at=now)
        row = await handling.raise_(
            calendar_failed_event(**ids, detail="older"), occurred_at=now - timedelta(minutes=5)
        )
        assert row["occurrences"] == 2
        assert row["last_occurred_at"] == now
        assert row["metadata"]["detail"] == "latest"

    async def test_a_repeat_makes_a_read_notification_unread_again(self, handling) -> None:
        event = calendar_failed_event()
        row = await handling.raise_(event)
        answer = await handling.client.post(
            f"/api/admin/notifications/{row['id']}/read", headers=handling.admin
        )
        assert answer.json()["is_read"] is True

        row = await handling.raise_(event)
        assert (row["occurrences"], row["is_read"], row["read_at"]) == (2, False, None)

    async def test_a_recovery_ends_the_incident_so_the_next_failure_is_new(self, handling) -> None:
        component = f"payments-{uuid.uuid4().hex[:6]}:health"
        failed = HealthCheckFailed(component=component, status="fail", output="503")
        first = await handling.raise_(failed)
        recovered = HealthCheckRecovered(component=component, status="pass", output="")
        await handling.raise_(recovered)
        second = await handling.raise_(failed)

        assert second["id"] > first["id"]
        rows = await handling.rows()
        assert [(TYPES[r["type"]], SEVERITIES[r["severity"]], r["is_open"]) for r in rows] == [
            ("HealthCheckFailure", "Critical", False),
            ("HealthCheckFailure", "Info", True),
            ("HealthCheckFailure", "Critical", True),
        ]

    async def test_concurrent_stores_of_one_alert_make_one_row(self, handling) -> None:
        db = handling.runtime.db
        alert = alert_for(calendar_failed_event(), datetime.now(UTC))

        async def store() -> None:
            async with db.transaction() as session:
                await repository.store_alert(session, alert, timedelta(hours=1))

        await asyncio.gather(*(store() for _ in range(10)))
        [row] = await handling.rows()
        assert row["occurrences"] == 10

    async def test_two_consumers_at_once_count_one_alert_on_one_row(self, notifications) -> None:
        """On the real RabbitMQ: two replicas take turns on one queue, as the broker shares
        its deliveries between them."""
        second = create_app(notifications.settings)
        async with serving(second):
            await second.state.runtime.broker.wait_ready(timeout=15)
            event = calendar_failed_event()
            sent = await asyncio.gather(*(notifications.publish(event) for _ in range(40)))
            await notifications.handled(*sent)

        [row] = await notifications.rows()
        assert row["occurrences"] == 40
        await notifications.quiet()
        raised = notifications.alerts.payloads(row["id"])
        assert sorted(r["occurrences"] for r in raised) == list(range(1, 41))


class TestLoopGuard:
    async def test_a_report_of_a_failed_report_is_stored_and_not_reported_again(
        self, handling
    ) -> None:
        report = SystemErrorReported(
            service="notifications",
            consumer="notifications",
            message_type="SystemErrorReported",
            error=TRACE,
            dead_lettered_message_id=str(uuid.uuid4()),
            attempts=5,
        )
        row = await handling.raise_(report, producer="notifications")
        assert (TYPES[row["type"]], SEVERITIES[row["severity"]]) == ("SystemError", "Critical")
        assert await handling.reported() == []

    async def test_when_storing_fails_the_chain_of_reports_ends_at_the_first(
        self, notifications, monkeypatch
    ) -> None:
        """On the real RabbitMQ: the retries through the delay queues, the dead-letter queue,
        and the relay that brings the report back to the service are the point."""

        async def broken_store(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("the notifications table is broken")

        monkeypatch.setattr(repository, "store_alert", broken_store)
        await notifications.publish(calendar_failed_event())

        # The event is dead-lettered and reported; storing that report fails as well, so it is
        # dead-lettered in turn, and that is the end of the line: no report of the report.
        dead = notifications.runtime.tables.dead_letters

        async def both_dead() -> bool:
            async with notifications.runtime.db.engine.connect() as conn:
                kept = (await conn.execute(dead.select().where(dead.c.status == "kept"))).all()
            return sorted(row.event_type for row in kept) == [
                "CalendarBookingFailed",
                "SystemErrorReported",
            ]

        await eventually(both_dead, what="the event and its report dead-lettered")
        await notifications.spy.settle()
        [report] = notifications.reported()
        assert _payload(report)["message_type"] == "CalendarBookingFailed"
        assert await notifications.rows() == []


def calendar_failed_event(**ids: Any) -> CalendarBookingFailed:
    return CalendarBookingFailed(
        session_id=ids.get("session_id", uuid.uuid4()),
        order_id=ids.get("order_id", uuid.uuid4()),
        mentor_id=ids.get("mentor_id", uuid.uuid4()),
        reason=CalendarFailureReason.CALENDAR_API_ERROR,
        detail=ids.get("detail", "Google answered 503 three times"),
        attempts=3,
        final=True,
    )


def _payload(message: Any) -> dict[str, Any]:
    return json.loads(message.body)["payload"]


class TestRetriedAttempts:
    async def test_an_attempt_the_calendar_retries_is_consumed_without_a_notification(
        self, handling
    ) -> None:
        attempt = calendar_failed_event().model_copy(update={"final": False})
        final = calendar_failed_event().model_copy(update={"final": True})
        await handling.handled(await handling.deliver(attempt))
        assert await handling.rows() == []
        row = await handling.raise_(final)
        assert SEVERITIES[row["severity"]] == "Critical"

"""What an admin notification is, and which one each failure event raises. Pure: no I/O, no clock.

The mapping table (`MAPPINGS`) is the one place that says, for every event this service
consumes, the notification it becomes: its type and severity (per reason or kind), its title,
its message, the metadata it carries and the ids that make its fingerprint. How severities are
chosen:

- **Critical**: money is held that no live order can take (it must be refunded or reconciled by
  hand), a booking is stuck for a reason nobody but an admin will fix (the mentor unknown to the
  calendar, an unexpected error), a message was dead-lettered, or a whole service (or its
  database or broker) fails its health check.
- **Error**: something failed and needs an admin, but nothing is lost: an integration to repair,
  a payment that did not match its order, a component that is degraded.
- **Warning**: suspicious but harmless on its own (a payment reference Konnect never issued).
- **Info**: good news (a component passes its health check again).

| event | reason / kind | type | severity |
|---|---|---|---|
| CalendarBookingFailed | store_not_found, calendar_api_error, unexpected_error, not final (5) | | |
| CalendarBookingFailed | mentor_not_integrated, not final | IntegrationFailure | Error |
| CalendarBookingFailed | integration_revoked, not final | IntegrationFailure | Error |
| CalendarBookingFailed | any reason, final (3) | IntegrationFailure | Critical |
| PaymentAnomalyDetected | unknown_payment_ref | PaymentAnomaly | Warning |
| PaymentAnomalyDetected | amount_mismatch | PaymentAnomaly | Error |
| PaymentAnomalyDetected | currency_mismatch | PaymentAnomaly | Error |
| PaymentAnomalyDetected | underpayment | PaymentAnomaly | Error |
| PaymentAnomalyDetected | payment_for_cancelled_order | PaymentAnomaly | Critical |
| PaymentAnomalyDetected | payment_for_ended_order | PaymentAnomaly | Critical |
| PaymentAnomalyDetected | underpaid_order_expired | PaymentAnomaly | Critical |
| PaymentInitiationFailed | (any reason) | PaymentAnomaly | Error |
| SessionIssueDetected | payment_for_unknown_order | SessionIssue | Critical |
| SessionIssueDetected | payment_for_cancelled_order | SessionIssue | Critical |
| SessionIssueDetected | payment_for_paid_order | SessionIssue | Critical |
| SessionIssueDetected | currency_mismatch | SessionIssue | Error |
| SessionIssueDetected | underpayment | SessionIssue | Error |
| SessionIssueDetected | payment_never_opened | SessionIssue | Error |
| EscrowFrozen | frozen | PaymentAnomaly | Error |
| EscrowRefundDue | refund_due | PaymentAnomaly | Critical |
| EscrowRefunded | refunded | PaymentAnomaly | Info |
| EscrowUnfrozen | unfrozen | PaymentAnomaly | Info |
| SystemErrorReported | dead_lettered | SystemError | Critical |
| SystemErrorReported | unroutable | SystemError | Error |
| AdminActionRecorded | each action (4) | by action | Info |
| HealthCheckFailed | failing_vital (1) | HealthCheckFailure | Critical |
| HealthCheckFailed | failing (2) | HealthCheckFailure | Error |
| HealthCheckRecovered | recovered | HealthCheckFailure | Info |

(1) status `fail`, and the component is a whole service (`orders:health`, as the gateway's
monitor names them, or `orders`) or a database or broker (`database:...`, `rabbitmq:...`).
(2) anything else: a `warn`, or a component such as an outside system.
(3) the calendar gave up: the session will not take place as paid and its escrow is frozen.
A final failure is its own notification (its reason key is `<reason>:final`), apart from the
earlier ones of the same booking.
(4) on dead letters SystemError, on an order SessionIssue, on a scheduling IntegrationFailure,
on an escrow PaymentAnomaly, on a mentor's identity-provider link SystemError.
(5) no notification: the calendar tries again on its schedule; only the final failure is news.

What each alert means and what to do about it: docs/alerts.md.

A kind this table does not know yet (a producer added one) still raises a notification, with the
event's fallback (Error for payment anomalies and session issues): nothing is ever dropped.

**Fingerprint.** The type, the event, the reason and the subject's ids (order, session, mentor,
payment ref, component, dead-lettered message), hashed. A repeat of the same fingerprint within
the dedup window of the notification's first occurrence counts up on that notification instead
of adding one; alerts about different bookings stay apart. Webhooks for payment refs none of our
payments has are the exception (`Kind.tallied`): payments reports them many at once, and their
notification has no subject, so a flood of any size is one notification per window, its
`occurrences` the webhooks counted and its metadata the first and the last refs (a bounded
sample). The window runs from the first
occurrence, not the latest, so a notification that keeps recurring is renewed every window and
stays near the top of a feed ordered newest first. A HealthCheckRecovered closes its component's
open failure, so the next failure is a new notification (a new incident).

Times are the events' `occurred_at`: when the failure happened, not when it was handled.

**Routing to people** (the last section): which channels (webhook, email) take a notification,
the quiet period between two sends of one notification on a channel, the retry schedule, the
idempotency key of each delivery, the messages sent, and the alerts about a failing channel.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta
from enum import IntEnum, StrEnum
from typing import Any, Literal, TypeVar

from booking.contracts import (
    UNKNOWN_REF_SAMPLE,
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
    PaymentInitiationFailed,
    SessionIssueDetected,
    SystemErrorReported,
)
from booking.contracts.http import cursor_text, cursor_token
from booking.runtime.domain import DomainError, keep_ends


class NotificationType(IntEnum):
    """Stored as these small integers (the ops queries of docs/operations.md use them); the API
    speaks names."""

    IntegrationFailure = 0
    PaymentAnomaly = 1
    SessionIssue = 2
    SystemError = 3
    HealthCheckFailure = 4


class Severity(IntEnum):
    """Stored as these small integers, so `severity = 3` reads as Critical in SQL."""

    Info = 0
    Warning = 1
    Error = 2
    Critical = 3


# Short names for the mapping table (not the bare names: Warning and SystemError are builtins).
T, S = NotificationType, Severity

MAX_TEXT = 8_000
"""Longest detail kept in metadata (stack traces can be long); the message carries a summary."""
MAX_SUMMARY = 300
MAX_ID = 2**63 - 1
"""The largest notification id (BIGINT)."""


@dataclass(frozen=True)
class Kind:
    """What one reason of an event becomes. `title` is formatted with the event's payload."""

    type: NotificationType
    severity: Severity
    title: str
    tallied: bool = False
    """Reports of many occurrences at once, whatever their subject (`Tally`): they count up on
    one notification per window, which lists a sample of their refs."""


@dataclass(frozen=True)
class Mapping:
    """How one event becomes a notification (one row of the table per reason in `kinds`)."""

    kinds: dict[str, Kind]
    reason: Callable[[Any], str]
    """Which entry of `kinds` applies."""
    message: Callable[[Any], str]
    metadata: tuple[str, ...]
    """Payload fields copied into the metadata (plus `reason`)."""
    subject: tuple[str, ...]
    """Payload fields that name what the alert is about: with the reason, the fingerprint."""
    fallback: Kind | None = None
    """For a reason `kinds` does not know (yet): the alert is raised all the same."""
    metadata_reason: Callable[[Any], str] | None = None
    """The `reason` in metadata, when it is not the mapping's (a free-form payload reason)."""
    silent: Callable[[Any], bool] | None = None
    """Events of this type that raise no notification (an attempt that will be retried)."""


def _summary(text: str) -> str:
    """One line of a detail for a message: a stack trace's last line (the exception), clipped."""
    lines = [line.strip() for line in clean(text).splitlines() if line.strip()]
    if not lines:
        return "no detail given"
    line = lines[-1] if lines[0].startswith("Traceback") else lines[0]
    return line if len(line) <= MAX_SUMMARY else line[: MAX_SUMMARY - 1] + "…"


def _name(value: Any) -> str:
    """An enum member's value (or a plain string, as a newer producer may send)."""
    return str(getattr(value, "value", value))


def _attempts(n: int) -> str:
    return f"{n} attempt" if n == 1 else f"{n} attempts"


def _calendar_message(e: CalendarBookingFailed) -> str:
    ending = (
        " The calendar has given up: the session will not take place as paid and its escrow is "
        "frozen until an admin retries the scheduling, releases or refunds it."
        if e.final
        else ""
    )
    return (
        f"Session {e.session_id} of order {e.order_id} (mentor {e.mentor_id}) could not be put "
        f"in the mentor's Google Calendar after {_attempts(e.attempts)}: "
        f"{_summary(e.detail)}{ending}"
    )


# Failures the calendar retries on its own schedule: only the final one is news.
_RETRIED_ON_SCHEDULE = frozenset(
    {
        CalendarFailureReason.CALENDAR_API_ERROR.value,
        CalendarFailureReason.UNEXPECTED_ERROR.value,
        CalendarFailureReason.STORE_NOT_FOUND.value,
    }
)


def _calendar_reason(e: CalendarBookingFailed) -> str:
    return f"{_name(e.reason)}:final" if e.final else _name(e.reason)


def _money(amount: int, currency: str) -> str:
    return f"{amount} {currency} (minor units)"


def _escrow_message(e: EscrowFrozen | EscrowRefundDue | EscrowRefunded | EscrowUnfrozen) -> str:
    by_whom = getattr(e, "by", None)  # EscrowUnfrozen names no one
    by = f" by {by_whom}" if by_whom else ""
    escrow = f"The escrow of order {e.order_id} ({_money(e.escrow_amount, e.currency)})"
    if isinstance(e, EscrowFrozen):
        return (
            f"{escrow} is frozen{by}: {_summary(e.reason)}. It is never released on its own: "
            "an admin releases it to the mentor or refunds the mentee."
        )
    if isinstance(e, EscrowRefundDue):
        return (
            f"{_money(e.refund_amount, e.currency)} paid for order {e.order_id} is owed back to "
            f"the mentee{by}: {_summary(e.reason)}. Konnect has no refund API: pay it back, then "
            "record the refund with its reference."
        )
    if isinstance(e, EscrowRefunded):
        return (
            f"The refund of {_money(e.refund_amount, e.currency)} for order {e.order_id} was "
            f"recorded{by} (reference {e.reference}): {_summary(e.reason)}"
        )
    return f"{escrow} is held again: {_summary(e.reason)}"


def _admin_message(e: AdminActionRecorded) -> str:
    subject = ", ".join(
        f"{name} {value}"
        for name, value in (
            ("order", e.order_id),
            ("session", e.session_id),
            ("dead letter", e.dead_letter_id),
        )
        if value
    )
    detail = f" ({_summary(e.detail)})" if e.detail else ""
    return f"{e.by} did {_name(e.action)} on {subject or e.service}{detail}: {_summary(e.reason)}"


def _anomaly_message(e: PaymentAnomalyDetected) -> str:
    order = f"order {e.order_id}" if e.order_id else "no known order"
    return f"Payment {e.payment_ref} ({order}): {_summary(e.detail)}"


def _initiation_message(e: PaymentInitiationFailed) -> str:
    return (
        f"Konnect would not open the payment of order {e.order_id} ({e.reason}), so the mentee "
        f"has nothing to pay with: {_summary(e.detail)}"
    )


def _session_message(e: SessionIssueDetected) -> str:
    session = f", session {e.session_id}" if e.session_id else ""
    return f"Order {e.order_id}{session}: {_summary(e.detail)}"


def _system_message(e: SystemErrorReported) -> str:
    if _name(e.kind) == "unroutable":
        return (
            f"{e.service} publishes {e.message_type} events that no queue takes; they wait in "
            f"its outbox and go out once a queue is bound to them: {_summary(e.error)}"
        )
    what = f"a {e.message_type} message" if e.message_type else "an unreadable message"
    ident = f" ({e.dead_lettered_message_id})" if e.dead_lettered_message_id else ""
    kept = (
        f"dead letter {e.dead_letter_id}"
        if e.dead_letter_id
        else f"the dead letters of {e.consumer}"
    )
    return (
        f"{e.service} could not handle {what}{ident} after {_attempts(e.attempts)}; it is kept "
        f"as {kept}, to replay or discard: {_summary(e.error)}"
    )


def _health_message(e: HealthCheckFailed | HealthCheckRecovered) -> str:
    return f"{e.component} reports {e.status}: {_summary(e.output)}"


_VITAL_COMPONENTS = ("database", "postgres", "rabbitmq", "broker")


def health_reason(event: HealthCheckFailed) -> str:
    """failing_vital (Critical) or failing (Error): see the module's table."""
    name, _, measurement = event.component.partition(":")
    whole_service = measurement in ("", "health")
    vital = whole_service or name.lower().startswith(_VITAL_COMPONENTS)
    return "failing_vital" if event.status == "fail" and vital else "failing"


_CALENDAR_TITLE = "Calendar booking failed: "
_ABANDONED_TITLE = "Calendar booking abandoned: "
_ADMIN_TYPES = {
    AdminAction.REPLAY_DEAD_LETTER: T.SystemError,
    AdminAction.DISCARD_DEAD_LETTER: T.SystemError,
    AdminAction.CANCEL_ORDER: T.SessionIssue,
    AdminAction.RETRY_SCHEDULING: T.IntegrationFailure,
    AdminAction.RELEASE_ESCROW: T.PaymentAnomaly,
    AdminAction.REFUND_ESCROW: T.PaymentAnomaly,
    AdminAction.RECORD_REFUND: T.PaymentAnomaly,
    AdminAction.LINK_MENTOR_IDENTITY: T.SystemError,
}
_ESCROW_METADATA = ("order_id", "mentor_id", "escrow_amount", "currency", "by")

MAPPINGS: dict[type[Event], Mapping] = {
    CalendarBookingFailed: Mapping(
        kinds={
            "store_not_found": Kind(
                T.IntegrationFailure,
                S.Critical,
                _CALENDAR_TITLE + "the mentor is unknown to the calendar service",
            ),
            "mentor_not_integrated": Kind(
                T.IntegrationFailure,
                S.Error,
                _CALENDAR_TITLE + "the mentor has not connected Google Calendar",
            ),
            "integration_revoked": Kind(
                T.IntegrationFailure,
                S.Error,
                _CALENDAR_TITLE + "the mentor's Google access was revoked",
            ),
            "calendar_api_error": Kind(
                T.IntegrationFailure, S.Error, _CALENDAR_TITLE + "Google Calendar kept failing"
            ),
            "unexpected_error": Kind(
                T.IntegrationFailure, S.Critical, _CALENDAR_TITLE + "unexpected error"
            ),
            "store_not_found:final": Kind(
                T.IntegrationFailure,
                S.Critical,
                _ABANDONED_TITLE + "the mentor is unknown to the calendar service",
            ),
            "mentor_not_integrated:final": Kind(
                T.IntegrationFailure,
                S.Critical,
                _ABANDONED_TITLE + "the mentor did not connect Google Calendar in time",
            ),
            "integration_revoked:final": Kind(
                T.IntegrationFailure,
                S.Critical,
                _ABANDONED_TITLE + "the mentor did not reconnect Google Calendar in time",
            ),
            "calendar_api_error:final": Kind(
                T.IntegrationFailure,
                S.Critical,
                _ABANDONED_TITLE + "Google Calendar kept failing",
            ),
            "unexpected_error:final": Kind(
                T.IntegrationFailure, S.Critical, _ABANDONED_TITLE + "unexpected error"
            ),
        },
        reason=_calendar_reason,
        message=_calendar_message,
        metadata=(
            "order_id",
            "session_id",
            "mentor_id",
            "detail",
            "attempts",
            "final",
            "next_attempt_at",
        ),
        subject=("order_id", "session_id", "mentor_id"),
        fallback=Kind(T.IntegrationFailure, S.Critical, _CALENDAR_TITLE + "{reason}"),
        metadata_reason=lambda e: _name(e.reason),
        silent=lambda e: not e.final and _name(e.reason) in _RETRIED_ON_SCHEDULE,
    ),
    PaymentAnomalyDetected: Mapping(
        kinds={
            "unknown_payment_ref": Kind(
                T.PaymentAnomaly,
                S.Warning,
                "Payment notifications for unknown references",
                tallied=True,
            ),
            "amount_mismatch": Kind(
                T.PaymentAnomaly, S.Error, "Payment amount does not match its order"
            ),
            "currency_mismatch": Kind(
                T.PaymentAnomaly, S.Error, "Payment currency does not match its order"
            ),
            "underpayment": Kind(T.PaymentAnomaly, S.Error, "Order underpaid"),
            "payment_for_cancelled_order": Kind(
                T.PaymentAnomaly, S.Critical, "Money received for a cancelled order"
            ),
            "payment_for_ended_order": Kind(
                T.PaymentAnomaly, S.Critical, "Money received for an order that had ended"
            ),
            "underpaid_order_expired": Kind(
                T.PaymentAnomaly,
                S.Critical,
                "Underpaid order expired: what was paid must be refunded",
            ),
        },
        reason=lambda e: _name(e.kind),
        message=_anomaly_message,
        metadata=("payment_ref", "order_id", "detail"),
        subject=("payment_ref", "order_id"),
        fallback=Kind(T.PaymentAnomaly, S.Error, "Payment anomaly: {kind}"),
    ),
    PaymentInitiationFailed: Mapping(
        kinds={
            "payment_initiation_failed": Kind(
                T.PaymentAnomaly, S.Error, "Payment could not be opened at Konnect"
            ),
        },
        reason=lambda e: "payment_initiation_failed",
        message=_initiation_message,
        metadata=("order_id", "detail"),
        subject=("order_id",),
        metadata_reason=lambda e: e.reason,
    ),
    SessionIssueDetected: Mapping(
        kinds={
            "payment_for_unknown_order": Kind(
                T.SessionIssue, S.Critical, "Money received for an order we do not know"
            ),
            "payment_for_cancelled_order": Kind(
                T.SessionIssue, S.Critical, "Money received for a cancelled order"
            ),
            "payment_for_paid_order": Kind(
                T.SessionIssue, S.Critical, "A second payment for an order already paid"
            ),
            "currency_mismatch": Kind(
                T.SessionIssue, S.Error, "Payment in another currency than its order's"
            ),
            "underpayment": Kind(T.SessionIssue, S.Error, "Order underpaid: it stays unpaid"),
            "payment_never_opened": Kind(
                T.SessionIssue, S.Error, "Order failed: its payment never opened"
            ),
        },
        reason=lambda e: _name(e.kind),
        message=_session_message,
        metadata=("order_id", "session_id", "detail"),
        subject=("order_id", "session_id"),
        fallback=Kind(T.SessionIssue, S.Error, "Session issue: {kind}"),
    ),
    SystemErrorReported: Mapping(
        kinds={
            "dead_lettered": Kind(
                T.SystemError, S.Critical, "Message dead-lettered by {service}: {message_type}"
            ),
            "unroutable": Kind(
                T.SystemError, S.Error, "Events nobody receives: {message_type} from {service}"
            ),
        },
        reason=lambda e: _name(e.kind),
        message=_system_message,
        metadata=(
            "service",
            "consumer",
            "message_type",
            "dead_lettered_message_id",
            "dead_letter_id",
            "error",
            "attempts",
        ),
        subject=("service", "consumer", "message_type", "dead_lettered_message_id"),
        fallback=Kind(T.SystemError, S.Critical, "System error in {service}: {kind}"),
    ),
    EscrowFrozen: Mapping(
        kinds={
            "frozen": Kind(
                T.PaymentAnomaly, S.Error, "Escrow frozen: release it or refund the mentee"
            )
        },
        reason=lambda e: "frozen",
        message=_escrow_message,
        metadata=_ESCROW_METADATA,
        subject=("order_id",),
        metadata_reason=lambda e: e.reason,
    ),
    EscrowUnfrozen: Mapping(
        kinds={
            "unfrozen": Kind(
                T.PaymentAnomaly, S.Info, "Escrow held again: the session was scheduled"
            )
        },
        reason=lambda e: "unfrozen",
        message=_escrow_message,
        metadata=("order_id", "mentor_id", "escrow_amount", "currency", "release_due_at"),
        subject=("order_id",),
        metadata_reason=lambda e: e.reason,
    ),
    EscrowRefundDue: Mapping(
        kinds={
            "refund_due": Kind(
                T.PaymentAnomaly, S.Critical, "Refund owed: pay the mentee back, then record it"
            )
        },
        reason=lambda e: "refund_due",
        message=_escrow_message,
        metadata=(*_ESCROW_METADATA, "refund_amount"),
        subject=("order_id",),
        metadata_reason=lambda e: e.reason,
    ),
    EscrowRefunded: Mapping(
        kinds={"refunded": Kind(T.PaymentAnomaly, S.Info, "Refund recorded")},
        reason=lambda e: "refunded",
        message=_escrow_message,
        metadata=(*_ESCROW_METADATA, "refund_amount", "reference"),
        subject=("order_id",),
        metadata_reason=lambda e: e.reason,
    ),
    AdminActionRecorded: Mapping(
        kinds={
            action.value: Kind(_ADMIN_TYPES[action], S.Info, "Admin action: {action} by {by}")
            for action in AdminAction
        },
        reason=lambda e: _name(e.action),
        message=_admin_message,
        metadata=(
            "action",
            "service",
            "by",
            "at",
            "order_id",
            "session_id",
            "dead_letter_id",
            "detail",
        ),
        # Each action is news of its own: two replays of one dead letter are two notifications.
        subject=("service", "order_id", "session_id", "dead_letter_id", "at"),
        fallback=Kind(T.SystemError, S.Info, "Admin action: {action} by {by}"),
        metadata_reason=lambda e: e.reason,
    ),
    HealthCheckFailed: Mapping(
        kinds={
            "failing_vital": Kind(
                T.HealthCheckFailure, S.Critical, "{component} is failing its health check"
            ),
            "failing": Kind(
                T.HealthCheckFailure, S.Error, "{component} is failing its health check"
            ),
        },
        reason=health_reason,
        message=_health_message,
        metadata=("component", "status", "output"),
        subject=("component",),
    ),
    HealthCheckRecovered: Mapping(
        kinds={
            "recovered": Kind(
                T.HealthCheckFailure, S.Info, "{component} passes its health check again"
            ),
        },
        reason=lambda e: "recovered",
        message=_health_message,
        metadata=("component", "status", "output"),
        subject=("component",),
    ),
}
"""The mapping table: every event this service consumes, and what it becomes."""


@dataclass(frozen=True)
class Alert:
    """A notification about to be stored (or counted up on the open one with its fingerprint)."""

    type: NotificationType
    severity: Severity
    title: str
    message: str
    metadata: dict[str, Any]
    fingerprint: str
    occurred_at: datetime
    reason: str = field(compare=False)
    occurrences: int = 1
    """How many occurrences it counts (a tally reports many at once)."""
    tallied: bool = False
    """A tally's report (`Kind.tallied`): see `counted_onto`."""

    def counted_onto(
        self, stored: dict[str, Any], occurrences: int, first_at: datetime, last_at: datetime
    ) -> Alert:
        """This tally's report as it counts up on the open notification of its fingerprint
        (its `stored` metadata, `occurrences`, first and last occurrence): the refs both list
        merged, the first ones kept and the latest updated (a report that occurred before the
        notification's first puts its refs first; one between them, among the middle: the
        sample is a guide, not a log), the total in message and metadata. Other alerts are
        returned as they are."""
        if not self.tallied:
            return self
        theirs_first = _refs(stored.get("first_payment_refs")) or _refs([stored.get("payment_ref")])
        theirs = (*theirs_first, *_refs(stored.get("last_payment_refs")))
        mine = (*self.metadata["first_payment_refs"], *self.metadata["last_payment_refs"])
        newest = self.occurred_at >= last_at
        if self.occurred_at < first_at:  # it arrived late: its refs came before
            run = (*mine, *theirs)
        elif not newest:
            run = (*theirs_first, *mine, *theirs[len(theirs_first) :])
        else:
            run = (*theirs, *mine)
        first: list[str] = []
        last: list[str] = []
        for ref in run:
            keep_ends(first, last, ref, UNKNOWN_REF_SAMPLE)
        latest = dict(self.metadata)
        if not newest:  # the stored notification's own latest stay, as far as they are readable
            for key in ("payment_ref", "detail"):
                if isinstance(stored.get(key), str) and stored[key]:
                    latest[key] = stored[key]
        total = occurrences + self.occurrences
        merged = {
            **latest,
            "webhooks": total,
            "first_payment_refs": first,
            "last_payment_refs": last,
        }
        return replace(self, metadata=merged, message=_tally_message(total, merged))


def clean(text: str) -> str:
    """Text Postgres can store: no NUL character (a detail may carry one from outside)."""
    return text.replace("\x00", "\ufffd")


def _clean_value(value: Any) -> Any:
    if isinstance(value, str):
        value = clean(value)
        return value if len(value) <= MAX_TEXT else value[: MAX_TEXT - 1] + "…"
    return value


def _refs(value: Any) -> list[str]:
    """The refs a stored list holds (stored metadata is only trusted as far as it is checked)."""
    if not isinstance(value, list):
        return []
    return [ref for ref in value if isinstance(ref, str) and ref][:UNKNOWN_REF_SAMPLE]


def _tally_message(total: int, metadata: dict[str, Any]) -> str:
    refs = [*metadata["first_payment_refs"], *metadata["last_payment_refs"]]
    latest = metadata["payment_ref"]
    if total == 1:
        return (
            f"A webhook named payment {latest}, which none of our payments has: forged or "
            "mistaken. Konnect only sends the refs we create, so it was not asked."
        )
    return (
        f"{total} webhooks named payment refs none of our payments has: forged or mistaken. "
        f"Konnect only sends the refs we create, so it was not asked. Latest: {latest}; the "
        f"first {len(metadata['first_payment_refs'])} and the last "
        f"{len(metadata['last_payment_refs'])} of {len(set(refs))} listed refs are in the "
        "metadata."
    )


def _tally(event: PaymentAnomalyDetected, kind: Kind, reason: str, occurred_at: datetime) -> Alert:
    """A report of many webhooks for unknown refs, as one notification (counted on by more)."""
    sample = [clean(ref) for ref in (event.payment_refs or [event.payment_ref])]
    first: list[str] = []
    last: list[str] = []
    for ref in sample:
        keep_ends(first, last, ref, UNKNOWN_REF_SAMPLE)
    metadata = {
        "payment_ref": clean(event.payment_ref),
        "order_id": None,
        "detail": _clean_value(event.detail),
        "reason": reason,
        "webhooks": event.occurrences,
        "first_payment_refs": first,
        "last_payment_refs": last,
    }
    return Alert(
        type=kind.type,
        severity=kind.severity,
        title=kind.title,
        message=_tally_message(event.occurrences, metadata),
        metadata=metadata,
        # No subject: every report counts up on one notification per window.
        fingerprint=fingerprint(kind.type.name, event.event_type(), reason),
        occurred_at=occurred_at,
        reason=reason,
        occurrences=event.occurrences,
        tallied=True,
    )


def fingerprint(*parts: str) -> str:
    """A fixed-size key of an alert's identity (type, event, reason, subject ids)."""
    joined = "\x1f".join(parts)  # a separator no id contains
    return hashlib.sha256(joined.encode()).hexdigest()[:40]


def _fingerprint_of(event: Event, mapping: Mapping, kind: Kind, reason: str) -> str:
    payload = event.model_dump(mode="json")
    subject = [f"{name}={payload.get(name) or ''}" for name in mapping.subject]
    return fingerprint(kind.type.name, event.event_type(), reason, *subject)


def raises_alert(event: Event) -> bool:
    """Whether `event` becomes a notification at all (some attempts are only recorded)."""
    silent = MAPPINGS[type(event)].silent
    return silent is None or not silent(event)


def alert_for(event: Event, occurred_at: datetime) -> Alert:
    """The notification `event` raises, by the mapping table."""
    mapping = MAPPINGS[type(event)]
    reason = mapping.reason(event)
    kind = mapping.kinds.get(reason) or mapping.fallback
    if kind is None:
        raise KeyError(f"{event.event_type()} reason {reason!r} is not in the mapping table")
    if kind.tallied and isinstance(event, PaymentAnomalyDetected):
        return _tally(event, kind, reason, occurred_at)
    payload = event.model_dump(mode="json")
    metadata_reason = mapping.metadata_reason(event) if mapping.metadata_reason else reason
    metadata = {name: _clean_value(payload.get(name)) for name in mapping.metadata}
    metadata["reason"] = _clean_value(metadata_reason)
    fields = {name: clean(str(value)) for name, value in payload.items()}
    fields.setdefault("reason", reason)
    if fields.get("message_type") in (None, "None"):
        fields["message_type"] = "unreadable"
    return Alert(
        type=kind.type,
        severity=kind.severity,
        title=_clean_value(kind.title.format_map(fields)),
        message=_clean_value(clean(mapping.message(event))),
        metadata=metadata,
        fingerprint=_fingerprint_of(event, mapping, kind, reason),
        occurred_at=occurred_at,
        reason=reason,
    )


def failures_closed_by(event: HealthCheckRecovered) -> list[str]:
    """The fingerprints of the failure notifications a recovery closes (either severity)."""
    mapping = MAPPINGS[HealthCheckFailed]
    failed = HealthCheckFailed(component=event.component, status="fail", output="")
    return [
        _fingerprint_of(failed, mapping, kind, reason) for reason, kind in mapping.kinds.items()
    ]


# --- the feed's filters and cursor ----------------------------------------------------------


class InvalidFilter(DomainError, ValueError):
    """A filter value or cursor the feed does not understand (the API answers 422)."""


L = TypeVar("L", bound=IntEnum)


def parse_level(levels: type[L], value: str, what: str) -> L:
    """A severity or type given by name (any case) or by its number."""
    text = value.strip()
    if text.isdigit():
        try:
            return levels(int(text))
        except ValueError:
            pass
    else:
        for level in levels:
            if level.name.lower() == text.lower():
                return level
    names = ", ".join(f"{level.name} ({level.value})" for level in levels)
    raise InvalidFilter(f"{what} must be one of {names}; got {value!r}")


@dataclass(frozen=True)
class Cursor:
    """Where a page ended: the last id given, and the order (newest first, or ascending)."""

    last_id: int
    ascending: bool = False

    def encode(self) -> str:
        return cursor_token(f"{'a' if self.ascending else 'd'}{self.last_id}")

    @classmethod
    def decode(cls, token: str) -> Cursor:
        try:
            raw = cursor_text(token)
        except ValueError:
            raw = ""
        valid = 2 <= len(raw) <= 20 and raw[0] in "ad" and raw[1:].isdigit()
        if not valid or int(raw[1:]) > MAX_ID:
            raise InvalidFilter("cursor is not one this feed gave; start again without it")
        return cls(int(raw[1:]), ascending=raw[0] == "a")


def summary_days(today: date, days: int) -> list[date]:
    """The last `days` UTC days, today included, oldest first."""
    return [today - timedelta(days=n) for n in range(days - 1, -1, -1)]


@dataclass(frozen=True)
class Filters:
    """The feed's filters; each one given narrows it (they combine with AND).

    `since` compares with `last_occurred_at`: a notification shows if it happened, first or
    again, at or after `since`.
    """

    unread_only: bool = False
    severity: Severity | None = None
    min_severity: Severity | None = None
    type: NotificationType | None = None
    since: datetime | None = None

    @classmethod
    def parse(
        cls,
        *,
        unread_only: bool | None = None,
        severity: str | None = None,
        min_severity: str | None = None,
        type: str | None = None,
        since: datetime | None = None,
    ) -> Filters:
        return cls(
            unread_only=bool(unread_only),
            severity=None if severity is None else parse_level(Severity, severity, "severity"),
            min_severity=(
                None if min_severity is None else parse_level(Severity, min_severity, "minSeverity")
            ),
            type=None if type is None else parse_level(NotificationType, type, "type"),
            since=since,
        )


# --- stored notifications -------------------------------------------------------------------


@dataclass(frozen=True)
class Notification:
    """A notification as stored: an alert with its id, its read state and its occurrences."""

    id: int
    type: NotificationType
    severity: Severity
    title: str
    message: str
    metadata: dict[str, Any]
    is_read: bool
    read_at: datetime | None
    created_at: datetime
    """Its first occurrence."""
    fingerprint: str
    occurrences: int
    last_occurred_at: datetime

    def public_fields(self) -> dict[str, Any]:
        """Its fields as the admins see them (the feed's items, AdminNotificationRaised): type
        and severity by name."""
        return {
            "id": self.id,
            "type": self.type.name,
            "severity": self.severity.name,
            "title": self.title,
            "message": self.message,
            "metadata": self.metadata,
            "is_read": self.is_read,
            "read_at": self.read_at,
            "created_at": self.created_at,
            "fingerprint": self.fingerprint,
            "occurrences": self.occurrences,
            "last_occurred_at": self.last_occurred_at,
        }


@dataclass(frozen=True)
class Stored:
    """A notification as an alert left it, and whether the alert created it (or counted up)."""

    notification: Notification
    created: bool


@dataclass(frozen=True)
class FeedPage:
    """One page of the feed, and where the next one starts (None: this was the last)."""

    items: list[Notification]
    next_cursor: Cursor | None


@dataclass(frozen=True)
class DayCount:
    """How many notifications of one severity were raised on one UTC day."""

    day: date
    severity: Severity
    count: int


# --- routing alerts to people ---------------------------------------------------------------
#
# Besides the feed, a notification may go to people through channels: a webhook (Slack's
# incoming-webhook shape) and email. Each (notification, occurrence, channel) is one delivery,
# queued in the transaction that stores or counts up the notification and sent later by the
# dispatcher, on a retry schedule of its own (docs/alerts.md, "Routing alerts to people").


class Channel(StrEnum):
    """Where alerts go besides the feed; stored by these names."""

    webhook = "webhook"
    email = "email"


class DeliveryStatus(StrEnum):
    """A delivery's state, stored by these names."""

    pending = "pending"
    """Waits for its `next_attempt_at`."""
    sending = "sending"
    """Claimed by a dispatcher until its `next_attempt_at` (a lease: if that dispatcher dies, the
    delivery is due again then, with the same idempotency key)."""
    sent = "sent"
    failed = "failed"
    """Given up: every attempt failed over the retry schedule."""
    superseded = "superseded"
    """A later occurrence of its notification goes on its channel instead (it carries the count)."""


UNSENT = (DeliveryStatus.pending, DeliveryStatus.sending)

CHANNEL_FAILING = "alert_channel_failing"
CHANNEL_RECOVERED = "alert_channel_recovered"
ABOUT_CHANNEL = "alert_channel"
"""The metadata key naming the channel a notification is about: it never goes through that one."""

_DELIVERY_KEYS = uuid.UUID("5f0c2b7e-9d1a-4c3e-8b6f-2a7d4e1c9b30")


def delivery_key(notification_id: int, occurrence: int, channel: Channel) -> str:
    """The idempotency key of one delivery: derived from what it delivers, so every attempt of
    it, from any replica and after any restart, carries the same key."""
    return str(uuid.uuid5(_DELIVERY_KEYS, f"{notification_id}:{occurrence}:{channel.value}"))


@dataclass(frozen=True)
class Route:
    """Which notifications one channel takes: at least `min_severity`, of `types` (empty: all)."""

    channel: Channel
    min_severity: Severity
    types: frozenset[NotificationType] = frozenset()

    def takes(self, notification: Notification) -> bool:
        if notification.metadata.get(ABOUT_CHANNEL) == self.channel.value:
            return False  # news of a failing channel cannot go through it (nor loop on it)
        if self.types and notification.type not in self.types:
            return False
        return notification.severity >= self.min_severity


@dataclass(frozen=True)
class RetrySchedule:
    """After each failed attempt: wait `first`, then twice as long each time, at most `longest`;
    the last attempt is made `give_up_after` the delivery was queued, and if it fails too the
    delivery is given up."""

    first: timedelta
    longest: timedelta
    give_up_after: timedelta

    def delay(self, failures: int) -> timedelta:
        """The wait after the `failures`-th failure in a row (1 for the first)."""
        doublings = min(max(failures, 1) - 1, 60)  # 2**60 of any first is past any longest
        seconds = self.first.total_seconds() * 2.0**doublings
        return timedelta(seconds=min(seconds, self.longest.total_seconds()))

    def next_attempt(self, queued_at: datetime, failures: int, now: datetime) -> datetime | None:
        """When to try again after the `failures`-th failure at `now`; None: give up."""
        deadline = queued_at + self.give_up_after
        if now >= deadline:
            return None
        return min(now + self.delay(failures), deadline)


@dataclass(frozen=True)
class Routing:
    """The routes of every configured channel, the quiet period and the retry schedule."""

    routes: tuple[Route, ...] = ()
    quiet_period: timedelta = timedelta(0)
    retries: RetrySchedule = RetrySchedule(
        timedelta(seconds=10), timedelta(hours=1), timedelta(hours=24)
    )

    @property
    def channels(self) -> tuple[Channel, ...]:
        return tuple(route.channel for route in self.routes)

    def channels_for(self, notification: Notification) -> list[Channel]:
        """The channels `notification` goes to."""
        return [route.channel for route in self.routes if route.takes(notification)]

    def first_due(self, now: datetime, last_sent_at: datetime | None) -> datetime:
        """When a new delivery is due: at once, unless its notification was sent on the same
        channel within the quiet period (a count-up): then when the period ends. The first
        occurrence (nothing sent yet) always goes at once."""
        if last_sent_at is None:
            return now
        return max(now, last_sent_at + self.quiet_period)


def snapshot(notification: Notification) -> dict[str, Any]:
    """A notification as a delivery keeps it (JSON): what it said at that occurrence."""
    fields = notification.public_fields()
    return {
        name: value.isoformat() if isinstance(value, datetime) else value
        for name, value in fields.items()
    }


@dataclass(frozen=True)
class NewDelivery:
    """A delivery about to be queued."""

    notification_id: int
    occurrence: int
    channel: Channel
    payload: dict[str, Any]
    queued_at: datetime
    due_at: datetime

    @property
    def key(self) -> str:
        return delivery_key(self.notification_id, self.occurrence, self.channel)


@dataclass(frozen=True)
class DueDelivery:
    """A delivery due now, as a dispatcher found it (locked), with what it knows of the other
    deliveries of the same notification on the same channel."""

    id: int
    notification_id: int
    occurrence: int
    channel: Channel
    newest_occurrence: int
    """The newest occurrence queued or sent on this channel for the notification (its own
    included)."""
    last_sent_at: datetime | None
    in_flight_until: datetime | None
    """Another delivery of the same notification and channel is being sent until then."""


@dataclass(frozen=True)
class Decision:
    """What a dispatcher does with a due delivery: send it, leave it until `until`, or drop it
    for a later occurrence (superseded)."""

    action: Literal["send", "postpone", "supersede"]
    until: datetime | None = None


def decide(due: DueDelivery, now: datetime, quiet_period: timedelta) -> Decision:
    """Send a due delivery unless a later occurrence of its notification is queued on its
    channel (that one carries the newer count), another is being sent right now, or one was sent
    within the quiet period (then it waits for the period's end)."""
    if due.newest_occurrence > due.occurrence:
        return Decision("supersede")
    if due.in_flight_until is not None and due.in_flight_until > now:
        return Decision("postpone", due.in_flight_until)
    if due.last_sent_at is not None and now < due.last_sent_at + quiet_period:
        return Decision("postpone", due.last_sent_at + quiet_period)
    return Decision("send")


@dataclass(frozen=True)
class Dispatch:
    """A delivery a dispatcher claimed to send: `attempts` counts this one."""

    id: int
    notification_id: int
    occurrence: int
    channel: Channel
    key: str
    attempts: int
    queued_at: datetime
    payload: dict[str, Any]


def _plain(text: Any) -> str:
    return " ".join(str(text).split())


def _slack_escaped(text: str) -> str:
    """Text Slack shows as written: `<!channel>`, `<@U123>` and links are markup there, and an
    alert's text may quote what an outsider sent (a forged payment ref)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _times(occurrences: int) -> str:
    return f" ({occurrences} times)" if occurrences > 1 else ""


def dashboard_url(public_base_url: str) -> str:
    """The admin dashboard, served by the gateway."""
    return public_base_url.rstrip("/") + "/admin/"


def webhook_body(dispatch: Dispatch, dashboard: str) -> dict[str, Any]:
    """The webhook's JSON: Slack's incoming-webhook `text`, and the notification's fields for a
    receiver that reads them."""
    p = dispatch.payload
    text = (
        f"[{p['severity']}] {_plain(p['title'])}{_times(dispatch.occurrence)}\n"
        f"{p['message']}\n"
        f"Notification {p['id']} in the admin dashboard: {dashboard}"
    )
    return {
        "text": _slack_escaped(text),
        "id": p["id"],
        "type": p["type"],
        "severity": p["severity"],
        "title": p["title"],
        "detail": p["message"],
        "occurrences": dispatch.occurrence,
        "first_occurred_at": p["created_at"],
        "last_occurred_at": p["last_occurred_at"],
        "metadata": p["metadata"],
        "idempotency_key": dispatch.key,
        "dashboard_url": dashboard,
    }


MAX_SUBJECT = 200


def email_message(dispatch: Dispatch, dashboard: str) -> tuple[str, str]:
    """The email's subject (one line) and plain-text body."""
    p = dispatch.payload
    subject = _plain(f"[booking {p['severity']}] {p['title']}{_times(dispatch.occurrence)}")
    if len(subject) > MAX_SUBJECT:
        subject = subject[: MAX_SUBJECT - 1] + "…"
    details = "\n".join(f"  {name}: {value}" for name, value in p["metadata"].items())
    body = (
        f"{p['title']}\n\n{p['message']}\n\n"
        f"Severity: {p['severity']}\n"
        f"Type: {p['type']}\n"
        f"Occurrences: {dispatch.occurrence} (first {p['created_at']}, latest "
        f"{p['last_occurred_at']})\n"
        f"Notification: {p['id']}\n"
        f"Details:\n{details}\n\n"
        f"The admin dashboard: {dashboard}\n"
        f"Idempotency key: {dispatch.key}\n"
    )
    return subject, body


def channel_failing_fingerprint(channel: Channel) -> str:
    return fingerprint(T.SystemError.name, "AlertChannel", CHANNEL_FAILING, f"channel={channel}")


def channel_failing_alert(
    channel: Channel, target: str, error: str, attempts: int, notification_id: int, at: datetime
) -> Alert:
    """A channel failed `attempts` times in a row to take a delivery: the admins hear of it in
    the feed (and on the other channels), never through the failing one."""
    metadata = {
        ABOUT_CHANNEL: channel.value,
        "target": target,
        "error": _clean_value(error),
        "attempts": attempts,
        "notification_id": notification_id,
        "reason": CHANNEL_FAILING,
    }
    return Alert(
        type=T.SystemError,
        severity=S.Error,
        title=f"Alerts cannot reach people by {channel.value}",
        message=_clean_value(
            f"{attempts} attempts in a row to send notification {notification_id} by "
            f"{channel.value} ({target}) failed: {_summary(error)}. The deliveries wait and are "
            "tried again on their schedule; they go out once it answers."
        ),
        metadata=metadata,
        fingerprint=channel_failing_fingerprint(channel),
        occurred_at=at,
        reason=CHANNEL_FAILING,
    )


def channel_recovered_alert(channel: Channel, target: str, at: datetime) -> Alert:
    """A channel that was failing took a delivery again; its failure is closed."""
    return Alert(
        type=T.SystemError,
        severity=S.Info,
        title=f"Alerts reach people by {channel.value} again",
        message=f"{channel.value} ({target}) took a delivery again; the waiting ones follow.",
        metadata={ABOUT_CHANNEL: channel.value, "target": target, "reason": CHANNEL_RECOVERED},
        fingerprint=fingerprint(
            T.SystemError.name, "AlertChannel", CHANNEL_RECOVERED, f"channel={channel}"
        ),
        occurred_at=at,
        reason=CHANNEL_RECOVERED,
    )

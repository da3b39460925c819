"""Every event survives the trip through an envelope and JSON unchanged, and is named right."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from enum import Enum
from typing import Annotated, Any, Literal, cast, get_args, get_origin
from uuid import UUID, uuid4

import annotated_types
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import AwareDatetime, BaseModel, StringConstraints
from pydantic.fields import FieldInfo

from booking.contracts import (
    ANY_PRODUCER,
    UNKNOWN_REF_SAMPLE,
    AdminAction,
    AdminActionRecorded,
    AdminNotificationRaised,
    BookingRequested,
    CalendarBookingConfirmed,
    CalendarBookingFailed,
    CalendarFailureReason,
    EscrowFrozen,
    EscrowRefundDue,
    EscrowRefunded,
    EscrowReleased,
    EscrowUnfrozen,
    Event,
    HealthCheckFailed,
    HealthCheckRecovered,
    MenteeContact,
    MentorIdentityLinked,
    MentorRegistered,
    Offering,
    OrderCancelled,
    OrderChanged,
    OrderConfirmed,
    OrderPaid,
    PaymentAnomalyDetected,
    PaymentAnomalyKind,
    PaymentCompleted,
    PaymentFailed,
    PaymentFailureReason,
    PaymentInitiated,
    PaymentInitiationFailed,
    SchedulingAbandoned,
    SessionIssueDetected,
    SessionIssueKind,
    SystemErrorKind,
    SystemErrorReported,
    decode,
    http,
    parse_envelope,
    registered_events,
    wrap,
)

ORDER = UUID("0b9e4c1e-4f57-4c36-9a43-2a8f1f3c1a01")
SESSION = UUID("5d1f0a6e-2b7c-4d0e-8f5e-6c7b8a9d0e02")
MENTOR = UUID("9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c03")
START = datetime(2025, 3, 14, 9, 0, tzinfo=UTC)
END = START + timedelta(hours=1)

SAMPLES: list[Event] = [
    MentorRegistered(
        mentor_id=MENTOR,
        name="Amira Ben Salah",
        email="amira@example.com",
        timezone="Africa/Tunis",
        identity_subject="auth0|65f0c1e2d3a4b5c6d7e8f9a0",
    ),
    MentorIdentityLinked(
        mentor_id=MENTOR,
        identity_subject="f81d4fae-7dec-41d0-a765-00a0c91e6bf6",
        previous_subject="auth0|65f0c1e2d3a4b5c6d7e8f9a0",
        by="admin-1",
        reason="the mentor moved to the company's identity provider",
        linked_at=START - timedelta(days=3),
        sequence=1,
    ),
    BookingRequested(
        order_id=ORDER,
        session_id=SESSION,
        mentor_id=MENTOR,
        offering=Offering(offering_id=uuid4(), title="CV review", duration_minutes=60),
        amount=45_000,
        currency="TND",
        mentee=MenteeContact(
            first_name="Yassine", last_name="Trabelsi", email="yassine@example.com", phone=None
        ),
        start_at=START,
        end_at=END,
    ),
    PaymentInitiated(
        order_id=ORDER,
        payment_ref="pay_123",
        pay_url="https://pay.example.com/pay_123",
        expires_at=START - timedelta(days=1),
    ),
    PaymentInitiationFailed(order_id=ORDER, reason="provider_error", detail="HTTP 502"),
    PaymentCompleted(
        order_id=ORDER,
        payment_ref="pay_123",
        amount=45_000,
        amount_paid=45_000,
        platform_fee=4_500,
        escrow_amount=40_500,
        currency="TND",
        paid_at=START - timedelta(days=2),
    ),
    PaymentFailed(order_id=ORDER, payment_ref="pay_123", reason=PaymentFailureReason.EXPIRED),
    EscrowReleased(
        order_id=ORDER,
        mentor_id=MENTOR,
        escrow_amount=40_500,
        currency="TND",
        released_at=END + timedelta(days=1),
    ),
    EscrowFrozen(
        order_id=ORDER,
        mentor_id=MENTOR,
        escrow_amount=40_500,
        currency="TND",
        reason="scheduling abandoned: calendar_api_error",
        sequence=1,
    ),
    EscrowUnfrozen(
        order_id=ORDER,
        mentor_id=MENTOR,
        escrow_amount=40_500,
        currency="TND",
        release_due_at=END + timedelta(days=1),
        reason="the session was scheduled",
        sequence=2,
    ),
    EscrowRefundDue(
        order_id=ORDER,
        mentor_id=MENTOR,
        escrow_amount=40_500,
        refund_amount=45_000,
        currency="TND",
        reason="the mentee asked for it",
        by="admin-1",
        sequence=3,
    ),
    EscrowRefunded(
        order_id=ORDER,
        mentor_id=MENTOR,
        escrow_amount=40_500,
        refund_amount=45_000,
        currency="TND",
        reason="paid back by bank transfer",
        by="admin-1",
        reference="TRF-2025-0042",
        sequence=4,
    ),
    PaymentAnomalyDetected(
        payment_ref="pay_999",
        order_id=None,
        kind=PaymentAnomalyKind.UNKNOWN_PAYMENT_REF,
        detail="no payment with this ref",
    ),
    OrderPaid(
        order_id=ORDER,
        session_id=SESSION,
        mentor_id=MENTOR,
        mentee_email="yassine@example.com",
        title="CV review",
        start_at=START,
        end_at=END,
    ),
    OrderConfirmed(order_id=ORDER, session_id=SESSION, mentor_id=MENTOR, end_at=END),
    OrderChanged(
        order=http.Order(
            id=ORDER,
            status="paid",
            amount=http.Money(amount=45_000, currency="TND"),
            amount_paid=http.Money(amount=45_000, currency="TND"),
            payment=http.PaymentView(
                ref="pay_1", pay_url="https://pay.example/1", status="completed"
            ),
            session=http.SessionView(
                id=SESSION,
                status="awaiting_calendar",
                start_at=START,
                end_at=END,
                meet_link=None,
                calendar_event_id=None,
            ),
            escrow=http.EscrowView(
                platform_fee=http.Money(amount=4_500, currency="TND"),
                escrow_amount=http.Money(amount=40_500, currency="TND"),
                status="held",
            ),
            version=3,
        )
    ),
    OrderCancelled(
        order_id=ORDER,
        session_id=SESSION,
        mentor_id=MENTOR,
        reason="the mentor is ill",
        by="admin-1",
    ),
    SchedulingAbandoned(
        order_id=ORDER,
        session_id=SESSION,
        mentor_id=MENTOR,
        reason=CalendarFailureReason.CALENDAR_API_ERROR,
        detail="503 after 5 attempts, 4 runs",
    ),
    SessionIssueDetected(
        order_id=ORDER,
        session_id=SESSION,
        kind=SessionIssueKind.UNDERPAYMENT,
        detail="paid 40000 of 45000",
    ),
    CalendarBookingConfirmed(
        session_id=SESSION,
        order_id=ORDER,
        event_id="evt_abc",
        meet_link="https://meet.google.com/abc-defg-hij",
        html_link="https://www.google.com/calendar/event?eid=abc",
    ),
    CalendarBookingFailed(
        session_id=SESSION,
        order_id=ORDER,
        mentor_id=MENTOR,
        reason=CalendarFailureReason.INTEGRATION_REVOKED,
        detail="invalid_grant",
        attempts=1,
        final=False,
        next_attempt_at=None,
    ),
    HealthCheckFailed(component="postgres", status="fail", output="connection refused"),
    HealthCheckRecovered(component="postgres", status="pass", output=""),
    SystemErrorReported(
        service="orders",
        consumer="orders.payments",
        message_type="PaymentCompleted",
        error="KeyError: 'order'",
        dead_lettered_message_id=str(uuid4()),
        attempts=5,
        kind=SystemErrorKind.DEAD_LETTERED,
        dead_letter_id="orders:12",
    ),
    AdminActionRecorded(
        action=AdminAction.CANCEL_ORDER,
        service="orders",
        by="admin-1",
        reason="the mentor is ill",
        at=START,
        order_id=ORDER,
        session_id=SESSION,
    ),
    AdminNotificationRaised(
        id=7,
        type="calendar_booking_failed",
        severity="error",
        title="Calendar booking failed",
        message="Google revoked the mentor's integration",
        metadata={"order_id": str(ORDER), "attempts": 1, "tags": ["google"], "extra": None},
        is_read=False,
        read_at=None,
        created_at=START,
        fingerprint="calendar:" + str(SESSION),
        occurrences=2,
        last_occurred_at=START + timedelta(minutes=5),
    ),
]


def assert_round_trips(event: Event) -> None:
    envelope = wrap(
        event,
        message_id=uuid4(),
        correlation_id=str(uuid4()),
        causation_id=str(uuid4()),
        producer="orders" if event.producer == ANY_PRODUCER else None,
    )
    body = envelope.model_dump_json().encode()

    parsed = parse_envelope(body)
    decoded = decode(parsed)

    assert parsed == envelope
    assert type(decoded) is type(event)
    assert decoded == event


def test_every_registered_event_has_a_sample():
    assert {type(sample) for sample in SAMPLES} == set(registered_events())
    assert len(SAMPLES) == len(registered_events())


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: e.event_type())
def test_sample_round_trips(event: Event):
    assert_round_trips(event)


# Strategies built from each model's own field definitions, so a new event is covered unaided.

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
DATETIMES = st.datetimes(
    min_value=datetime(2000, 1, 1),
    max_value=datetime(2100, 1, 1),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=1)), timezone(timedelta(hours=-5))]),
)


def model_strategy(model: type[BaseModel]) -> st.SearchStrategy[Any]:
    fields = {name: field_strategy(field) for name, field in model.model_fields.items()}
    return st.builds(model, **fields)


def field_strategy(field: FieldInfo) -> st.SearchStrategy[Any]:
    return type_strategy(field.annotation, field.metadata)


def type_strategy(tp: Any, metadata: list[Any]) -> st.SearchStrategy[Any]:
    if get_origin(tp) is Annotated:
        tp, *more = get_args(tp)
        return type_strategy(tp, [*metadata, *more])
    args = get_args(tp)
    if type(None) in args:
        (inner,) = [arg for arg in args if arg is not type(None)]
        return st.none() | type_strategy(inner, metadata)
    if get_origin(tp) is dict:
        return st.dictionaries(st.text(), JSON_VALUES, max_size=4)
    if get_origin(tp) is list:
        (item,) = args
        max_size = min(
            (m.max_length for m in metadata if getattr(m, "max_length", None)), default=5
        )
        return st.lists(type_strategy(item, []), max_size=min(max_size, 5))
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return model_strategy(tp)
    if isinstance(tp, type) and issubclass(tp, Enum):
        return st.sampled_from(tp)
    if get_origin(tp) is Literal:
        return st.sampled_from(args)
    if tp is UUID:
        return st.uuids()
    if tp in (AwareDatetime, datetime):
        return DATETIMES
    if tp is bool:
        return st.booleans()
    if tp is int:
        # The bounds of an int field are ints (annotated_types types them as comparables).
        low, high = 0, 10**15
        for item in metadata:
            if isinstance(item, annotated_types.Ge):
                low = max(low, cast(int, item.ge))
            if isinstance(item, annotated_types.Gt):
                low = max(low, cast(int, item.gt) + 1)
            if isinstance(item, annotated_types.Le):
                high = min(high, cast(int, item.le))
        return st.integers(min_value=low, max_value=high)
    if tp is str:
        for item in metadata:
            if isinstance(item, StringConstraints) and item.pattern:
                return st.from_regex(item.pattern, fullmatch=True)
        min_size = max((getattr(item, "min_length", 0) or 0 for item in metadata), default=0)
        max_size = min(
            (m.max_length for m in metadata if getattr(m, "max_length", None)), default=None
        )
        return st.text(min_size=min_size, max_size=max_size)
    raise NotImplementedError(f"no strategy for {tp!r}")


@pytest.mark.parametrize("event_class", registered_events(), ids=lambda c: c.event_type())
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_generated_events_round_trip(event_class: type[Event], data: st.DataObject):
    assert_round_trips(data.draw(model_strategy(event_class)))


def test_times_are_normalised_to_utc():
    tunis = timezone(timedelta(hours=1))
    event = EscrowReleased(
        order_id=ORDER,
        mentor_id=MENTOR,
        escrow_amount=0,
        currency="TND",
        released_at=datetime(2025, 1, 1, 12, 0, tzinfo=tunis),
    )
    assert event.released_at.utcoffset() == timedelta(0)
    assert event.released_at == datetime(2025, 1, 1, 11, 0, tzinfo=UTC)


def test_routing_keys_are_producer_dot_snake_case():
    assert PaymentCompleted.routing_key() == "payments.payment_completed"
    assert CalendarBookingFailed.routing_key() == "calendar.calendar_booking_failed"
    assert SystemErrorReported.routing_key("orders") == "orders.system_error_reported"
    assert SystemErrorReported.binding_key() == "*.system_error_reported"
    for event in registered_events():
        producer, name = event.binding_key().split(".")
        assert producer == event.producer
        assert producer in {"orders", "payments", "calendar", "gateway", "notifications", "*"}
        assert re.fullmatch(r"[a-z]+(_[a-z]+)*", name), event
        assert name.replace("_", "") == event.event_type().lower()


def test_routing_keys_are_unique():
    keys = [event.binding_key() for event in registered_events()]
    assert len(keys) == len(set(keys))


def test_every_event_is_documented():
    for event in [*registered_events(), Offering, MenteeContact]:
        assert event.__doc__ and "\n" not in event.__doc__.strip(), event


def test_events_are_frozen():
    event = SAMPLES[0]
    with pytest.raises(ValueError):
        event.name = "someone else"  # type: ignore[misc]


class TestUnknownRefReports:
    def report(self, **fields: Any) -> PaymentAnomalyDetected:
        values: dict[str, Any] = {
            "payment_ref": "a" * 24,
            "order_id": None,
            "kind": PaymentAnomalyKind.UNKNOWN_PAYMENT_REF,
            "detail": "webhooks for refs none of our payments has",
        }
        return PaymentAnomalyDetected(**(values | fields))

    def test_one_anomaly_reports_one_webhook_unless_it_says_how_many(self):
        assert self.report().occurrences == 1 and self.report().payment_refs == []
        many = self.report(occurrences=10_000, payment_refs=[f"{n:024x}" for n in range(40)])
        assert_round_trips(many)

    @pytest.mark.parametrize(
        "fields",
        [
            {"occurrences": 0},
            {"occurrences": 10**9 + 1},
            {"payment_refs": [f"{n:024x}" for n in range(2 * UNKNOWN_REF_SAMPLE + 1)]},
            {"payment_refs": [""]},
            {"payment_refs": ["f" * 101]},
        ],
        ids=[
            "no occurrence",
            "more than a counter holds",
            "too many refs",
            "an empty ref",
            "a ref too long",
        ],
    )
    def test_a_report_out_of_bounds_is_refused(self, fields: dict[str, Any]):
        with pytest.raises(ValueError):
            self.report(**fields)

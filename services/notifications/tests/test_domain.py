"""The mapping table and the feed's rules, without any server."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta
from typing import cast

import pytest

from booking.contracts import (
    CalendarBookingFailed,
    CalendarFailureReason,
    HealthCheckFailed,
    HealthCheckRecovered,
    PaymentAnomalyDetected,
    PaymentAnomalyKind,
    SessionIssueDetected,
    SessionIssueKind,
    SystemErrorReported,
)
from booking.notifications.domain import (
    MAPPINGS,
    MAX_TEXT,
    Cursor,
    Filters,
    InvalidFilter,
    NotificationType,
    Severity,
    alert_for,
    failures_closed_by,
    health_reason,
    parse_level,
    raises_alert,
    summary_days,
)
from booking.notifications.handlers import subscribers
from booking.notifications.service import NotificationsService

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def calendar(reason: str = "calendar_api_error", **changes) -> CalendarBookingFailed:
    fields = {
        "session_id": uuid.uuid4(),
        "order_id": uuid.uuid4(),
        "mentor_id": uuid.uuid4(),
        "reason": reason,
        "detail": "Google answered 503",
        "attempts": 3,
        **changes,
    }
    return CalendarBookingFailed(**fields)


class TestTheMappingTable:
    def test_the_stored_numbers_are_the_documented_ones(self) -> None:
        assert [(t.name, t.value) for t in NotificationType] == [
            ("IntegrationFailure", 0),
            ("PaymentAnomaly", 1),
            ("SessionIssue", 2),
            ("SystemError", 3),
            ("HealthCheckFailure", 4),
        ]
        assert [(s.name, s.value) for s in Severity] == [
            ("Info", 0),
            ("Warning", 1),
            ("Error", 2),
            ("Critical", 3),
        ]

    @pytest.mark.parametrize(
        ("event", "reasons"),
        [
            (CalendarBookingFailed, CalendarFailureReason),
            (PaymentAnomalyDetected, PaymentAnomalyKind),
            (SessionIssueDetected, SessionIssueKind),
        ],
    )
    def test_every_reason_the_contract_knows_has_its_own_row(self, event, reasons) -> None:
        finals = {f"{r.value}:final" for r in reasons} if event is CalendarBookingFailed else set()
        assert set(MAPPINGS[event].kinds) == {r.value for r in reasons} | finals

    def test_an_attempt_the_calendar_retries_raises_nothing_until_it_is_final(self) -> None:
        for reason in ("calendar_api_error", "unexpected_error", "store_not_found"):
            assert not raises_alert(calendar(reason))
            final = calendar(reason, final=True)
            assert raises_alert(final)
            assert alert_for(final, NOW).severity is Severity.Critical
        for reason in ("mentor_not_integrated", "integration_revoked"):
            waiting = calendar(reason)
            assert raises_alert(waiting)
            assert alert_for(waiting, NOW).severity is Severity.Error
            final = calendar(reason, final=True)
            assert alert_for(final, NOW).severity is Severity.Critical
            # The final failure is news of its own, not a count on the waiting one.
            assert alert_for(final, NOW).fingerprint != alert_for(waiting, NOW).fingerprint

    def test_every_mapped_event_is_consumed_and_every_consumed_event_mapped(self) -> None:
        # Which events are consumed does not depend on the service: none is needed to know.
        consumed = subscribers(cast(NotificationsService, None))
        assert set(consumed) == set(MAPPINGS)

    @pytest.mark.filterwarnings("ignore::UserWarning")  # the copy's reason is no enum member
    def test_a_reason_the_table_does_not_know_yet_still_raises_an_alert(self) -> None:
        event = calendar().model_copy(update={"reason": "quota_exceeded"})
        alert = alert_for(event, NOW)
        assert alert.type is NotificationType.IntegrationFailure
        assert alert.severity is Severity.Critical
        assert alert.title == "Calendar booking failed: quota_exceeded"

    @pytest.mark.parametrize(
        ("component", "status", "severity"),
        [
            ("orders:health", "fail", Severity.Critical),
            ("orders", "fail", Severity.Critical),
            ("database:responseTime", "fail", Severity.Critical),
            ("rabbitmq:consumers", "fail", Severity.Critical),
            ("konnect:reachable", "fail", Severity.Error),
            ("outbox:lag", "fail", Severity.Error),
            ("orders:health", "warn", Severity.Error),
        ],
    )
    def test_a_failing_health_check_is_critical_for_a_service_or_its_infrastructure(
        self, component: str, status: str, severity: Severity
    ) -> None:
        event = HealthCheckFailed(component=component, status=status, output="x")
        assert alert_for(event, NOW).severity is severity
        vital = severity is Severity.Critical
        assert health_reason(event) == ("failing_vital" if vital else "failing")


class TestFingerprints:
    def test_the_same_alert_has_the_same_fingerprint_whatever_its_detail(self) -> None:
        one = calendar(detail="first", attempts=1)
        again = one.model_copy(update={"detail": "second", "attempts": 5})
        assert alert_for(one, NOW).fingerprint == alert_for(again, NOW).fingerprint

    def test_another_booking_or_another_reason_is_another_alert(self) -> None:
        one = calendar()
        other_booking = calendar(mentor_id=one.mentor_id)
        other_reason = one.model_copy(update={"reason": CalendarFailureReason.STORE_NOT_FOUND})
        prints = {alert_for(e, NOW).fingerprint for e in (one, other_booking, other_reason)}
        assert len(prints) == 3

    def test_the_same_kind_in_two_events_is_two_alerts(self) -> None:
        order = uuid.uuid4()
        issue = SessionIssueDetected(
            order_id=order, session_id=None, kind=SessionIssueKind.UNDERPAYMENT, detail=""
        )
        payment = PaymentAnomalyDetected(
            payment_ref="ref", order_id=order, kind=PaymentAnomalyKind.UNDERPAYMENT, detail=""
        )
        assert alert_for(issue, NOW).fingerprint != alert_for(payment, NOW).fingerprint

    def test_a_recovery_closes_its_component_s_failures_of_either_severity(self) -> None:
        closes = failures_closed_by(
            HealthCheckRecovered(component="orders:health", status="pass", output="")
        )
        for status in ("fail", "warn"):
            failed = HealthCheckFailed(component="orders:health", status=status, output="")
            assert alert_for(failed, NOW).fingerprint in closes
        other = HealthCheckFailed(component="payments:health", status="fail", output="")
        assert alert_for(other, NOW).fingerprint not in closes


def unknown_refs(refs: list[str], count: int | None = None) -> PaymentAnomalyDetected:
    """A report of webhooks for unknown refs as payments sends it: `count` of them, `refs` the
    sample it kept (the first and the last ones)."""
    return PaymentAnomalyDetected(
        payment_ref=refs[0],
        order_id=None,
        kind=PaymentAnomalyKind.UNKNOWN_PAYMENT_REF,
        detail=f"{count or len(refs)} webhooks named refs no payment of ours has",
        occurrences=count or len(refs),
        payment_refs=refs,
    )


def hexes(start: int, count: int) -> list[str]:
    return [f"{n:024x}" for n in range(start, start + count)]


class TestUnknownRefTallies:
    def test_every_report_of_unknown_refs_is_one_alert_whatever_its_refs(self) -> None:
        one, other = unknown_refs(hexes(0, 1)), unknown_refs(hexes(1, 40), count=5000)
        assert alert_for(one, NOW).fingerprint == alert_for(other, NOW).fingerprint
        # Other anomalies stay per subject.
        mismatch = [
            PaymentAnomalyDetected(
                payment_ref=ref,
                order_id=uuid.uuid4(),
                kind=PaymentAnomalyKind.AMOUNT_MISMATCH,
                detail="",
            )
            for ref in hexes(0, 2)
        ]
        assert alert_for(mismatch[0], NOW).fingerprint != alert_for(mismatch[1], NOW).fingerprint

    def test_a_report_counts_its_webhooks_and_lists_its_refs(self) -> None:
        alert = alert_for(unknown_refs(hexes(0, 40), count=5000), NOW)

        assert (alert.occurrences, alert.tallied, alert.severity) == (5000, True, Severity.Warning)
        assert alert.metadata["webhooks"] == 5000
        assert alert.metadata["first_payment_refs"] == hexes(0, 20)
        assert alert.metadata["last_payment_refs"] == hexes(20, 20)
        assert alert.metadata["payment_ref"] == hexes(0, 1)[0]
        assert alert.message.startswith("5000 webhooks named payment refs")

    def test_counted_onto_the_open_one_it_keeps_the_first_refs_and_the_latest(self) -> None:
        first = alert_for(unknown_refs(hexes(0, 1)), NOW)
        stored, occurrences = first.metadata, first.occurrences
        for n, start in enumerate((1, 1001, 2001), 1):  # three more reports of 1,000 webhooks
            report = unknown_refs(hexes(start, 20) + hexes(start + 980, 20), 1000)
            more = alert_for(report, NOW + timedelta(seconds=5 * n))
            counted = more.counted_onto(stored, occurrences, NOW, NOW + timedelta(seconds=5 * n))
            stored, occurrences = counted.metadata, occurrences + more.occurrences

        assert occurrences == stored["webhooks"] == 3001
        assert stored["first_payment_refs"] == hexes(0, 20)
        assert stored["last_payment_refs"] == hexes(2981, 20)
        assert stored["payment_ref"] == hexes(2001, 1)[0]
        assert counted.message.startswith("3001 webhooks named payment refs")
        assert hexes(2001, 1)[0] in counted.message

    def test_a_report_that_arrives_late_lists_its_refs_where_they_occurred(self) -> None:
        stored = alert_for(unknown_refs(hexes(100, 40), 1000), NOW).metadata
        earlier = alert_for(unknown_refs(hexes(0, 2)), NOW - timedelta(seconds=5))
        between = alert_for(unknown_refs(hexes(50, 2)), NOW + timedelta(seconds=5))

        before = earlier.counted_onto(stored, 1000, NOW, NOW + timedelta(seconds=10))
        amid = between.counted_onto(stored, 1000, NOW, NOW + timedelta(seconds=10))

        assert before.metadata["first_payment_refs"] == hexes(0, 2) + hexes(100, 18)
        assert before.metadata["last_payment_refs"] == hexes(120, 20)
        assert amid.metadata["first_payment_refs"] == hexes(100, 20)
        assert amid.metadata["last_payment_refs"] == hexes(120, 20)  # the latest stay last
        # The notification's latest ref and detail stay the latest report's.
        assert before.metadata["payment_ref"] == amid.metadata["payment_ref"] == hexes(100, 1)[0]
        assert before.metadata["webhooks"] == 1002

    def test_a_stored_notification_of_another_shape_is_merged_as_far_as_it_is_readable(
        self,
    ) -> None:
        more = alert_for(unknown_refs(hexes(5, 1)), NOW)

        before_tallies = more.counted_onto({"payment_ref": "a" * 24, "detail": "old"}, 1, NOW, NOW)
        garbled = more.counted_onto({"first_payment_refs": [1, None, "b" * 24]}, 7, NOW, NOW)

        assert before_tallies.metadata["first_payment_refs"] == ["a" * 24, hexes(5, 1)[0]]
        assert garbled.metadata["first_payment_refs"] == ["b" * 24, hexes(5, 1)[0]]
        assert garbled.metadata["webhooks"] == 8

    def test_other_alerts_count_up_as_they_are(self) -> None:
        alert = alert_for(calendar(), NOW)
        assert alert.counted_onto({"x": 1}, 5, NOW, NOW) is alert and alert.occurrences == 1


class TestText:
    def test_a_nul_character_from_outside_is_stored_as_a_replacement(self) -> None:
        alert = alert_for(calendar(detail="bad\x00byte"), NOW)
        assert "\x00" not in alert.message
        assert alert.metadata["detail"] == "bad\ufffdbyte"

    def test_a_long_detail_is_clipped_and_a_trace_summarised_by_its_last_line(self) -> None:
        trace = "Traceback (most recent call last):\n" + "  frame\n" * 5000 + "ValueError: bad\n"
        report = SystemErrorReported(
            service="orders",
            consumer="orders",
            message_type=None,
            error=trace,
            dead_lettered_message_id=None,
            attempts=1,
        )
        alert = alert_for(report, NOW)
        assert len(alert.metadata["error"]) == MAX_TEXT
        assert alert.message.endswith(": ValueError: bad")
        assert alert.title == "Message dead-lettered by orders: unreadable"
        assert "an unreadable message after 1 attempt;" in alert.message


class TestFilters:
    @pytest.mark.parametrize("value", ["Critical", "critical", "CRITICAL", "3", " 3 "])
    def test_a_severity_by_name_or_number(self, value: str) -> None:
        assert parse_level(Severity, value, "severity") is Severity.Critical

    @pytest.mark.parametrize("value", ["", "Fatal", "4", "-1", "3.0", "Critical,Error"])
    def test_anything_else_is_refused_with_the_choices(self, value: str) -> None:
        with pytest.raises(InvalidFilter, match=r"Info \(0\), Warning \(1\)"):
            parse_level(Severity, value, "severity")

    def test_filters_parse_their_names(self) -> None:
        since = NOW - timedelta(days=1)
        parsed = Filters.parse(
            unread_only=True, severity="3", min_severity="Warning", type="sessionissue", since=since
        )
        assert parsed == Filters(
            unread_only=True,
            severity=Severity.Critical,
            min_severity=Severity.Warning,
            type=NotificationType.SessionIssue,
            since=since,
        )
        assert Filters.parse() == Filters()

    @pytest.mark.parametrize("cursor", [Cursor(1), Cursor(2**63 - 1), Cursor(42, ascending=True)])
    def test_a_cursor_reads_back_as_it_was_written(self, cursor: Cursor) -> None:
        token = cursor.encode()
        assert token.isascii() and "=" not in token
        assert Cursor.decode(token) == cursor

    @pytest.mark.parametrize(
        "token",
        [
            "",
            "x",
            "!!!",
            "eDE",  # x1
            "ZA",  # d
            "ZC0x",  # d-1
            "ZDE5OTk5OTk5OTk5OTk5OTk5OTk5",  # too long
            "ZDk5OTk5OTk5OTk5OTk5OTk5OTk",  # beyond BIGINT
        ],
    )
    def test_a_cursor_the_feed_did_not_give_is_refused(self, token: str) -> None:
        with pytest.raises(InvalidFilter):
            Cursor.decode(token)

    def test_the_summary_spans_the_last_days_today_included(self) -> None:
        assert summary_days(date(2026, 3, 1), 3) == [
            date(2026, 2, 27),
            date(2026, 2, 28),
            date(2026, 3, 1),
        ]

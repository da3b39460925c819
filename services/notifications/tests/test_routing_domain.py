"""Who gets which alert, when, and what they read: the routing's pure rules, and the settings
that describe it (a bad one is refused before anything starts). No server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from booking.notifications.domain import (
    ABOUT_CHANNEL,
    Channel,
    Dispatch,
    DueDelivery,
    Notification,
    NotificationType,
    RetrySchedule,
    Route,
    Routing,
    Severity,
    channel_failing_alert,
    channel_recovered_alert,
    decide,
    delivery_key,
    email_message,
    snapshot,
    webhook_body,
)
from booking.notifications.settings import NotificationsSettings, alert_routing
from booking.runtime.settings import RefusedSettings

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
QUIET = timedelta(seconds=900)
DEFAULT = RetrySchedule(timedelta(seconds=10), timedelta(hours=1), timedelta(hours=24))


def notification(
    severity: Severity = Severity.Error,
    type: NotificationType = NotificationType.PaymentAnomaly,
    **changes: Any,
) -> Notification:
    fields: dict[str, Any] = {
        "id": 42,
        "type": type,
        "severity": severity,
        "title": "Payment could not be opened at Konnect",
        "message": "Konnect would not open the payment of order o-1.",
        "metadata": {"order_id": "o-1", "reason": "payment_initiation_failed"},
        "is_read": False,
        "read_at": None,
        "created_at": NOW,
        "fingerprint": "f" * 40,
        "occurrences": 1,
        "last_occurred_at": NOW,
        **changes,
    }
    return Notification(**fields)


def dispatch(n: Notification | None = None, channel: Channel = Channel.webhook) -> Dispatch:
    n = n or notification()
    return Dispatch(
        id=1,
        notification_id=n.id,
        occurrence=n.occurrences,
        channel=channel,
        key=delivery_key(n.id, n.occurrences, channel),
        attempts=1,
        queued_at=NOW,
        payload=snapshot(n),
    )


def due(**changes: Any) -> DueDelivery:
    fields: dict[str, Any] = {
        "id": 1,
        "notification_id": 42,
        "occurrence": 2,
        "channel": Channel.webhook,
        "newest_occurrence": 2,
        "last_sent_at": None,
        "in_flight_until": None,
        **changes,
    }
    return DueDelivery(**fields)


class TestWhoGetsWhat:
    def test_a_route_takes_its_severity_and_above(self) -> None:
        route = Route(Channel.webhook, Severity.Error)
        taken = [s for s in Severity if route.takes(notification(s))]
        assert taken == [Severity.Error, Severity.Critical]

    def test_a_route_limited_by_type_takes_only_those(self) -> None:
        route = Route(Channel.email, Severity.Info, frozenset({NotificationType.SessionIssue}))
        assert route.takes(notification(type=NotificationType.SessionIssue))
        assert not route.takes(notification(type=NotificationType.PaymentAnomaly))
        assert not route.takes(notification(Severity.Critical, NotificationType.SystemError))

    def test_no_type_chosen_is_every_type(self) -> None:
        route = Route(Channel.email, Severity.Info)
        assert all(route.takes(notification(type=t)) for t in NotificationType)

    def test_routing_lists_the_channels_that_take_a_notification(self) -> None:
        routing = Routing(
            routes=(Route(Channel.webhook, Severity.Critical), Route(Channel.email, Severity.Error))
        )
        assert routing.channels_for(notification(Severity.Critical)) == [
            Channel.webhook,
            Channel.email,
        ]
        assert routing.channels_for(notification(Severity.Error)) == [Channel.email]
        assert routing.channels_for(notification(Severity.Warning)) == []
        assert Routing().channels_for(notification(Severity.Critical)) == []

    def test_news_of_a_failing_channel_never_goes_through_it_but_may_through_another(self) -> None:
        routing = Routing(
            routes=(Route(Channel.webhook, Severity.Info), Route(Channel.email, Severity.Info))
        )
        for channel, other in ((Channel.webhook, Channel.email), (Channel.email, Channel.webhook)):
            for alert in (
                channel_failing_alert(channel, "host", "HTTP 503", 3, 7, NOW),
                channel_recovered_alert(channel, "host", NOW),
            ):
                assert alert.metadata[ABOUT_CHANNEL] == channel.value
                about = notification(alert.severity, alert.type, metadata=alert.metadata)
                assert routing.channels_for(about) == [other]

    def test_a_failing_channel_is_an_error_and_one_incident_per_channel(self) -> None:
        one = channel_failing_alert(Channel.webhook, "https://hooks", "HTTP 503", 3, 7, NOW)
        again = channel_failing_alert(Channel.webhook, "https://hooks", "timeout", 3, 9, NOW)
        email = channel_failing_alert(Channel.email, "smtp:587", "HTTP 503", 3, 7, NOW)
        assert (one.type, one.severity) == (NotificationType.SystemError, Severity.Error)
        assert one.reason == "alert_channel_failing"
        assert one.fingerprint == again.fingerprint != email.fingerprint
        recovered = channel_recovered_alert(Channel.webhook, "https://hooks", NOW)
        assert recovered.severity is Severity.Info and recovered.fingerprint != one.fingerprint


class TestTheRetrySchedule:
    def test_waits_double_from_10_seconds_to_an_hour(self) -> None:
        waits = [DEFAULT.delay(n).total_seconds() for n in range(1, 12)]
        assert waits == [10, 20, 40, 80, 160, 320, 640, 1280, 2560, 3600, 3600]
        assert DEFAULT.delay(10_000) == timedelta(hours=1)  # no overflow, however many

    def test_the_last_attempt_is_a_day_after_queueing_then_it_is_given_up(self) -> None:
        at, failures, attempts = NOW, 0, [NOW]
        while True:
            failures += 1
            retry = DEFAULT.next_attempt(NOW, failures, at)
            if retry is None:
                break
            assert retry > at
            attempts.append(retry)
            at = retry
        assert attempts[-1] == NOW + timedelta(hours=24)
        assert 25 <= len(attempts) <= 35  # about 10 in the first hour and a half, then hourly
        assert attempts[1] - attempts[0] == timedelta(seconds=10)

    def test_a_failure_past_the_day_gives_up_at_once(self) -> None:
        assert DEFAULT.next_attempt(NOW, 1, NOW + timedelta(hours=25)) is None
        assert DEFAULT.next_attempt(NOW, 1, NOW + timedelta(hours=24)) is None


class TestTheQuietPeriod:
    def test_the_first_occurrence_goes_at_once(self) -> None:
        assert Routing(quiet_period=QUIET).first_due(NOW, None) == NOW

    def test_a_count_up_waits_for_the_end_of_the_period_after_the_last_send(self) -> None:
        routing = Routing(quiet_period=QUIET)
        sent = NOW - timedelta(seconds=60)
        assert routing.first_due(NOW, sent) == sent + QUIET
        assert routing.first_due(NOW, NOW - QUIET - timedelta(seconds=1)) == NOW

    def test_a_due_delivery_is_sent_unless_something_says_otherwise(self) -> None:
        assert decide(due(), NOW, QUIET).action == "send"
        assert decide(due(last_sent_at=NOW - QUIET), NOW, QUIET).action == "send"

    def test_a_due_count_up_within_the_period_waits_for_its_end(self) -> None:
        sent = NOW - timedelta(seconds=100)
        decision = decide(due(last_sent_at=sent), NOW, QUIET)
        assert (decision.action, decision.until) == ("postpone", sent + QUIET)

    def test_an_older_occurrence_gives_way_to_a_newer_one(self) -> None:
        assert decide(due(occurrence=2, newest_occurrence=5), NOW, QUIET).action == "supersede"

    def test_it_waits_while_its_notification_is_being_sent_on_the_channel(self) -> None:
        until = NOW + timedelta(seconds=30)
        decision = decide(due(in_flight_until=until), NOW, QUIET)
        assert (decision.action, decision.until) == ("postpone", until)
        assert decide(due(in_flight_until=NOW), NOW, QUIET).action == "send"  # its lease ended


class TestIdempotencyKeys:
    def test_a_key_is_derived_from_notification_occurrence_and_channel_alone(self) -> None:
        key = delivery_key(42, 3, Channel.webhook)
        # Stable across processes, restarts and releases: a receiver keeps it.
        assert key == "d3092858-ecd1-5eaf-9c60-9f8b8150d9f3"
        assert key == delivery_key(42, 3, Channel.webhook)
        others = {
            delivery_key(43, 3, Channel.webhook),
            delivery_key(42, 4, Channel.webhook),
            delivery_key(42, 3, Channel.email),
        }
        assert key not in others and len(others) == 3


class TestMessages:
    def test_the_webhook_body_is_slack_s_text_and_the_notification_s_fields(self) -> None:
        n = notification(occurrences=3)
        body = webhook_body(dispatch(n), "http://gw/admin/")
        assert body["text"].startswith("[Error] Payment could not be opened at Konnect (3 times)")
        assert n.message in body["text"] and "http://gw/admin/" in body["text"]
        assert body | {"text": ""} == {
            "text": "",
            "id": 42,
            "type": "PaymentAnomaly",
            "severity": "Error",
            "title": n.title,
            "detail": n.message,
            "occurrences": 3,
            "first_occurred_at": NOW.isoformat(),
            "last_occurred_at": NOW.isoformat(),
            "metadata": n.metadata,
            "idempotency_key": delivery_key(42, 3, Channel.webhook),
            "dashboard_url": "http://gw/admin/",
        }

    def test_slack_markup_an_outsider_wrote_is_shown_not_obeyed(self) -> None:
        n = notification(title="Refs <!channel> & <https://evil|click>", message="<@U1>")
        text = webhook_body(dispatch(n), "http://gw/admin/")["text"]
        assert "<" not in text and ">" not in text
        assert "&lt;!channel&gt; &amp; &lt;https://evil|click&gt;" in text

    def test_the_email_has_a_one_line_subject_and_says_it_all(self) -> None:
        n = notification(Severity.Critical, title="Line one\r\nBcc: someone@else.org" + "x" * 300)
        subject, body = email_message(dispatch(n, Channel.email), "http://gw/admin/")
        assert "\n" not in subject and "\r" not in subject
        assert subject.startswith("[booking Critical] Line one Bcc:") and len(subject) == 200
        for part in (n.message, "Severity: Critical", "order_id: o-1", "http://gw/admin/"):
            assert part in body
        assert delivery_key(42, 1, Channel.email) in body


def settings(**values: Any) -> NotificationsSettings:
    return NotificationsSettings.model_validate(values)


DEPLOYED = {"development_mode": False}  # the test suite runs in development mode
SMTP = {
    "alert_smtp_host": "smtp.example.com",
    "alert_smtp_from": "alerts@example.com",
    "alert_smtp_to": "ops@example.com, Night Shift <night@example.com>",
}


class TestTheSettings:
    def test_unset_is_off(self) -> None:
        assert alert_routing(settings()).routes == ()

    def test_the_defaults_are_error_and_above_every_type_a_quiet_15_minutes(self) -> None:
        routing = alert_routing(settings(alert_webhook_url="https://hooks.example.com/x", **SMTP))
        assert routing.routes == (
            Route(Channel.webhook, Severity.Error),
            Route(Channel.email, Severity.Error),
        )
        assert routing.quiet_period == timedelta(seconds=900)
        assert routing.retries == DEFAULT

    def test_severities_and_types_are_read_by_name_or_number_in_any_case(self) -> None:
        routing = alert_routing(
            settings(
                alert_webhook_url="http://10.0.0.5:9000/hook",
                alert_webhook_min_severity="critical",
                alert_webhook_types="PaymentAnomaly, 2",
            )
        )
        assert routing.routes == (
            Route(
                Channel.webhook,
                Severity.Critical,
                frozenset({NotificationType.PaymentAnomaly, NotificationType.SessionIssue}),
            ),
        )
        assert settings(**SMTP).alert_smtp_to == (
            "ops@example.com",
            "Night Shift <night@example.com>",
        )

    @pytest.mark.parametrize(
        ("values", "says"),
        [
            ({"alert_webhook_url": "ftp://hooks.example.com/x"}, "ALERT_WEBHOOK_URL must be an"),
            ({"alert_webhook_url": "hooks.example.com/x"}, "ALERT_WEBHOOK_URL must be an"),
            ({"alert_webhook_url": "https:///x"}, "ALERT_WEBHOOK_URL must be an"),
            (
                {"alert_webhook_url": "https://h.example.com", "alert_webhook_min_severity": "Bad"},
                "ALERT_WEBHOOK_MIN_SEVERITY must be one of Info (0), Warning (1)",
            ),
            (
                {"alert_webhook_url": "https://h.example.com", "alert_webhook_types": "Payments"},
                "ALERT_WEBHOOK_TYPES must be one of IntegrationFailure (0)",
            ),
            ({"alert_webhook_types": "SessionIssue"}, "ALERT_WEBHOOK_TYPES is set but"),
            ({**SMTP, "alert_smtp_from": None}, "ALERT_SMTP_FROM must be set"),
            ({**SMTP, "alert_smtp_to": ""}, "ALERT_SMTP_TO must name at least one address"),
            ({**SMTP, "alert_smtp_to": "ops@example.com, ops"}, "ALERT_SMTP_TO: 'ops' is not an"),
            ({**SMTP, "alert_smtp_from": "alerts at example"}, "ALERT_SMTP_FROM is not an email"),
            ({**SMTP, "alert_email_min_severity": "loud"}, "ALERT_EMAIL_MIN_SEVERITY must be"),
            ({**SMTP, "alert_smtp_password": "pw"}, "ALERT_SMTP_PASSWORD is set but"),
            (
                {**SMTP, "alert_smtp_username": "u", "alert_smtp_starttls": False, **DEPLOYED},
                "ALERT_SMTP_STARTTLS is off: the SMTP login would cross the network in clear",
            ),
            ({"alert_smtp_to": "ops@example.com"}, "ALERT_SMTP_TO set but ALERT_SMTP_HOST is not"),
            (
                {"alert_retry_first_seconds": 7200},
                "ALERT_RETRY_FIRST_SECONDS must not exceed ALERT_RETRY_MAX_SECONDS",
            ),
        ],
    )
    def test_a_bad_or_half_set_channel_is_refused_saying_which_setting(
        self, values: dict[str, Any], says: str
    ) -> None:
        with pytest.raises(RefusedSettings) as refused:
            alert_routing(settings(**values))
        assert says in str(refused.value)

    def test_every_problem_is_named_at_once(self) -> None:
        with pytest.raises(RefusedSettings) as refused:
            alert_routing(settings(alert_webhook_url="ftp://x", **{**SMTP, "alert_smtp_to": "x"}))
        assert "ALERT_WEBHOOK_URL" in str(refused.value) and "ALERT_SMTP_TO" in str(refused.value)

    def test_a_login_in_clear_is_allowed_to_this_machine_or_in_development(self) -> None:
        clear = {**SMTP, "alert_smtp_username": "u", "alert_smtp_starttls": False}
        alert_routing(settings(**{**clear, "alert_smtp_host": "127.0.0.1", **DEPLOYED}))
        alert_routing(settings(**clear, development_mode=True))

    def test_blank_is_unset(self) -> None:
        assert alert_routing(settings(alert_webhook_url=" ", alert_smtp_host="")).routes == ()

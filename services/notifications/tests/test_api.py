"""The admins' feed over HTTP: filters, keyset paging, replay after an id, read, delete, summary.

The table is shared by the test session: each test raises its own notifications (all of them
occurred in the past, none in the future) and looks at those (ids above its baseline, or
`since` its start).
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from booking.contracts import (
    CalendarBookingFailed,
    CalendarFailureReason,
    Event,
    HealthCheckRecovered,
    PaymentAnomalyDetected,
    PaymentAnomalyKind,
    SessionIssueDetected,
    SessionIssueKind,
    SystemErrorReported,
    http,
)
from booking.runtime.auth import Role

NOTIFICATION_FIELDS = set(http.Notification.model_fields)
ALL = ["critical", "error", "warning", "session", "info", "system"]


def calendar(reason: str) -> CalendarBookingFailed:
    return CalendarBookingFailed(
        session_id=uuid.uuid4(),
        order_id=uuid.uuid4(),
        mentor_id=uuid.uuid4(),
        reason=CalendarFailureReason(reason),
        detail="detail",
        attempts=1,
        # Failures the calendar retries on its schedule are news only once they are final.
        final=reason in ("store_not_found", "calendar_api_error", "unexpected_error"),
    )


def anomaly(kind: str) -> PaymentAnomalyDetected:
    return PaymentAnomalyDetected(
        payment_ref=uuid.uuid4().hex[:24],
        order_id=None,
        kind=PaymentAnomalyKind(kind),
        detail="detail",
    )


def session_issue(kind: str) -> SessionIssueDetected:
    return SessionIssueDetected(
        order_id=uuid.uuid4(), session_id=uuid.uuid4(), kind=SessionIssueKind(kind), detail="detail"
    )


def dead_letter() -> SystemErrorReported:
    return SystemErrorReported(
        service="orders",
        consumer="orders",
        message_type="PaymentCompleted",
        error="boom",
        dead_lettered_message_id=str(uuid.uuid4()),
        attempts=5,
    )


def recovered() -> HealthCheckRecovered:
    return HealthCheckRecovered(
        component=f"calendar-{uuid.uuid4().hex[:6]}:health", status="pass", output=""
    )


async def raise_all(notifications, *events: Event, occurred_at: datetime | None = None) -> list:
    """Raise each event in turn (so ids follow the order given); their notifications' ids."""
    ids = []
    for event in events:
        producer = "orders" if isinstance(event, SystemErrorReported) else None
        row = await notifications.raise_(event, occurred_at=occurred_at, producer=producer)
        ids.append(row["id"])
    return ids


def rfc3339(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


class TestFilters:
    @pytest.fixture
    async def feed(self, notifications) -> dict[str, int]:
        """Six notifications of every type and severity; the Warning one read."""
        ids = await raise_all(
            notifications,
            calendar("store_not_found"),  # IntegrationFailure, Critical
            calendar("mentor_not_integrated"),  # IntegrationFailure, Error
            anomaly("unknown_payment_ref"),  # PaymentAnomaly, Warning
            session_issue("payment_for_paid_order"),  # SessionIssue, Critical
            recovered(),  # HealthCheckFailure, Info
            dead_letter(),  # SystemError, Critical
        )
        made = dict(zip(ALL, ids, strict=True))
        answer = await notifications.client.post(
            f"/api/admin/notifications/{made['warning']}/read", headers=notifications.admin
        )
        assert answer.status_code == 200, answer.text
        return made

    async def test_the_list_is_newest_first_in_the_contract_s_shape(
        self, notifications, feed
    ) -> None:
        items = await notifications.mine()
        assert [i["id"] for i in items] == sorted(feed.values(), reverse=True)
        for item in items:
            assert set(item) == NOTIFICATION_FIELDS
            http.Notification.model_validate(item)
        critical = next(i for i in items if i["id"] == feed["critical"])
        assert (critical["type"], critical["severity"]) == ("IntegrationFailure", "Critical")

    @pytest.mark.parametrize(
        ("params", "expected"),
        [
            ({"unreadOnly": "true"}, ["critical", "error", "session", "info", "system"]),
            ({"unreadOnly": "false"}, ALL),
            ({"severity": "Critical"}, ["critical", "session", "system"]),
            ({"severity": "3"}, ["critical", "session", "system"]),
            ({"severity": "critical"}, ["critical", "session", "system"]),
            ({"severity": "Warning"}, ["warning"]),
            ({"minSeverity": "Error"}, ["critical", "error", "session", "system"]),
            ({"minSeverity": "1"}, ["critical", "error", "warning", "session", "system"]),
            ({"type": "IntegrationFailure"}, ["critical", "error"]),
            ({"type": "0"}, ["critical", "error"]),
            ({"type": "SystemError"}, ["system"]),
            ({"type": "HealthCheckFailure"}, ["info"]),
            ({"unreadOnly": "true", "severity": "Warning"}, []),
            ({"unreadOnly": "true", "minSeverity": "Critical", "type": "2"}, ["session"]),
        ],
        ids=lambda value: (
            "&".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else None
        ),
    )
    async def test_each_filter_narrows_the_list(
        self, notifications, feed, params: dict[str, str], expected: list[str]
    ) -> None:
        items = await notifications.mine(**params)
        assert [i["id"] for i in items] == sorted((feed[n] for n in expected), reverse=True)

    async def test_every_item_given_matches_the_filter(self, notifications, feed) -> None:
        page = await notifications.page(
            unreadOnly="true", minSeverity="Error", type="IntegrationFailure", limit=200
        )
        assert page["items"]
        for item in page["items"]:
            assert item["is_read"] is False
            assert item["severity"] in ("Error", "Critical")
            assert item["type"] == "IntegrationFailure"

    async def test_since_is_when_a_notification_last_occurred(self, notifications) -> None:
        base = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=6)
        old, middle = calendar("calendar_api_error"), calendar("integration_revoked")
        [old_id] = await raise_all(notifications, old, occurred_at=base)
        [middle_id] = await raise_all(notifications, middle, occurred_at=base + timedelta(hours=2))
        [new_id] = await raise_all(
            notifications, calendar("mentor_not_integrated"), occurred_at=base + timedelta(hours=4)
        )

        since = rfc3339(base + timedelta(hours=2))
        assert [i["id"] for i in await notifications.mine(since=since)] == [new_id, middle_id]
        # A repeat of the old one after `since` brings it in: it occurred again.
        await raise_all(notifications, old, occurred_at=base + timedelta(minutes=50))
        assert [i["id"] for i in await notifications.mine(since=since)] == [new_id, middle_id]
        await raise_all(notifications, old, occurred_at=base + timedelta(minutes=59))
        since_55 = rfc3339(base + timedelta(minutes=55))
        assert [i["id"] for i in await notifications.mine(since=since_55)] == [
            new_id,
            middle_id,
            old_id,
        ]
        offset = (base + timedelta(hours=2)).astimezone().isoformat()  # any offset will do
        assert [i["id"] for i in await notifications.mine(since=offset)] == [new_id, middle_id]

    @pytest.mark.parametrize(
        "params",
        [
            {"severity": "Bogus"},
            {"severity": "4"},
            {"severity": "-1"},
            {"minSeverity": "Fatal"},
            {"minSeverity": "7"},
            {"type": "Nope"},
            {"type": "5"},
            {"since": "yesterday"},
            {"since": "2026-01-01T00:00:00"},  # no offset: which instant would it be?
            {"limit": "0"},
            {"limit": "201"},
            {"limit": "many"},
            {"cursor": "not-a-cursor"},
            {"cursor": "eDE"},  # base64 of "x1": not one the feed gives
            {"afterId": "-1"},
            {"afterId": "x"},
            {"unreadOnly": "maybe"},
        ],
        ids=lambda p: "&".join(f"{k}={v}" for k, v in p.items()),
    )
    async def test_a_bad_filter_value_is_a_422_problem(
        self, notifications, params: dict[str, str]
    ) -> None:
        answer = await notifications.get(**params)
        body = notifications.problem(answer, 422)
        assert "Traceback" not in body["detail"]

    async def test_read_all_refuses_a_bad_filter_too(self, notifications) -> None:
        answer = await notifications.client.post(
            "/api/admin/notifications/read-all",
            params={"severity": "Bogus"},
            headers=notifications.admin,
        )
        body = notifications.problem(answer, 422)
        assert "Info (0), Warning (1), Error (2), Critical (3)" in body["detail"]


class TestPaging:
    async def test_cursor_pages_cover_every_row_once_while_new_rows_arrive(
        self, notifications
    ) -> None:
        first = await raise_all(notifications, *(calendar("calendar_api_error") for _ in range(7)))
        seen: list[int] = []
        cursor = None
        arrived: list[int] = []
        while True:
            params: dict[str, Any] = {"limit": 3, **({"cursor": cursor} if cursor else {})}
            body = await notifications.page(**params)
            mine = [i["id"] for i in body["items"] if i["id"] > notifications.baseline]
            seen += mine
            if len(mine) < len(body["items"]) or body["next_cursor"] is None:
                break
            cursor = body["next_cursor"]
            # New notifications arrive between pages: they are newer, so not in later pages.
            arrived += await raise_all(notifications, calendar("integration_revoked"))

        assert seen == sorted(first, reverse=True)
        assert len(arrived) >= 2
        assert min(arrived) > max(first)

    async def test_after_id_replays_in_ascending_order_then_continues(self, notifications) -> None:
        made = await raise_all(notifications, *(calendar("store_not_found") for _ in range(5)))
        page = await notifications.page(afterId=notifications.baseline, limit=2)
        assert [i["id"] for i in page["items"]] == made[:2]
        more = await raise_all(notifications, calendar("store_not_found"))
        replayed = [i["id"] for i in page["items"]]
        while page["next_cursor"] is not None:
            page = await notifications.page(cursor=page["next_cursor"], limit=2)
            replayed += [i["id"] for i in page["items"]]
        assert replayed == made + more

        after_third = await notifications.page(afterId=made[2], limit=200)
        assert [i["id"] for i in after_third["items"]] == made[3:] + more
        assert after_third["next_cursor"] is None
        assert (await notifications.page(afterId=more[0]))["items"] == []

    async def test_after_id_takes_the_filters_too(self, notifications) -> None:
        critical, _, other = await raise_all(
            notifications,
            calendar("store_not_found"),
            calendar("mentor_not_integrated"),
            calendar("unexpected_error"),
        )
        page = await notifications.page(afterId=notifications.baseline, severity="Critical")
        assert [i["id"] for i in page["items"]] == [critical, other]

    async def test_limit_1_gives_the_newest(self, notifications) -> None:
        made = await raise_all(notifications, calendar("store_not_found"), anomaly("underpayment"))
        page = await notifications.page(limit=1)
        assert [i["id"] for i in page["items"]] == [made[-1]]
        assert page["next_cursor"] is not None
        default = await notifications.page()
        assert len(default["items"]) <= 50


class TestChanges:
    async def test_mark_read_answers_the_notification_and_keeps_the_first_read_time(
        self, notifications
    ) -> None:
        [made] = await raise_all(notifications, calendar("store_not_found"))
        url = f"/api/admin/notifications/{made}/read"
        answer = await notifications.client.post(url, headers=notifications.admin)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert set(body) == NOTIFICATION_FIELDS
        assert body["id"] == made and body["is_read"] is True and body["read_at"]
        again = await notifications.client.post(url, headers=notifications.admin)
        assert again.json()["read_at"] == body["read_at"]
        [listed] = await notifications.mine()
        assert listed == body

    async def test_reading_or_deleting_an_unknown_notification_is_a_404(
        self, notifications
    ) -> None:
        admin = notifications.admin
        client = notifications.client
        unknown = 2**62
        read = await client.post(f"/api/admin/notifications/{unknown}/read", headers=admin)
        assert "no notification" in notifications.problem(read, 404)["detail"]
        gone = await client.delete(f"/api/admin/notifications/{unknown}", headers=admin)
        notifications.problem(gone, 404)
        notifications.problem(await client.delete("/api/admin/notifications/0", headers=admin), 422)

    async def test_delete_removes_it_for_good(self, notifications) -> None:
        kept, deleted = await raise_all(
            notifications, calendar("store_not_found"), calendar("store_not_found")
        )
        url = f"/api/admin/notifications/{deleted}"
        answer = await notifications.client.delete(url, headers=notifications.admin)
        assert answer.status_code == 204 and answer.content == b""
        assert [i["id"] for i in await notifications.mine()] == [kept]
        again = await notifications.client.delete(url, headers=notifications.admin)
        notifications.problem(again, 404)
        read = await notifications.client.post(f"{url}/read", headers=notifications.admin)
        notifications.problem(read, 404)

    async def test_read_all_marks_only_what_matches_the_filters(self, notifications) -> None:
        # Every notification of the other tests occurred before this one started.
        since = rfc3339(notifications.started_at)
        one, two, integration = await raise_all(
            notifications,
            session_issue("underpayment"),
            session_issue("currency_mismatch"),
            calendar("mentor_not_integrated"),
        )
        answer = await notifications.client.post(
            "/api/admin/notifications/read-all",
            params={"type": "SessionIssue", "since": since},
            headers=notifications.admin,
        )
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"updated": 2}
        unread = {i["id"] for i in await notifications.mine(unreadOnly="true")}
        assert unread == {integration}
        assert one not in unread and two not in unread

    async def test_read_all_without_filters_marks_everything_read(self, notifications) -> None:
        await raise_all(notifications, calendar("store_not_found"), anomaly("underpayment"))
        url = "/api/admin/notifications/read-all"
        answer = await notifications.client.post(url, headers=notifications.admin)
        assert answer.status_code == 200, answer.text
        assert answer.json()["updated"] >= 2
        assert await notifications.mine(unreadOnly="true") == []
        again = await notifications.client.post(url, headers=notifications.admin)
        assert again.json() == {"updated": 0}


class TestSummary:
    async def test_counts_by_utc_day_and_severity_over_the_last_days(self, notifications) -> None:
        before = await self.summary(notifications, 7)
        now = datetime.now(UTC)
        two_days_ago = now - timedelta(days=2)
        await raise_all(
            notifications,
            calendar("store_not_found"),
            calendar("unexpected_error"),
            anomaly("unknown_payment_ref"),
            occurred_at=two_days_ago,
        )
        await raise_all(notifications, calendar("mentor_not_integrated"), occurred_at=now)
        await raise_all(
            notifications, calendar("store_not_found"), occurred_at=now - timedelta(days=9)
        )
        after = await self.summary(notifications, 7)

        delta = {key: after[key] - before[key] for key in after if after[key] != before[key]}
        assert delta == {
            (two_days_ago.date().isoformat(), "Critical"): 2,
            (two_days_ago.date().isoformat(), "Warning"): 1,
            (now.date().isoformat(), "Error"): 1,
        }

    async def test_every_day_and_severity_is_listed_oldest_first(self, notifications) -> None:
        answer = await notifications.get("/summary", days=3)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        http.NotificationSummary.model_validate(body)
        today = datetime.now(UTC).date()
        days = [(today - timedelta(days=n)).isoformat() for n in (2, 1, 0)]
        assert body["days"] == 3
        assert [(c["day"], c["severity"]) for c in body["counts"]] == [
            (day, severity) for day in days for severity in ("Info", "Warning", "Error", "Critical")
        ]
        default = (await notifications.get("/summary")).json()
        assert default["days"] == 7 and len(default["counts"]) == 28

    @pytest.mark.parametrize("days", ["0", "367", "week"])
    async def test_a_bad_number_of_days_is_a_422(self, notifications, days: str) -> None:
        notifications.problem(await notifications.get("/summary", days=days), 422)

    @staticmethod
    async def summary(notifications, days: int) -> dict[tuple[str, str], int]:
        answer = await notifications.get("/summary", days=days)
        assert answer.status_code == 200, answer.text
        return {(c["day"], c["severity"]): c["count"] for c in answer.json()["counts"]}


ROUTES = [
    ("GET", "/api/admin/notifications"),
    ("GET", "/api/admin/notifications?afterId=0"),
    ("POST", "/api/admin/notifications/read-all"),
    ("GET", "/api/admin/notifications/summary"),
    ("POST", "/api/admin/notifications/1/read"),
    ("DELETE", "/api/admin/notifications/1"),
]


class TestAuth:
    @pytest.mark.parametrize(("method", "path"), ROUTES)
    async def test_only_admins_may_use_the_feed(self, notifications, method, path) -> None:
        client = notifications.client
        answers = await asyncio.gather(
            client.request(method, path),
            client.request(method, path, headers={"Authorization": "Bearer not-a-jwt"}),
            client.request(method, path, headers=notifications.token(Role.MENTEE)),
            client.request(method, path, headers=notifications.token(Role.MENTOR)),
        )
        none, forged, mentee, mentor = answers
        notifications.problem(none, 401)
        notifications.problem(forged, 401)
        assert "admin" in notifications.problem(mentee, 403)["detail"]
        notifications.problem(mentor, 403)

"""Every change of what GET /api/orders/{id} shows grows the order's version by one and records
OrderChanged, with the view as GET then shows it, to the order changes fanout, in the same
transaction; a change that shows nothing records nothing. And GET takes an order link for that
very order, read-only.

The service runs in process (events on FastStream's TestRabbitBroker); what it emits is read
from its outbox.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from booking.contracts import PaymentInitiationFailed
from booking.runtime.auth import Role, issue_order_token

REF = "5f0c1e2d3a4b5c6d7e8f9a0b"
TIMEOUT = 30  # PAYMENT_OPENING_TIMEOUT_MINUTES, the default


@pytest.fixture
def orders(orders_in_process):
    return orders_in_process


async def changes(orders, order_id: str) -> list[dict[str, Any]]:
    """The views OrderChanged carried for the order, in the order they were recorded."""
    await orders.quiet()
    return [p["order"] for p in orders.events("OrderChanged") if p["order"]["id"] == order_id]


async def assert_last_change_is_what_get_shows(orders, booked) -> dict[str, Any]:
    shown = await orders.order(booked)
    recorded = await changes(orders, booked.order_id)
    assert recorded[-1] == shown
    assert [view["version"] for view in recorded] == list(range(1, shown["version"] + 1))
    return shown


class TestTheHappyPath:
    async def test_each_step_grows_the_version_by_one_and_records_the_view(self, orders) -> None:
        booked = await orders.booked()
        assert (await assert_last_change_is_what_get_shows(orders, booked))["version"] == 1

        steps = [
            (booked.initiated(REF), "awaiting_payment", "pending_payment"),
            (booked.completed(REF), "paid", "awaiting_calendar"),
            (booked.confirmed(), "confirmed", "scheduled"),
            (booked.escrow("released", 1), "confirmed", "scheduled"),
        ]
        for version, (event, status, session) in enumerate(steps, start=2):
            await orders.handled(await orders.publish(event))
            shown = await assert_last_change_is_what_get_shows(orders, booked)
            assert (shown["version"], shown["status"], shown["session"]["status"]) == (
                version,
                status,
                session,
            ), event
        assert shown["escrow"]["status"] == "released"

    async def test_order_changes_go_to_the_fanout_not_the_events_exchange(self, orders) -> None:
        booked = await orders.booked()
        rows = await orders.scalar(
            "SELECT json_agg(exchange) FROM orders.outbox "
            "WHERE event_type = 'OrderChanged' AND body LIKE :like",
            like=f"%{booked.order_id}%",
        )
        assert rows == [orders.settings.order_changes_exchange]

    async def test_a_repeat_or_a_stale_event_records_no_change(self, orders) -> None:
        booked = await orders.booked()
        await orders.pay(booked, REF)
        before = await assert_last_change_is_what_get_shows(orders, booked)
        for event in (
            booked.initiated(REF),  # late: the order is paid already, ref and link kept
            booked.completed(REF),  # a repeat
            booked.failed(REF),  # stale: a paid order stays paid
            booked.calendar_failed(final=False),  # the calendar tries again: nothing shows
        ):
            await orders.handled(await orders.publish(event))
        after = await assert_last_change_is_what_get_shows(orders, booked)
        assert after == before


class TestEveryPathThatChangesTheView:
    async def test_a_failed_payment(self, orders) -> None:
        booked = await orders.booked()
        await orders.handled(await orders.publish(booked.initiated(REF)))
        await orders.handled(await orders.publish(booked.failed(REF)))
        shown = await assert_last_change_is_what_get_shows(orders, booked)
        assert (shown["version"], shown["status"]) == (3, "payment_failed")

    async def test_a_payment_that_could_not_open(self, orders) -> None:
        booked = await orders.booked()
        failed = PaymentInitiationFailed(
            order_id=uuid.UUID(booked.order_id), reason="konnect_refused", detail="401"
        )
        await orders.handled(await orders.publish(failed))
        shown = await assert_last_change_is_what_get_shows(orders, booked)
        assert (shown["version"], shown["status"]) == (2, "cancelled")

    async def test_an_admins_cancel_once(self, orders) -> None:
        booked = await orders.booked()
        for _ in range(2):  # a repeat changes nothing
            answer = await orders.client.post(
                f"/api/admin/orders/{booked.order_id}/cancel",
                json={"reason": "the mentor is ill"},
                headers=orders.admin,
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["version"] == 2
        shown = await assert_last_change_is_what_get_shows(orders, booked)
        assert shown["status"] == "cancelled"

    async def test_the_sweepers_failure_of_a_payment_that_never_opened(self, orders) -> None:
        booked = await orders.booked()
        await orders.backdate(booked.order_id, TIMEOUT + 1)
        await orders.sweeper.run_once()
        shown = await assert_last_change_is_what_get_shows(orders, booked)
        assert (shown["version"], shown["status"]) == (2, "payment_failed")

    async def test_a_final_scheduling_failure_then_an_admins_retry(self, orders) -> None:
        booked = await orders.booked()
        await orders.pay(booked, REF)  # versions 2 and 3
        await orders.handled(await orders.publish(booked.calendar_failed(final=True)))
        shown = await assert_last_change_is_what_get_shows(orders, booked)
        assert (shown["version"], shown["session"]["status"]) == (4, "scheduling_failed")
        await orders.handled(await orders.publish(booked.escrow("frozen", 1)))
        await orders.handled(await orders.publish(booked.confirmed()))  # the retry worked
        shown = await assert_last_change_is_what_get_shows(orders, booked)
        assert (shown["version"], shown["status"], shown["escrow"]["status"]) == (
            6,
            "confirmed",
            "frozen",
        )


class TestOrderLinks:
    """GET /api/orders/{id} also takes an order link (the gateway's stream sends it on)."""

    def link(self, orders, order_id: str, ttl: int = 60) -> dict[str, str]:
        token = issue_order_token(orders.settings.order_link_key, uuid.UUID(order_id), ttl)
        return {"Authorization": f"Bearer {token}"}

    async def test_a_link_reads_its_order(self, orders) -> None:
        booked = await orders.booked()
        answer = await orders.client.get(
            f"/api/orders/{booked.order_id}", headers=self.link(orders, booked.order_id)
        )
        assert answer.status_code == 200, answer.text
        assert answer.json() == await orders.order(booked)

    async def test_a_link_to_another_order_or_an_expired_one_reads_nothing(self, orders) -> None:
        booked = await orders.booked()
        other = self.link(orders, str(uuid.uuid4()))
        answer = await orders.client.get(f"/api/orders/{booked.order_id}", headers=other)
        assert orders.problem(answer, 403)["detail"] == "this order link is for another order"
        expired = self.link(orders, booked.order_id, ttl=-60)
        answer = await orders.client.get(f"/api/orders/{booked.order_id}", headers=expired)
        assert "expired" in orders.problem(answer, 401)["detail"]

    async def test_a_link_signed_with_the_login_secret_is_refused(self, orders) -> None:
        booked = await orders.booked()
        secret = orders.settings.auth_jwt_secret.get_secret_value()
        token = issue_order_token(secret, uuid.UUID(booked.order_id), 60)
        answer = await orders.client.get(
            f"/api/orders/{booked.order_id}", headers={"Authorization": f"Bearer {token}"}
        )
        orders.problem(answer, 401)

    async def test_a_link_is_no_login_anywhere_else(self, orders) -> None:
        booked = await orders.booked()
        link = self.link(orders, booked.order_id)
        start = (datetime.now(UTC) + timedelta(days=90)).replace(microsecond=0)
        attempts = [
            orders.client.get(f"/api/mentors/{booked.mentor_id}", headers=link),
            orders.client.post(
                f"/api/admin/orders/{booked.order_id}/cancel",
                json={"reason": "with a link"},
                headers=link,
            ),
            orders.client.post(
                "/api/bookings",
                content=json.dumps(orders.booking(booked.offering_id, start)),
                headers={**link, "content-type": "application/json"},
            ),
        ]
        for attempt in attempts:
            orders.problem(await attempt, 401)
        assert (await orders.order(booked))["status"] == "pending"  # nothing changed

    async def test_a_mentor_token_still_may_not_read_orders(self, orders) -> None:
        booked = await orders.booked()
        answer = await orders.client.get(
            f"/api/orders/{booked.order_id}", headers=orders.token(Role.MENTOR)
        )
        orders.problem(answer, 403)

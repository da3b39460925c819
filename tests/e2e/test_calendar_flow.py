"""The calendar step through the gateway: a paid booking lands in the mentor's Google Calendar.

Against the running services and both sandboxes: the mentor connects Google through the real
consent redirect and callback, a mentee books and pays, and the session ends scheduled with its
Meet link and the order confirmed; without a working connection it fails for the admins to see,
and is scheduled by itself once the mentor connects.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e

MEET = "https://meet.google.com/"


@pytest.fixture(scope="module")
def system_overrides() -> dict[str, str]:
    return {"GOOGLE_MAX_ATTEMPTS": "3", "GOOGLE_RETRY_BASE_SECONDS": "0.05"}


async def paid_booking(market, offering) -> str:
    order_id = await market.booked(offering)
    await market.pay(await market.payment_ref(order_id))
    return order_id


class TestAConnectedMentor:
    async def test_a_paid_booking_is_confirmed_with_one_event_and_its_meet_link(
        self, market, events
    ):
        offering = await market.offering()
        mentor_id = offering["mentor_id"]
        connection = await market.connect_calendar(mentor_id)
        assert connection["connected"] is True and connection["revoked"] is False

        order_id = await paid_booking(market, offering)

        order = await market.order_when(
            order_id, "the order confirmed", lambda o: o["status"] == "confirmed"
        )
        session = order["session"]
        assert session["status"] == "scheduled"
        assert session["meet_link"].startswith(MEET)
        [event] = await market.google_events(mentor_id)
        assert event["id"] == session["calendar_event_id"]
        assert event["hangoutLink"] == session["meet_link"]
        assert [a["email"] for a in event["attendees"]] == ["youssef@example.com"]
        [confirmed] = await events.seen("CalendarBookingConfirmed", order_id=order_id)
        assert confirmed["meet_link"] == session["meet_link"]

    async def test_a_revoked_connection_holds_the_booking_until_the_mentor_reconnects(
        self, market, google, events
    ):
        offering = await market.offering()
        mentor_id = offering["mentor_id"]
        await market.connect_calendar(mentor_id)
        revoked = await google.post(
            "/_sandbox/revoke", json={"account": market.mentor_emails[mentor_id]}
        )
        assert revoked.status_code == 200, revoked.text

        order_id = await paid_booking(market, offering)

        [failed] = await events.seen("CalendarBookingFailed", order_id=order_id)
        assert failed["reason"] == "integration_revoked"
        # Not final: it waits for the mentor to connect again, until the session starts.
        assert (failed["final"], failed["next_attempt_at"]) == (False, None)
        order = await market.order_when(order_id, "the order paid", lambda o: o["status"] == "paid")
        assert order["session"]["status"] == "awaiting_calendar"  # its slot still held
        assert order["escrow"]["status"] == "held"  # not frozen: nothing was given up
        status = await market.api.get(f"/api/mentors/{mentor_id}/calendar", headers=market.admin)
        assert status.json()["revoked"] is True
        assert await market.google_events(mentor_id) == []

        await market.connect_calendar(mentor_id)
        order = await market.order_when(
            order_id, "the order confirmed", lambda o: o["status"] == "confirmed"
        )
        assert order["session"]["status"] == "scheduled"
        assert len(await market.google_events(mentor_id)) == 1


class TestAMentorWithoutGoogle:
    async def test_the_booking_fails_then_is_scheduled_by_itself_once_the_mentor_connects(
        self, market, events
    ):
        offering = await market.offering()
        mentor_id = offering["mentor_id"]
        order_id = await paid_booking(market, offering)
        [failed] = await events.seen("CalendarBookingFailed", order_id=order_id)
        assert failed["reason"] == "mentor_not_integrated"
        assert failed["final"] is False
        order = await market.order_when(order_id, "the order paid", lambda o: o["status"] == "paid")
        assert order["session"]["status"] == "awaiting_calendar"

        await market.connect_calendar(mentor_id)

        order = await market.order_when(
            order_id, "the order confirmed", lambda o: o["status"] == "confirmed"
        )
        assert order["session"]["meet_link"].startswith(MEET)
        assert len(await market.google_events(mentor_id)) == 1

    async def test_a_tampered_callback_is_refused_and_connects_nothing(self, market):
        offering = await market.offering()
        mentor_id = offering["mentor_id"]
        auth_url = await market.consent_url(mentor_id, market.admin)
        approved = await market.google.post("/_sandbox/oauth/approve", json={"auth_url": auth_url})
        back = approved.json()["location"].replace("state=", "state=x")

        refused = await market.api.get(back)

        assert 400 <= refused.status_code < 500, refused.text
        assert refused.headers["content-type"].startswith("application/problem+json")
        status = await market.api.get(f"/api/mentors/{mentor_id}/calendar", headers=market.admin)
        assert status.json()["connected"] is False

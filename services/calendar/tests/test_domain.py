"""The calendar's pure rules: the event of a session, bookings, the signed consent state."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from booking.calendar.domain import (
    RECOVERABLE,
    AlreadyConfirmed,
    BookingStatus,
    CalendarBooking,
    ConsentState,
    ExpiredState,
    SessionEvent,
    TamperedState,
    _b64,
    _unb64,
    google_event_id,
    local_time,
)
from booking.contracts import CalendarFailureReason
from booking.runtime.domain import IllegalTransition

NOW = datetime(2030, 5, 1, 9, 0, tzinfo=UTC)
KEY = b"k" * 32


def session_event(**fields) -> SessionEvent:
    values = {
        "session_id": uuid.uuid4(),
        "order_id": uuid.uuid4(),
        "title": "Career chat",
        "mentee_email": "amira@example.com",
        "start_at": NOW,
        "end_at": NOW + timedelta(hours=1),
        "timezone": "Africa/Tunis",
    }
    values.update(fields)
    return SessionEvent(**values)


class TestTheEventOfASession:
    def test_the_event_id_follows_googles_base32hex_rules(self) -> None:
        for _ in range(200):
            assert re.fullmatch(r"[a-v0-9]{5,1024}", google_event_id(uuid.uuid4()))

    def test_the_event_id_is_the_same_on_every_attempt(self) -> None:
        session_id = uuid.uuid4()
        assert google_event_id(session_id) == google_event_id(uuid.UUID(str(session_id)))
        assert google_event_id(session_id) != google_event_id(uuid.uuid4())

    def test_the_body_asks_for_a_meet_link_and_invites_the_mentee(self) -> None:
        event = session_event()

        body = event.body()

        assert body["id"] == event.session_id.hex
        assert body["summary"] == "Career chat"
        assert body["attendees"] == [{"email": "amira@example.com"}]
        create = body["conferenceData"]["createRequest"]
        assert create["conferenceSolutionKey"] == {"type": "hangoutsMeet"}
        assert event.session_id.hex in create["requestId"]
        assert str(event.order_id) in body["description"]

    def test_times_are_written_in_the_mentors_zone(self) -> None:
        body = session_event().body()

        assert body["start"] == {
            "dateTime": "2030-05-01T10:00:00+01:00",
            "timeZone": "Africa/Tunis",
        }
        assert body["end"]["dateTime"] == "2030-05-01T11:00:00+01:00"

    def test_an_unknown_zone_falls_back_to_utc(self) -> None:
        assert local_time(NOW, "Mars/Olympus") == ("2030-05-01T09:00:00+00:00", "UTC")


def booking(status: BookingStatus = BookingStatus.PENDING, **fields) -> CalendarBooking:
    return CalendarBooking(
        session_id=uuid.uuid4(),
        order_id=uuid.uuid4(),
        mentor_id=uuid.uuid4(),
        status=status,
        attempts=1,
        updated_at=NOW,
        **fields,
    )


class TestBookings:
    def test_a_pending_booking_is_confirmed_with_its_links(self) -> None:
        pending = booking()

        pending.confirm("abc123", "https://meet.google.com/x", "https://c/e", NOW)

        assert pending.status is BookingStatus.CONFIRMED
        assert (pending.event_id, pending.meet_link) == ("abc123", "https://meet.google.com/x")

    def test_a_late_success_wins_over_a_failure(self) -> None:
        failed = booking(
            BookingStatus.FAILED, reason=CalendarFailureReason.CALENDAR_API_ERROR, detail="503"
        )

        failed.confirm("abc123", "https://meet.google.com/x", "https://c/e", NOW)

        assert failed.status is BookingStatus.CONFIRMED
        assert failed.reason is None and failed.detail is None

    def test_confirming_twice_is_refused(self) -> None:
        done = booking(BookingStatus.CONFIRMED)
        with pytest.raises(AlreadyConfirmed):
            done.confirm("abc123", "https://meet.google.com/x", "https://c/e", NOW)

    def test_only_a_pending_booking_can_fail(self) -> None:
        pending = booking()
        pending.fail(CalendarFailureReason.STORE_NOT_FOUND, "unknown mentor", NOW)
        assert pending.status is BookingStatus.FAILED

        with pytest.raises(IllegalTransition):
            booking(BookingStatus.CONFIRMED).fail(
                CalendarFailureReason.CALENDAR_API_ERROR, "x", NOW
            )

    def test_only_missing_connections_are_recovered_by_a_reconnect(self) -> None:
        assert {
            CalendarFailureReason.MENTOR_NOT_INTEGRATED,
            CalendarFailureReason.INTEGRATION_REVOKED,
        } == RECOVERABLE


class TestConsentState:
    def test_a_signed_state_verifies_until_it_expires(self) -> None:
        mentor = uuid.uuid4()
        state = ConsentState.issue(mentor, "nonce-1", NOW, timedelta(minutes=10))
        token = state.sign(KEY)

        assert ConsentState.verify(token, KEY, NOW + timedelta(minutes=9)) == state
        with pytest.raises(ExpiredState):
            ConsentState.verify(token, KEY, NOW + timedelta(minutes=10))

    def test_another_mentor_under_the_same_signature_is_refused(self) -> None:
        token = ConsentState.issue(uuid.uuid4(), "n", NOW, timedelta(minutes=10)).sign(KEY)
        payload, signature = token.split(".")
        claims = json.loads(_unb64(payload))
        claims["m"] = str(uuid.uuid4())
        forged = f"{_b64(json.dumps(claims).encode())}.{signature}"

        with pytest.raises(TamperedState):
            ConsentState.verify(forged, KEY, NOW)

    def test_a_later_expiry_under_the_same_signature_is_refused(self) -> None:
        token = ConsentState.issue(uuid.uuid4(), "n", NOW, timedelta(minutes=10)).sign(KEY)
        payload, signature = token.split(".")
        claims = json.loads(_unb64(payload))
        claims["e"] = (NOW + timedelta(days=365)).isoformat()
        forged = f"{_b64(json.dumps(claims).encode())}.{signature}"

        with pytest.raises(TamperedState):
            ConsentState.verify(forged, KEY, NOW + timedelta(hours=1))

    @pytest.mark.parametrize("token", ["", "garbage", "a.b", "!!.??", "x" * 300])
    def test_garbage_is_refused(self, token: str) -> None:
        with pytest.raises(TamperedState):
            ConsentState.verify(token, KEY, NOW)

    def test_another_key_is_refused(self) -> None:
        token = ConsentState.issue(uuid.uuid4(), "n", NOW, timedelta(minutes=10)).sign(KEY)
        with pytest.raises(TamperedState):
            ConsentState.verify(token, b"o" * 32, NOW)

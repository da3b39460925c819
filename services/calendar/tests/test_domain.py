"""The calendar's pure rules: the event of a session, bookings, the signed consent state."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from booking.calendar.domain import (
    RECOVERABLE,
    RETRIED_ON_SCHEDULE,
    AlreadyCancelled,
    AlreadyConfirmed,
    BookingStatus,
    CalendarBooking,
    ConsentState,
    ExpiredState,
    InvalidSchedule,
    NothingToRetry,
    RetrySchedule,
    SessionEvent,
    TamperedState,
    _b64,
    _unb64,
    google_event_id,
    local_time,
)
from booking.contracts import CalendarFailureReason
from booking.runtime.domain import DomainError, IllegalTransition

NOW = datetime(2030, 5, 1, 9, 0, tzinfo=UTC)
KEY = b"k" * 32


def session_event(**fields: Any) -> SessionEvent:
    values: dict[str, Any] = {
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


MINUTE = timedelta(minutes=1)
SCHEDULE = RetrySchedule.from_minutes("1,5,15,60")
START = NOW + timedelta(days=2)
API_ERROR = CalendarFailureReason.CALENDAR_API_ERROR
NOT_INTEGRATED = CalendarFailureReason.MENTOR_NOT_INTEGRATED


def booking(status: BookingStatus = BookingStatus.PENDING, **fields) -> CalendarBooking:
    values = {"attempts": 0, "start_at": START, **fields}
    return CalendarBooking(
        session_id=uuid.uuid4(),
        order_id=uuid.uuid4(),
        mentor_id=uuid.uuid4(),
        status=status,
        updated_at=NOW,
        **values,
    )


def run_again(failed: CalendarBooking) -> None:
    """What the sweeper's claim does to a failed booking whose next attempt is due."""
    assert failed.status is BookingStatus.FAILED and not failed.final
    failed.status = BookingStatus.PENDING
    failed.next_attempt_at = None


class TestRetrySchedule:
    def test_minutes_are_read_with_fractions(self) -> None:
        schedule = RetrySchedule.from_minutes("0.01, 0.5,2")
        assert schedule.delays == (
            timedelta(seconds=0.6),
            timedelta(seconds=30),
            timedelta(minutes=2),
        )

    @pytest.mark.parametrize("text", ["", "a", "1,,2", "0", "1,-5", "inf", "nan", "1;5"])
    def test_anything_but_positive_minutes_is_refused(self, text: str) -> None:
        with pytest.raises(InvalidSchedule):
            RetrySchedule.from_minutes(text)

    def test_each_failure_waits_its_delay_and_the_one_after_the_last_gives_up(self) -> None:
        waits = [SCHEDULE.next_attempt_at(n, NOW) for n in range(0, 6)]

        assert waits == [
            None,
            NOW + MINUTE,
            NOW + 5 * MINUTE,
            NOW + 15 * MINUTE,
            NOW + 60 * MINUTE,
            None,
        ]


class TestAttempts:
    def test_every_outcome_counts_one_attempt(self) -> None:
        pending = booking()
        pending.put_off(NOW)
        pending.fail(API_ERROR, "503", NOW, SCHEDULE)
        run_again(pending)
        pending.confirm("abc123", "https://meet.google.com/x", "https://c/e", NOW)

        assert pending.attempts == 3

    def test_only_a_pending_booking_is_put_off(self) -> None:
        with pytest.raises(IllegalTransition):
            booking(BookingStatus.CANCELLED).put_off(NOW)


class TestFailures:
    @pytest.mark.parametrize("reason", sorted(RETRIED_ON_SCHEDULE))
    def test_a_failure_on_the_schedule_waits_for_its_first_delay(self, reason) -> None:
        pending = booking()

        pending.fail(reason, "it broke", NOW, SCHEDULE)

        assert pending.status is BookingStatus.FAILED
        assert (pending.reason, pending.detail) == (reason, "it broke")
        assert pending.final is False and pending.next_attempt_at == NOW + MINUTE
        assert (pending.attempts, pending.schedule_failures) == (1, 1)

    def test_the_failure_after_the_last_delay_is_final(self) -> None:
        pending = booking()
        waits = []
        for _ in range(5):
            if pending.status is BookingStatus.FAILED:
                run_again(pending)
            pending.fail(API_ERROR, "503", NOW, SCHEDULE)
            waits.append(pending.next_attempt_at and pending.next_attempt_at - NOW)

        assert waits == [MINUTE, 5 * MINUTE, 15 * MINUTE, 60 * MINUTE, None]
        assert pending.final is True and pending.attempts == 5

    @pytest.mark.parametrize("reason", sorted(RECOVERABLE))
    def test_a_missing_connection_waits_for_a_reconnect_with_no_next_attempt(self, reason) -> None:
        pending = booking(schedule_failures=2)

        pending.fail(reason, "connect Google", NOW, SCHEDULE)

        assert pending.final is False and pending.next_attempt_at is None
        assert pending.waits_for_reconnect
        assert pending.schedule_failures == 2  # not a failure of the schedule's

    @pytest.mark.parametrize("reason", [API_ERROR, NOT_INTEGRATED])
    def test_any_failure_once_the_session_has_begun_is_final(self, reason) -> None:
        late = booking(start_at=NOW)

        late.fail(reason, "too late", NOW, SCHEDULE)

        assert late.final is True and late.next_attempt_at is None

    def test_only_a_pending_booking_can_fail(self) -> None:
        for status in (BookingStatus.CONFIRMED, BookingStatus.FAILED, BookingStatus.CANCELLED):
            with pytest.raises(IllegalTransition):
                booking(status).fail(API_ERROR, "x", NOW, SCHEDULE)

    def test_only_missing_connections_are_recovered_by_a_reconnect(self) -> None:
        assert {
            CalendarFailureReason.MENTOR_NOT_INTEGRATED,
            CalendarFailureReason.INTEGRATION_REVOKED,
        } == RECOVERABLE
        assert set(CalendarFailureReason) == RECOVERABLE | RETRIED_ON_SCHEDULE
        assert not RECOVERABLE & RETRIED_ON_SCHEDULE


class TestGivingUp:
    def waiting(self, **fields) -> CalendarBooking:
        pending = booking(**fields)
        pending.fail(NOT_INTEGRATED, "connect Google", NOW, SCHEDULE)
        return pending

    def test_a_booking_still_waiting_for_a_reconnect_at_its_start_is_final(self) -> None:
        waiting = self.waiting()

        waiting.give_up(START)

        assert waiting.final is True and waiting.status is BookingStatus.FAILED
        assert waiting.reason is NOT_INTEGRATED
        assert waiting.detail is not None
        assert waiting.detail.startswith("connect Google") and "given up" in waiting.detail
        assert not waiting.waits_for_reconnect

    def test_not_before_its_start(self) -> None:
        waiting = self.waiting()
        with pytest.raises(DomainError):
            waiting.give_up(START - timedelta(seconds=1))
        assert waiting.final is False

    def test_not_a_booking_on_the_retry_schedule_nor_a_final_one(self) -> None:
        on_schedule = booking()
        on_schedule.fail(API_ERROR, "503", NOW, SCHEDULE)
        given_up = self.waiting()
        given_up.give_up(START)

        for refused in (on_schedule, given_up, booking(), booking(BookingStatus.CANCELLED)):
            with pytest.raises(IllegalTransition):
                refused.give_up(START)


class TestConfirming:
    def test_a_pending_booking_is_confirmed_with_its_links(self) -> None:
        pending = booking()

        pending.confirm("abc123", "https://meet.google.com/x", "https://c/e", NOW)

        assert pending.status is BookingStatus.CONFIRMED
        assert (pending.event_id, pending.meet_link) == ("abc123", "https://meet.google.com/x")

    def test_a_late_success_wins_over_a_failure_even_a_final_one(self) -> None:
        failed = booking(
            BookingStatus.FAILED, reason=API_ERROR, detail="503", final=True, attempts=5
        )

        failed.confirm("abc123", "https://meet.google.com/x", "https://c/e", NOW)

        assert failed.status is BookingStatus.CONFIRMED
        assert failed.reason is None and failed.detail is None and failed.final is False
        assert failed.attempts == 6

    def test_confirming_twice_is_refused(self) -> None:
        done = booking(BookingStatus.CONFIRMED)
        with pytest.raises(AlreadyConfirmed):
            done.confirm("abc123", "https://meet.google.com/x", "https://c/e", NOW)

    def test_a_cancelled_booking_is_never_confirmed(self) -> None:
        cancelled = booking(BookingStatus.CANCELLED)
        with pytest.raises(IllegalTransition):
            cancelled.confirm("abc123", "https://meet.google.com/x", "https://c/e", NOW)
        assert cancelled.status is BookingStatus.CANCELLED and cancelled.meet_link is None


class TestAnAdminsRetry:
    def test_a_final_failure_is_pending_again_on_a_new_schedule(self) -> None:
        final = booking()
        for _ in range(5):
            if final.status is BookingStatus.FAILED:
                run_again(final)
            final.fail(API_ERROR, "503", NOW, SCHEDULE)
        assert final.final

        final.retry(NOW)

        assert final.status is BookingStatus.PENDING and final.final is False
        assert final.reason is None and final.next_attempt_at is None
        final.fail(API_ERROR, "503 again", NOW, SCHEDULE)
        assert final.next_attempt_at == NOW + MINUTE  # the schedule's first delay again
        assert final.attempts == 6

    def test_a_failure_waiting_for_its_next_attempt_is_run_now(self) -> None:
        waiting = booking()
        waiting.fail(API_ERROR, "503", NOW, SCHEDULE)

        waiting.retry(NOW)

        assert waiting.status is BookingStatus.PENDING and waiting.next_attempt_at is None

    @pytest.mark.parametrize("status", [BookingStatus.PENDING, BookingStatus.CONFIRMED])
    def test_nothing_to_retry_in_a_pending_or_confirmed_booking(self, status) -> None:
        untouched = booking(status)
        with pytest.raises(NothingToRetry):
            untouched.retry(NOW)
        assert untouched.status is status

    def test_a_cancelled_booking_is_refused(self) -> None:
        with pytest.raises(IllegalTransition):
            booking(BookingStatus.CANCELLED).retry(NOW)


class TestCancelling:
    @pytest.mark.parametrize(
        "status", [BookingStatus.PENDING, BookingStatus.CONFIRMED, BookingStatus.FAILED]
    )
    def test_any_booking_is_cancelled_and_owes_its_event_a_delete(self, status) -> None:
        live = booking(status, next_attempt_at=NOW + MINUTE, event_id="abc123")

        live.cancel("admin_cancelled", NOW)

        assert live.status is BookingStatus.CANCELLED and live.event_delete_pending
        assert live.next_attempt_at is None and live.final is False
        assert live.detail is not None
        assert "admin_cancelled" in live.detail
        assert live.event_id == "abc123"  # what to delete

    def test_cancelling_twice_changes_nothing(self) -> None:
        cancelled = booking()
        cancelled.cancel("admin_cancelled", NOW)
        cancelled.event_delete_pending = False  # Google said it is gone

        with pytest.raises(AlreadyCancelled):
            cancelled.cancel("admin_cancelled", NOW + MINUTE)

        assert cancelled.event_delete_pending is False and cancelled.updated_at == NOW


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

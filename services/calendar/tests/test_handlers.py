"""register_mentor, link_mentor_identity and schedule_session: a mentor's record keeps its
latest identity-provider subject; a paid session becomes exactly one calendar event.

The handlers run on FastStream's TestRabbitBroker (no RabbitMQ): events reach the consumer
through `deliver`, and what the service emits is read from its outbox. The one test whose point
is the broker (a message retried through the delay queues into the dead letters, then replayed)
runs on the real RabbitMQ.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.fernet import Fernet
from prometheus_client.parser import text_string_to_metric_families

from booking.calendar.tables import SCHEMA
from booking.contracts import MentorIdentityLinked, MentorRegistered
from booking.devtools.fixtures import eventually


@pytest.fixture
async def calendar(start_on_test_broker):
    """The service's handlers on the test broker: a real broker is not the point here."""
    return await start_on_test_broker()


async def handled(calendar, count: int) -> bool:
    return await calendar.db.fetchval(f"SELECT count(*) FROM {SCHEMA}.inbox") >= count


class TestRegisterMentor:
    async def test_a_repeated_registration_keeps_one_mentor(self, calendar):
        event = MentorRegistered(
            mentor_id=uuid.uuid4(), name="Ada", email="ada@example.com", timezone="Europe/Paris"
        )
        await calendar.publish(event)
        await calendar.publish(event)
        await eventually(lambda: handled(calendar, 2), what="both deliveries handled")

        rows = await calendar.db.fetch(f"SELECT * FROM {SCHEMA}.mentors")
        assert [(r["id"], r["email"], r["timezone"]) for r in rows] == [
            (event.mentor_id, "ada@example.com", "Europe/Paris")
        ]


def linked(mentor_id: uuid.UUID, subject: str, sequence: int = 1) -> MentorIdentityLinked:
    return MentorIdentityLinked(
        mentor_id=mentor_id,
        identity_subject=subject,
        by="admin-1",
        reason="the mentor signs in with the company's identity provider",
        linked_at=datetime.now(UTC),
        sequence=sequence,
    )


async def consumed(calendar, outcome: str, type_: str = "MentorIdentityLinked") -> float:
    """How many `type_` messages the consumer counted with `outcome` (its /metrics)."""
    answer = await calendar.http.get("/metrics")
    labels = {"consumer": f"{calendar.settings.queue_prefix}calendar", "type": type_}
    return sum(
        sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
        if sample.name == "booking_messages_handled_total"
        and sample.labels == {**labels, "outcome": outcome}
    )


async def identity_of(calendar, mentor_id: uuid.UUID) -> tuple[str | None, int] | None:
    row = await calendar.db.fetchrow(
        f"SELECT identity_subject, identity_sequence FROM {SCHEMA}.mentors WHERE id = $1",
        mentor_id,
    )
    return None if row is None else (row["identity_subject"], row["identity_sequence"])


class TestLinkMentorIdentity:
    async def test_a_registration_brings_its_subject(self, calendar):
        mentor = await calendar.register_mentor(identity_subject="auth0|first")
        assert await identity_of(calendar, mentor.id) == ("auth0|first", 0)

    async def test_a_link_is_kept_once_however_often_it_comes(self, calendar):
        mentor = await calendar.register_mentor(identity_subject="auth0|first")
        event = linked(mentor.id, "kc-7d0a4a7e")
        message_id = uuid.uuid4()

        await calendar.publish(event, message_id=message_id)
        await calendar.publish(event, message_id=message_id)  # redelivered
        await calendar.publish(event)  # the same fact under another message id

        async def all_three_consumed() -> bool:
            return (
                await consumed(calendar, "handled") == 2
                and await consumed(calendar, "duplicate") == 1
            )

        await eventually(all_three_consumed, what="the three deliveries consumed")
        assert await identity_of(calendar, mentor.id) == ("kc-7d0a4a7e", 1)
        assert await consumed(calendar, "retried") == 0

    async def test_an_older_link_arriving_late_changes_nothing(self, calendar):
        mentor = await calendar.register_mentor()
        await calendar.publish(linked(mentor.id, "auth0|second", sequence=2))
        await eventually(lambda: handled(calendar, 2), what="the second link handled")

        await calendar.publish(linked(mentor.id, "auth0|first", sequence=1))
        await eventually(lambda: handled(calendar, 3), what="the first link handled")

        assert await identity_of(calendar, mentor.id) == ("auth0|second", 2)
        assert await consumed(calendar, "retried") == 0

    async def test_a_link_for_an_unknown_mentor_waits_as_a_dead_letter_for_its_replay(
        self, start_calendar
    ):
        """On the real RabbitMQ: the link goes through the delay queues into the dead-letter
        queue, whose keeper stores it, and the replay comes back through the service's queue."""
        calendar = await start_calendar()
        mentor_id = uuid.uuid4()
        message_id = uuid.uuid4()
        event = linked(mentor_id, "auth0|early")
        await calendar.publish(event, message_id=message_id)

        async def dead_letter() -> str | None:
            return await calendar.db.fetchval(
                f"SELECT error FROM {SCHEMA}.dead_letters WHERE message_id = $1", str(message_id)
            )

        error = await eventually(dead_letter, what="the link kept as a dead letter")
        assert f"no mentor {mentor_id} to link" in error
        assert await identity_of(calendar, mentor_id) is None

        await calendar.register_mentor(mentor_id=mentor_id)
        await calendar.publish(event, message_id=message_id)  # as a replay sends it

        async def applied() -> bool:
            return await identity_of(calendar, mentor_id) == ("auth0|early", 1)

        await eventually(applied, what="the replayed link applied")


class TestScheduleSession:
    async def test_a_paid_session_gets_one_event_with_a_meet_link(self, calendar, sandbox):
        mentor = await calendar.connected()
        paid = await calendar.pay(mentor, title="Mock interview", mentee_email="sami@example.com")

        confirmed = await calendar.confirmed(paid.session_id)

        [event] = await sandbox.events(mentor.email)
        assert confirmed == {
            "session_id": str(paid.session_id),
            "order_id": str(paid.order_id),
            "event_id": paid.session_id.hex,
            "meet_link": event["hangoutLink"],
            "html_link": event["htmlLink"],
        }
        assert event["id"] == paid.session_id.hex and event["summary"] == "Mock interview"
        assert event["hangoutLink"].startswith("https://meet.google.com/")
        # conferenceDataVersion=1 honoured: the Meet conference exists, its video entry the link.
        entry = event["conferenceData"]["entryPoints"][0]
        assert entry["entryPointType"] == "video" and entry["uri"] == event["hangoutLink"]
        assert [a["email"] for a in event["attendees"]] == ["sami@example.com"]
        assert event["sandbox"]["send_updates"] == "all"
        booking = await calendar.booking(paid.session_id)
        assert booking["status"] == "confirmed" and booking["meet_link"] == event["hangoutLink"]
        assert booking["claimed_until"] is None
        assert await calendar.recorded("CalendarBookingFailed") == []

    async def test_order_paid_delivered_twice_makes_one_event(self, calendar, sandbox):
        mentor = await calendar.connected()
        paid = await calendar.pay(mentor)
        await calendar.publish(paid)  # the same fact, under another message id
        await eventually(lambda: handled(calendar, 3), what="mentor and both deliveries handled")

        await calendar.confirmed(paid.session_id)  # once

        assert len(await sandbox.events(mentor.email)) == 1

    async def test_google_failing_twice_then_answering_makes_one_event(self, calendar, sandbox):
        mentor = await calendar.connected()
        await sandbox.fault("http_500", count=2, endpoint="insert")

        paid = await calendar.pay(mentor)

        await calendar.confirmed(paid.session_id)
        assert len(await sandbox.events(mentor.email)) == 1

    async def test_google_failing_throughout_is_a_calendar_api_error(self, calendar, sandbox):
        mentor = await calendar.connected()
        await sandbox.fault("http_503", count=calendar.settings.google_max_attempts)

        paid = await calendar.pay(mentor)

        failed = await calendar.failed(paid.session_id)
        assert failed["reason"] == "calendar_api_error"
        # The first scheduling attempt, made of every HTTP attempt the client allows.
        assert failed["attempts"] == 1
        assert (
            f"gave up after {calendar.settings.google_max_attempts} attempt(s)"
            in (failed["detail"])
        )
        assert "503" in failed["detail"] and "currently unavailable" in failed["detail"]
        assert failed["mentor_id"] == str(mentor.id)
        assert failed["order_id"] == str(paid.order_id)
        # Not final: it waits for the retry schedule's first delay.
        assert failed["final"] is False
        [attempt] = await calendar.attempts(paid.session_id)
        assert datetime.fromisoformat(failed["next_attempt_at"]) == attempt["next_attempt_at"]
        assert attempt["next_attempt_at"] - attempt["at"] == timedelta(minutes=1)
        assert (attempt["outcome"], attempt["reason"]) == ("failed", "calendar_api_error")
        assert (attempt["attempt"], attempt["detail"]) == (1, failed["detail"])
        assert await sandbox.events(mentor.email) == []
        booking = await calendar.booking(paid.session_id)
        assert booking["status"] == "failed" and booking["reason"] == "calendar_api_error"
        assert (booking["final"], booking["attempts"]) == (False, 1)

    async def test_a_mentor_who_never_connected_is_not_integrated(self, calendar):
        mentor = await calendar.register_mentor()

        paid = await calendar.pay(mentor)

        failed = await calendar.failed(paid.session_id)
        assert failed["reason"] == "mentor_not_integrated" and failed["attempts"] == 1
        # It waits for the mentor to connect, not for a time.
        assert failed["final"] is False and failed["next_attempt_at"] is None
        booking = await calendar.booking(paid.session_id)
        assert booking["status"] == "failed" and booking["next_attempt_at"] is None
        [attempt] = await calendar.attempts(paid.session_id)
        assert (attempt["attempt"], attempt["reason"]) == (1, "mentor_not_integrated")

    async def test_a_disconnected_mentor_is_not_integrated(self, calendar, sandbox):
        mentor = await calendar.connected()
        response = await calendar.http.delete(
            f"/api/mentors/{mentor.id}/calendar", headers=calendar.token()
        )
        assert response.status_code == 204

        paid = await calendar.pay(mentor)

        assert (await calendar.failed(paid.session_id))["reason"] == "mentor_not_integrated"
        assert await sandbox.events(mentor.email) == []

    async def test_an_unknown_mentor_is_store_not_found(self, calendar):
        paid = await calendar.pay(uuid.uuid4())

        failed = await calendar.failed(paid.session_id)

        assert failed["reason"] == "store_not_found"
        assert str(paid.mentor_id) in failed["detail"]
        # MentorRegistered may be late: tried again on the schedule.
        assert failed["final"] is False and failed["next_attempt_at"] is not None

    async def test_a_revoked_token_is_integration_revoked_and_marks_the_connection(
        self, calendar, sandbox
    ):
        mentor = await calendar.connected()
        await sandbox.revoke(mentor.email)

        paid = await calendar.pay(mentor)

        failed = await calendar.failed(paid.session_id)
        assert failed["reason"] == "integration_revoked"
        assert "invalid_grant" in failed["detail"]
        assert (await calendar.connection(mentor))["revoked_at"] is not None
        status = await calendar.http.get(
            f"/api/mentors/{mentor.id}/calendar", headers=calendar.token()
        )
        assert status.json()["revoked"] is True and status.json()["connected"] is False
        # The next booking is refused at once, without asking Google again.
        tokens_before = await sandbox.access_tokens_issued(mentor.email)
        later = await calendar.pay(mentor)
        assert (await calendar.failed(later.session_id))["reason"] == "integration_revoked"
        assert await sandbox.access_tokens_issued(mentor.email) == tokens_before

    async def test_an_exception_while_scheduling_is_an_unexpected_error_with_its_trace(
        self, calendar, sandbox
    ):
        mentor = await calendar.connected()
        # The stored token was encrypted under another key (a key rotated without migrating).
        foreign = Fernet(Fernet.generate_key()).encrypt(b"1//0-some-token").decode()
        await calendar.db.execute(
            f"UPDATE {SCHEMA}.connections SET refresh_token_encrypted = $1 WHERE mentor_id = $2",
            foreign,
            mentor.id,
        )

        paid = await calendar.pay(mentor)

        failed = await calendar.failed(paid.session_id)
        assert failed["reason"] == "unexpected_error"
        assert failed["final"] is False and failed["next_attempt_at"] is not None
        assert failed["detail"].startswith("Traceback (most recent call last)")
        assert "InvalidToken" in failed["detail"] and "schedule_claimed" in failed["detail"]
        assert await sandbox.events(mentor.email) == []

    async def test_meet_data_pending_then_there_confirms_with_the_link(
        self, start_on_test_broker, pending_meet_sandbox
    ):
        calendar = await start_on_test_broker(pending_meet_sandbox)
        mentor = await calendar.connected()

        paid = await calendar.pay(mentor)

        confirmed = await calendar.confirmed(paid.session_id)
        [event] = await pending_meet_sandbox.events(mentor.email)
        assert confirmed["meet_link"] == event["hangoutLink"]

    async def test_meet_data_still_pending_is_looked_at_again_by_the_sweeper(
        self, start_on_test_broker, pending_meet_sandbox
    ):
        calendar = await start_on_test_broker(pending_meet_sandbox, google_meet_poll_attempts=0)
        retry = timedelta(seconds=calendar.settings.meet_pending_retry_seconds)
        mentor = await calendar.connected()
        paid = await calendar.pay(mentor)

        async def put_off() -> bool:
            # The first run ended: the booking waits for a later look, not for its lease.
            row = await calendar.booking(paid.session_id)
            soon = datetime.now(UTC) + 2 * retry
            return (
                row is not None
                and row["claimed_until"] is not None
                and (row["claimed_until"] < soon)
            )

        await eventually(put_off, what="the first run to put the booking off")
        assert await calendar.recorded("CalendarBookingConfirmed") == []
        later = datetime.now(UTC) + retry + timedelta(seconds=5)
        runs = [await calendar.sweeper.run_once(later) for _ in range(3)]  # a read each

        assert [run.scheduled for run in runs] == [1, 1, 1]
        confirmed = await calendar.confirmed(paid.session_id)
        assert confirmed["meet_link"].startswith("https://meet.google.com/")
        assert len(await pending_meet_sandbox.events(mentor.email)) == 1
        attempts = await calendar.attempts(paid.session_id)
        assert [a["outcome"] for a in attempts] == ["meet_pending"] * 3 + ["confirmed"]
        assert "Meet data was still pending" in attempts[0]["detail"]
        assert attempts[-1]["detail"] is None

    async def test_an_expired_access_token_is_refreshed_once(self, calendar, sandbox):
        mentor = await calendar.connected()
        first = await calendar.pay(mentor)
        await calendar.confirmed(first.session_id)
        await sandbox.expire_access_tokens(mentor.email)
        issued = await sandbox.access_tokens_issued(mentor.email)

        later = await calendar.pay(mentor)

        await calendar.confirmed(later.session_id)
        assert await sandbox.access_tokens_issued(mentor.email) == issued + 1

    async def test_a_cached_access_token_serves_the_next_bookings(self, calendar, sandbox):
        mentor = await calendar.connected()
        code_exchange = await sandbox.access_tokens_issued(mentor.email)

        first = await calendar.pay(mentor)
        await calendar.confirmed(first.session_id)
        second = await calendar.pay(mentor)
        await calendar.confirmed(second.session_id)

        # One refresh for two bookings.
        assert await sandbox.access_tokens_issued(mentor.email) == code_exchange + 1
        assert len(await sandbox.events(mentor.email)) == 2


class TestRecovery:
    async def test_a_mentor_who_connects_gets_the_failed_bookings_scheduled(
        self, calendar, sandbox
    ):
        mentor = await calendar.register_mentor()
        first = await calendar.pay(mentor)
        second = await calendar.pay(mentor)
        await calendar.failed(first.session_id)
        await calendar.failed(second.session_id)

        await calendar.connect(mentor)

        await calendar.confirmed(first.session_id)
        await calendar.confirmed(second.session_id)
        assert len(await sandbox.events(mentor.email)) == 2

    async def test_a_mentor_who_reconnects_after_a_revocation_gets_them_scheduled(
        self, calendar, sandbox
    ):
        mentor = await calendar.connected()
        await sandbox.revoke(mentor.email)
        paid = await calendar.pay(mentor)
        assert (await calendar.failed(paid.session_id))["reason"] == "integration_revoked"
        other = await calendar.connected()
        untouched = await calendar.pay(uuid.uuid4())  # store_not_found: not for a reconnect
        await calendar.failed(untouched.session_id)

        answer = await calendar.connect(mentor)

        assert answer["revoked"] is False
        await calendar.confirmed(paid.session_id)
        assert len(await sandbox.events(mentor.email)) == 1
        assert await sandbox.events(other.email) == []
        assert (await calendar.booking(untouched.session_id))["status"] == "failed"
        assert (await calendar.connection(mentor))["revoked_at"] is None

    async def test_failures_google_caused_are_not_retried_by_a_reconnect(self, calendar, sandbox):
        mentor = await calendar.connected()
        await sandbox.fault("quota_403", count=1, endpoint="insert")
        paid = await calendar.pay(mentor)
        assert (await calendar.failed(paid.session_id))["reason"] == "calendar_api_error"

        await calendar.connect(mentor)
        await calendar.service.settle()

        assert (await calendar.booking(paid.session_id))["status"] == "failed"
        assert await sandbox.events(mentor.email) == []


class TestCancelSession:
    async def test_a_session_cancelled_before_it_was_paid_is_never_scheduled(
        self, calendar, sandbox
    ):
        mentor = await calendar.connected()
        paid = calendar.order_paid(mentor)  # not delivered yet
        await calendar.cancel(paid, reason="payment_never_opened", by=None)
        await eventually(
            lambda: calendar.booking(paid.session_id), what="the cancelled session's tombstone"
        )

        await calendar.publish(paid)  # OrderPaid after all (a late or replayed message)
        await eventually(lambda: handled(calendar, 3), what="mentor, cancel and paid handled")
        await calendar.service.settle()

        booking = await calendar.booking(paid.session_id)
        assert booking["status"] == "cancelled" and booking["event_delete_pending"] is False
        assert "payment_never_opened" in booking["detail"]
        assert booking["title"] is None and booking["attempts"] == 0
        assert await sandbox.events(mentor.email) == []
        assert await calendar.recorded("CalendarBookingConfirmed") == []
        assert await calendar.recorded("CalendarBookingFailed") == []

    async def test_a_confirmed_session_cancelled_has_its_event_deleted(self, calendar, sandbox):
        mentor = await calendar.connected()
        paid = await calendar.pay(mentor)
        await calendar.confirmed(paid.session_id)

        await calendar.cancel(paid)

        async def deleted() -> bool:
            event = await sandbox.event(mentor.email, paid.session_id.hex)
            return event["status"] == "cancelled"

        await eventually(deleted, what="the event deleted in Google")
        event = await sandbox.event(mentor.email, paid.session_id.hex)
        assert event["sandbox"]["deleted_send_updates"] == "all"  # the mentee is told
        await eventually(
            lambda: settled_deletion(calendar, paid.session_id), what="the deletion recorded"
        )
        booking = await calendar.booking(paid.session_id)
        assert booking["status"] == "cancelled" and booking["claimed_until"] is None
        assert booking["meet_link"] == event["hangoutLink"]  # what it was, kept

    async def test_a_repeated_cancel_changes_nothing(self, calendar, sandbox):
        mentor = await calendar.connected()
        paid = await calendar.pay(mentor)
        await calendar.confirmed(paid.session_id)
        cancelled = await calendar.cancel(paid)
        await eventually(
            lambda: settled_deletion(calendar, paid.session_id), what="the deletion recorded"
        )
        before = await calendar.booking(paid.session_id)

        await calendar.publish(cancelled)  # the same fact again, under another message id
        await eventually(lambda: handled(calendar, 4), what="both cancels handled")
        await calendar.service.settle()

        assert await calendar.booking(paid.session_id) == before
        [event] = await sandbox.events(mentor.email)
        assert event["status"] == "cancelled"

    async def test_a_cancel_during_an_insert_in_flight_leaves_no_live_event(
        self, calendar, sandbox
    ):
        mentor = await calendar.connected()
        # Shorter than the client's timeout: the insert answers, after the cancel is in.
        await sandbox.fault("slow", count=1, endpoint="insert", seconds=1.5)
        paid = await calendar.pay(mentor)

        async def stalled() -> bool:
            return await sandbox.faults() == []  # the insert took the switch: it is stalling

        await eventually(stalled, what="the insert to reach Google and stall")
        await calendar.cancel(paid)
        await eventually(
            lambda: cancelled_row(calendar, paid.session_id), what="the booking cancelled"
        )
        assert await sandbox.events(mentor.email) == []  # the insert has not landed yet

        async def deleted() -> bool:
            events = await sandbox.events(mentor.email)
            return len(events) == 1 and events[0]["status"] == "cancelled"

        await eventually(deleted, what="the run to delete the event it made")
        await eventually(
            lambda: settled_deletion(calendar, paid.session_id), what="the deletion recorded"
        )
        assert await calendar.recorded("CalendarBookingConfirmed") == []
        booking = await calendar.booking(paid.session_id)
        assert booking["status"] == "cancelled" and booking["attempts"] == 0

    async def test_a_failed_booking_cancelled_is_not_scheduled_by_a_reconnect(
        self, calendar, sandbox
    ):
        mentor = await calendar.register_mentor()
        paid = await calendar.pay(mentor)
        await calendar.failed(paid.session_id)

        await calendar.cancel(paid)
        await eventually(
            lambda: settled_deletion(calendar, paid.session_id),
            what="the deletion settled without a connection",
        )
        await calendar.connect(mentor)
        await calendar.service.settle()

        assert (await calendar.booking(paid.session_id))["status"] == "cancelled"
        assert await sandbox.events(mentor.email) == []
        assert await calendar.recorded("CalendarBookingConfirmed") == []

    async def test_a_mentor_with_no_working_connection_leaves_nothing_deletable(
        self, calendar, sandbox, caplog
    ):
        mentor = await calendar.connected()
        paid = await calendar.pay(mentor)
        await calendar.confirmed(paid.session_id)
        await sandbox.revoke(mentor.email)
        calendar.service.google.forget(mentor.id)

        await calendar.cancel(paid)

        await eventually(
            lambda: settled_deletion(calendar, paid.session_id), what="the deletion given up"
        )
        # Google still has it: only the mentor can remove it now, and the logs say so.
        assert (await sandbox.event(mentor.email, paid.session_id.hex))["status"] == "confirmed"
        assert "cannot be deleted by the platform" in caplog.text
        assert (await calendar.connection(mentor))["revoked_at"] is not None


async def cancelled_row(calendar, session_id: uuid.UUID) -> bool:
    row = await calendar.booking(session_id)
    return row is not None and row["status"] == "cancelled"


async def settled_deletion(calendar, session_id: uuid.UUID) -> bool:
    row = await calendar.booking(session_id)
    return row is not None and row["status"] == "cancelled" and not row["event_delete_pending"]

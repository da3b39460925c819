"""The routes: connecting a calendar (consent, callback with a single-use signed state,
status, disconnect), and an admin's retry of a session's scheduling."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import pytest
from pydantic import SecretStr

from booking.calendar.domain import _b64, _unb64
from booking.calendar.tables import SCHEMA
from booking.calendar.tokens import TokenCipher
from booking.contracts import MentorIdentityLinked
from booking.devtools.fixtures import eventually

PROBLEM = "application/problem+json"


def query_of(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


def with_params(url: str, **params: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(query=urlencode({**query_of(url), **params})))


async def stored_nothing(calendar, mentor) -> bool:
    return await calendar.connection(mentor) is None


class TestConnectFlow:
    async def test_connect_redirects_to_google_with_every_parameter(self, calendar, sandbox):
        mentor = await calendar.register_mentor()

        location = await calendar.consent_redirect(mentor)

        assert location.startswith(f"{sandbox.auth_url}?")
        params = query_of(location)
        state = params.pop("state")
        assert params == {
            "client_id": calendar.settings.google_client_id,
            "redirect_uri": f"{calendar.url}/api/calendar/oauth/callback",
            "response_type": "code",
            "scope": "https://www.googleapis.com/auth/calendar.events",
            "access_type": "offline",
            "prompt": "consent",
            "include_granted_scopes": "true",
            "login_hint": mentor.email,
        }
        stored = await calendar.db.fetchrow(f"SELECT * FROM {SCHEMA}.oauth_states")
        assert stored["mentor_id"] == mentor.id and stored["used_at"] is None
        assert stored["nonce"] in _unb64(state.split(".")[0]).decode()
        assert stored["expires_at"] - datetime.now(UTC) <= timedelta(minutes=10)

    async def test_the_round_trip_connects_the_mentor(self, calendar, sandbox):
        mentor = await calendar.register_mentor()

        answer = await calendar.connect(mentor)

        assert answer["connected"] is True and answer["revoked"] is False
        assert answer["calendar_id"] == "primary" and answer["connected_at"]
        status = await calendar.http.get(
            f"/api/mentors/{mentor.id}/calendar", headers=calendar.token()
        )
        assert status.status_code == 200
        assert status.json() == answer
        row = await calendar.connection(mentor)
        assert row["scope"] and "calendar.events" in row["scope"]
        state = await calendar.db.fetchrow(f"SELECT * FROM {SCHEMA}.oauth_states")
        assert state["used_at"] is not None

    async def test_the_refresh_token_is_stored_encrypted(self, calendar, sandbox):
        mentor = await calendar.connected()

        [refresh_token] = await sandbox.refresh_tokens(mentor.email)
        stored = (await calendar.connection(mentor))["refresh_token_encrypted"]
        assert refresh_token not in stored
        everything = await calendar.db.fetch(f"SELECT * FROM {SCHEMA}.connections")
        assert refresh_token not in repr([dict(r) for r in everything])
        cipher = TokenCipher(calendar.settings.token_encryption_key)
        assert cipher.decrypt(stored).get_secret_value() == refresh_token

    async def test_the_mentor_may_connect_their_own_calendar_and_only_theirs(self, calendar):
        mentor = await calendar.register_mentor()
        own = calendar.token("mentor", str(mentor.id))
        other = calendar.token("mentor", str(uuid.uuid4()))
        path = f"/api/mentors/{mentor.id}/calendar/connect"

        assert (await calendar.http.get(path, headers=own)).status_code == 302
        assert (await calendar.http.get(path, headers=other)).status_code == 403
        assert (await calendar.http.get(path, headers=calendar.token("mentee"))).status_code == 403
        assert (await calendar.http.get(path)).status_code == 401

    async def test_an_unknown_mentor_cannot_connect(self, calendar):
        response = await calendar.http.get(
            f"/api/mentors/{uuid.uuid4()}/calendar/connect", headers=calendar.token()
        )

        assert response.status_code == 404
        assert response.headers["content-type"] == PROBLEM
        assert await calendar.db.fetchval(f"SELECT count(*) FROM {SCHEMA}.oauth_states") == 0


class TestActingAsTheMentor:
    """Connect, status and disconnect: an admin, or a mentor token whose `sub` is the mentor's
    id or the identity-provider subject MentorRegistered or MentorIdentityLinked gave it."""

    async def answers(self, calendar, mentor_id, headers) -> list[int]:
        """What connect, status and disconnect answer the caller, in that order."""
        path = f"/api/mentors/{mentor_id}/calendar"
        return [
            (await calendar.http.get(f"{path}/connect", headers=headers)).status_code,
            (await calendar.http.get(path, headers=headers)).status_code,
            (await calendar.http.delete(path, headers=headers)).status_code,
        ]

    async def test_the_registered_subject_acts_as_its_mentor(self, calendar, sandbox):
        mentor = await calendar.register_mentor(identity_subject="auth0|amel")
        own = calendar.token("mentor", "auth0|amel")

        assert await self.answers(calendar, mentor.id, own) == [302, 200, 204]
        other = await calendar.register_mentor(identity_subject="auth0|sami")
        assert await self.answers(calendar, other.id, own) == [403, 403, 403]

    async def test_another_subject_or_another_role_is_refused_as_a_problem(self, calendar):
        mentor = await calendar.register_mentor(identity_subject="auth0|amel")
        for headers, why in (
            (calendar.token("mentor", "auth0|someone-else"), "own calendar"),
            (calendar.token("mentee", "auth0|amel"), "role"),
        ):
            response = await calendar.http.get(
                f"/api/mentors/{mentor.id}/calendar/connect", headers=headers
            )
            assert response.status_code == 403
            assert response.headers["content-type"] == PROBLEM
            assert why in response.json()["detail"]
        assert await calendar.db.fetchval(f"SELECT count(*) FROM {SCHEMA}.oauth_states") == 0

    async def test_a_linked_subject_acts_at_once_and_the_old_one_no_more(self, calendar, sandbox):
        mentor = await calendar.register_mentor(identity_subject="auth0|old")
        new = calendar.token("mentor", "kc-4a7e9f57")
        assert await self.answers(calendar, mentor.id, new) == [403, 403, 403]

        await calendar.publish(
            MentorIdentityLinked(
                mentor_id=mentor.id,
                identity_subject="kc-4a7e9f57",
                previous_subject="auth0|old",
                by="admin-1",
                reason="moved to the company's identity provider",
                linked_at=datetime.now(UTC),
                sequence=1,
            )
        )

        async def linked() -> bool:
            return (
                await calendar.db.fetchval(
                    f"SELECT identity_subject FROM {SCHEMA}.mentors WHERE id = $1", mentor.id
                )
                == "kc-4a7e9f57"
            )

        await eventually(linked, what="the link consumed")
        assert await self.answers(calendar, mentor.id, new) == [302, 200, 204]
        old = calendar.token("mentor", "auth0|old")
        assert await self.answers(calendar, mentor.id, old) == [403, 403, 403]

    async def test_an_unknown_mentor_is_403_to_another_mentor_and_404_to_an_admin(self, calendar):
        unknown = uuid.uuid4()
        other = calendar.token("mentor", "auth0|someone")
        assert await self.answers(calendar, unknown, other) == [403, 403, 403]
        assert await self.answers(calendar, unknown, calendar.token()) == [404, 404, 404]
        own_id = calendar.token("mentor", str(unknown))
        assert await self.answers(calendar, unknown, own_id) == [404, 404, 404]


class TestRefusedCallbacks:
    async def refused(self, calendar, location: str, mentor) -> dict:
        response = await calendar.callback(location)
        assert 400 <= response.status_code < 500, response.text
        assert response.headers["content-type"] == PROBLEM
        assert await stored_nothing(calendar, mentor)
        return response.json()

    async def test_a_tampered_state_is_refused(self, calendar, sandbox):
        mentor = await calendar.register_mentor()
        victim = await calendar.register_mentor()
        back = await sandbox.approve(await calendar.consent_redirect(mentor))
        payload, signature = query_of(back)["state"].split(".")
        claims = json.loads(_unb64(payload))
        claims["m"] = str(victim.id)  # the attacker's code, stored as the victim's calendar
        forged = f"{_b64(json.dumps(claims, separators=(',', ':')).encode())}.{signature}"

        problem = await self.refused(calendar, with_params(back, state=forged), victim)

        assert "signature" in problem["detail"]
        assert await stored_nothing(calendar, mentor)
        # The code was never exchanged: Google issued no refresh token for it.
        assert await sandbox.refresh_tokens(mentor.email) == []

    async def test_an_expired_state_is_refused(self, calendar, sandbox):
        mentor = await calendar.register_mentor()
        long_ago = datetime.now(UTC) - timedelta(hours=1)
        consent = await calendar.service.consent_url(mentor.id, now=long_ago)
        back = await sandbox.approve(consent)

        problem = await self.refused(calendar, back, mentor)

        assert "expired" in problem["detail"]
        assert await sandbox.refresh_tokens(mentor.email) == []

    async def test_a_replayed_state_is_refused(self, calendar, sandbox):
        mentor = await calendar.register_mentor()
        consent = await calendar.consent_redirect(mentor)
        first = await calendar.callback(await sandbox.approve(consent))
        assert first.status_code == 200
        stored = await calendar.connection(mentor)
        # The same state again, with a fresh, valid code from Google.
        again = await sandbox.approve(consent)

        response = await calendar.callback(again)

        assert response.status_code == 400
        assert response.headers["content-type"] == PROBLEM
        assert "used already" in response.json()["detail"]
        assert await calendar.connection(mentor) == stored
        assert len(await sandbox.refresh_tokens(mentor.email)) == 1  # the second code unused

    async def test_a_state_replayed_concurrently_connects_once(self, calendar, sandbox):
        import asyncio

        mentor = await calendar.register_mentor()
        consent = await calendar.consent_redirect(mentor)
        backs = [await sandbox.approve(consent) for _ in range(5)]

        answers = await asyncio.gather(*(calendar.callback(b) for b in backs))

        assert sorted(a.status_code for a in answers) == [200, 400, 400, 400, 400]
        assert len(await sandbox.refresh_tokens(mentor.email)) == 1

    async def test_a_missing_code_is_refused(self, calendar, sandbox):
        mentor = await calendar.register_mentor()
        back = await sandbox.approve(await calendar.consent_redirect(mentor))
        query = query_of(back)
        location = f"{calendar.settings.oauth_redirect_uri}?state={query['state']}"

        problem = await self.refused(calendar, location, mentor)

        assert "code" in problem["detail"]

    async def test_a_missing_state_is_refused(self, calendar):
        mentor = await calendar.register_mentor()

        problem = await self.refused(
            calendar, f"{calendar.settings.oauth_redirect_uri}?code=4/abc", mentor
        )

        assert "state" in problem["detail"]

    async def test_a_declined_consent_is_refused(self, calendar, sandbox):
        mentor = await calendar.register_mentor()
        back = await sandbox.approve(await calendar.consent_redirect(mentor), deny=True)
        assert query_of(back)["error"] == "access_denied"

        problem = await self.refused(calendar, back, mentor)

        assert "declined" in problem["detail"]

    async def test_a_code_google_refuses_is_refused(self, calendar, sandbox):
        mentor = await calendar.register_mentor()
        back = await sandbox.approve(await calendar.consent_redirect(mentor))

        problem = await self.refused(calendar, with_params(back, code="4/0Anot-a-code"), mentor)

        assert "invalid_grant" in problem["detail"]

    async def test_google_refusing_our_client_is_a_502(self, start_calendar, sandbox):
        calendar = await start_calendar(google_client_secret=SecretStr("not-the-secret"))
        mentor = await calendar.register_mentor()
        back = await sandbox.approve(await calendar.consent_redirect(mentor))

        response = await calendar.callback(back)

        assert response.status_code == 502
        assert response.headers["content-type"] == PROBLEM
        assert "invalid_client" in response.json()["detail"]
        assert "not-the-secret" not in response.text
        assert await stored_nothing(calendar, mentor)


class TestStatusAndDisconnect:
    async def test_a_mentor_who_never_connected_is_not_connected(self, calendar):
        mentor = await calendar.register_mentor()

        response = await calendar.http.get(
            f"/api/mentors/{mentor.id}/calendar", headers=calendar.token("mentor", str(mentor.id))
        )

        assert response.status_code == 200
        assert response.json() == {
            "connected": False,
            "calendar_id": None,
            "connected_at": None,
            "revoked": False,
        }

    async def test_an_unknown_mentor_has_no_status(self, calendar):
        response = await calendar.http.get(
            f"/api/mentors/{uuid.uuid4()}/calendar", headers=calendar.token()
        )
        assert response.status_code == 404
        assert response.headers["content-type"] == PROBLEM

    async def test_disconnecting_forgets_the_tokens(self, calendar, sandbox):
        mentor = await calendar.connected()
        path = f"/api/mentors/{mentor.id}/calendar"
        other = calendar.token("mentor", str(uuid.uuid4()))

        assert (await calendar.http.delete(path, headers=other)).status_code == 403
        response = await calendar.http.delete(path, headers=calendar.token())

        assert response.status_code == 204
        assert await calendar.connection(mentor) is None
        status = await calendar.http.get(path, headers=calendar.token())
        assert status.json()["connected"] is False
        again = await calendar.http.delete(path, headers=calendar.token())
        assert again.status_code == 204
        unknown = await calendar.http.delete(
            f"/api/mentors/{uuid.uuid4()}/calendar", headers=calendar.token()
        )
        assert unknown.status_code == 404


class TestRetryScheduling:
    async def test_a_failed_scheduling_is_tried_again_now_and_audited(self, calendar, sandbox):
        mentor = await calendar.connected()
        await sandbox.fault("quota_403", count=1, endpoint="insert")
        paid = await calendar.pay(mentor)
        failed = await calendar.failed(paid.session_id)
        assert failed["final"] is False  # waiting an hour is not what the admin wants

        response = await calendar.retry(paid.session_id, {"reason": "quota raised"})

        assert response.status_code == 200, response.text
        assert response.json() == {
            "session_id": str(paid.session_id),
            "order_id": str(paid.order_id),
            "status": "pending",
            "reason": None,
            "final": False,
            "attempts": 1,
            "next_attempt_at": None,
        }
        await calendar.confirmed(paid.session_id)
        assert len(await sandbox.events(mentor.email)) == 1
        [audit] = await calendar.audit()
        assert (audit["action"], audit["by"], audit["reason"]) == (
            "retry_scheduling",
            "admin-7",
            "quota raised",
        )
        assert (audit["order_id"], audit["session_id"]) == (paid.order_id, paid.session_id)
        recorded = await calendar.one("AdminActionRecorded", paid.session_id)
        assert recorded["action"] == "retry_scheduling" and recorded["by"] == "admin-7"

    async def test_a_final_failure_is_tried_again_when_the_admin_says_so(self, calendar, sandbox):
        mentor = await calendar.register_mentor()
        begun = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
        paid = await calendar.pay(mentor, start_at=begun, end_at=begun + timedelta(hours=1))
        assert (await calendar.failed(paid.session_id))["final"] is True
        await calendar.connect(mentor)  # too late for a reconnect to retry it
        await calendar.service.settle()
        assert (await calendar.booking(paid.session_id))["status"] == "failed"

        response = await calendar.retry(paid.session_id)  # no body at all: the reason is optional

        assert response.status_code == 200, response.text
        assert response.json()["status"] == "pending" and response.json()["final"] is False
        confirmed = await calendar.confirmed(paid.session_id)
        assert confirmed["event_id"] == paid.session_id.hex
        assert (await calendar.booking(paid.session_id))["attempts"] == 2
        [audit] = await calendar.audit()
        assert audit["reason"] and "finally failed" in audit["detail"]

    async def test_the_retry_schedule_starts_again(self, calendar, sandbox, db):
        mentor = await calendar.connected()
        await sandbox.fault("http_503", count=2 * calendar.settings.google_max_attempts)
        paid = await calendar.pay(mentor)
        await calendar.failed(paid.session_id)
        # Stage the end of the schedule: its last failure, final.
        await db.execute(
            f"UPDATE {SCHEMA}.calendar_bookings SET final = true, schedule_failures = 5,"
            " next_attempt_at = NULL WHERE session_id = $1",
            paid.session_id,
        )

        assert (await calendar.retry(paid.session_id, {})).status_code == 200
        failures = await calendar.failed_times(paid.session_id, 2)

        assert failures[-1]["final"] is False and failures[-1]["attempts"] == 2
        last = (await calendar.attempts(paid.session_id))[-1]
        assert last["next_attempt_at"] - last["at"] == timedelta(minutes=1)

    async def test_a_repeat_answers_the_state_as_it_is_without_a_new_audit(self, calendar, sandbox):
        mentor = await calendar.connected()
        await sandbox.fault("quota_403", count=1, endpoint="insert")
        paid = await calendar.pay(mentor)
        await calendar.failed(paid.session_id)
        assert (await calendar.retry(paid.session_id, {"reason": "again"})).status_code == 200
        await calendar.confirmed(paid.session_id)

        repeats = [await calendar.retry(paid.session_id, {"reason": "again"}) for _ in range(2)]

        for repeat in repeats:
            assert repeat.status_code == 200, repeat.text
            assert repeat.json()["status"] == "confirmed" and repeat.json()["attempts"] == 2
        assert len(await calendar.audit()) == 1
        await calendar.one("AdminActionRecorded", paid.session_id)  # still only the one
        await calendar.confirmed(paid.session_id)  # still once

    async def test_a_pending_scheduling_is_in_flight_already(self, calendar, sandbox):
        mentor = await calendar.connected()
        await sandbox.fault("slow", count=1, endpoint="insert", seconds=1.0)
        paid = await calendar.pay(mentor)

        async def in_flight() -> bool:
            return await sandbox.faults() == []

        await eventually(in_flight, what="the insert to stall")

        response = await calendar.retry(paid.session_id, {"reason": "is it stuck?"})

        assert response.status_code == 200
        assert response.json()["status"] == "pending" and response.json()["attempts"] == 0
        await calendar.confirmed(paid.session_id)
        assert await calendar.audit() == []
        assert len(await sandbox.events(mentor.email)) == 1

    async def test_a_cancelled_session_is_refused(self, calendar, sandbox):
        mentor = await calendar.register_mentor()
        paid = await calendar.pay(mentor)
        await calendar.failed(paid.session_id)
        await calendar.cancel(paid)

        async def cancelled() -> bool:
            return (await calendar.booking(paid.session_id))["status"] == "cancelled"

        await eventually(cancelled, what="the booking cancelled")

        response = await calendar.retry(paid.session_id, {"reason": "please"})

        assert response.status_code == 409
        assert response.headers["content-type"] == PROBLEM
        assert "cancelled" in response.json()["detail"]
        assert await calendar.audit() == []
        assert (await calendar.booking(paid.session_id))["status"] == "cancelled"

    async def test_an_unknown_session_is_404(self, calendar):
        response = await calendar.retry(uuid.uuid4(), {"reason": "please"})

        assert response.status_code == 404
        assert response.headers["content-type"] == PROBLEM

    @pytest.mark.parametrize(
        "body", [{"reason": ""}, {"reason": "ok", "force": True}, {"reason": 7}, ["x"]]
    )
    async def test_a_bad_body_is_422(self, calendar, body):
        mentor = await calendar.register_mentor()
        paid = await calendar.pay(mentor)
        await calendar.failed(paid.session_id)

        response = await calendar.retry(paid.session_id, body)

        assert response.status_code == 422, response.text
        assert response.headers["content-type"] == PROBLEM
        assert (await calendar.booking(paid.session_id))["status"] == "failed"

    async def test_only_an_admin_may_retry(self, calendar):
        mentor = await calendar.register_mentor()
        paid = await calendar.pay(mentor)
        await calendar.failed(paid.session_id)
        path = f"/api/admin/sessions/{paid.session_id}/retry-scheduling"

        for role in ("mentor", "mentee"):
            assert (await calendar.retry(paid.session_id, {}, role=role)).status_code == 403
        assert (await calendar.http.post(path, json={})).status_code == 401
        assert (await calendar.booking(paid.session_id))["status"] == "failed"
        assert await calendar.audit() == []

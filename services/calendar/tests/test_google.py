"""GoogleClient against the Google sandbox over real HTTP: OAuth, events, retries, errors."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from pydantic import SecretStr

from booking.calendar.domain import SessionEvent
from booking.calendar.google import (
    GoogleClient,
    GoogleRefused,
    GoogleUnavailable,
    IntegrationRevoked,
    MeetLinkPending,
    MentorCredentials,
)
from booking.runtime.transport import CancelSafeTransport

CLIENT_ID = "calendar-tests-client"
CLIENT_SECRET = "calendar-tests-secret"
REDIRECT = "http://127.0.0.1:9/api/calendar/oauth/callback"


class Calls:
    """Every request the client sent, as (method, path)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    async def __call__(self, request) -> None:
        self.sent.append((request.method, request.url.path))

    def count(self, method: str, suffix: str) -> int:
        return sum(1 for m, path in self.sent if m == method and path.endswith(suffix))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def make_client(sandbox) -> AsyncIterator[Callable[..., Any]]:
    clients: list[GoogleClient] = []

    async def make(google=None, **overrides: Any) -> tuple[GoogleClient, Calls]:
        google = google or sandbox
        calls = Calls()
        options: dict[str, Any] = {
            "client_id": CLIENT_ID,
            "client_secret": SecretStr(CLIENT_SECRET),
            "auth_url": google.auth_url,
            "token_url": google.token_url,
            "calendar_api_url": google.calendar_api_url,
            "timeout": 2.0,
            "max_attempts": 3,
            "retry_base": 0.01,
            "retry_after_max": 2.0,
            "meet_poll_attempts": 4,
            "meet_poll_base": 0.01,
            "event_hooks": {"request": [calls]},
        }
        options.update(overrides)
        client = GoogleClient(**options)
        await client.open()
        clients.append(client)
        return client, calls

    yield make
    for client in clients:
        await client.aclose()


async def consented(client: GoogleClient, google, account: str) -> SecretStr:
    """A refresh token for `account`, through the consent and the code exchange."""
    url = client.consent_url(redirect_uri=REDIRECT, state="s", login_hint=account)
    back = parse_qs(urlsplit(await google.approve(url)).query)
    grant = await client.exchange_code(back["code"][0], REDIRECT)
    assert grant.refresh_token is not None
    return grant.refresh_token


@pytest.fixture
def account() -> str:
    return f"mentor-{uuid.uuid4().hex[:10]}@example.com"


def session(**fields: Any) -> SessionEvent:
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(days=2)
    values: dict[str, Any] = {
        "session_id": uuid.uuid4(),
        "order_id": uuid.uuid4(),
        "title": "Career chat",
        "mentee_email": "amira@example.com",
        "start_at": start,
        "end_at": start + timedelta(hours=1),
        "timezone": "Africa/Tunis",
    }
    values.update(fields)
    return SessionEvent(**values)


async def credentials(make_client, sandbox, account, **overrides):
    client, calls = await make_client(**overrides)
    refresh = await consented(client, sandbox, account)
    calls.sent.clear()
    return client, calls, MentorCredentials(uuid.uuid4(), refresh)


class TestConsent:
    def test_the_consent_url_asks_for_offline_calendar_events_access(self) -> None:
        client = GoogleClient(
            client_id="id-1",
            client_secret=SecretStr("s"),
            auth_url="https://accounts.google.com/o/oauth2/v2/auth",
            token_url="https://oauth2.googleapis.com/token",
            calendar_api_url="https://www.googleapis.com/calendar/v3",
        )

        url = client.consent_url(redirect_uri=REDIRECT, state="st.sig", login_hint="a@b.co")

        parts = urlsplit(url)
        assert f"{parts.scheme}://{parts.netloc}{parts.path}" == client.auth_url
        assert {k: v[0] for k, v in parse_qs(parts.query).items()} == {
            "client_id": "id-1",
            "redirect_uri": REDIRECT,
            "response_type": "code",
            "scope": "https://www.googleapis.com/auth/calendar.events",
            "access_type": "offline",
            "prompt": "consent",
            "include_granted_scopes": "true",
            "state": "st.sig",
            "login_hint": "a@b.co",
        }

    async def test_a_code_is_exchanged_once(self, make_client, sandbox, account) -> None:
        client, _ = await make_client()
        url = client.consent_url(redirect_uri=REDIRECT, state="s", login_hint=account)
        code = parse_qs(urlsplit(await sandbox.approve(url)).query)["code"][0]

        grant = await client.exchange_code(code, REDIRECT)
        with pytest.raises(GoogleRefused) as again:
            await client.exchange_code(code, REDIRECT)

        assert grant.refresh_token is not None and grant.expires_in > 0
        assert "calendar.events" in (grant.scope or "")
        assert again.value.reason == "invalid_grant"

    async def test_a_wrong_client_secret_is_refused_not_retried(
        self, make_client, sandbox, account
    ) -> None:
        client, calls = await make_client(client_secret=SecretStr("wrong"))
        url = client.consent_url(redirect_uri=REDIRECT, state="s", login_hint=account)
        code = parse_qs(urlsplit(await sandbox.approve(url)).query)["code"][0]

        with pytest.raises(GoogleRefused) as refused:
            await client.exchange_code(code, REDIRECT)

        assert refused.value.status == 401 and refused.value.reason == "invalid_client"
        assert calls.count("POST", "/token") == 1


class TestAccessTokens:
    async def test_the_access_token_is_cached_until_shortly_before_it_expires(
        self, make_client, sandbox, account
    ) -> None:
        clock = Clock()
        client, calls, mentor = await credentials(
            make_client, sandbox, account, clock=clock, token_expiry_margin=60
        )

        first = await client.access_token(mentor)
        clock.now += 3599 - 61
        second = await client.access_token(mentor)
        clock.now += 2  # within the last minute of its life
        third = await client.access_token(mentor)

        assert first == second != third
        assert calls.count("POST", "/token") == 2

    async def test_concurrent_callers_share_one_refresh(self, make_client, sandbox, account):
        import asyncio

        client, calls, mentor = await credentials(make_client, sandbox, account)

        tokens = await asyncio.gather(*(client.access_token(mentor) for _ in range(5)))

        assert len(set(tokens)) == 1
        assert calls.count("POST", "/token") == 1

    async def test_a_revoked_refresh_token_is_integration_revoked_never_retried(
        self, make_client, sandbox, account
    ) -> None:
        client, calls, mentor = await credentials(make_client, sandbox, account)
        await sandbox.revoke(account)

        with pytest.raises(IntegrationRevoked):
            await client.access_token(mentor)

        assert calls.count("POST", "/token") == 1

    async def test_the_token_endpoint_down_for_a_while_is_retried(
        self, make_client, sandbox, account
    ) -> None:
        client, calls, mentor = await credentials(make_client, sandbox, account)
        await sandbox.fault("http_503", count=2, endpoint="token")

        assert await client.access_token(mentor)
        assert calls.count("POST", "/token") == 3


class TestInsertEvent:
    async def test_one_event_with_a_meet_link_the_mentee_invited(
        self, make_client, sandbox, account
    ) -> None:
        client, _calls, mentor = await credentials(make_client, sandbox, account)
        wanted = session()

        event = await client.insert_event(mentor, "primary", wanted)

        [stored] = await sandbox.events(account)
        assert event.id == wanted.event_id == stored["id"]
        assert event.meet_link and event.meet_link.startswith("https://meet.google.com/")
        assert event.meet_link == stored["hangoutLink"]
        assert event.html_link == stored["htmlLink"]
        assert [a["email"] for a in stored["attendees"]] == ["amira@example.com"]
        assert stored["sandbox"]["send_updates"] == "all"
        assert stored["start"]["timeZone"] == "Africa/Tunis"

    async def test_inserting_again_reads_the_event_instead_of_making_another(
        self, make_client, sandbox, account
    ) -> None:
        client, calls, mentor = await credentials(make_client, sandbox, account)
        wanted = session()

        first = await client.insert_event(mentor, "primary", wanted)
        second = await client.insert_event(mentor, "primary", wanted)

        assert first == second
        assert len(await sandbox.events(account)) == 1
        assert calls.count("GET", f"/events/{wanted.event_id}") == 1

    async def test_5xx_twice_then_success_makes_one_event(
        self, make_client, sandbox, account
    ) -> None:
        client, calls, mentor = await credentials(make_client, sandbox, account)
        await sandbox.fault("http_500", count=2, endpoint="insert")

        await client.insert_event(mentor, "primary", session())

        assert calls.count("POST", "/events") == 3
        assert len(await sandbox.events(account)) == 1

    @pytest.mark.parametrize("kind", ["http_429", "rate_limit_403", "http_503"])
    async def test_slow_down_answers_are_retried(self, make_client, sandbox, account, kind):
        client, calls, mentor = await credentials(make_client, sandbox, account)
        await sandbox.fault(kind, count=1, endpoint="insert")

        await client.insert_event(mentor, "primary", session())

        assert calls.count("POST", "/events") == 2

    async def test_google_failing_throughout_gives_up_after_the_bounded_attempts(
        self, make_client, sandbox, account
    ) -> None:
        client, calls, mentor = await credentials(make_client, sandbox, account)
        await sandbox.fault("http_500", count=10, endpoint="insert")

        with pytest.raises(GoogleUnavailable) as unavailable:
            await client.insert_event(mentor, "primary", session())

        assert unavailable.value.attempts == 3 == calls.count("POST", "/events")
        assert unavailable.value.status == 500 and unavailable.value.reason == "backendError"
        assert "Backend Error" in str(unavailable.value)
        assert await sandbox.events(account) == []

    async def test_a_quota_403_is_not_retried(self, make_client, sandbox, account) -> None:
        client, calls, mentor = await credentials(make_client, sandbox, account)
        await sandbox.fault("quota_403", count=5, endpoint="insert")

        with pytest.raises(GoogleRefused) as refused:
            await client.insert_event(mentor, "primary", session())

        assert refused.value.reason == "quotaExceeded"
        assert calls.count("POST", "/events") == 1

    async def test_a_timeout_is_retried_and_still_makes_one_event(
        self, make_client, sandbox, account
    ) -> None:
        client, _calls, mentor = await credentials(make_client, sandbox, account, timeout=0.5)
        await sandbox.fault("slow", count=1, endpoint="insert", seconds=1.0)

        await client.insert_event(mentor, "primary", session())

        # The stalled insert went through after we gave up on it: the retry met 409 and read it.
        assert len(await sandbox.events(account)) == 1

    async def test_a_calendar_that_is_not_there_is_refused(
        self, make_client, sandbox, account
    ) -> None:
        client, _, mentor = await credentials(make_client, sandbox, account)

        with pytest.raises(GoogleRefused) as refused:
            await client.insert_event(mentor, "someone-else@example.com", session())

        assert refused.value.status == 404

    async def test_an_expired_access_token_is_refreshed_once(
        self, make_client, sandbox, account
    ) -> None:
        client, calls, mentor = await credentials(make_client, sandbox, account)
        await client.access_token(mentor)
        await sandbox.expire_access_tokens(account)
        calls.sent.clear()

        await client.insert_event(mentor, "primary", session())

        assert calls.count("POST", "/events") == 2  # 401, then with the fresh token
        assert calls.count("POST", "/token") == 1

    async def test_a_revoked_account_is_integration_revoked(
        self, make_client, sandbox, account
    ) -> None:
        client, calls, mentor = await credentials(make_client, sandbox, account)
        await client.access_token(mentor)
        await sandbox.revoke(account)

        with pytest.raises(IntegrationRevoked):
            await client.insert_event(mentor, "primary", session())

        assert calls.count("POST", "/token") == 2  # the first token, then the refused refresh

    async def test_meet_data_pending_is_read_again_until_it_is_there(
        self, make_client, pending_meet_sandbox, account
    ) -> None:
        client, calls, mentor = await credentials(
            make_client, pending_meet_sandbox, account, google=pending_meet_sandbox
        )
        wanted = session()

        event = await client.insert_event(mentor, "primary", wanted)

        assert event.meet_link and event.meet_status == "success"
        assert calls.count("GET", f"/events/{wanted.event_id}") == 3

    async def test_meet_data_pending_beyond_the_reads_is_meet_link_pending(
        self, make_client, pending_meet_sandbox, account
    ) -> None:
        client, _calls, mentor = await credentials(
            make_client,
            pending_meet_sandbox,
            account,
            google=pending_meet_sandbox,
            meet_poll_attempts=1,
        )

        with pytest.raises(MeetLinkPending):
            await client.insert_event(mentor, "primary", session())

        assert len(await pending_meet_sandbox.events(account)) == 1


class TestDeleteEvent:
    async def inserted(self, make_client, sandbox, account):
        client, calls, mentor = await credentials(make_client, sandbox, account)
        wanted = session()
        await client.insert_event(mentor, "primary", wanted)
        calls.sent.clear()
        return client, calls, mentor, wanted.event_id

    async def test_the_event_is_cancelled_and_its_guests_told(
        self, make_client, sandbox, account
    ) -> None:
        client, calls, mentor, event_id = await self.inserted(make_client, sandbox, account)

        assert await client.delete_event(mentor, "primary", event_id) is True

        [stored] = await sandbox.events(account)
        assert stored["id"] == event_id and stored["status"] == "cancelled"
        assert stored["sandbox"]["deleted_send_updates"] == "all"
        assert calls.count("DELETE", f"/events/{event_id}") == 1

    async def test_a_second_delete_is_gone_already_not_an_error(
        self, make_client, sandbox, account
    ) -> None:
        client, calls, mentor, event_id = await self.inserted(make_client, sandbox, account)
        await client.delete_event(mentor, "primary", event_id)

        assert await client.delete_event(mentor, "primary", event_id) is False

        assert calls.count("DELETE", f"/events/{event_id}") == 2  # 410 is not retried

    async def test_an_event_that_never_was_is_gone_already(
        self, make_client, sandbox, account
    ) -> None:
        client, calls, mentor = await credentials(make_client, sandbox, account)
        never = session().event_id

        assert await client.delete_event(mentor, "primary", never) is False

        assert calls.count("DELETE", f"/events/{never}") == 1

    @pytest.mark.parametrize("kind", ["http_500", "http_429", "rate_limit_403", "http_503"])
    async def test_slow_down_answers_and_5xx_are_retried(
        self, make_client, sandbox, account, kind
    ) -> None:
        client, calls, mentor, event_id = await self.inserted(make_client, sandbox, account)
        await sandbox.fault(kind, count=2, endpoint="delete")

        assert await client.delete_event(mentor, "primary", event_id) is True

        assert calls.count("DELETE", f"/events/{event_id}") == 3
        [stored] = await sandbox.events(account)
        assert stored["status"] == "cancelled"

    async def test_google_failing_throughout_gives_up_and_the_event_stays(
        self, make_client, sandbox, account
    ) -> None:
        client, calls, mentor, event_id = await self.inserted(make_client, sandbox, account)
        await sandbox.fault("http_503", count=10, endpoint="delete")

        with pytest.raises(GoogleUnavailable) as unavailable:
            await client.delete_event(mentor, "primary", event_id)

        assert unavailable.value.attempts == 3 == calls.count("DELETE", f"/events/{event_id}")
        [stored] = await sandbox.events(account)
        assert stored["status"] == "confirmed"

    async def test_a_quota_403_is_refused_not_retried(self, make_client, sandbox, account):
        client, calls, mentor, event_id = await self.inserted(make_client, sandbox, account)
        await sandbox.fault("quota_403", count=5, endpoint="delete")

        with pytest.raises(GoogleRefused) as refused:
            await client.delete_event(mentor, "primary", event_id)

        assert refused.value.reason == "quotaExceeded"
        assert calls.count("DELETE", f"/events/{event_id}") == 1

    async def test_an_expired_access_token_is_refreshed_once(
        self, make_client, sandbox, account
    ) -> None:
        client, calls, mentor, event_id = await self.inserted(make_client, sandbox, account)
        await sandbox.expire_access_tokens(account)

        assert await client.delete_event(mentor, "primary", event_id) is True

        assert calls.count("DELETE", f"/events/{event_id}") == 2  # 401, then the fresh token
        assert calls.count("POST", "/token") == 1

    async def test_a_revoked_account_is_integration_revoked(self, make_client, sandbox, account):
        client, _calls, mentor, event_id = await self.inserted(make_client, sandbox, account)
        await sandbox.revoke(account)

        with pytest.raises(IntegrationRevoked):
            await client.delete_event(mentor, "primary", event_id)

        [stored] = await sandbox.events(account)
        assert stored["status"] == "confirmed"


class TestSecrets:
    async def test_no_token_or_secret_reaches_the_logs_or_the_errors(
        self, make_client, sandbox, account, caplog
    ) -> None:
        caplog.set_level(logging.DEBUG)
        client, _, mentor = await credentials(make_client, sandbox, account)
        access = await client.access_token(mentor)
        await sandbox.fault("http_503", count=10, endpoint="insert")
        with pytest.raises(GoogleUnavailable) as failed:
            await client.insert_event(mentor, "primary", session())
        await sandbox.revoke(account)
        client.forget(mentor.mentor_id)
        with pytest.raises(IntegrationRevoked) as revoked:
            await client.access_token(mentor)

        shown = caplog.text + str(failed.value) + str(revoked.value) + repr(client) + repr(mentor)
        for secret in (
            mentor.refresh_token.get_secret_value(),
            access.get_secret_value(),
            CLIENT_SECRET,
        ):
            assert secret not in shown


async def test_the_client_sends_through_the_cancel_safe_transport(make_client):
    # httpx's own pool leaks a slot per request cancelled under contention (httpcore #1093).
    client, _ = await make_client()
    assert isinstance(client.http._transport, CancelSafeTransport)

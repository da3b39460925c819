"""The Google sandbox speaks Google's OAuth 2.0 and Calendar API v3, and stages the rest
(revoked access, expired tokens, late Meet links, faults) on demand.

Tests call the sandbox in-process, with a clock of their own so codes and tokens can expire;
the serve command's test runs it as a process over real HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest

from booking.devtools.fixtures import eventually, free_port
from booking.sandbox.control import ControlAuth
from booking.sandbox.google import create_app
from booking.sandbox.settings import SandboxSettings

CLIENT_ID = "sandbox-client-id"
CLIENT_SECRET = "sandbox-client-secret"
PUBLIC_URL = "http://google.test"
REDIRECT_URI = "https://booking.example/api/calendar/oauth/callback"
EVENTS_SCOPE = "https://www.googleapis.com/auth/calendar.events"
CALENDAR_SCOPE = "https://www.googleapis.com/auth/calendar"
Response = httpx.Response
MEET_URL = re.compile(r"https://meet\.google\.com/[a-z]{3}-[a-z]{4}-[a-z]{3}")


@dataclass
class Clock:
    """The sandbox's time, moved on by the test."""

    now: datetime = field(default_factory=lambda: datetime.now(UTC))

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


def account() -> str:
    return f"mentor-{uuid.uuid4().hex[:8]}@example.com"


def event_id() -> str:
    # A UUID's hex is a valid Google event id: what the calendar service derives from a session.
    return uuid.uuid4().hex


def consent_url(**overrides: str | None) -> str:
    params = {
        "client_id": CLIENT_ID,
        "redirect_uri": REDIRECT_URI,
        "response_type": "code",
        "scope": EVENTS_SCOPE,
        "access_type": "offline",
        "prompt": "consent",
        "state": "signed-state-" + uuid.uuid4().hex,
        **overrides,
    }
    query = urlencode({name: value for name, value in params.items() if value is not None})
    return f"{PUBLIC_URL}/o/oauth2/v2/auth?{query}"


def query_of(url: str) -> dict[str, str]:
    return {name: values[0] for name, values in parse_qs(urlsplit(url).query).items()}


def session_body(**fields: Any) -> dict[str, Any]:
    return {
        "summary": "Mentoring session",
        "description": "Booked through the platform",
        "start": {"dateTime": "2030-03-04T10:00:00+01:00", "timeZone": "Africa/Tunis"},
        "end": {"dateTime": "2030-03-04T11:00:00+01:00", "timeZone": "Africa/Tunis"},
        "attendees": [{"email": "mentee@example.com"}],
        "conferenceData": {
            "createRequest": {
                "requestId": uuid.uuid4().hex,
                "conferenceSolutionKey": {"type": "hangoutsMeet"},
            }
        },
        **fields,
    }


@dataclass
class Google:
    """A sandbox, its clock, and a client for it that knows Google's calls."""

    http: httpx.AsyncClient
    clock: Clock

    async def control(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        response = await self.http.post(f"/_sandbox/{path}", json=body)
        assert response.status_code == 200, response.text
        return response.json()

    async def code(self, url: str | None = None, **approve: Any) -> str:
        answer = await self.control("oauth/approve", {"auth_url": url or consent_url(), **approve})
        return query_of(answer["location"])["code"]

    async def token(self, auth: httpx.Auth | None = None, **form: str) -> httpx.Response:
        if auth is None:
            form = {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, **form}
        # Without auth of its own, the request goes without the client's ControlAuth:
        # httpx.Auth() is the one that adds nothing.
        sent_auth = auth if auth is not None else httpx.Auth()
        return await self.http.post("/token", data=form, auth=sent_auth)

    async def exchange(self, code: str, redirect_uri: str = REDIRECT_URI) -> httpx.Response:
        return await self.token(
            grant_type="authorization_code", code=code, redirect_uri=redirect_uri
        )

    async def refresh(self, refresh_token: str) -> httpx.Response:
        return await self.token(grant_type="refresh_token", refresh_token=refresh_token)

    async def connect(self, who: str | None = None, **consent: str | None) -> dict[str, Any]:
        """A mentor who consented: the answer of the code exchange."""
        code = await self.code(consent_url(login_hint=who or account(), **consent))
        response = await self.exchange(code)
        assert response.status_code == 200, response.text
        return response.json()

    async def insert(
        self,
        access_token: str,
        body: dict[str, Any],
        calendar: str = "primary",
        params: dict[str, str] | None = None,
    ) -> httpx.Response:
        params = {"conferenceDataVersion": "1", "sendUpdates": "all"} if params is None else params
        return await self.http.post(
            f"/calendar/v3/calendars/{calendar}/events",
            params=params,
            json=body,
            headers=bearer(access_token),
        )

    async def read(self, access_token: str, event: str, calendar: str = "primary") -> Response:
        return await self.http.get(
            f"/calendar/v3/calendars/{calendar}/events/{event}", headers=bearer(access_token)
        )

    async def delete(
        self,
        access_token: str,
        event: str,
        calendar: str = "primary",
        params: dict[str, str] | None = None,
    ) -> Response:
        return await self.http.delete(
            f"/calendar/v3/calendars/{calendar}/events/{event}",
            params={"sendUpdates": "all"} if params is None else params,
            headers=bearer(access_token),
        )

    async def free_busy(self, access_token: str, body: dict[str, Any]) -> httpx.Response:
        headers = bearer(access_token)
        return await self.http.post("/calendar/v3/freeBusy", json=body, headers=headers)


def bearer(access_token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {access_token}"}


def google_error(response: httpx.Response, status: int, reason: str) -> dict[str, Any]:
    """Assert Google's error shape with this status and reason; the error, for more checks."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"code", "message", "errors", "status"}
    assert error["code"] == status
    [detail] = error["errors"]
    assert detail["reason"] == reason
    assert detail["domain"] and detail["message"]
    return error


def oauth_error(response: httpx.Response, status: int, error: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "error_description"}
    assert body["error"] == error
    return body


MakeGoogle = Callable[..., Google]


@pytest.fixture
async def make_google() -> AsyncIterator[MakeGoogle]:
    """Sandboxes with settings of the test's choosing, each with its own clock."""
    clients: list[httpx.AsyncClient] = []

    def make(**settings: Any) -> Google:
        clock = Clock()
        app = create_app(SandboxSettings(google_public_url=PUBLIC_URL, **settings), clock)
        http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url=PUBLIC_URL, auth=ControlAuth()
        )
        clients.append(http)
        return Google(http, clock)

    yield make
    for http in clients:
        await http.aclose()


@pytest.fixture
def google(make_google: MakeGoogle) -> Google:
    return make_google()


class TestConsentPage:
    async def test_it_names_the_account_and_the_scopes_with_allow_and_deny(self, google):
        response = await google.http.get(consent_url(login_hint="Ada@Example.com"))
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        page = response.text
        assert "ada@example.com" in page
        assert EVENTS_SCOPE in page
        assert 'action="/o/oauth2/v2/auth/decision"' in page
        assert 'value="allow">Allow</button>' in page
        assert 'value="deny">Deny</button>' in page
        # No external assets: the page works offline.
        assert "src=" not in page
        assert "<link" not in page

    async def test_without_a_login_hint_it_is_the_default_account(self, google):
        page = (await google.http.get(consent_url())).text
        assert "mentor@example.com" in page

    async def test_allow_redirects_with_a_code_and_the_state(self, google):
        url = consent_url(redirect_uri=f"{REDIRECT_URI}?from=google", state="s&t=1")
        response = await google.http.post(
            "/o/oauth2/v2/auth/decision", data={**query_of(url), "decision": "allow"}
        )
        assert response.status_code == 303
        location = response.headers["location"]
        assert location.startswith(f"{REDIRECT_URI}?from=google&code=")
        query = query_of(location)
        assert query["state"] == "s&t=1"
        assert query["code"]
        assert (await google.exchange(query["code"], f"{REDIRECT_URI}?from=google")).is_success

    async def test_deny_redirects_with_access_denied(self, google):
        url = consent_url(state="abc")
        response = await google.http.post(
            "/o/oauth2/v2/auth/decision", data={**query_of(url), "decision": "deny"}
        )
        assert response.status_code == 303
        assert response.headers["location"] == f"{REDIRECT_URI}?error=access_denied&state=abc"

    async def test_the_page_form_submits_what_it_shows(self, google):
        # The hidden fields of the page are all a browser sends: the decision works from them.
        page = (await google.http.get(consent_url(login_hint="bo@example.com"))).text
        fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', page))
        fields = {name: value.replace("&amp;", "&") for name, value in fields.items()}
        response = await google.http.post(
            "/o/oauth2/v2/auth/decision", data={**fields, "decision": "allow"}
        )
        code = query_of(response.headers["location"])["code"]
        await google.exchange(code)
        tokens = (await google.http.get("/_sandbox/tokens?account=bo@example.com")).json()
        assert len(tokens["access_tokens"]) == 1

    async def test_the_full_calendar_scope_is_enough(self, google):
        response = await google.http.get(consent_url(scope=f"openid {CALENDAR_SCOPE}"))
        assert response.status_code == 200

    @pytest.mark.parametrize(
        ("change", "error"),
        [
            ({"client_id": "someone-else"}, "invalid_client"),
            ({"client_id": None}, "invalid_request"),
            ({"response_type": "token"}, "unsupported_response_type"),
            ({"response_type": None}, "invalid_request"),
            ({"redirect_uri": None}, "invalid_request"),
            ({"redirect_uri": "/relative/callback"}, "invalid_request"),
            ({"scope": "openid email"}, "invalid_scope"),
            ({"scope": f"{EVENTS_SCOPE}.readonly"}, "invalid_scope"),
            ({"scope": None}, "invalid_request"),
            ({"access_type": "forever"}, "invalid_request"),
        ],
    )
    async def test_a_request_google_refuses_is_a_400_error_page(self, google, change, error):
        url = consent_url(**change)
        response = await google.http.get(url)
        assert response.status_code == 400
        assert response.headers["content-type"].startswith("text/html")
        assert f"Error 400: {error}" in response.text
        assert "<form" not in response.text

        decided = await google.http.post(
            "/o/oauth2/v2/auth/decision", data={**query_of(url), "decision": "allow"}
        )
        assert decided.status_code == 400
        assert "location" not in decided.headers

        approved = await google.http.post("/_sandbox/oauth/approve", json={"auth_url": url})
        assert approved.status_code == 400
        assert approved.headers["content-type"] == "application/problem+json"
        assert error in approved.json()["detail"]


class TestApprove:
    async def test_it_answers_where_allow_would_send_the_browser(self, google):
        url = consent_url(state="the-state")
        answer = await google.control("oauth/approve", {"auth_url": url})
        location = answer["location"]
        assert location.startswith(f"{REDIRECT_URI}?code=")
        assert query_of(location)["state"] == "the-state"
        assert query_of(location)["scope"] == EVENTS_SCOPE

    async def test_the_account_can_be_chosen(self, google):
        who = account()
        code = await google.code(consent_url(login_hint="someone@example.com"), account=who)
        await google.exchange(code)
        tokens = await google.http.get("/_sandbox/tokens", params={"account": who})
        assert len(tokens.json()["refresh_tokens"]) == 1

    async def test_deny_answers_the_error_redirect(self, google):
        answer = await google.control(
            "oauth/approve", {"auth_url": consent_url(state="xyz"), "deny": True}
        )
        assert answer == {"location": f"{REDIRECT_URI}?error=access_denied&state=xyz"}


class TestCodeExchange:
    async def test_offline_access_gives_a_refresh_token(self, google):
        code = await google.code(consent_url(access_type="offline"))
        response = await google.exchange(code)
        assert response.status_code == 200
        assert response.headers["cache-control"] == "no-store"
        tokens = response.json()
        assert set(tokens) == {
            "access_token",
            "expires_in",
            "refresh_token",
            "scope",
            "token_type",
        }
        assert tokens["expires_in"] == 3599
        assert tokens["scope"] == EVENTS_SCOPE
        assert tokens["token_type"] == "Bearer"

    async def test_online_access_gives_none(self, google):
        tokens = await google.connect(access_type="online")
        assert "refresh_token" not in tokens
        assert tokens["access_token"]

    async def test_prompt_consent_gives_a_new_refresh_token_each_time(self, google):
        who = account()
        first = await google.connect(who, prompt="consent")
        second = await google.connect(who, prompt="consent")
        assert first["refresh_token"] != second["refresh_token"]
        # The earlier one still works, as at Google.
        assert (await google.refresh(first["refresh_token"])).status_code == 200

    async def test_without_prompt_consent_a_second_consent_gives_no_refresh_token(self, google):
        who = account()
        assert "refresh_token" in await google.connect(who, prompt=None)
        assert "refresh_token" not in await google.connect(who, prompt=None)

    async def test_a_code_is_good_once(self, google):
        code = await google.code()
        assert (await google.exchange(code)).status_code == 200
        again = await google.exchange(code)
        body = oauth_error(again, 400, "invalid_grant")
        assert body["error_description"] == "Bad Request"

    async def test_an_unknown_code_is_invalid_grant(self, google):
        oauth_error(await google.exchange("4/0Anever-issued"), 400, "invalid_grant")

    async def test_a_code_expires_after_ten_minutes(self, google):
        fresh, stale = await google.code(), await google.code()
        google.clock.advance(minutes=9)
        assert (await google.exchange(fresh)).status_code == 200
        google.clock.advance(minutes=1, seconds=1)
        oauth_error(await google.exchange(stale), 400, "invalid_grant")

    async def test_the_redirect_uri_must_be_the_consents(self, google):
        code = await google.code()
        mismatch = await google.exchange(code, "https://evil.example/callback")
        oauth_error(mismatch, 400, "invalid_grant")

    @pytest.mark.parametrize(
        "client",
        [
            {"client_id": CLIENT_ID, "client_secret": "wrong"},
            {"client_id": CLIENT_ID},
            {"client_id": "someone-else", "client_secret": CLIENT_SECRET},
            {},
        ],
    )
    async def test_a_client_that_does_not_authenticate_is_401_invalid_client(self, google, client):
        code = await google.code()
        response = await google.http.post(
            "/token",
            data={
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": REDIRECT_URI,
                **client,
            },
        )
        oauth_error(response, 401, "invalid_client")
        # Nothing was used up: the right client still gets its tokens.
        assert (await google.exchange(code)).status_code == 200

    async def test_http_basic_authenticates_the_client_too(self, google):
        code = await google.code()
        response = await google.token(
            auth=httpx.BasicAuth(CLIENT_ID, CLIENT_SECRET),
            grant_type="authorization_code",
            code=code,
            redirect_uri=REDIRECT_URI,
        )
        assert response.status_code == 200
        wrong = await google.token(
            auth=httpx.BasicAuth(CLIENT_ID, "wrong"), grant_type="refresh_token", refresh_token="x"
        )
        oauth_error(wrong, 401, "invalid_client")

    @pytest.mark.parametrize("grant_type", ["password", "client_credentials", ""])
    async def test_another_grant_type_is_unsupported(self, google, grant_type):
        response = await google.token(grant_type=grant_type)
        oauth_error(response, 400, "unsupported_grant_type")

    async def test_the_client_id_and_secret_are_settings(self, make_google):
        google = make_google(google_client_id="my-app", google_client_secret="my-secret")
        code = await google.code(consent_url(client_id="my-app"))
        response = await google.http.post(
            "/token",
            data={
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": REDIRECT_URI,
                "client_id": "my-app",
                "client_secret": "my-secret",
            },
        )
        assert response.status_code == 200
        refused = await google.http.get(consent_url(client_id=CLIENT_ID))
        assert refused.status_code == 400


class TestRefresh:
    async def test_it_gives_a_new_access_token_and_no_refresh_token(self, google):
        connected = await google.connect()
        response = await google.refresh(connected["refresh_token"])
        assert response.status_code == 200
        tokens = response.json()
        assert set(tokens) == {"access_token", "expires_in", "scope", "token_type"}
        assert tokens["access_token"] != connected["access_token"]
        assert tokens["scope"] == EVENTS_SCOPE
        assert (await google.insert(tokens["access_token"], session_body())).status_code == 200

    async def test_a_revoked_refresh_token_is_invalid_grant(self, google):
        who = account()
        connected = await google.connect(who)
        await google.control("revoke", {"account": who})
        body = oauth_error(await google.refresh(connected["refresh_token"]), 400, "invalid_grant")
        assert body["error_description"] == "Token has been expired or revoked."

    async def test_an_unknown_refresh_token_is_invalid_grant(self, google):
        body = oauth_error(await google.refresh("1//0never-issued"), 400, "invalid_grant")
        assert body["error_description"] == "Token has been expired or revoked."

    async def test_access_tokens_live_as_long_as_the_setting_says(self, make_google):
        google = make_google(google_access_token_seconds=120)
        connected = await google.connect()
        assert connected["expires_in"] == 120
        google.clock.advance(seconds=119)
        assert (await google.insert(connected["access_token"], session_body())).status_code == 200
        google.clock.advance(seconds=1)
        stale = await google.insert(connected["access_token"], session_body())
        google_error(stale, 401, "authError")
        fresh = (await google.refresh(connected["refresh_token"])).json()
        assert (await google.insert(fresh["access_token"], session_body())).status_code == 200


class TestCalendarAuth:
    @pytest.mark.parametrize(
        "headers",
        [
            {},
            {"Authorization": "Bearer ya29.never-issued"},
            {"Authorization": "Bearer "},
            {"Authorization": f"Basic {base64.b64encode(b'a:b').decode()}"},
        ],
    )
    async def test_no_working_access_token_is_401_auth_error(self, google, headers):
        for response in [
            await google.http.post(
                "/calendar/v3/calendars/primary/events", json=session_body(), headers=headers
            ),
            await google.http.get(
                f"/calendar/v3/calendars/primary/events/{event_id()}", headers=headers
            ),
            await google.http.delete(
                f"/calendar/v3/calendars/primary/events/{event_id()}", headers=headers
            ),
            await google.http.post("/calendar/v3/freeBusy", json={}, headers=headers),
        ]:
            error = google_error(response, 401, "authError")
            assert error["status"] == "UNAUTHENTICATED"
            assert response.headers["www-authenticate"].startswith("Bearer")

    async def test_an_expired_access_token_is_401_until_refreshed(self, google):
        who = account()
        connected = await google.connect(who)
        answer = await google.control("expire-access-tokens", {"account": who})
        assert answer == {"expired": 1}
        stale = await google.insert(connected["access_token"], session_body())
        google_error(stale, 401, "authError")
        fresh = (await google.refresh(connected["refresh_token"])).json()
        assert (await google.insert(fresh["access_token"], session_body())).status_code == 200


class TestEvents:
    async def test_insert_with_an_id_answers_the_event(self, google):
        who = account()
        connected = await google.connect(who)
        chosen = event_id()
        response = await google.insert(connected["access_token"], session_body(id=chosen))
        assert response.status_code == 200
        event = response.json()
        assert event["kind"] == "calendar#event"
        assert event["id"] == chosen
        assert event["status"] == "confirmed"
        assert event["htmlLink"].startswith(f"{PUBLIC_URL}/calendar/event?eid=")
        assert event["summary"] == "Mentoring session"
        assert event["description"] == "Booked through the platform"
        assert event["start"] == {
            "dateTime": "2030-03-04T10:00:00+01:00",
            "timeZone": "Africa/Tunis",
        }
        assert event["end"]["dateTime"] == "2030-03-04T11:00:00+01:00"
        assert event["attendees"] == [
            {"email": "mentee@example.com", "responseStatus": "needsAction"}
        ]
        assert event["organizer"] == {"email": who, "self": True}
        assert event["creator"] == {"email": who, "self": True}
        assert event["iCalUID"] == f"{chosen}@google.com"
        for stamp in ("created", "updated"):
            assert event[stamp].endswith("Z")
            datetime.fromisoformat(event[stamp])

    async def test_an_id_is_generated_in_base32hex_when_not_given(self, google):
        token = (await google.connect())["access_token"]
        event = (await google.insert(token, session_body())).json()
        assert re.fullmatch(r"[a-v0-9]{26}", event["id"])
        assert (await google.read(token, event["id"])).json()["id"] == event["id"]

    @pytest.mark.parametrize(
        "bad_id",
        ["ABCDE12345", "abcw12345", "abcd", "a" * 1025, "abc-12345", "abcde_123", 12345],
    )
    async def test_an_id_outside_the_rules_is_400_invalid(self, google, bad_id):
        token = (await google.connect())["access_token"]
        response = await google.insert(token, session_body(id=bad_id))
        error = google_error(response, 400, "invalid")
        assert error["message"] == "Invalid resource id value."
        assert (await google.http.get("/_sandbox/events")).json() == {"events": []}

    @pytest.mark.parametrize("good_id", ["abcde", "v" * 1024, "0123456789abcdefghijklmnopqrstuv"])
    async def test_ids_at_the_edges_of_the_rules_are_fine(self, google, good_id):
        token = (await google.connect())["access_token"]
        assert (await google.insert(token, session_body(id=good_id))).status_code == 200

    async def test_a_reused_id_is_409_duplicate_and_the_first_event_stays(self, google):
        token = (await google.connect())["access_token"]
        chosen = event_id()
        first = await google.insert(token, session_body(id=chosen, summary="First"))
        again = await google.insert(token, session_body(id=chosen, summary="Second"))
        error = google_error(again, 409, "duplicate")
        assert error["message"] == "The requested identifier already exists."
        found = await google.read(token, chosen)
        assert found.status_code == 200
        assert found.json()["summary"] == "First"
        assert found.json()["hangoutLink"] == first.json()["hangoutLink"]
        assert len((await google.http.get("/_sandbox/events")).json()["events"]) == 1

    async def test_ids_are_unique_per_calendar_not_across_calendars(self, google):
        chosen = event_id()
        for _ in range(2):
            token = (await google.connect())["access_token"]
            assert (await google.insert(token, session_body(id=chosen))).status_code == 200

    async def test_the_calendar_is_primary_or_the_accounts_email(self, google):
        who = account()
        token = (await google.connect(who))["access_token"]
        chosen = event_id()
        inserted = await google.insert(token, session_body(id=chosen), calendar=who)
        assert inserted.status_code == 200
        assert (await google.read(token, chosen, calendar="primary")).status_code == 200
        assert (await google.read(token, chosen, calendar=who.upper())).status_code == 200

    async def test_a_calendar_the_account_cannot_reach_is_404(self, google):
        token = (await google.connect())["access_token"]
        other = account()
        google_error(await google.insert(token, session_body(), calendar=other), 404, "notFound")
        google_error(await google.read(token, event_id(), calendar=other), 404, "notFound")

    async def test_an_event_of_another_account_is_404(self, google):
        mine = (await google.connect())["access_token"]
        theirs = (await google.connect())["access_token"]
        chosen = event_id()
        await google.insert(mine, session_body(id=chosen))
        google_error(await google.read(theirs, chosen), 404, "notFound")

    async def test_an_unknown_event_is_404_not_found(self, google):
        token = (await google.connect())["access_token"]
        error = google_error(await google.read(token, event_id()), 404, "notFound")
        assert error["status"] == "NOT_FOUND"

    async def test_an_end_before_the_start_is_400_time_range_empty(self, google):
        token = (await google.connect())["access_token"]
        body = session_body(
            start={"dateTime": "2030-03-04T11:00:00Z"}, end={"dateTime": "2030-03-04T10:00:00Z"}
        )
        google_error(await google.insert(token, body), 400, "timeRangeEmpty")

    @pytest.mark.parametrize(
        ("change", "reason"),
        [
            ({"start": None}, "required"),
            ({"end": {"dateTime": "2030-03-04T11:00:00"}}, "required"),
            ({"end": {"dateTime": "tomorrow"}}, "invalid"),
            ({"end": {"dateTime": "2030-03-04T11:00:00Z", "timeZone": "Mars/Olympus"}}, "invalid"),
            ({"attendees": [{"displayName": "No email"}]}, "required"),
        ],
    )
    async def test_bad_times_and_attendees_are_400(self, google, change, reason):
        token = (await google.connect())["access_token"]
        body = {key: value for key, value in session_body(**change).items() if value is not None}
        google_error(await google.insert(token, body), 400, reason)

    async def test_a_body_that_is_not_json_is_400_parse_error(self, google):
        token = (await google.connect())["access_token"]
        response = await google.http.post(
            "/calendar/v3/calendars/primary/events",
            content=b"summary=x",
            headers={**bearer(token), "content-type": "application/json"},
        )
        google_error(response, 400, "parseError")

    async def test_a_local_time_with_its_time_zone_is_that_zones(self, google):
        token = (await google.connect())["access_token"]
        body = session_body(
            start={"dateTime": "2030-07-01T09:00:00", "timeZone": "Europe/Paris"},
            end={"dateTime": "2030-07-01T10:00:00", "timeZone": "Europe/Paris"},
        )
        event = (await google.insert(token, body)).json()
        assert event["start"]["dateTime"] == "2030-07-01T09:00:00+02:00"

    async def test_the_html_link_opens_the_event(self, google):
        token = (await google.connect())["access_token"]
        event = (await google.insert(token, session_body(summary="Session <1>"))).json()
        page = await google.http.get(event["htmlLink"])
        assert page.status_code == 200
        assert "Session &lt;1&gt;" in page.text
        assert event["hangoutLink"] in page.text


class TestDelete:
    async def test_a_delete_answers_204_and_the_event_reads_back_cancelled(self, google):
        who = account()
        token = (await google.connect(who))["access_token"]
        chosen = event_id()
        await google.insert(token, session_body(id=chosen))
        google.clock.advance(minutes=5)

        response = await google.delete(token, chosen)

        assert response.status_code == 204 and response.content == b""
        found = await google.read(token, chosen)
        assert found.status_code == 200
        event = found.json()
        assert event["id"] == chosen and event["status"] == "cancelled"
        assert event["updated"] > event["created"]
        [listed] = (await google.http.get("/_sandbox/events", params={"account": who})).json()[
            "events"
        ]
        assert listed["status"] == "cancelled"
        assert listed["sandbox"]["deleted_send_updates"] == "all"

    async def test_deleting_again_is_410_deleted(self, google):
        token = (await google.connect())["access_token"]
        chosen = event_id()
        await google.insert(token, session_body(id=chosen))
        assert (await google.delete(token, chosen)).status_code == 204

        again = await google.delete(token, chosen)

        error = google_error(again, 410, "deleted")
        assert error["message"] == "Resource has been deleted"
        assert (await google.read(token, chosen)).json()["status"] == "cancelled"

    async def test_an_unknown_event_is_404_not_found(self, google):
        token = (await google.connect())["access_token"]
        google_error(await google.delete(token, event_id()), 404, "notFound")

    async def test_another_accounts_event_or_calendar_is_404_and_stays(self, google):
        who = account()
        mine = (await google.connect(who))["access_token"]
        theirs = (await google.connect())["access_token"]
        chosen = event_id()
        await google.insert(mine, session_body(id=chosen))

        google_error(await google.delete(theirs, chosen), 404, "notFound")
        google_error(await google.delete(theirs, chosen, calendar=who), 404, "notFound")

        assert (await google.read(mine, chosen)).json()["status"] == "confirmed"

    async def test_the_calendar_may_be_named_by_the_accounts_email(self, google):
        who = account()
        token = (await google.connect(who))["access_token"]
        chosen = event_id()
        await google.insert(token, session_body(id=chosen))

        assert (await google.delete(token, chosen, calendar=who)).status_code == 204

    async def test_a_deleted_id_cannot_be_inserted_again(self, google):
        token = (await google.connect())["access_token"]
        chosen = event_id()
        await google.insert(token, session_body(id=chosen, summary="First"))
        await google.delete(token, chosen)

        again = await google.insert(token, session_body(id=chosen, summary="Second"))

        google_error(again, 409, "duplicate")
        event = (await google.read(token, chosen)).json()
        assert (event["summary"], event["status"]) == ("First", "cancelled")

    async def test_a_bad_send_updates_is_400_and_deletes_nothing(self, google):
        token = (await google.connect())["access_token"]
        chosen = event_id()
        await google.insert(token, session_body(id=chosen))

        refused = await google.delete(token, chosen, params={"sendUpdates": "everyone"})

        google_error(refused, 400, "invalid")
        assert (await google.read(token, chosen)).json()["status"] == "confirmed"

    async def test_a_cancelled_event_is_not_busy(self, google):
        token = (await google.connect())["access_token"]
        chosen = event_id()
        await google.insert(
            token,
            session_body(
                id=chosen,
                start={"dateTime": "2030-03-04T09:00:00Z"},
                end={"dateTime": "2030-03-04T10:00:00Z"},
            ),
        )
        await google.delete(token, chosen)

        response = await google.free_busy(
            token,
            {
                "timeMin": "2030-03-04T00:00:00Z",
                "timeMax": "2030-03-05T00:00:00Z",
                "items": [{"id": "primary"}],
            },
        )

        assert response.json()["calendars"]["primary"] == {"busy": []}


class TestMeet:
    async def test_meet_data_is_pending_for_n_reads_then_success(self, make_google):
        google = make_google(google_meet_pending_reads=3)
        token = (await google.connect())["access_token"]
        chosen = event_id()
        body = session_body(id=chosen)
        request_id = body["conferenceData"]["createRequest"]["requestId"]

        inserted = (await google.insert(token, body)).json()
        reads = [inserted] + [(await google.read(token, chosen)).json() for _ in range(3)]

        statuses = [r["conferenceData"]["createRequest"]["status"]["statusCode"] for r in reads]
        assert statuses == ["pending", "pending", "pending", "success"]
        for pending in reads[:3]:
            assert "hangoutLink" not in pending
            assert set(pending["conferenceData"]) == {"createRequest"}
            assert pending["conferenceData"]["createRequest"]["requestId"] == request_id
        done = reads[3]
        conference = done["conferenceData"]
        [video] = [e for e in conference["entryPoints"] if e["entryPointType"] == "video"]
        assert MEET_URL.fullmatch(video["uri"])
        assert done["hangoutLink"] == video["uri"]
        assert video["label"] == video["uri"].removeprefix("https://")
        assert conference["conferenceId"] == video["uri"].rsplit("/", 1)[1]
        assert conference["conferenceSolution"]["key"] == {"type": "hangoutsMeet"}
        assert conference["createRequest"]["conferenceSolutionKey"] == {"type": "hangoutsMeet"}
        # And it stays there.
        assert (await google.read(token, chosen)).json()["hangoutLink"] == done["hangoutLink"]

    async def test_the_control_list_does_not_count_as_a_read(self, make_google):
        google = make_google(google_meet_pending_reads=2)
        token = (await google.connect())["access_token"]
        chosen = event_id()
        await google.insert(token, session_body(id=chosen))
        for _ in range(3):
            [listed] = (await google.http.get("/_sandbox/events")).json()["events"]
            assert listed["conferenceData"]["createRequest"]["status"]["statusCode"] == "pending"
        assert "hangoutLink" not in (await google.read(token, chosen)).json()
        assert "hangoutLink" in (await google.read(token, chosen)).json()

    async def test_by_default_the_insert_answers_the_meet_link(self, google):
        token = (await google.connect())["access_token"]
        event = (await google.insert(token, session_body())).json()
        assert event["conferenceData"]["createRequest"]["status"]["statusCode"] == "success"
        assert MEET_URL.fullmatch(event["hangoutLink"])

    @pytest.mark.parametrize("params", [{}, {"conferenceDataVersion": "0"}, {"sendUpdates": "all"}])
    async def test_without_conference_data_version_1_conference_data_is_ignored(
        self, google, params
    ):
        token = (await google.connect())["access_token"]
        response = await google.insert(token, session_body(), params=params)
        assert response.status_code == 200
        assert "conferenceData" not in response.json()
        assert "hangoutLink" not in response.json()

    async def test_without_a_create_request_there_is_no_meet(self, google):
        token = (await google.connect())["access_token"]
        body = session_body()
        del body["conferenceData"]
        event = (await google.insert(token, body)).json()
        assert "conferenceData" not in event
        assert "hangoutLink" not in event

    async def test_another_conference_type_is_400(self, google):
        token = (await google.connect())["access_token"]
        body = session_body()
        body["conferenceData"]["createRequest"]["conferenceSolutionKey"]["type"] = "zoom"
        google_error(await google.insert(token, body), 400, "invalid")


class TestFreeBusy:
    async def test_busy_periods_come_from_the_stored_events(self, google):
        who = account()
        token = (await google.connect(who))["access_token"]
        for start, end in [("09:00", "10:00"), ("09:30", "10:30"), ("14:00", "15:00")]:
            body = session_body(
                start={"dateTime": f"2030-03-04T{start}:00Z"},
                end={"dateTime": f"2030-03-04T{end}:00Z"},
            )
            await google.insert(token, body)
        free = session_body(
            start={"dateTime": "2030-03-04T16:00:00Z"},
            end={"dateTime": "2030-03-04T17:00:00Z"},
            transparency="transparent",
        )
        await google.insert(token, free)
        # Someone else's event is not this calendar's business.
        other = (await google.connect())["access_token"]
        await google.insert(other, session_body())

        response = await google.free_busy(
            token,
            {
                "timeMin": "2030-03-04T00:00:00Z",
                "timeMax": "2030-03-04T14:30:00Z",
                "items": [{"id": "primary"}, {"id": who}],
            },
        )
        assert response.status_code == 200
        expected = [
            {"start": "2030-03-04T09:00:00Z", "end": "2030-03-04T10:30:00Z"},
            {"start": "2030-03-04T14:00:00Z", "end": "2030-03-04T14:30:00Z"},
        ]
        assert response.json() == {
            "kind": "calendar#freeBusy",
            "timeMin": "2030-03-04T00:00:00.000Z",
            "timeMax": "2030-03-04T14:30:00.000Z",
            "calendars": {"primary": {"busy": expected}, who: {"busy": expected}},
        }

    async def test_a_calendar_it_cannot_reach_reports_not_found(self, google):
        token = (await google.connect())["access_token"]
        other = account()
        answer = (
            await google.free_busy(
                token,
                {
                    "timeMin": "2030-03-04T00:00:00Z",
                    "timeMax": "2030-03-05T00:00:00Z",
                    "items": [{"id": other}],
                },
            )
        ).json()
        assert answer["calendars"][other] == {
            "errors": [{"domain": "global", "reason": "notFound"}],
            "busy": [],
        }

    async def test_a_time_max_before_time_min_is_400(self, google):
        token = (await google.connect())["access_token"]
        body = {"timeMin": "2030-03-05T00:00:00Z", "timeMax": "2030-03-04T00:00:00Z", "items": []}
        google_error(await google.free_busy(token, body), 400, "timeRangeEmpty")

    async def test_a_missing_bound_is_400(self, google):
        token = (await google.connect())["access_token"]
        body = {"timeMin": "2030-03-05T00:00:00Z", "items": [{"id": "primary"}]}
        google_error(await google.free_busy(token, body), 400, "required")


# endpoint -> how a test makes that call normally (the sandbox, a connected mentor)
async def call(google: Google, endpoint: str, tokens: dict[str, Any]) -> httpx.Response:
    access = tokens["access_token"]
    if endpoint == "token":
        return await google.refresh(tokens["refresh_token"])
    if endpoint == "insert":
        return await google.insert(access, session_body())
    if endpoint == "get":
        return await google.read(access, tokens["event_id"])
    if endpoint == "delete":
        # One of the events the fixture set aside for deleting: a fault never touches them.
        return await google.delete(access, tokens["deletable"].pop())
    window = {"timeMin": "2030-03-04T00:00:00Z", "timeMax": "2030-03-05T00:00:00Z"}
    return await google.free_busy(access, {**window, "items": [{"id": "primary"}]})


@pytest.fixture
async def mentor(google: Google) -> dict[str, Any]:
    """A connected mentor with one event to read and a few to delete: all five calls can be
    made."""
    tokens = await google.connect()
    chosen = event_id()
    await google.insert(tokens["access_token"], session_body(id=chosen))
    deletable = [event_id() for _ in range(3)]
    for spare in deletable:
        await google.insert(tokens["access_token"], session_body(id=spare))
    return {**tokens, "event_id": chosen, "deletable": deletable}


ENDPOINTS = ["token", "insert", "get", "delete", "freebusy"]
# kind -> (status, Calendar's reason, the token endpoint's error)
FAULTS = {
    "http_500": (500, "backendError", "internal_failure"),
    "http_503": (503, "backendError", "temporarily_unavailable"),
    "http_429": (429, "rateLimitExceeded", "rate_limit_exceeded"),
    "rate_limit_403": (403, "rateLimitExceeded", "rate_limit_exceeded"),
    "quota_403": (403, "quotaExceeded", "quota_exceeded"),
}


class TestFaults:
    @pytest.mark.parametrize("endpoint", ENDPOINTS)
    @pytest.mark.parametrize("kind", sorted(FAULTS))
    async def test_a_fault_answers_once_in_googles_shape(self, google, mentor, kind, endpoint):
        await google.control("faults", {"kind": kind, "count": 1, "endpoint": endpoint})
        status, reason, oauth_code = FAULTS[kind]

        faulted = await call(google, endpoint, mentor)

        if endpoint == "token":
            oauth_error(faulted, status, oauth_code)
        else:
            google_error(faulted, status, reason)
        if kind == "http_429":
            assert faulted.headers["retry-after"] == "1"
        assert (await call(google, endpoint, mentor)).is_success
        assert (await google.http.get("/_sandbox/faults")).json() == {"faults": []}

    async def test_any_matches_every_endpoint(self, google, mentor):
        await google.control("faults", {"kind": "http_503", "count": len(ENDPOINTS)})
        for endpoint in ENDPOINTS:
            assert (await call(google, endpoint, mentor)).status_code == 503
        for endpoint in ENDPOINTS:
            assert (await call(google, endpoint, mentor)).is_success

    async def test_a_fault_for_one_endpoint_leaves_the_others_alone(self, google, mentor):
        await google.control("faults", {"kind": "http_500", "count": 1, "endpoint": "insert"})
        for endpoint in ("token", "get", "delete", "freebusy"):
            assert (await call(google, endpoint, mentor)).is_success
        listed = (await google.http.get("/_sandbox/faults")).json()["faults"]
        assert listed == [{"kind": "http_500", "count": 1, "endpoint": "insert"}]
        assert (await call(google, "insert", mentor)).status_code == 500

    async def test_n_faults_then_normal_service(self, google, mentor):
        await google.control("faults", {"kind": "http_503", "count": 2, "endpoint": "insert"})
        statuses = [(await call(google, "insert", mentor)).status_code for _ in range(3)]
        assert statuses == [503, 503, 200]

    async def test_switches_queue_up_in_order(self, google, mentor):
        for kind in ("http_500", "http_429", "quota_403"):
            await google.control("faults", {"kind": kind, "count": 1})
        statuses = [(await call(google, "get", mentor)).status_code for _ in range(4)]
        assert statuses == [500, 429, 403, 200]

    async def test_faults_come_before_auth(self, google):
        await google.control("faults", {"kind": "http_503", "count": 1, "endpoint": "get"})
        response = await google.read("ya29.never-issued", event_id())
        google_error(response, 503, "backendError")

    async def test_a_delete_stalled_by_slow_still_deletes(self, google, mentor):
        await google.control(
            "faults", {"kind": "slow", "count": 1, "endpoint": "delete", "seconds": 0.01}
        )
        doomed = mentor["deletable"][-1]

        assert (await call(google, "delete", mentor)).status_code == 204

        read = await google.read(mentor["access_token"], doomed)
        assert read.json()["status"] == "cancelled"

    async def test_slow_stalls_then_answers_normally(self, google, mentor):
        await google.control(
            "faults", {"kind": "slow", "count": 2, "endpoint": "insert", "seconds": 0.01}
        )
        listed = (await google.http.get("/_sandbox/faults")).json()["faults"]
        assert listed == [{"kind": "slow", "count": 2, "endpoint": "insert", "seconds": 0.01}]
        for _ in range(2):
            assert (await call(google, "insert", mentor)).status_code == 200
        assert (await google.http.get("/_sandbox/faults")).json() == {"faults": []}

    async def test_a_slow_call_outlasts_a_short_client_timeout(self, google, mentor):
        # In-process the client cannot time out on the wire; asyncio's timeout plays its part.
        await google.control("faults", {"kind": "slow", "count": 1, "seconds": 30})
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await call(google, "token", mentor)
        assert (await call(google, "token", mentor)).status_code == 200

    async def test_other_paths_never_use_a_fault_up(self, google):
        await google.control("faults", {"kind": "http_500", "count": 1})
        assert (await google.http.get(consent_url())).status_code == 200
        await google.code()
        assert (await google.http.get("/calendar/v3/users/me/calendarList")).status_code == 404
        assert (await google.http.get("/health/live")).status_code == 200
        listed = (await google.http.get("/_sandbox/faults")).json()["faults"]
        assert listed == [{"kind": "http_500", "count": 1, "endpoint": "any"}]

    async def test_delete_clears_every_switch(self, google, mentor):
        await google.control("faults", {"kind": "http_500", "count": 5})
        response = await google.http.delete("/_sandbox/faults")
        assert response.json() == {"faults": []}
        assert (await call(google, "insert", mentor)).status_code == 200

    @pytest.mark.parametrize(
        "body",
        [
            {"kind": "timeout", "count": 1},
            {"kind": "http_500", "count": 0},
            {"kind": "http_500", "endpoint": "consent"},
            {"kind": "slow", "seconds": -1},
        ],
    )
    async def test_a_bad_switch_is_refused(self, google, body):
        response = await google.http.post("/_sandbox/faults", json=body)
        assert response.status_code == 422
        assert response.headers["content-type"] == "application/problem+json"


class TestRevoke:
    async def test_it_kills_the_accounts_refresh_and_access_tokens(self, google):
        who, bystander = account(), account()
        mine = await google.connect(who)
        theirs = await google.connect(bystander)

        answer = await google.control("revoke", {"account": who})

        assert answer == {"account": who, "revoked": {"refresh_tokens": 1, "access_tokens": 1}}
        google_error(await google.insert(mine["access_token"], session_body()), 401, "authError")
        oauth_error(await google.refresh(mine["refresh_token"]), 400, "invalid_grant")
        assert (await google.insert(theirs["access_token"], session_body())).status_code == 200
        assert (await google.refresh(theirs["refresh_token"])).status_code == 200

        tokens = (await google.http.get("/_sandbox/tokens", params={"account": who})).json()
        assert [t["revoked"] for t in tokens["refresh_tokens"]] == [True]
        assert [t["revoked"] for t in tokens["access_tokens"]] == [True]

    async def test_reconnecting_after_a_revoke_gives_a_refresh_token_again(self, google):
        who = account()
        await google.connect(who, prompt=None)
        await google.control("revoke", {"account": who})
        again = await google.connect(who, prompt=None)
        assert (await google.refresh(again["refresh_token"])).status_code == 200


class TestExpireAccessTokens:
    async def test_without_an_account_every_access_token_expires(self, google):
        first, second = await google.connect(), await google.connect()
        answer = await google.control("expire-access-tokens", {})
        assert answer == {"expired": 2}
        for tokens in (first, second):
            response = await google.insert(tokens["access_token"], session_body())
            google_error(response, 401, "authError")
            assert (await google.refresh(tokens["refresh_token"])).status_code == 200

    async def test_with_an_account_only_its_tokens_expire(self, google):
        who = account()
        mine, theirs = await google.connect(who), await google.connect()
        await google.control("expire-access-tokens", {"account": who})
        assert (await google.insert(mine["access_token"], session_body())).status_code == 401
        assert (await google.insert(theirs["access_token"], session_body())).status_code == 200
        tokens = (await google.http.get("/_sandbox/tokens", params={"account": who})).json()
        assert [t["expired"] for t in tokens["access_tokens"]] == [True]


class TestControl:
    async def test_events_are_listed_by_account_and_calendar(self, google):
        who, other = account(), account()
        mine = (await google.connect(who))["access_token"]
        theirs = (await google.connect(other))["access_token"]
        ids = [event_id(), event_id()]
        for chosen in ids:
            await google.insert(mine, session_body(id=chosen))
        await google.insert(theirs, session_body())

        await google.delete(mine, ids[1])

        listed = (await google.http.get("/_sandbox/events", params={"account": who})).json()
        assert [e["id"] for e in listed["events"]] == ids
        assert [e["status"] for e in listed["events"]] == ["confirmed", "cancelled"]
        assert listed["events"][0]["sandbox"]["account"] == who
        assert listed["events"][0]["sandbox"]["send_updates"] == "all"
        assert listed["events"][0]["sandbox"]["deleted_send_updates"] is None
        by_calendar = await google.http.get("/_sandbox/events", params={"calendar": who})
        assert [e["id"] for e in by_calendar.json()["events"]] == ids
        assert len((await google.http.get("/_sandbox/events")).json()["events"]) == 3

    async def test_tokens_are_listed_with_their_state(self, google):
        who = account()
        connected = await google.connect(who)
        tokens = (await google.http.get("/_sandbox/tokens", params={"account": who})).json()
        [refresh] = tokens["refresh_tokens"]
        [access] = tokens["access_tokens"]
        assert refresh["token"] == connected["refresh_token"]
        assert (refresh["account"], refresh["revoked"]) == (who, False)
        assert access["token"] == connected["access_token"]
        assert (access["expired"], access["revoked"]) == (False, False)
        assert "sandbox-client-secret" not in str(tokens)

    async def test_reset_forgets_everything(self, google, mentor):
        await google.control("faults", {"kind": "http_500", "count": 1})
        assert await google.control("reset") == {"reset": True}
        assert (await google.http.get("/_sandbox/events")).json() == {"events": []}
        assert (await google.http.get("/_sandbox/tokens")).json() == {
            "refresh_tokens": [],
            "access_tokens": [],
        }
        assert (await google.http.get("/_sandbox/faults")).json() == {"faults": []}
        oauth_error(await google.refresh(mentor["refresh_token"]), 400, "invalid_grant")


class TestSettings:
    def test_the_environment_sets_them(self, monkeypatch):
        monkeypatch.setenv("SANDBOX_GOOGLE_CLIENT_ID", "env-client")
        monkeypatch.setenv("SANDBOX_GOOGLE_CLIENT_SECRET", "env-secret")
        monkeypatch.setenv("SANDBOX_GOOGLE_PUBLIC_URL", "https://google.example/")
        monkeypatch.setenv("SANDBOX_GOOGLE_ACCESS_TOKEN_SECONDS", "60")
        monkeypatch.setenv("SANDBOX_GOOGLE_MEET_PENDING_READS", "2")
        settings = SandboxSettings()
        assert settings.google_client_id == "env-client"
        assert settings.google_client_secret.get_secret_value() == "env-secret"
        assert settings.google_public_url == "https://google.example"
        assert settings.google_access_token_seconds == 60
        assert settings.google_meet_pending_reads == 2

    def test_the_defaults_are_the_calendar_services(self, monkeypatch):
        for name in ("SANDBOX_GOOGLE_PUBLIC_URL", "SANDBOX_GOOGLE_PORT"):
            monkeypatch.delenv(name, raising=False)
        settings = SandboxSettings(google_port=9111)
        assert settings.google_client_id == CLIENT_ID
        assert settings.google_client_secret.get_secret_value() == CLIENT_SECRET
        assert settings.google_public_url == "http://127.0.0.1:9111"
        assert settings.google_access_token_seconds == 3599
        assert settings.google_meet_pending_reads == 0


class TestServeCommand:
    async def test_python_m_booking_sandbox_google_serve(self):
        port = free_port()
        env = {
            **os.environ,
            "SANDBOX_GOOGLE_PORT": str(port),
            "SANDBOX_GOOGLE_MEET_PENDING_READS": "1",
            "LOG_LEVEL": "WARNING",
        }
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "booking.sandbox", "google", "serve", env=env
        )
        url = f"http://127.0.0.1:{port}"
        try:
            async with httpx.AsyncClient(base_url=url, trust_env=False, auth=ControlAuth()) as http:

                async def live() -> bool:
                    assert process.returncode is None, "the sandbox exited"
                    try:
                        return (await http.get("/health/live")).status_code == 200
                    except httpx.TransportError:
                        return False

                await eventually(live, what="the sandbox to serve", timeout=30)
                google = Google(http, Clock())
                connected = await google.connect()
                event = (await google.insert(connected["access_token"], session_body())).json()
            assert event["htmlLink"].startswith(f"{url}/calendar/event?eid=")
            assert "hangoutLink" not in event
        finally:
            process.terminate()
            await process.wait()

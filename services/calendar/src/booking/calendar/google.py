"""The Google adapter: OAuth 2.0 (consent URL, code exchange, refresh) and Calendar v3 events.

One `httpx.AsyncClient` per process, opened and closed by the app's lifespan. Timeouts, transport
errors, 429, 403 rateLimitExceeded/userRateLimitExceeded and 5xx are retried with exponential
backoff and full jitter, a bounded number of times (a short Retry-After is honoured); any other
4xx is an answer, never retried. At the calendar API a 401 refreshes the access token once and
tries again; a 409 duplicate means the event exists (its id is derived from the session), so it
is read instead; at a delete, 410 `deleted` and 404 mean the event is gone already, which is
what was asked. invalid_grant at a refresh is `IntegrationRevoked`, never retried.

Access tokens live in memory only, per mentor, until shortly before they expire. Refresh and
access tokens and the client secret never reach a log line, an exception or a repr.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import quote, urlencode
from uuid import UUID

import httpx
from pydantic import SecretStr

from booking.calendar.domain import CALENDAR_SCOPE, SessionEvent
from booking.calendar.settings import CalendarSettings
from booking.runtime.outside import (
    ClientClosed,
    OutsideClient,
    RetriesExhausted,
    RetryPolicy,
    TransientAnswer,
    describe_failure,
    retry_after,
)

log = logging.getLogger(__name__)

# 403 reasons that mean "slow down", not "no": retried like a 429.
RATE_LIMIT_REASONS = frozenset({"rateLimitExceeded", "userRateLimitExceeded"})


# -- errors ----------------------------------------------------------------------------------


class GoogleError(Exception):
    """Google did not do what was asked: what it said, and how many attempts it took."""

    def __init__(
        self,
        what: str,
        message: str,
        *,
        status: int | None = None,
        reason: str | None = None,
        attempts: int = 1,
    ) -> None:
        self.what = what
        self.message = message
        self.status = status
        self.reason = reason
        self.attempts = attempts
        super().__init__(self.describe())

    def describe(self) -> str:
        answer = f"HTTP {self.status}" if self.status is not None else "no answer"
        reason = f" {self.reason}" if self.reason else ""
        return f"Google {self.what}: {answer}{reason}: {self.message}"


class GoogleRefused(GoogleError):
    """An answer retrying cannot change: 400, 403 quota or permissions, 404, a second 401..."""


class GoogleUnavailable(GoogleError):
    """Google could not be reached or kept failing (timeouts, 429, rate limits, 5xx) throughout."""

    def describe(self) -> str:
        return f"{super().describe()} (gave up after {self.attempts} attempt(s))"


class IntegrationRevoked(GoogleError):
    """invalid_grant at a refresh: the mentor's refresh token is dead. Never retried."""


class MeetLinkPending(Exception):
    """The event exists, but Google still had no Meet link for it after every read."""

    def __init__(self, event_id: str, reads: int) -> None:
        self.event_id = event_id
        self.reads = reads
        super().__init__(f"event {event_id}: the Meet data was still pending after {reads} reads")


class GoogleClientClosed(ClientClosed):
    """The client is not open: the app is starting or stopping. Not Google's answer."""


class _Transient(TransientAnswer, GoogleError):
    """Worth another attempt."""


class _Unauthorized(GoogleError):
    """401 at the calendar API: the access token is bad or expired."""


class _Duplicate(GoogleError):
    """409 duplicate: an event with that id exists already."""


class _InvalidGrant(GoogleError):
    """The token endpoint's invalid_grant."""


# -- results ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TokenGrant:
    """What the token endpoint answered. The tokens are SecretStr: they never print."""

    access_token: SecretStr
    expires_in: float
    refresh_token: SecretStr | None
    scope: str | None


@dataclass(frozen=True, slots=True)
class MentorCredentials:
    """Whose calendar, and the refresh token that opens it."""

    mentor_id: UUID
    refresh_token: SecretStr

    @property
    def fingerprint(self) -> str:
        # Tells a cached access token of an older connection from the current one.
        return hashlib.sha256(self.refresh_token.get_secret_value().encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class CalendarEvent:
    """The parts of a Calendar v3 Event we keep."""

    id: str
    html_link: str | None
    meet_link: str | None
    meet_status: str | None  # conferenceData.createRequest.status.statusCode

    @classmethod
    def read(cls, body: dict[str, Any]) -> CalendarEvent:
        conference = body.get("conferenceData") or {}
        video = next(
            (
                point.get("uri")
                for point in conference.get("entryPoints") or []
                if isinstance(point, dict) and point.get("entryPointType") == "video"
            ),
            None,
        )
        status = ((conference.get("createRequest") or {}).get("status") or {}).get("statusCode")
        return cls(
            id=str(body.get("id") or ""),
            html_link=body.get("htmlLink"),
            meet_link=video or body.get("hangoutLink"),
            meet_status=status,
        )

    @property
    def meet_pending(self) -> bool:
        return self.meet_link is None and self.meet_status != "failure"


@dataclass
class _CachedToken:
    token: SecretStr
    fingerprint: str
    good_until: float  # on the client's monotonic clock


# -- the client ------------------------------------------------------------------------------


@dataclass
class GoogleClient(OutsideClient):
    system: ClassVar[str] = "Google"
    closed_error: ClassVar[type[ClientClosed]] = GoogleClientClosed

    client_id: str
    client_secret: SecretStr
    auth_url: str
    token_url: str
    calendar_api_url: str
    timeout: float = 10.0
    max_attempts: int = 5
    retry_base: float = 1.0
    retry_after_max: float = 20.0
    meet_poll_attempts: int = 5
    meet_poll_base: float = 0.5
    token_expiry_margin: float = 60.0
    transport: httpx.AsyncBaseTransport | None = None
    event_hooks: dict[str, list[Callable[..., Any]]] | None = None
    clock: Callable[[], float] = time.monotonic
    _tokens: dict[UUID, _CachedToken] = field(default_factory=dict, init=False, repr=False)
    _locks: dict[UUID, asyncio.Lock] = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def from_settings(cls, settings: CalendarSettings, **kwargs: Any) -> GoogleClient:
        return cls(
            client_id=settings.google_client_id,
            client_secret=settings.google_client_secret,
            auth_url=settings.google_auth_url,
            token_url=settings.google_token_url,
            calendar_api_url=settings.google_calendar_api_url.rstrip("/"),
            timeout=settings.google_timeout_seconds,
            max_attempts=settings.google_max_attempts,
            retry_base=settings.google_retry_base_seconds,
            retry_after_max=settings.google_retry_after_max_seconds,
            meet_poll_attempts=settings.google_meet_poll_attempts,
            meet_poll_base=settings.google_meet_poll_base_seconds,
            token_expiry_margin=settings.google_token_expiry_margin_seconds,
            **kwargs,
        )

    @property
    def configured(self) -> list[str]:
        """The settings Google needs that are missing (empty: configured)."""
        wanted = {
            "GOOGLE_CLIENT_ID": self.client_id,
            "GOOGLE_CLIENT_SECRET": self.client_secret.get_secret_value(),
            "GOOGLE_AUTH_URL": self.auth_url,
            "GOOGLE_TOKEN_URL": self.token_url,
            "GOOGLE_CALENDAR_API_URL": self.calendar_api_url,
        }
        return [name for name, value in wanted.items() if not value]

    # -- OAuth -------------------------------------------------------------------------------

    def consent_url(self, *, redirect_uri: str, state: str, login_hint: str | None) -> str:
        """Google's consent page for the calendar.events scope, offline, asking again."""
        params = {
            "client_id": self.client_id,
            "redirect_uri": redirect_uri,
            "response_type": "code",
            "scope": CALENDAR_SCOPE,
            "access_type": "offline",  # a refresh token
            "prompt": "consent",  # a new refresh token on every reconnect
            "include_granted_scopes": "true",
            "state": state,
        }
        if login_hint:
            params["login_hint"] = login_hint
        separator = "&" if "?" in self.auth_url else "?"
        return f"{self.auth_url}{separator}{urlencode(params)}"

    async def exchange_code(self, code: str, redirect_uri: str) -> TokenGrant:
        """The tokens for an authorization code. A refused code is GoogleRefused(invalid_grant)."""
        try:
            return await self._token(
                "code exchange",
                {
                    "grant_type": "authorization_code",
                    "code": code,
                    "redirect_uri": redirect_uri,
                },
            )
        except _InvalidGrant as error:
            raise GoogleRefused(
                error.what, error.message, status=error.status, reason="invalid_grant"
            ) from None

    async def access_token(
        self, credentials: MentorCredentials, *, stale: SecretStr | None = None
    ) -> SecretStr:
        """A live access token for the mentor: the cached one, or a fresh one from a refresh.

        `stale` is a token the calendar API has just refused: never handed out again. One
        refresh at a time per mentor, so concurrent bookings share it.
        """
        lock = self._locks.setdefault(credentials.mentor_id, asyncio.Lock())
        async with lock:
            cached = self._tokens.get(credentials.mentor_id)
            if (
                cached is not None
                and cached.fingerprint == credentials.fingerprint
                and cached.good_until > self.clock()
                and (stale is None or cached.token != stale)
            ):
                return cached.token
            try:
                grant = await self._token(
                    "token refresh",
                    {
                        "grant_type": "refresh_token",
                        "refresh_token": credentials.refresh_token.get_secret_value(),
                    },
                )
            except _InvalidGrant as error:
                self._tokens.pop(credentials.mentor_id, None)
                raise IntegrationRevoked(
                    error.what, error.message, status=error.status, reason="invalid_grant"
                ) from None
            self._tokens[credentials.mentor_id] = _CachedToken(
                token=grant.access_token,
                fingerprint=credentials.fingerprint,
                good_until=self.clock() + max(0.0, grant.expires_in - self.token_expiry_margin),
            )
            return grant.access_token

    def forget(self, mentor_id: UUID) -> None:
        """Drop the mentor's cached access token (disconnected)."""
        self._tokens.pop(mentor_id, None)

    async def _token(self, what: str, form: dict[str, str]) -> TokenGrant:
        form = {
            **form,
            "client_id": self.client_id,
            "client_secret": self.client_secret.get_secret_value(),
        }
        response = await self._call(what, self._token_outcome, "POST", self.token_url, data=form)
        body = _json_object(response)
        access = body.get("access_token")
        if not isinstance(access, str) or not access:
            raise GoogleRefused(what, "the answer has no access_token", status=200)
        refresh = body.get("refresh_token")
        try:
            expires_in = float(body.get("expires_in", 3600))
        except (TypeError, ValueError):
            expires_in = 3600.0
        return TokenGrant(
            access_token=SecretStr(access),
            expires_in=expires_in,
            refresh_token=SecretStr(refresh) if isinstance(refresh, str) and refresh else None,
            scope=body.get("scope") if isinstance(body.get("scope"), str) else None,
        )

    @staticmethod
    def _token_outcome(what: str, response: httpx.Response) -> None:
        if response.is_success:
            return
        status = response.status_code
        error, description = _token_error(response)
        message = f"{error}: {description}" if description else error
        if error == "invalid_grant":
            raise _InvalidGrant(what, message, status=status, reason=error)
        if status == 429 or status >= 500 or (status == 403 and "rate_limit" in error):
            raise _Transient(
                what, message, status=status, reason=error, retry_after=retry_after(response)
            )
        raise GoogleRefused(what, message, status=status, reason=error)

    # -- Calendar v3 -------------------------------------------------------------------------

    def _events_url(self, calendar_id: str) -> str:
        return f"{self.calendar_api_url}/calendars/{quote(calendar_id, safe='')}/events"

    async def insert_event(
        self, credentials: MentorCredentials, calendar_id: str, session: SessionEvent
    ) -> CalendarEvent:
        """Put the session in the mentor's calendar with a Meet link; exactly one event.

        The event's id is derived from the session: if an earlier attempt (or a replica that
        crashed) made it, Google answers 409 duplicate and the event is read instead.
        """
        body = session.body()

        async def insert(token: SecretStr) -> httpx.Response:
            return await self.http.post(
                self._events_url(calendar_id),
                params={"conferenceDataVersion": "1", "sendUpdates": "all"},
                json=body,
                headers=_bearer(token),
            )

        try:
            response = await self._authorized("event insert", credentials, insert)
            event = CalendarEvent.read(_json_object(response))
        except _Duplicate:
            log.info("event %s exists already: reading it", session.event_id)
            event = await self.get_event(credentials, calendar_id, session.event_id)
        return await self._with_meet_link(credentials, calendar_id, event)

    async def get_event(
        self, credentials: MentorCredentials, calendar_id: str, event_id: str
    ) -> CalendarEvent:
        async def read(token: SecretStr) -> httpx.Response:
            return await self.http.get(
                f"{self._events_url(calendar_id)}/{quote(event_id, safe='')}",
                headers=_bearer(token),
            )

        response = await self._authorized("event read", credentials, read)
        return CalendarEvent.read(_json_object(response))

    async def delete_event(
        self, credentials: MentorCredentials, calendar_id: str, event_id: str
    ) -> bool:
        """Remove the event from the mentor's calendar, telling its guests; True if this call
        deleted it, False if it was gone already (410 deleted by an earlier call, or 404).

        Safe to repeat: Google keeps a deleted event `cancelled` and answers 410 thereafter, and
        its id is never free again, so a late insert under it cannot bring it back.
        """

        async def delete(token: SecretStr) -> httpx.Response:
            return await self.http.delete(
                f"{self._events_url(calendar_id)}/{quote(event_id, safe='')}",
                params={"sendUpdates": "all"},
                headers=_bearer(token),
            )

        try:
            await self._authorized("event delete", credentials, delete)
        except GoogleRefused as refused:
            if refused.status in (404, 410):
                log.info("event %s is gone already (%s)", event_id, refused.describe())
                return False
            raise
        return True

    async def _with_meet_link(
        self, credentials: MentorCredentials, calendar_id: str, event: CalendarEvent
    ) -> CalendarEvent:
        """Read the event again while Google is still creating its Meet conference (bounded)."""
        reads = 0
        while event.meet_pending:
            if reads >= self.meet_poll_attempts:
                raise MeetLinkPending(event.id, reads)
            await asyncio.sleep(random.uniform(0.5, 1.0) * self.meet_poll_base * 2**reads)
            reads += 1
            event = await self.get_event(credentials, calendar_id, event.id)
        if event.meet_link is None:
            raise GoogleRefused(
                "event insert", f"Google could not create the Meet conference of {event.id}"
            )
        return event

    async def _authorized(
        self,
        what: str,
        credentials: MentorCredentials,
        send: Callable[[SecretStr], Awaitable[httpx.Response]],
    ) -> httpx.Response:
        """`send` with the mentor's access token; on 401, once more with a refreshed one."""
        token = await self.access_token(credentials)
        try:
            return await self._call(what, self._calendar_outcome, send=send, token=token)
        except _Unauthorized:
            log.info("mentor %s: access token refused, refreshing", credentials.mentor_id)
        token = await self.access_token(credentials, stale=token)
        try:
            return await self._call(what, self._calendar_outcome, send=send, token=token)
        except _Unauthorized as error:
            raise GoogleRefused(
                what, f"a freshly refreshed access token was refused: {error.message}", status=401
            ) from None

    @staticmethod
    def _calendar_outcome(what: str, response: httpx.Response) -> None:
        if response.is_success:
            return
        status = response.status_code
        message, reasons = _calendar_error(response)
        reason = reasons[0] if reasons else None
        if status == 401:
            raise _Unauthorized(what, message, status=status, reason=reason)
        if status == 409 and (not reasons or "duplicate" in reasons):
            raise _Duplicate(what, message, status=status, reason="duplicate")
        if status == 429 or status >= 500 or (status == 403 and RATE_LIMIT_REASONS & set(reasons)):
            raise _Transient(
                what, message, status=status, reason=reason, retry_after=retry_after(response)
            )
        raise GoogleRefused(what, message, status=status, reason=reason)

    async def ping(self) -> int:
        """One request to the token endpoint, no retries: its HTTP status, whatever it is."""
        response = await self.http.get(self.token_url)
        return response.status_code

    # -- retries -----------------------------------------------------------------------------

    @property
    def retries(self) -> RetryPolicy:
        return RetryPolicy("Google", self.max_attempts, self.retry_base, self.retry_after_max, log)

    async def _call(
        self,
        what: str,
        outcome: Callable[[str, httpx.Response], None],
        method: str | None = None,
        url: str | None = None,
        *,
        send: Callable[[SecretStr], Awaitable[httpx.Response]] | None = None,
        token: SecretStr | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """One request, retried while it is transient; `outcome` raises for what is not 2xx."""

        async def once(attempt: int) -> httpx.Response:
            try:
                if send is not None:
                    assert token is not None
                    response = await send(token)
                else:
                    assert method is not None and url is not None
                    response = await self.http.request(method, url, **kwargs)
                outcome(what, response)
                return response
            except GoogleError as error:
                error.attempts = attempt
                raise

        try:
            return await self.retries.call(what, once)
        except RetriesExhausted as exhausted:
            last, tried = exhausted.last, exhausted.attempts
            if isinstance(last, GoogleError):
                raise GoogleUnavailable(
                    what, last.message, status=last.status, reason=last.reason, attempts=tried
                ) from None
            raise GoogleUnavailable(what, describe_failure(last), attempts=tried) from None


def _bearer(token: SecretStr) -> dict[str, str]:
    return {"authorization": f"Bearer {token.get_secret_value()}"}


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        raise GoogleRefused(
            "answer", "the answer is not JSON", status=response.status_code
        ) from None
    if not isinstance(body, dict):
        raise GoogleRefused("answer", "the answer is not an object", status=response.status_code)
    return body


def _token_error(response: httpx.Response) -> tuple[str, str]:
    """The token endpoint's `error` and `error_description` (or the body's text)."""
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}", response.text.strip()[:300]
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):  # some Google errors use the API form here too
            return str(error.get("status") or error.get("code")), str(error.get("message") or "")
        if isinstance(error, str):
            return error, str(body.get("error_description") or "")
    return f"HTTP {response.status_code}", str(body)[:300]


def _calendar_error(response: httpx.Response) -> tuple[str, list[str]]:
    """The Calendar API's `error.message` and its `errors[].reason`s."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:300] or f"HTTP {response.status_code}", []
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return str(body)[:300], []
    reasons = [
        str(item["reason"])
        for item in error.get("errors") or []
        if isinstance(item, dict) and item.get("reason")
    ]
    return str(error.get("message") or f"HTTP {response.status_code}"), reasons

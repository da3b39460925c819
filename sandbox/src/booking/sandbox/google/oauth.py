"""Google OAuth 2.0 as the sandbox keeps it: the consent request and its checks, the codes, the
refresh tokens and the access tokens.

Pure: no I/O, and every function that needs the time is given `now`.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from booking.sandbox.google.clock import rfc3339

CALENDAR_EVENTS_SCOPE = "https://www.googleapis.com/auth/calendar.events"
# Either of these lets a token insert events and ask for free/busy.
CALENDAR_SCOPES = frozenset({CALENDAR_EVENTS_SCOPE, "https://www.googleapis.com/auth/calendar"})
# Google's authorization codes are good for ten minutes, once.
CODE_LIFETIME = timedelta(minutes=10)
# Who consents when the consent URL names nobody (no login_hint).
DEFAULT_ACCOUNT = "mentor@example.com"
# What the consent request carries from the consent page to its decision.
CONSENT_PARAMS = (
    "client_id",
    "redirect_uri",
    "response_type",
    "scope",
    "access_type",
    "prompt",
    "state",
    "login_hint",
)


class ConsentRefused(Exception):
    """A consent request Google refuses with an error page (it does not redirect)."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description


class GrantRefused(Exception):
    """A token request the token endpoint refuses with 400 `{"error", "error_description"}`."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description


def with_query(url: str, params: Mapping[str, str]) -> str:
    """`url` with `params` added to whatever query it already has."""
    parts = urlsplit(url)
    extra = urlencode(params)
    query = f"{parts.query}&{extra}" if parts.query else extra
    return urlunsplit(parts._replace(query=query))


def normal_account(email: str | None) -> str:
    # Google's addresses are case-insensitive; one spelling keeps one account.
    return (email or "").strip().lower() or DEFAULT_ACCOUNT


@dataclass(frozen=True)
class ConsentRequest:
    """The query of `GET /o/oauth2/v2/auth`, checked as Google checks it."""

    client_id: str
    redirect_uri: str
    scope: str
    access_type: str = "online"
    prompt: str = ""
    state: str | None = None
    login_hint: str | None = None

    @classmethod
    def parse(cls, params: Mapping[str, str], known_client_id: str) -> ConsentRequest:
        def required(name: str) -> str:
            value = params.get(name, "")
            if not value:
                raise ConsentRefused("invalid_request", f"Missing required parameter: {name}")
            return value

        client_id = required("client_id")
        if client_id != known_client_id:
            raise ConsentRefused("invalid_client", "The OAuth client was not found.")
        redirect_uri = required("redirect_uri")
        parts = urlsplit(redirect_uri)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.fragment:
            raise ConsentRefused(
                "invalid_request", f"Invalid parameter value for redirect_uri: {redirect_uri}"
            )
        response_type = required("response_type")
        if response_type != "code":
            raise ConsentRefused(
                "unsupported_response_type", f"Invalid response_type: {response_type}"
            )
        scope = required("scope")
        if not CALENDAR_SCOPES & set(scope.split()):
            raise ConsentRefused(
                "invalid_scope",
                f"This app needs {CALENDAR_EVENTS_SCOPE} (or .../auth/calendar); "
                f"it asked for: {scope}",
            )
        access_type = params.get("access_type") or "online"
        if access_type not in ("online", "offline"):
            raise ConsentRefused("invalid_request", f"Invalid access_type: {access_type}")
        return cls(
            client_id=client_id,
            redirect_uri=redirect_uri,
            scope=" ".join(scope.split()),
            access_type=access_type,
            prompt=params.get("prompt", ""),
            state=params.get("state") or None,
            login_hint=params.get("login_hint") or None,
        )

    @property
    def offline(self) -> bool:
        return self.access_type == "offline"

    @property
    def forces_consent(self) -> bool:
        return "consent" in self.prompt.split()

    def account(self, chosen: str | None = None) -> str:
        return normal_account(chosen or self.login_hint)

    def as_params(self) -> dict[str, str]:
        """The request again as query parameters (the consent page's hidden fields)."""
        values = {
            "client_id": self.client_id,
            "redirect_uri": self.redirect_uri,
            "response_type": "code",
            "scope": self.scope,
            "access_type": self.access_type,
            "prompt": self.prompt,
            "state": self.state,
            "login_hint": self.login_hint,
        }
        return {name: value for name, value in values.items() if value}

    def _with_state(self, params: dict[str, str]) -> dict[str, str]:
        return {**params, "state": self.state} if self.state is not None else params

    def granted(self, code: str) -> str:
        """Where Allow sends the browser: the code, the state, and (as Google adds) the scope."""
        return with_query(
            self.redirect_uri, {**self._with_state({"code": code}), "scope": self.scope}
        )

    def denied(self) -> str:
        return with_query(self.redirect_uri, self._with_state({"error": "access_denied"}))


@dataclass
class Code:
    value: str
    consent: ConsentRequest
    account: str
    expires_at: datetime
    used: bool = False


@dataclass
class RefreshToken:
    value: str
    client_id: str
    account: str
    scope: str
    created_at: datetime
    revoked_at: datetime | None = None

    @property
    def live(self) -> bool:
        return self.revoked_at is None

    def as_json(self) -> dict[str, Any]:
        return {
            "token": self.value,
            "account": self.account,
            "client_id": self.client_id,
            "scope": self.scope,
            "created": rfc3339(self.created_at),
            "revoked": not self.live,
        }


@dataclass
class AccessToken:
    value: str
    client_id: str
    account: str
    scope: str
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None = None

    def works(self, now: datetime) -> bool:
        return self.revoked_at is None and now < self.expires_at

    def as_json(self, now: datetime) -> dict[str, Any]:
        return {
            "token": self.value,
            "account": self.account,
            "client_id": self.client_id,
            "scope": self.scope,
            "created": rfc3339(self.created_at),
            "expires_at": rfc3339(self.expires_at),
            "expired": now >= self.expires_at,
            "revoked": self.revoked_at is not None,
        }


def _new(prefix: str) -> str:
    # Shaped like Google's: codes "4/0A...", refresh tokens "1//0...", access tokens "ya29.".
    return prefix + secrets.token_urlsafe(40)


@dataclass
class OAuth:
    """Every code and token this sandbox issued."""

    codes: dict[str, Code] = field(default_factory=dict)
    refresh_tokens: dict[str, RefreshToken] = field(default_factory=dict)
    access_tokens: dict[str, AccessToken] = field(default_factory=dict)

    def approve(self, consent: ConsentRequest, account: str | None, now: datetime) -> Code:
        """The user clicked Allow: a code for the redirect."""
        code = Code(_new("4/0A"), consent, consent.account(account), now + CODE_LIFETIME)
        self.codes[code.value] = code
        return code

    def exchange(
        self, client_id: str, code_value: str, redirect_uri: str, lifetime: int, now: datetime
    ) -> dict[str, Any]:
        """`grant_type=authorization_code`: the tokens for a code, once."""
        code = self.codes.get(code_value)
        if (
            code is None
            or code.used
            or now >= code.expires_at
            or code.consent.client_id != client_id
            or code.consent.redirect_uri != redirect_uri
        ):
            raise GrantRefused("invalid_grant", "Bad Request")
        code.used = True
        consent = code.consent
        answer = self._access(client_id, code.account, consent.scope, lifetime, now)
        # Google gives a refresh token for offline access the first time, and again only when
        # the consent was forced (prompt=consent) or the earlier ones are gone.
        has_one = any(
            t.live and t.account == code.account and t.client_id == client_id
            for t in self.refresh_tokens.values()
        )
        if consent.offline and (consent.forces_consent or not has_one):
            token = RefreshToken(_new("1//0"), client_id, code.account, consent.scope, now)
            self.refresh_tokens[token.value] = token
            answer["refresh_token"] = token.value
        return answer

    def refresh(
        self, client_id: str, token_value: str, lifetime: int, now: datetime
    ) -> dict[str, Any]:
        """`grant_type=refresh_token`: a new access token (and no new refresh token)."""
        token = self.refresh_tokens.get(token_value)
        if token is None or not token.live or token.client_id != client_id:
            raise GrantRefused("invalid_grant", "Token has been expired or revoked.")
        return self._access(client_id, token.account, token.scope, lifetime, now)

    def _access(
        self, client_id: str, account: str, scope: str, lifetime: int, now: datetime
    ) -> dict[str, Any]:
        token = AccessToken(
            _new("ya29."), client_id, account, scope, now, now + timedelta(seconds=lifetime)
        )
        self.access_tokens[token.value] = token
        return {
            "access_token": token.value,
            "expires_in": lifetime,
            "scope": scope,
            "token_type": "Bearer",
        }

    def authenticate(self, token_value: str, now: datetime) -> AccessToken | None:
        token = self.access_tokens.get(token_value)
        return token if token is not None and token.works(now) else None

    def revoke(self, account: str, now: datetime) -> dict[str, int]:
        """The user removed the app: every refresh and access token of the account dies."""
        refresh = [t for t in self.refresh_tokens.values() if t.account == account and t.live]
        access = [
            t for t in self.access_tokens.values() if t.account == account and t.revoked_at is None
        ]
        tokens: list[RefreshToken | AccessToken] = [*refresh, *access]
        for token in tokens:
            token.revoked_at = now
        return {"refresh_tokens": len(refresh), "access_tokens": len(access)}

    def expire_access_tokens(self, account: str | None, now: datetime) -> int:
        expired = 0
        for token in self.access_tokens.values():
            if (account is None or token.account == account) and token.works(now):
                token.expires_at = now
                expired += 1
        return expired

    def as_json(self, account: str | None, now: datetime) -> dict[str, Any]:
        def mine(token: RefreshToken | AccessToken) -> bool:
            return account is None or token.account == account

        return {
            "refresh_tokens": [t.as_json() for t in self.refresh_tokens.values() if mine(t)],
            "access_tokens": [t.as_json(now) for t in self.access_tokens.values() if mine(t)],
        }

    def clear(self) -> None:
        self.codes.clear()
        self.refresh_tokens.clear()
        self.access_tokens.clear()

"""Bearer tokens: who is calling, and in which role.

Two kinds of token, and the algorithm always follows from the key we hold, never from the token:
- an identity provider's (AUTH_JWKS_URL): RS256 or ES256, verified with the key of the provider's
  JSON Web Key Set that the token names (`kid`) and whose type fits the algorithm;
- HS256 signed with AUTH_JWT_SECRET: development, or a deployment without a provider. Refused
  when a provider is configured, outside development mode.
Then the claims: `exp` and `sub` always, `iss` and `aud` when configured, a lifetime cap, and
the role from AUTH_ROLE_CLAIM (mapped by AUTH_ROLE_VALUES).

Answers: no token or a bad one 401; a good token without a role this system knows 403 (it is
someone, allowed nothing); the provider's keys unreachable while the token names a key we do
not have 503 with Retry-After (the token may be fine: try again).

No service starts with a secret anyone could know (`check_auth_settings`). `python -m
booking.runtime.auth ROLE [SUB]` prints a signed development token (`make token`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

import httpx
import jwt
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from booking.runtime.outages import OutageLog
from booking.runtime.outside import is_loopback_host
from booking.runtime.settings import DEVELOPMENT_JWT_SECRET, RefusedSettings, RuntimeSettings

log = logging.getLogger(__name__)

MIN_SECRET_BYTES = 32
PROVIDER_ALGORITHMS = ("RS256", "ES256")
# What a provider's key must be to verify each algorithm: RSA for RS256, EC on P-256 for ES256.
_KEY_FITS = {"RS256": ("RSA", None), "ES256": ("EC", "P-256")}
# A JWKS is a few kilobytes; a provider answering megabytes is broken or not the provider.
MAX_JWKS_BYTES = 512 * 1024


class Role(StrEnum):
    ADMIN = "admin"
    MENTOR = "mentor"
    MENTEE = "mentee"


# When a token holds several roles, the most privileged wins.
_PRIVILEGE = {Role.ADMIN: 3, Role.MENTOR: 2, Role.MENTEE: 1}


@dataclass(frozen=True)
class Identity:
    sub: str
    role: Role
    # Signed by the identity provider (its `sub` is the provider's), not by our own secret.
    from_provider: bool = False

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN


def acts_as_mentor(identity: Identity, mentor_id: UUID, identity_subject: str | None) -> bool:
    """Whether `identity` may act as the mentor `mentor_id`: an admin always; a mentor whose
    token's `sub` is the identity-provider subject stored on the mentor's record, or, in a token
    we signed ourselves (HS256), the id the system gave. A provider's `sub` never counts as our
    id: the provider, not we, decides what it holds."""
    if identity.is_admin:
        return True
    if identity.role is not Role.MENTOR:
        return False
    if identity_subject is not None and identity.sub == identity_subject:
        return True
    return not identity.from_provider and identity.sub == str(mentor_id)


# --- refusals ------------------------------------------------------------------------------------


class TokenRefused(Exception):
    """Why a token gives no identity; `status` is the HTTP answer."""

    status = 401

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    @property
    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer error="invalid_token"'}


class InvalidToken(TokenRefused):
    """Not a token we accept: malformed, forged, expired, for someone else, wrong algorithm."""


class NoKnownRole(TokenRefused):
    """A valid token whose role claim holds no role this system knows."""

    status = 403

    @property
    def headers(self) -> dict[str, str]:
        return {}


class KeysUnavailable(TokenRefused):
    """The token names a key we do not have, and the provider's keys cannot be fetched now."""

    status = 503

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)}


# --- the settings a process may start with -------------------------------------------------------


def secret_weakness(secret: str, *, built_in: str = DEVELOPMENT_JWT_SECRET) -> str | None:
    """Why `secret` must not be relied on outside development mode, or None if it may:
    `built_in` (the development default, readable in the source), a placeholder, or short."""
    if secret == built_in:
        return "is the built-in development secret, which anyone can read in the source"
    if secret.strip().upper().startswith("REPLACE"):
        return "is still the deployment's placeholder"
    if len(secret.encode()) < MIN_SECRET_BYTES:
        return f"is shorter than {MIN_SECRET_BYTES} bytes"
    return None


GENERATE_SECRET = 'python -c "import secrets; print(secrets.token_urlsafe(48))"'


def check_auth_settings(settings: RuntimeSettings) -> None:
    """Raise `RefusedSettings` for auth settings a deployment must not run with.

    Outside development mode: without a provider, AUTH_JWT_SECRET must be a real secret; with
    one (AUTH_JWKS_URL), HS256 is refused, so the secret signs no token and may stay unset, but
    the keys must come over https (or loopback) and AUTH_ISSUER and AUTH_AUDIENCE must be set:
    a provider signs tokens for every application and tenant it serves.
    """
    if settings.auth_jwks_url is not None and not jwt.algorithms.has_crypto:
        raise RefusedSettings(
            "AUTH_JWKS_URL is set, but the cryptography package (RS256, ES256) is not installed "
            "or not loaded in this process"
        )
    if settings.development_mode:
        return
    if settings.auth_jwks_url is None:
        weakness = secret_weakness(settings.auth_jwt_secret.get_secret_value())
        if weakness is not None:
            raise RefusedSettings(
                f"AUTH_JWT_SECRET {weakness}. Set it to at least {MIN_SECRET_BYTES} random bytes "
                f"(e.g. {GENERATE_SECRET}), or set AUTH_JWKS_URL to use an identity provider; "
                "DEVELOPMENT_MODE=true is for local runs only"
            )
        return
    url = urlsplit(settings.auth_jwks_url)
    if url.scheme != "https" and not is_loopback_host(url.hostname or ""):
        raise RefusedSettings(
            f"AUTH_JWKS_URL must be an https:// URL: keys fetched over {url.scheme}:// could be "
            "replaced on the way, and whoever replaces them signs any token"
        )
    missing = [
        name
        for name, value in (
            ("AUTH_ISSUER", settings.auth_issuer),
            ("AUTH_AUDIENCE", settings.auth_audience),
        )
        if value is None
    ]
    if missing:
        raise RefusedSettings(
            f"AUTH_JWKS_URL is set without {' and '.join(missing)}: without them this system "
            "would accept the provider's tokens for any other application or tenant. Set them to "
            "the provider's issuer and this system's audience (client id or API identifier)"
        )


def check_order_link_settings(settings: RuntimeSettings) -> None:
    """Raise `RefusedSettings` when the order links' key could be known or could sign a login
    token: ORDER_LINK_SECRET equal to AUTH_JWT_SECRET, anywhere; outside development mode, an
    ORDER_LINK_SECRET, or else the AUTH_JWT_SECRET it is derived from, that is weak (with an
    identity provider, AUTH_JWT_SECRET may keep its built-in value, since it signs no token)."""
    own = settings.order_link_secret
    login = settings.auth_jwt_secret.get_secret_value()
    if settings.auth_audience == ORDER_TOKEN_AUDIENCE:
        raise RefusedSettings(
            f"AUTH_AUDIENCE is {ORDER_TOKEN_AUDIENCE!r}, the order links' own audience: a login "
            "token must never be taken for an order link. Choose another audience"
        )
    if own is not None and own.get_secret_value() == login:
        raise RefusedSettings(
            "ORDER_LINK_SECRET is AUTH_JWT_SECRET: an order link's key must never sign a login "
            "token. Set it to other random bytes, or unset it to derive one"
        )
    if settings.development_mode:
        return
    if own is not None and own.get_secret_value():
        name, weakness = "ORDER_LINK_SECRET", secret_weakness(own.get_secret_value())
    else:
        name = "AUTH_JWT_SECRET, from which the order links' key is derived,"
        weakness = secret_weakness(login)
    if weakness is not None:
        raise RefusedSettings(
            f"{name} {weakness}. Set ORDER_LINK_SECRET to at least {MIN_SECRET_BYTES} random "
            f"bytes (e.g. {GENERATE_SECRET})"
        )


# --- claims --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClaimRules:
    issuer: str | None
    audience: str | None
    leeway: float
    max_lifetime: int
    role_claim: str
    role_values: Mapping[str, Role]  # the names a token may carry, onto our roles

    @classmethod
    def from_settings(cls, settings: RuntimeSettings) -> ClaimRules:
        names = settings.auth_role_values or {role.value: role.value for role in Role}
        return cls(
            issuer=settings.auth_issuer,
            audience=settings.auth_audience,
            leeway=settings.auth_leeway_seconds,
            max_lifetime=settings.auth_max_token_lifetime_seconds,
            role_claim=settings.auth_role_claim,
            role_values={name: Role(role) for name, role in names.items()},
        )


def _decode(token: str, key: Any, algorithm: str, rules: ClaimRules) -> dict[str, Any]:
    required = ["exp", "sub"]
    if rules.issuer is not None:
        required.append("iss")
    if rules.audience is not None:
        required.append("aud")
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[algorithm],  # ours, chosen with the key: never the token's say
            audience=rules.audience,
            issuer=rules.issuer,
            leeway=rules.leeway,
            # Without AUTH_AUDIENCE, an `aud` is not checked (PyJWT would refuse any).
            options={"require": required, "verify_aud": rules.audience is not None},
        )
    except jwt.ExpiredSignatureError:
        raise InvalidToken("the token has expired") from None
    except jwt.ImmatureSignatureError:
        raise InvalidToken("the token is not valid yet (nbf or iat in the future)") from None
    except jwt.MissingRequiredClaimError as exc:
        raise InvalidToken(f"the token has no {exc.claim} claim") from None
    except jwt.InvalidAudienceError:
        raise InvalidToken(
            f"the token is not meant for this system (aud: {rules.audience})"
        ) from None
    except jwt.InvalidIssuerError:
        raise InvalidToken(f"the token was not issued by {rules.issuer} (iss)") from None
    except jwt.InvalidSignatureError:
        raise InvalidToken("the token's signature does not verify") from None
    except jwt.InvalidTokenError as exc:
        raise InvalidToken(f"the token is not valid: {exc}") from None
    _check_lifetime(claims, rules)
    return claims


def _check_lifetime(claims: dict[str, Any], rules: ClaimRules) -> None:
    exp, iat = claims["exp"], claims.get("iat")
    # PyJWT takes "123" for a time too; a time is a number (RFC 7519, NumericDate).
    for name, value in (("exp", exp), ("iat", iat)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise InvalidToken(f"the token's {name} is not a number of seconds")
    if iat is not None:
        lifetime = exp - iat
        if lifetime > rules.max_lifetime:
            raise InvalidToken(
                f"the token lives {lifetime:.0f} s (exp - iat); at most {rules.max_lifetime} s "
                "are accepted"
            )
    elif exp - time.time() > rules.max_lifetime + rules.leeway:
        raise InvalidToken(
            f"the token has no iat and expires more than {rules.max_lifetime} s from now; "
            "at most that is accepted"
        )


def _identity(claims: dict[str, Any], rules: ClaimRules, *, from_provider: bool) -> Identity:
    sub = claims["sub"]
    if not isinstance(sub, str) or not sub:
        raise InvalidToken("the token has no subject (sub)")
    found = claim_at(claims, rules.role_claim)
    named = [found] if isinstance(found, str) else found if isinstance(found, list) else []
    roles = [rules.role_values[n] for n in named if isinstance(n, str) and n in rules.role_values]
    if not roles:
        known = ", ".join(sorted(rules.role_values))
        raise NoKnownRole(
            f"the token carries no role this system knows: its {rules.role_claim!r} claim must "
            f"hold one of {known}"
        )
    role = max(roles, key=_PRIVILEGE.__getitem__)
    return Identity(sub=sub, role=role, from_provider=from_provider)


_MISSING = object()


def claim_at(claims: Mapping[str, Any], path: str) -> Any:
    """The claim `path` names: a claim's whole name first (namespaced claims are URLs, dots and
    all: `https://booking.example.com/roles`), else a dotted path (`realm_access.roles`), each
    step again trying the longest name first. None when there is no such claim."""
    found = _walk(claims, path.split("."))
    return None if found is _MISSING else found


def _walk(node: Any, parts: list[str]) -> Any:
    if not isinstance(node, Mapping):
        return _MISSING
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        if name in node:
            found = node[name] if end == len(parts) else _walk(node[name], parts[end:])
            if found is not _MISSING:
                return found
    return _MISSING


# --- the provider's keys -------------------------------------------------------------------------


class ProviderKeys:
    """The identity provider's signing keys, fetched from its JWKS and kept.

    Fetched when first needed, again once they are older than `max_age`, and when a token names
    a key we do not have (the provider rotated), but never twice within `refetch_interval`: a
    stream of tokens with made-up kids costs the provider one request per interval. Concurrent
    requests share one fetch, which a caller that gives up does not cancel. When a fetch fails,
    the keys we have stay in use.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float,
        max_age: float,
        refetch_interval: float,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.max_age = max_age
        self.refetch_interval = refetch_interval
        self.transport = transport
        self.clock = clock
        self.fetches = 0  # requests made to the provider
        self._keys: dict[tuple[str, str], Any] = {}  # (kid, algorithm) -> the public key
        self._fetched_at: float | None = None  # last success
        self._attempted_at: float | None = None  # last attempt, success or not
        self._last_failed = False
        self._fetching: asyncio.Task[None] | None = None
        self._http: httpx.AsyncClient | None = None
        self._outage = OutageLog(log, f"the identity provider's keys ({url})")

    async def key(self, kid: str, algorithm: str) -> Any:
        """The public key named `kid` for `algorithm`; `InvalidToken` if the provider has none,
        `KeysUnavailable` if we cannot ask it."""
        now = self.clock()
        stale = self._fetched_at is None or now - self._fetched_at >= self.max_age
        if stale and self._may_fetch(now):
            await self._fetch()
        if (kid, algorithm) in self._keys:
            return self._keys[(kid, algorithm)]
        if self._may_fetch(self.clock()):
            await self._fetch()
            if (kid, algorithm) in self._keys:
                return self._keys[(kid, algorithm)]
        if self._last_failed:
            wait = self.refetch_interval - (self.clock() - (self._attempted_at or 0.0))
            raise KeysUnavailable(
                "the identity provider's keys cannot be fetched right now, so this token cannot "
                "be checked; try again shortly",
                retry_after=max(1, math.ceil(wait)),
            )
        if any(known == kid for known, _ in self._keys):
            raise InvalidToken(f"the provider's key {kid!r} is not for {algorithm}")
        raise InvalidToken(f"the token's key {kid!r} is not one of the identity provider's keys")

    def holds(self, kid: str, algorithm: str, key: Any) -> bool:
        """Whether `key` is still the provider's key `kid` for `algorithm`, and the keys are
        fresh (else `key()` would fetch them again first)."""
        fresh = self._fetched_at is not None and self.clock() - self._fetched_at < self.max_age
        return fresh and self._keys.get((kid, algorithm)) is key

    def _may_fetch(self, now: float) -> bool:
        if self._fetching is not None:
            return True  # join the fetch under way
        return self._attempted_at is None or now - self._attempted_at >= self.refetch_interval

    async def _fetch(self) -> None:
        if self._fetching is None:
            self._attempted_at = self.clock()
            self._fetching = asyncio.ensure_future(self._fetch_once())
            self._fetching.add_done_callback(self._fetched)
        await asyncio.shield(self._fetching)

    @staticmethod
    def _fetched(task: asyncio.Task[None]) -> None:
        if not task.cancelled():
            task.exception()  # retrieved, even when every caller has given up

    async def _fetch_once(self) -> None:
        self.fetches += 1
        try:
            keys = await self._download()
        except (httpx.HTTPError, ValueError, jwt.PyJWTError) as exc:
            self._last_failed = True
            self._outage.failed(exc, "fetching them")
            return
        finally:
            self._fetching = None  # before any caller resumes: the next one may fetch again
        self._keys = keys
        self._fetched_at = self.clock()
        self._last_failed = False
        self._outage.recovered()

    async def _download(self) -> dict[tuple[str, str], Any]:
        if self._http is None:
            self._http = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout),
                transport=self.transport,
                headers={"accept": "application/json"},
                follow_redirects=False,
                trust_env=False,  # reached as configured, never via a proxy from the environment
            )
        response = await self._http.get(self.url)
        if response.status_code != 200:
            raise ValueError(f"the JWKS answered {response.status_code}")
        if len(response.content) > MAX_JWKS_BYTES:
            raise ValueError(f"the JWKS is larger than {MAX_JWKS_BYTES} bytes")
        return signing_keys(response.json())

    async def aclose(self) -> None:
        if self._fetching is not None:
            self._fetching.cancel()
        if self._http is not None:
            await self._http.aclose()
            self._http = None


def signing_keys(document: Any) -> dict[tuple[str, str], Any]:
    """The RS256 and ES256 signing keys of a JWKS document, by (kid, algorithm).

    A key without a kid, meant for encryption (`use: enc`), of another type or algorithm, or
    that does not parse is left out: a token can only ever be verified with a key of the type
    its algorithm needs (no symmetric `oct` key, no RSA key for ES256)."""
    keys = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(keys, list):
        raise ValueError("the JWKS has no keys list")
    found: dict[tuple[str, str], Any] = {}
    for jwk in keys:
        if not isinstance(jwk, dict) or jwk.get("use", "sig") != "sig":
            continue
        kid = jwk.get("kid")
        if not isinstance(kid, str) or not kid:
            continue
        for algorithm, (kty, crv) in _KEY_FITS.items():
            if jwk.get("kty") != kty or (crv is not None and jwk.get("crv") != crv):
                continue
            if jwk.get("alg", algorithm) != algorithm:
                continue
            try:
                found[(kid, algorithm)] = jwt.PyJWK(jwk, algorithm).key
            except jwt.PyJWTError:
                continue
    if not found:
        raise ValueError("the JWKS holds no RS256 or ES256 signing key with a kid")
    return found


# --- the verifier --------------------------------------------------------------------------------


# How many verified tokens a verifier keeps, and for how long at most.
_VERIFIED_TOKENS_KEPT = 10_000
_VERIFIED_TOKEN_SECONDS = 300.0


@dataclass(frozen=True, slots=True)
class _Verified:
    """A token's identity, until when it may be used without checking the token again, and the
    provider's key that signed it (kid, algorithm, key; None for HS256)."""

    identity: Identity
    until: float
    signer: tuple[str, str, Any] | None


class TokenVerifier:
    """Verifies bearer tokens as the settings say. One per app (`app.state.token_verifier`),
    built with the settings; creating it refuses settings a deployment must not run with."""

    def __init__(
        self,
        settings: RuntimeSettings,
        *,
        jwks_transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_auth_settings(settings)
        self.rules = ClaimRules.from_settings(settings)
        self._secret = settings.auth_jwt_secret.get_secret_value()
        # Used where an order link may read (check_order_link_settings is that app's to call).
        self._order_link_key = settings.order_link_key
        self.provider: ProviderKeys | None = None
        if settings.auth_jwks_url is not None:
            self.provider = ProviderKeys(
                settings.auth_jwks_url,
                timeout=settings.auth_jwks_timeout_seconds,
                max_age=settings.auth_jwks_cache_seconds,
                refetch_interval=settings.auth_jwks_refetch_interval_seconds,
                transport=jwks_transport,
                clock=clock,
            )
        # Next to a provider, HS256 would let whoever holds the secret (or guesses it) be anyone.
        self.accepts_hs256 = self.provider is None or settings.development_mode
        # Tokens verified already, oldest first: a client sends the same token with every
        # request, and checking a signature is a measurable share of a cheap one. Each is kept
        # until the token expires, or a few minutes at most, and a provider's token only while
        # the provider's key that signed it is still the one we hold (a rotated-out key stops
        # admitting its tokens as soon as we know of the rotation). Never more than the cap.
        self._verified: dict[str, _Verified] = {}

    async def verify(self, token: str) -> Identity:
        """The token's identity, or `TokenRefused` (401, 403 or 503) saying why not."""
        known = self._verified.get(token)
        if known is not None:
            if time.time() < known.until and (
                known.signer is None
                or (self.provider is not None and self.provider.holds(*known.signer))
            ):
                return known.identity
            del self._verified[token]
        verified = await self._verify(token)
        if len(self._verified) >= _VERIFIED_TOKENS_KEPT:
            del self._verified[next(iter(self._verified))]  # the oldest
        self._verified[token] = verified
        return verified.identity

    async def _verify(self, token: str) -> _Verified:
        algorithm, kid = _header(token)
        signer: tuple[str, str, Any] | None = None
        if algorithm == "HS256":
            if not self.accepts_hs256:
                raise InvalidToken(
                    "HS256 tokens are not accepted: sign in with the identity provider "
                    "(RS256 or ES256)"
                )
            key: Any = self._secret
        elif algorithm in PROVIDER_ALGORITHMS and self.provider is not None:
            if kid is None:
                raise InvalidToken("the token does not name its key (kid)")
            key = await self.provider.key(kid, algorithm)
            signer = (kid, algorithm, key)
        else:
            accepted = ["HS256"] if self.accepts_hs256 else []
            if self.provider is not None:
                accepted += PROVIDER_ALGORITHMS
            raise InvalidToken(
                f"tokens signed with {algorithm!r} are not accepted (only {', '.join(accepted)})"
            )
        claims = _decode(token, key, algorithm, self.rules)
        return _Verified(
            identity=_identity(claims, self.rules, from_provider=algorithm != "HS256"),
            until=min(claims["exp"] + self.rules.leeway, time.time() + _VERIFIED_TOKEN_SECONDS),
            signer=signer,
        )

    async def verify_reader(self, token: str) -> Identity | OrderLink:
        """Who may read an order: a login token's identity, or an order link (told apart by
        its audience, then verified with the order links' own key). `TokenRefused` otherwise."""
        # A login token verified before is no link: no need to read its audience again.
        if token not in self._verified and is_order_link(token):
            return OrderLink(
                verify_order_token(self._order_link_key, token, leeway=self.rules.leeway)
            )
        return await self.verify(token)

    async def aclose(self) -> None:
        if self.provider is not None:
            await self.provider.aclose()


def _header(token: str) -> tuple[str, str | None]:
    """The algorithm and key id the (not yet verified) token claims: only to pick our key."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.InvalidTokenError:
        raise InvalidToken("the token is not a well-formed JWT") from None
    algorithm, kid = header.get("alg"), header.get("kid")
    if not isinstance(algorithm, str):
        raise InvalidToken("the token's header names no algorithm")
    return algorithm, kid if isinstance(kid, str) and kid else None


# --- development tokens --------------------------------------------------------------------------


def issue_token(
    secret: str,
    sub: str,
    role: Role | str,
    *,
    ttl_seconds: int = 3600,
    issuer: str | None = None,
    audience: str | None = None,
) -> str:
    """An HS256 token (development, tests, the bench and the demo). `issuer` and `audience`:
    AUTH_ISSUER and AUTH_AUDIENCE where they are set, since every token is checked for them."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": sub, "role": str(Role(role)), "iat": now}
    claims["exp"] = now + ttl_seconds
    if issuer is not None:
        claims["iss"] = issuer
    if audience is not None:
        claims["aud"] = audience
    return jwt.encode(claims, secret, algorithm="HS256")


def verify_token(secret: str, token: str) -> Identity:
    """An HS256 token's identity under the default claim rules (tests and tools; the services
    use their `TokenVerifier`)."""
    # Defaults only: nothing from this process's environment.
    rules = ClaimRules.from_settings(RuntimeSettings.model_construct())
    algorithm, _ = _header(token)
    if algorithm != "HS256":
        raise InvalidToken(f"tokens signed with {algorithm!r} are not accepted (only HS256)")
    return _identity(_decode(token, secret, "HS256", rules), rules, from_provider=False)


# --- order tokens --------------------------------------------------------------------------------

# An order token reads one order, nothing else: its own audience and its own key
# (RuntimeSettings.order_link_key), so it never passes as a login token nor a login token as it.
ORDER_TOKEN_AUDIENCE = "order-link"
ORDER_TOKEN_SCOPE = "order:read"


def issue_order_token(secret: bytes | str, order_id: UUID, ttl_seconds: int) -> str:
    """A token that lets whoever holds it read the order `order_id` until it expires."""
    now = int(time.time())
    claims = {
        "sub": str(order_id),
        "scope": ORDER_TOKEN_SCOPE,
        "aud": ORDER_TOKEN_AUDIENCE,
        "iat": now,
        "exp": now + ttl_seconds,
    }
    return jwt.encode(claims, secret, algorithm="HS256")


@dataclass(frozen=True)
class OrderLink:
    """The holder of an order link: may read the order `order_id`, and nothing else."""

    order_id: UUID


def is_order_link(token: str) -> bool:
    """Whether `token` claims to be an order link (its audience, unverified: only to choose the
    key it must then verify with)."""
    try:
        audience = jwt.decode(token, options={"verify_signature": False}).get("aud")
    except jwt.InvalidTokenError:
        return False
    return audience == ORDER_TOKEN_AUDIENCE


def verify_order_token(secret: bytes | str, token: str, *, leeway: float = 5.0) -> UUID:
    """The order an order token lets its holder read; `InvalidToken` for anything else (a login
    token, another key, expired, another scope)."""
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            secret,
            algorithms=["HS256"],  # ours, never the token's say
            audience=ORDER_TOKEN_AUDIENCE,
            leeway=leeway,
            options={"require": ["exp", "sub", "aud", "scope"]},
        )
    except jwt.ExpiredSignatureError:
        raise InvalidToken("the order link has expired") from None
    except jwt.InvalidTokenError:
        raise InvalidToken("not an order link this system signed") from None
    if claims["scope"] != ORDER_TOKEN_SCOPE:
        raise InvalidToken(f"the order link's scope is not {ORDER_TOKEN_SCOPE}")
    try:
        return UUID(claims["sub"])
    except (TypeError, ValueError, AttributeError):
        raise InvalidToken("the order link names no order") from None


# --- the dependencies ----------------------------------------------------------------------------


def token_verifier(app: FastAPI) -> TokenVerifier:
    verifier: TokenVerifier | None = getattr(app.state, "token_verifier", None)
    if verifier is None:
        raise RuntimeError(
            "the app has no token verifier: build it with create_service_app, or set "
            "app.state.token_verifier = TokenVerifier(settings)"
        )
    return verifier


_bearer = HTTPBearer(auto_error=False)


async def authenticated(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
) -> Identity:
    """Dependency: the caller's identity; 401 without a valid token, 403 with no known role,
    503 when the provider's keys are needed and cannot be fetched."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(
            401, "a bearer token is required", headers={"WWW-Authenticate": "Bearer"}
        )
    try:
        return await token_verifier(request.app).verify(credentials.credentials)
    except TokenRefused as refused:
        raise HTTPException(refused.status, refused.detail, headers=refused.headers) from None


async def order_reader(
    request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
) -> Identity | OrderLink:
    """Dependency of a route that reads one order: a signed-in caller's identity, or an order
    link (the route checks it is for its order); 401 without a valid token of either kind."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(
            401, "a bearer token is required", headers={"WWW-Authenticate": "Bearer"}
        )
    try:
        return await token_verifier(request.app).verify_reader(credentials.credentials)
    except TokenRefused as refused:
        raise HTTPException(refused.status, refused.detail, headers=refused.headers) from None


def require_roles(*roles: Role) -> Callable[..., Awaitable[Identity]]:
    """Dependency factory: the caller's identity if it has one of `roles`, else 403."""

    async def dependency(identity: Identity = Depends(authenticated)) -> Identity:
        if identity.role not in roles:
            allowed = ", ".join(str(r) for r in roles)
            raise HTTPException(
                403, f"this needs the role {allowed}; the token has {identity.role}"
            )
        return identity

    return dependency


# --- make token ----------------------------------------------------------------------------------


def print_token(argv: list[str]) -> int:
    """`python -m booking.runtime.auth ROLE [SUB]`: a token the running system accepts.

    `make token` runs outside `make run`'s environment, so DEVELOPMENT_MODE is not set here: a
    token signed with the built-in secret is printed anyway, since only a system in development
    mode accepts it. Any other secret must be one a service would start with, and a system with
    an identity provider takes no HS256 token outside development mode.
    """
    role = argv[0] if argv else "admin"
    if role not in {r.value for r in Role}:
        print(f"ROLE must be one of admin, mentor, mentee, not {role!r}", file=sys.stderr)
        return 2
    sub = argv[1] if len(argv) > 1 else f"dev-{role}"
    settings = RuntimeSettings()
    if settings.auth_jwks_url is not None and not settings.development_mode:
        print(
            "no token: with AUTH_JWKS_URL set this system takes its identity provider's tokens "
            "only; get one there, or run the system and this with DEVELOPMENT_MODE=true",
            file=sys.stderr,
        )
        return 2
    secret = settings.auth_jwt_secret.get_secret_value()
    if secret != DEVELOPMENT_JWT_SECRET:
        try:
            check_auth_settings(settings)
        except RefusedSettings as refused:
            print(f"no token: {refused}", file=sys.stderr)
            return 2
    print(
        issue_token(secret, sub, role, issuer=settings.auth_issuer, audience=settings.auth_audience)
    )
    return 0


if __name__ == "__main__":
    sys.exit(print_token(sys.argv[1:]))

"""Bearer tokens: the provider's keys (JWKS), the algorithm rules, the claims, the roles, the
settings no service starts with, and the answers a route gives (401, 403, 503)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any
from uuid import uuid4

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import Depends, FastAPI
from pydantic import ValidationError

from booking.devtools.fixtures import free_port, serving
from booking.devtools.identity_provider import (
    AUDIENCE,
    ISSUER,
    IdentityProvider,
    SigningKey,
    claims,
    hs256_with_key,
)
from booking.runtime import auth
from booking.runtime.auth import (
    Identity,
    InvalidToken,
    KeysUnavailable,
    NoKnownRole,
    Role,
    TokenVerifier,
    acts_as_mentor,
    authenticated,
    check_auth_settings,
    claim_at,
    issue_token,
    print_token,
    require_roles,
    signing_keys,
    verify_token,
)
from booking.runtime.cli import main
from booking.runtime.host import ServiceRuntime, create_service_app
from booking.runtime.problems import install_problem_handlers
from booking.runtime.settings import DEVELOPMENT_JWT_SECRET, RefusedSettings, RuntimeSettings

SECRET = "test-secret-0123456789abcdef0123456789"
DEFAULTS = RuntimeSettings.model_construct()  # the defaults, not this environment's
REFETCH = DEFAULTS.auth_jwks_refetch_interval_seconds
CACHE = DEFAULTS.auth_jwks_cache_seconds


class Clock:
    """The verifier's monotonic clock, moved by the test (a token's exp still reads real time)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="module")
def rsa_key() -> SigningKey:
    return SigningKey.rsa("rsa-1")


@pytest.fixture(scope="module")
def ec_key() -> SigningKey:
    return SigningKey.ec("ec-1")


@pytest.fixture
async def provider(rsa_key, ec_key) -> AsyncIterator[IdentityProvider]:
    idp = IdentityProvider(keys=[rsa_key, ec_key])
    async with serving(idp.app) as url:
        yield idp.served_at(url)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def settings(**overrides: Any) -> RuntimeSettings:
    """Outside development mode unless told (the test run itself is in it)."""
    return RuntimeSettings(**{"development_mode": False, **overrides})


def verifier_of(provider: IdentityProvider, clock: Clock, **overrides: Any) -> TokenVerifier:
    return TokenVerifier(settings(**provider.settings(**overrides)), clock=clock)


async def refused(verifier: TokenVerifier, token: str) -> Exception:
    with pytest.raises((InvalidToken, NoKnownRole, KeysUnavailable)) as caught:
        await verifier.verify(token)
    return caught.value


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- the provider's tokens -----------------------------------------------------------------------


class TestProviderTokens:
    async def test_rs256_and_es256_tokens_verify_with_the_providers_keys(
        self, provider, clock, rsa_key, ec_key
    ):
        verifier = verifier_of(provider, clock)
        for key in (rsa_key, ec_key):
            identity = await verifier.verify(key.sign(claims("u-1", role="mentee")))
            assert identity == Identity(sub="u-1", role=Role.MENTEE, from_provider=True)
        assert provider.requests == 1  # both keys came with one fetch

    async def test_a_forged_signature_is_refused(self, provider, clock, rsa_key):
        forger = SigningKey.rsa(rsa_key.kid)  # the provider's kid, another private key
        error = await refused(verifier_of(provider, clock), forger.sign(claims()))
        assert isinstance(error, InvalidToken) and "signature" in str(error)

    async def test_an_expired_token_is_refused(self, provider, clock, rsa_key):
        token = rsa_key.sign(claims(exp=int(time.time()) - 60, iat=int(time.time()) - 120))
        assert "expired" in str(await refused(verifier_of(provider, clock), token))

    async def test_another_audience_or_none_is_refused(self, provider, clock, rsa_key):
        verifier = verifier_of(provider, clock)
        error = await refused(verifier, rsa_key.sign(claims(aud="another-app")))
        assert isinstance(error, InvalidToken) and "not meant for this system" in str(error)
        assert "aud" in str(await refused(verifier, rsa_key.sign(claims(aud=None))))
        # An `aud` list passes when this system is one of them.
        identity = await verifier.verify(rsa_key.sign(claims(aud=["other", AUDIENCE])))
        assert identity.role is Role.ADMIN

    async def test_another_issuer_or_none_is_refused(self, provider, clock, rsa_key):
        verifier = verifier_of(provider, clock)
        error = await refused(verifier, rsa_key.sign(claims(iss="https://evil.example/")))
        assert isinstance(error, InvalidToken) and ISSUER in str(error)
        assert "iss" in str(await refused(verifier, rsa_key.sign(claims(iss=None))))

    async def test_exp_and_sub_are_required(self, provider, clock, rsa_key):
        verifier = verifier_of(provider, clock)
        assert "exp" in str(await refused(verifier, rsa_key.sign(claims(exp=None))))
        assert "sub" in str(await refused(verifier, rsa_key.sign(claims(sub=None))))
        assert "sub" in str(await refused(verifier, rsa_key.sign(claims(sub=""))))

    async def test_a_token_must_name_its_key(self, provider, clock, rsa_key):
        token = jwt.encode(claims(), rsa_key.private, algorithm="RS256")  # no kid
        assert "kid" in str(await refused(verifier_of(provider, clock), token))


class TestLifetime:
    async def test_a_token_living_longer_than_the_cap_is_refused(self, provider, clock, rsa_key):
        cap = DEFAULTS.auth_max_token_lifetime_seconds
        verifier = verifier_of(provider, clock)
        now = int(time.time())
        assert await verifier.verify(rsa_key.sign(claims(iat=now, exp=now + cap)))
        error = await refused(verifier, rsa_key.sign(claims(iat=now, exp=now + cap + 1)))
        assert isinstance(error, InvalidToken) and f"at most {cap} s" in str(error)
        # Issued long ago, still good for a long time: exp - iat counts, not what is left.
        old = rsa_key.sign(claims(iat=now - 2 * cap, exp=now + 60))
        assert isinstance(await refused(verifier, old), InvalidToken)

    async def test_without_iat_the_expiry_may_be_at_most_the_cap_away(
        self, provider, clock, rsa_key
    ):
        cap = DEFAULTS.auth_max_token_lifetime_seconds
        verifier = verifier_of(provider, clock)
        now = int(time.time())
        assert await verifier.verify(rsa_key.sign(claims(iat=None, exp=now + cap - 60)))
        error = await refused(verifier, rsa_key.sign(claims(iat=None, exp=now + 2 * cap)))
        assert "no iat" in str(error)

    async def test_times_must_be_numbers(self, provider, clock, rsa_key):
        now = int(time.time())
        token = rsa_key.sign(claims(iat=str(now), exp=now + 60))
        assert "iat" in str(await refused(verifier_of(provider, clock), token))

    async def test_a_little_clock_skew_is_allowed(self, provider, clock, rsa_key):
        leeway = DEFAULTS.auth_leeway_seconds
        now = int(time.time())
        verifier = verifier_of(provider, clock)
        just_expired = rsa_key.sign(claims(iat=now - 60, exp=now - int(leeway / 2)))
        assert await verifier.verify(just_expired)
        long_expired = rsa_key.sign(claims(iat=now - 60, exp=now - int(leeway) - 5))
        assert "expired" in str(await refused(verifier, long_expired))


# --- which algorithm, with which key ------------------------------------------------------------


class TestAlgorithms:
    async def test_hs256_is_refused_next_to_a_provider_outside_development_mode(
        self, provider, clock
    ):
        verifier = verifier_of(provider, clock, auth_jwt_secret=SECRET)
        token = issue_token(SECRET, "someone", Role.ADMIN)  # the right secret, even
        error = await refused(verifier, token)
        assert isinstance(error, InvalidToken) and "HS256" in str(error)
        assert provider.requests == 0

    async def test_in_development_mode_hs256_and_the_providers_tokens_both_verify(
        self, provider, clock, rsa_key
    ):
        verifier = verifier_of(provider, clock, auth_jwt_secret=SECRET, development_mode=True)
        dev = issue_token(SECRET, "dev", Role.MENTOR, issuer=ISSUER, audience=AUDIENCE)
        assert (await verifier.verify(dev)).sub == "dev"
        assert (await verifier.verify(rsa_key.sign(claims("idp")))).sub == "idp"
        # AUTH_ISSUER and AUTH_AUDIENCE hold for every token, ours included.
        assert "iss" in str(await refused(verifier, issue_token(SECRET, "dev", Role.MENTOR)))

    @pytest.mark.parametrize("development_mode", [False, True])
    async def test_hs256_signed_with_the_providers_public_key_is_refused(
        self, provider, clock, rsa_key, development_mode
    ):
        """The classic confusion: a verifier that let the token pick HS256 would check the HMAC
        with the key it holds for that kid, the provider's public key, which anyone has."""
        verifier = verifier_of(
            provider, clock, auth_jwt_secret=SECRET, development_mode=development_mode
        )
        for secret in (rsa_key.public_pem(), json.dumps(rsa_key.jwk()).encode()):
            token = hs256_with_key(claims(), secret, kid=rsa_key.kid)
            assert isinstance(await refused(verifier, token), InvalidToken)

    async def test_alg_none_is_refused(self, provider, clock, rsa_key):
        unsigned = jwt.encode(claims(), None, algorithm="none", headers={"kid": rsa_key.kid})
        for verifier in (
            verifier_of(provider, clock),
            verifier_of(provider, clock, development_mode=True),
            TokenVerifier(settings(auth_jwt_secret=SECRET)),
        ):
            error = await refused(verifier, unsigned)
            assert isinstance(error, InvalidToken) and "'none'" in str(error)
        with pytest.raises(InvalidToken):
            verify_token(SECRET, unsigned)

    async def test_a_key_verifies_only_the_algorithm_of_its_type(
        self, provider, clock, rsa_key, ec_key
    ):
        verifier = verifier_of(provider, clock)
        # Signed with the RSA key, but naming the EC key: RS256 is never checked with an EC key.
        error = await refused(verifier, rsa_key.sign(claims(), kid=ec_key.kid))
        assert isinstance(error, InvalidToken) and "not for RS256" in str(error)
        error = await refused(verifier, ec_key.sign(claims(), kid=rsa_key.kid))
        assert isinstance(error, InvalidToken) and "not for ES256" in str(error)

    async def test_other_asymmetric_algorithms_are_refused(self, provider, clock, rsa_key):
        token = jwt.encode(
            claims(), rsa_key.private, algorithm="PS256", headers={"kid": rsa_key.kid}
        )
        assert "'PS256'" in str(await refused(verifier_of(provider, clock), token))

    async def test_without_a_provider_only_hs256_is_accepted(self, rsa_key):
        verifier = TokenVerifier(settings(auth_jwt_secret=SECRET))
        assert (await verifier.verify(issue_token(SECRET, "a", Role.ADMIN))).role is Role.ADMIN
        error = await refused(verifier, rsa_key.sign(claims()))
        assert isinstance(error, InvalidToken) and "'RS256'" in str(error)

    def test_the_jwks_keys_used_are_rsa_and_p256_signing_keys_with_a_kid(self, rsa_key, ec_key):
        # ES384's curve: not a key ES256 may use, whatever its `alg` says.
        p384 = SigningKey("ec-384", "ES384", ec.generate_private_key(ec.SECP384R1()))
        document = {
            "keys": [
                rsa_key.jwk(),
                ec_key.jwk(),
                {"kty": "oct", "kid": "oct-1", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQ"},
                {**rsa_key.jwk(), "kid": "enc-1", "use": "enc"},
                {**rsa_key.jwk(), "kid": "rs384", "alg": "RS384"},
                {**rsa_key.jwk(), "kid": None},
                {**p384.jwk(), "alg": "ES256"},
                {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
                "not a key",
            ]
        }
        assert set(signing_keys(document)) == {("rsa-1", "RS256"), ("ec-1", "ES256")}
        for empty in ({"keys": []}, {"keys": [{"kty": "oct", "kid": "x", "k": "AA"}]}, [], {}):
            with pytest.raises(ValueError):
                signing_keys(empty)


# --- the provider's keys over time ---------------------------------------------------------------


class TestKeyRotation:
    async def test_a_new_kid_verifies_after_one_refetch_and_a_removed_one_stops_working(
        self, provider, clock, rsa_key
    ):
        verifier = verifier_of(provider, clock)
        old_token = rsa_key.sign(claims("u-old"))
        assert (await verifier.verify(old_token)).sub == "u-old"
        assert provider.requests == 1

        new_key = SigningKey.rsa("rsa-2")
        provider.keys = [new_key]  # the provider rotated: the old key is gone
        clock.advance(REFETCH)
        assert (await verifier.verify(new_key.sign(claims("u-new")))).sub == "u-new"
        assert provider.requests == 2
        assert (await verifier.verify(new_key.sign(claims("u-new")))).sub == "u-new"
        assert provider.requests == 2  # kept

        error = await refused(verifier, old_token)
        assert isinstance(error, InvalidToken) and "not one of the identity provider's keys" in str(
            error
        )
        clock.advance(REFETCH)
        assert isinstance(await refused(verifier, old_token), InvalidToken)
        assert provider.requests == 3  # asked once more, still gone

    async def test_unknown_kids_fetch_the_keys_at_most_once_per_interval(
        self, provider, clock, rsa_key
    ):
        verifier = verifier_of(provider, clock)
        await verifier.verify(rsa_key.sign(claims()))
        clock.advance(REFETCH)
        made_up = [rsa_key.sign(claims(), kid=f"garbage-{n}") for n in range(30)]
        errors = await asyncio.gather(*(refused(verifier, t) for t in made_up))
        errors += [await refused(verifier, t) for t in made_up]
        assert all(isinstance(e, InvalidToken) for e in errors)
        assert provider.requests == 2  # the first fetch, and one for all sixty
        clock.advance(REFETCH - 0.5)
        await refused(verifier, made_up[0])
        assert provider.requests == 2
        clock.advance(0.5)
        await refused(verifier, made_up[0])
        assert provider.requests == 3

    async def test_the_first_requests_share_one_fetch(self, provider, clock, rsa_key, ec_key):
        verifier = verifier_of(provider, clock)
        tokens = [key.sign(claims(f"u-{n}")) for n in range(10) for key in (rsa_key, ec_key)]
        identities = await asyncio.gather(*(verifier.verify(t) for t in tokens))
        assert len(identities) == 20 and provider.requests == 1

    async def test_keys_are_fetched_again_once_older_than_the_cache_lifetime(
        self, provider, clock, rsa_key
    ):
        verifier = verifier_of(provider, clock)
        token = rsa_key.sign(claims())
        await verifier.verify(token)
        provider.keys = [SigningKey.ec("ec-9")]  # the RSA key withdrawn, and no new kid seen
        clock.advance(CACHE - 1)
        assert await verifier.verify(token)  # still within the cache's lifetime
        assert provider.requests == 1
        clock.advance(1)
        assert isinstance(await refused(verifier, token), InvalidToken)
        assert provider.requests == 2


class TestProviderOutage:
    async def test_a_key_we_lack_while_the_provider_fails_is_503_with_retry_after(
        self, provider, clock, rsa_key
    ):
        provider.status = 500
        verifier = verifier_of(provider, clock)
        error = await refused(verifier, rsa_key.sign(claims()))
        assert isinstance(error, KeysUnavailable) and error.status == 503
        assert 1 <= error.retry_after <= REFETCH
        assert provider.requests == 1
        clock.advance(REFETCH / 2)
        error = await refused(verifier, rsa_key.sign(claims()))  # not asked again yet
        assert isinstance(error, KeysUnavailable) and error.retry_after <= REFETCH / 2
        assert provider.requests == 1
        provider.status = 200
        clock.advance(REFETCH / 2)
        assert await verifier.verify(rsa_key.sign(claims()))
        assert provider.requests == 2

    async def test_known_keys_keep_working_through_an_outage(self, provider, clock, rsa_key):
        verifier = verifier_of(provider, clock)
        token = rsa_key.sign(claims())
        await verifier.verify(token)
        provider.status = 503
        clock.advance(CACHE + 1)
        assert (await verifier.verify(token)).role is Role.ADMIN
        assert provider.requests == 2  # tried, failed, kept the keys it had
        # A new kid during the outage: we cannot tell whether it is real, so 503, not 401.
        error = await refused(verifier, SigningKey.rsa("rsa-new").sign(claims()))
        assert isinstance(error, KeysUnavailable)

    async def test_a_provider_that_does_not_answer_in_time_is_503(self, provider, rsa_key):
        provider.delay = 2.0
        verifier = TokenVerifier(settings(**provider.settings(auth_jwks_timeout_seconds=0.3)))
        started = time.monotonic()
        assert isinstance(await refused(verifier, rsa_key.sign(claims())), KeysUnavailable)
        assert time.monotonic() - started < 1.5
        await verifier.aclose()

    async def test_an_unreachable_or_garbled_provider_is_503(self, clock, rsa_key):
        closed = IdentityProvider().served_at(f"http://127.0.0.1:{free_port()}")
        verifier = verifier_of(closed, clock)
        assert isinstance(await refused(verifier, rsa_key.sign(claims())), KeysUnavailable)
        garbled = IdentityProvider(extra_jwks=[{"kty": "oct", "kid": "x", "k": "AA"}])
        async with serving(garbled.app) as url:
            verifier = verifier_of(garbled.served_at(url), clock)
            assert isinstance(await refused(verifier, rsa_key.sign(claims())), KeysUnavailable)


# --- roles ---------------------------------------------------------------------------------------


class TestRoleClaim:
    def test_a_claim_is_found_by_its_whole_name_or_a_dotted_path(self):
        found = {
            "role": "admin",
            "realm_access": {"roles": ["mentor"]},
            "https://booking.example.com/roles": ["coach"],
            "https://booking.example.com/claims": {"app.roles": "x", "app": {"roles": "y"}},
        }
        assert claim_at(found, "role") == "admin"
        assert claim_at(found, "realm_access.roles") == ["mentor"]
        assert claim_at(found, "https://booking.example.com/roles") == ["coach"]
        assert claim_at(found, "https://booking.example.com/claims.app.roles") == "x"
        assert claim_at(found, "realm_access.nothing") is None
        assert claim_at(found, "role.sub") is None

    async def test_a_keycloak_role_list_is_mapped_and_the_most_privileged_wins(
        self, provider, clock, rsa_key
    ):
        verifier = verifier_of(
            provider,
            clock,
            auth_role_claim="realm_access.roles",
            auth_role_values={
                "platform-admin": "admin",
                "coach": "mentor",
                "default-roles-booking": "mentee",
            },
        )

        async def role_of(roles: list[str]) -> Role:
            token = rsa_key.sign(claims(role=None, realm_access={"roles": roles}))
            return (await verifier.verify(token)).role

        assert await role_of(["offline_access", "default-roles-booking"]) is Role.MENTEE
        assert await role_of(["default-roles-booking", "coach"]) is Role.MENTOR
        assert await role_of(["coach", "platform-admin", "default-roles-booking"]) is Role.ADMIN
        for unknown in (["offline_access"], [], ["admin"]):  # with a mapping, only its names
            token = rsa_key.sign(claims(role=None, realm_access={"roles": unknown}))
            error = await refused(verifier, token)
            assert isinstance(error, NoKnownRole) and error.status == 403
            assert "'realm_access.roles'" in str(error)

    async def test_an_auth0_namespaced_claim_is_read_whole(self, provider, clock, ec_key):
        claim = "https://booking.example.com/roles"
        verifier = verifier_of(provider, clock, auth_role_claim=claim)
        token = ec_key.sign(claims(role=None, **{claim: ["mentor"]}))
        assert (await verifier.verify(token)).role is Role.MENTOR

    async def test_without_a_mapping_our_own_names_count(self, provider, clock, rsa_key):
        verifier = verifier_of(provider, clock)
        assert (await verifier.verify(rsa_key.sign(claims(role="mentor")))).role is Role.MENTOR
        for value in ("root", ["root", "superuser"], 7, {"admin": True}, None):
            error = await refused(verifier, rsa_key.sign(claims(role=value)))
            assert isinstance(error, NoKnownRole)

    def test_role_values_must_map_onto_our_roles(self, monkeypatch):
        monkeypatch.setenv("AUTH_ROLE_VALUES", '{"platform-admin": "admin", "coach": "mentor"}')
        assert RuntimeSettings().auth_role_values == {"platform-admin": "admin", "coach": "mentor"}
        with pytest.raises(ValidationError):
            RuntimeSettings(auth_role_values={"boss": "root"})
        with pytest.raises(ValidationError):
            RuntimeSettings(auth_role_claim=" ")


# --- the settings a service starts with ----------------------------------------------------------

KNOWN_SECRETS = {
    "the built-in development secret": DEVELOPMENT_JWT_SECRET,
    "a short secret": "s3cret-but-short",
    "the old Kubernetes placeholder": "REPLACE-WITH-A-LONG-RANDOM-SECRET",
    "the Kubernetes placeholder": "REPLACE-WITH-48-RANDOM-BYTES-see-docs-security-md-0123456789",
}


class TestStartup:
    @pytest.mark.parametrize("secret", KNOWN_SECRETS.values(), ids=KNOWN_SECRETS.keys())
    def test_no_service_starts_with_a_secret_anyone_could_know(self, secret):
        with pytest.raises(RefusedSettings) as refusal:
            ServiceRuntime(name="orders", settings=settings(auth_jwt_secret=secret))
        assert "AUTH_JWT_SECRET" in str(refusal.value)
        assert "secrets.token_urlsafe" in str(refusal.value)  # and how to make a real one

    @pytest.mark.parametrize("secret", KNOWN_SECRETS.values(), ids=KNOWN_SECRETS.keys())
    def test_development_mode_allows_them(self, secret):
        check_auth_settings(settings(auth_jwt_secret=secret, development_mode=True))

    def test_a_real_secret_is_accepted(self):
        check_auth_settings(settings(auth_jwt_secret=os.urandom(24).hex()))

    def test_with_a_provider_the_secret_may_stay_unset(self):
        check_auth_settings(settings(**IdentityProvider(url="https://idp.example/jwks").settings()))

    def test_a_provider_needs_its_issuer_and_audience(self):
        provider = IdentityProvider(url="https://idp.example/jwks")
        for missing in ("auth_issuer", "auth_audience"):
            with pytest.raises(RefusedSettings, match=missing.upper()):
                check_auth_settings(settings(**provider.settings(**{missing: ""})))

    def test_the_providers_keys_come_over_https_or_loopback(self):
        plain = IdentityProvider(url="http://idp.example/jwks").settings()
        with pytest.raises(RefusedSettings, match="https"):
            check_auth_settings(settings(**plain))
        check_auth_settings(settings(**{**plain, "development_mode": True}))
        for loopback in ("http://127.0.0.1:8080/jwks", "http://[::1]/jwks", "http://localhost/k"):
            check_auth_settings(settings(**IdentityProvider(url=loopback).settings()))
        with pytest.raises(ValidationError):
            RuntimeSettings(auth_jwks_url="ftp://idp.example/jwks")

    def test_the_command_line_says_why_and_exits_before_doing_anything(self, monkeypatch, capsys):
        """`python -m booking.<service> serve|migrate` (booking.runtime.cli) for every service."""
        made: list[ServiceRuntime] = []

        def create_app(settings: RuntimeSettings) -> FastAPI:
            made.append(ServiceRuntime(name="orders", settings=settings))
            return create_service_app(made[-1])

        migrated: list[str] = []
        monkeypatch.setattr(
            "booking.runtime.migrations.upgrade", lambda *args: migrated.append(args[2])
        )
        clean_environment(monkeypatch, DEVELOPMENT_MODE="false")
        for command in ("serve", "migrate"):
            with pytest.raises(SystemExit) as exited:
                main(
                    name="orders",
                    settings_type=RuntimeSettings,
                    create_app=create_app,
                    schema="orders",
                    argv=[command],
                )
            assert exited.value.code == 2
            said = capsys.readouterr().err
            assert said.startswith("booking.orders will not start: AUTH_JWT_SECRET is the built-in")
        assert made == [] and migrated == []  # refused before anything was built or migrated


def clean_environment(monkeypatch: pytest.MonkeyPatch, **env: str) -> None:
    """Only `env` of the auth settings and DEVELOPMENT_MODE (the test run sets the latter)."""
    for name in list(os.environ):
        if name.upper().startswith("AUTH_") or name.upper() == "DEVELOPMENT_MODE":
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


class TestMakeToken:
    """`make token` (`python -m booking.runtime.auth ROLE [SUB]`) runs outside `make run`'s
    environment: DEVELOPMENT_MODE is not set there."""

    def token(self, monkeypatch, capsys, *args: str, **env: str) -> tuple[int, str, str]:
        clean_environment(monkeypatch, **env)
        capsys.readouterr()  # what the fixtures' servers logged as they started: not the command's
        code = print_token(list(args))
        out, err = capsys.readouterr()
        return code, out.strip(), err

    def test_the_module_prints_a_dev_token_without_development_mode_set(self):
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.upper().startswith("AUTH_") and k.upper() != "DEVELOPMENT_MODE"
        }
        done = subprocess.run(
            [sys.executable, "-m", "booking.runtime.auth", "mentor", "m-7"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        # Signed with the built-in secret: only a system in development mode accepts it.
        identity = verify_token(DEVELOPMENT_JWT_SECRET, done.stdout.strip())
        assert identity == Identity(sub="m-7", role=Role.MENTOR)

    def test_a_token_with_the_systems_real_secret(self, monkeypatch, capsys):
        code, out, _ = self.token(monkeypatch, capsys, "admin", AUTH_JWT_SECRET=SECRET)
        assert code == 0 and verify_token(SECRET, out) == Identity("dev-admin", Role.ADMIN)

    @pytest.mark.parametrize(
        ("args", "env", "said"),
        [
            (["admin"], {"AUTH_JWT_SECRET": "short"}, "AUTH_JWT_SECRET is shorter"),
            (["admin"], {"AUTH_JWKS_URL": "https://idp.example/jwks"}, "identity provider"),
            (["root"], {}, "ROLE must be one of"),
        ],
        ids=["a weak secret", "a provider", "an unknown role"],
    )
    def test_no_token(self, monkeypatch, capsys, args, env, said):
        code, out, err = self.token(monkeypatch, capsys, *args, **env)
        assert (code, out) == (2, "") and said in err

    async def test_a_provider_in_development_mode_still_takes_dev_tokens(
        self, monkeypatch, capsys, provider
    ):
        in_development = provider.settings(development_mode=True)
        env = {k.upper(): str(v) for k, v in in_development.items()}
        code, out, err = self.token(monkeypatch, capsys, "mentee", **env)
        assert code == 0, err
        verifier = TokenVerifier(RuntimeSettings(**in_development))
        assert (await verifier.verify(out)).role is Role.MENTEE


# --- development tokens --------------------------------------------------------------------------


class TestDevelopmentTokens:
    def test_a_token_round_trips_its_subject_and_role(self):
        identity = verify_token(SECRET, issue_token(SECRET, "m-1", "mentor"))
        assert identity == Identity(sub="m-1", role=Role.MENTOR)

    def test_an_expired_token_is_refused(self):
        token = issue_token(SECRET, "a", "admin", ttl_seconds=-60)
        with pytest.raises(InvalidToken, match="expired"):
            verify_token(SECRET, token)

    def test_a_token_without_exp_is_refused(self):
        token = jwt.encode({"sub": "a", "role": "admin"}, SECRET, algorithm="HS256")
        with pytest.raises(InvalidToken, match="exp"):
            verify_token(SECRET, token)

    def test_an_unknown_role_is_refused(self):
        exp = int(time.time()) + 60
        token = jwt.encode({"sub": "a", "role": "root", "exp": exp}, SECRET, algorithm="HS256")
        with pytest.raises(NoKnownRole, match="role"):
            verify_token(SECRET, token)

    def test_not_a_jwt_is_refused(self):
        with pytest.raises(InvalidToken, match="well-formed"):
            verify_token(SECRET, "not-a-jwt")


class TestActingAsAMentor:
    """Who may act as a mentor: an admin; a mentor token whose `sub` is the subject stored on the
    mentor's record; and our own (HS256) token whose `sub` is the id we gave."""

    MENTOR_ID = uuid4()

    def acts(self, sub: str, role: Role, *, subject: str | None, from_provider: bool) -> bool:
        identity = Identity(sub=sub, role=role, from_provider=from_provider)
        return acts_as_mentor(identity, self.MENTOR_ID, subject)

    def test_an_admin_acts_for_any_mentor(self):
        assert self.acts("a-1", Role.ADMIN, subject=None, from_provider=True)

    def test_the_linked_subject_acts_whichever_signed_it(self):
        for signed_by_provider in (True, False):
            assert self.acts("kc|7", Role.MENTOR, subject="kc|7", from_provider=signed_by_provider)
            assert not self.acts("kc|8", Role.MENTOR, subject="kc|7", from_provider=True)

    def test_our_id_as_sub_counts_only_in_a_token_we_signed(self):
        mentor_id = str(self.MENTOR_ID)
        assert self.acts(mentor_id, Role.MENTOR, subject=None, from_provider=False)
        # A provider's `sub` is the provider's to choose: equal to our id by chance or design,
        # it is still not ours.
        assert not self.acts(mentor_id, Role.MENTOR, subject=None, from_provider=True)
        assert not self.acts(mentor_id, Role.MENTOR, subject="kc|7", from_provider=True)

    def test_a_mentee_never_acts_as_a_mentor(self):
        assert not self.acts("kc|7", Role.MENTEE, subject="kc|7", from_provider=True)
        assert not self.acts(str(self.MENTOR_ID), Role.MENTEE, subject=None, from_provider=False)


# --- over HTTP -----------------------------------------------------------------------------------


def app_with(verifier: TokenVerifier) -> httpx.AsyncClient:
    app = FastAPI()
    app.state.token_verifier = verifier
    install_problem_handlers(app)

    @app.get("/admin-only")
    async def admin_only(who: Identity = Depends(require_roles(Role.ADMIN))) -> dict:
        return {"sub": who.sub, "role": who.role}

    @app.get("/signed-in")
    async def signed_in(who: Identity = Depends(authenticated)) -> dict:
        return {"sub": who.sub, "role": who.role}

    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


def assert_problem(response: httpx.Response, status: int, detail: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["status"] == status
    assert detail in response.json()["detail"]


class TestOverHttp:
    async def test_no_token_is_401_problem_json(self):
        async with app_with(TokenVerifier(settings(auth_jwt_secret=SECRET))) as client:
            response = await client.get("/admin-only")
        assert_problem(response, 401, "bearer token is required")
        assert response.headers["www-authenticate"] == "Bearer"

    async def test_a_bad_token_is_401_the_wrong_role_403_the_right_one_passes(
        self, provider, clock, rsa_key
    ):
        verifier = verifier_of(provider, clock, auth_role_claim="realm_access.roles")
        async with app_with(verifier) as client:
            forged = SigningKey.rsa(rsa_key.kid).sign(claims())
            response = await client.get("/admin-only", headers=bearer(forged))
            assert_problem(response, 401, "signature does not verify")
            assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'

            mentee = rsa_key.sign(claims("m-1", role=None, realm_access={"roles": ["mentee"]}))
            response = await client.get("/admin-only", headers=bearer(mentee))
            assert_problem(response, 403, "needs the role admin; the token has mentee")
            assert (await client.get("/signed-in", headers=bearer(mentee))).status_code == 200

            nobody = rsa_key.sign(claims("n-1", role=None, realm_access={"roles": ["other"]}))
            for path in ("/admin-only", "/signed-in"):  # someone, allowed nothing
                response = await client.get(path, headers=bearer(nobody))
                assert_problem(response, 403, "no role this system knows")

            admin = rsa_key.sign(claims("a-1", role=None, realm_access={"roles": ["admin"]}))
            response = await client.get("/admin-only", headers=bearer(admin))
            assert response.status_code == 200
            assert response.json() == {"sub": "a-1", "role": "admin"}

    async def test_hs256_next_to_a_provider_is_401(self, provider, clock):
        async with app_with(verifier_of(provider, clock, auth_jwt_secret=SECRET)) as client:
            token = issue_token(SECRET, "a", Role.ADMIN)
            response = await client.get("/admin-only", headers=bearer(token))
        assert_problem(response, 401, "HS256 tokens are not accepted")

    async def test_a_provider_outage_is_503_with_retry_after(self, provider, clock, rsa_key):
        provider.status = 502
        async with app_with(verifier_of(provider, clock)) as client:
            response = await client.get("/admin-only", headers=bearer(rsa_key.sign(claims())))
        assert_problem(response, 503, "keys cannot be fetched")
        assert int(response.headers["retry-after"]) >= 1

    async def test_an_app_without_a_verifier_says_so(self):
        app = FastAPI()

        @app.get("/x")
        async def x(who: Identity = Depends(authenticated)) -> dict:
            return {}

        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")
        with pytest.raises(RuntimeError, match="token verifier"):
            await client.get("/x", headers=bearer(issue_token(SECRET, "a", "admin")))


# --- verified tokens are kept --------------------------------------------------------------------


class TestVerifiedTokensAreKept:
    """A client sends one token with every request: its signature is checked once, then the
    identity is kept until the token expires (or a few minutes), never past the cap."""

    @pytest.fixture
    def decoded(self, monkeypatch: pytest.MonkeyPatch) -> list[str]:
        calls: list[str] = []
        decode = auth._decode

        def counting(token: str, *args: Any) -> dict[str, Any]:
            calls.append(token)
            return decode(token, *args)

        monkeypatch.setattr(auth, "_decode", counting)
        return calls

    def verifier(self) -> TokenVerifier:
        return TokenVerifier(settings(auth_jwt_secret=SECRET, development_mode=True))

    async def test_a_token_is_verified_once_then_its_identity_is_kept(
        self, decoded: list[str]
    ) -> None:
        verifier = self.verifier()
        token = issue_token(SECRET, "mentee-1", Role.MENTEE)
        first = await verifier.verify(token)
        assert await verifier.verify(token) == first
        assert decoded == [token]

    async def test_once_the_token_expires_it_is_verified_again(
        self, decoded: list[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        verifier = self.verifier()
        token = issue_token(SECRET, "mentee-1", Role.MENTEE, ttl_seconds=60)
        await verifier.verify(token)
        # Past its expiry as the verifier reads the clock (PyJWT's own check is tested above).
        later = time.time() + 60 + verifier.rules.leeway + 1
        monkeypatch.setattr(time, "time", lambda: later)
        await verifier.verify(token)
        assert decoded == [token, token]

    async def test_a_refused_token_is_not_kept(self, decoded: list[str]) -> None:
        verifier = self.verifier()
        forged = issue_token("another-secret-0123456789abcdef0123", "x", Role.ADMIN)
        await refused(verifier, forged)
        await refused(verifier, forged)
        assert decoded == [forged, forged]

    async def test_at_most_the_cap_are_kept_the_oldest_going_first(
        self, decoded: list[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(auth, "_VERIFIED_TOKENS_KEPT", 2)
        verifier = self.verifier()
        tokens = [issue_token(SECRET, f"mentee-{n}", Role.MENTEE) for n in range(3)]
        for token in tokens:
            await verifier.verify(token)
        await verifier.verify(tokens[2])
        await verifier.verify(tokens[0])  # gone: verified again
        assert decoded == [*tokens, tokens[0]]

"""Order tokens: read one order, nothing else; their own key and audience, so a login token never
passes as one and an order token never passes as a login token."""

from __future__ import annotations

import time
from typing import Any
from uuid import uuid4

import jwt
import pytest
from pydantic import SecretStr

from booking.runtime.auth import (
    ORDER_TOKEN_AUDIENCE,
    InvalidToken,
    NoKnownRole,
    TokenVerifier,
    check_order_link_settings,
    issue_order_token,
    issue_token,
    verify_order_token,
)
from booking.runtime.settings import DEVELOPMENT_JWT_SECRET, RefusedSettings, RuntimeSettings

LOGIN_SECRET = "login-secret-0123456789abcdef0123456789"
REAL = "r" * 40


def settings(**values: Any) -> RuntimeSettings:
    """Only `values` over the defaults, nothing from this process's environment."""
    return RuntimeSettings.model_construct(**values)


KEY = settings(auth_jwt_secret=SecretStr(LOGIN_SECRET)).order_link_key


class TestOrderTokens:
    def test_a_token_reads_the_order_it_was_issued_for(self) -> None:
        order_id = uuid4()
        assert verify_order_token(KEY, issue_order_token(KEY, order_id, 60)) == order_id

    def test_an_expired_token_is_refused(self) -> None:
        token = issue_order_token(KEY, uuid4(), -60)
        with pytest.raises(InvalidToken, match="expired"):
            verify_order_token(KEY, token)

    def test_a_token_signed_with_another_key_is_refused(self) -> None:
        other = settings(auth_jwt_secret=SecretStr("another-" + LOGIN_SECRET)).order_link_key
        with pytest.raises(InvalidToken):
            verify_order_token(KEY, issue_order_token(other, uuid4(), 60))

    def test_a_login_token_is_no_order_token(self) -> None:
        login = issue_token(LOGIN_SECRET, str(uuid4()), "admin")
        with pytest.raises(InvalidToken):
            verify_order_token(KEY, login)
        # Not even one signed with the order key and naming an order: it has no order audience.
        now = int(time.time())
        claims = {"sub": str(uuid4()), "role": "admin", "iat": now, "exp": now + 60}
        with pytest.raises(InvalidToken):
            verify_order_token(KEY, jwt.encode(claims, KEY, algorithm="HS256"))

    def test_another_scope_or_no_order_is_refused(self) -> None:
        now = int(time.time())
        base = {"aud": ORDER_TOKEN_AUDIENCE, "iat": now, "exp": now + 60}
        for claims in (
            {**base, "sub": str(uuid4()), "scope": "order:write"},
            {**base, "sub": "not-an-order", "scope": "order:read"},
            {**base, "sub": str(uuid4())},  # no scope
        ):
            with pytest.raises(InvalidToken):
                verify_order_token(KEY, jwt.encode(claims, KEY, algorithm="HS256"))

    async def test_an_order_token_is_no_login_token(self) -> None:
        verifier = TokenVerifier(
            settings(auth_jwt_secret=SecretStr(LOGIN_SECRET), development_mode=True)
        )
        with pytest.raises(InvalidToken):
            await verifier.verify(issue_order_token(KEY, uuid4(), 60))

    async def test_even_signed_with_the_login_secret_it_carries_no_role(self) -> None:
        verifier = TokenVerifier(
            settings(auth_jwt_secret=SecretStr(LOGIN_SECRET), development_mode=True)
        )
        with pytest.raises(NoKnownRole):
            await verifier.verify(issue_order_token(LOGIN_SECRET, uuid4(), 60))


class TestOrderLinkKey:
    def test_the_key_is_derived_from_the_jwt_secret_but_is_not_it(self) -> None:
        assert LOGIN_SECRET.encode() != KEY
        assert len(KEY) == 32
        assert settings(auth_jwt_secret=SecretStr(LOGIN_SECRET)).order_link_key == KEY

    def test_its_own_secret_is_used_when_set(self) -> None:
        own = settings(auth_jwt_secret=SecretStr(LOGIN_SECRET), order_link_secret=SecretStr(REAL))
        assert own.order_link_key == REAL.encode()

    def test_no_deployment_starts_with_a_key_anyone_can_derive(self) -> None:
        for weak in (
            settings(auth_jwt_secret=SecretStr(DEVELOPMENT_JWT_SECRET)),
            settings(auth_jwt_secret=SecretStr(REAL), order_link_secret=SecretStr("short")),
            settings(auth_jwt_secret=SecretStr(REAL), order_link_secret=SecretStr("REPLACE-" * 5)),
        ):
            with pytest.raises(RefusedSettings, match="ORDER_LINK_SECRET"):
                check_order_link_settings(weak)

    def test_a_real_secret_or_development_mode_will_do(self) -> None:
        check_order_link_settings(settings(auth_jwt_secret=SecretStr(REAL)))
        check_order_link_settings(
            settings(auth_jwt_secret=SecretStr(REAL), order_link_secret=SecretStr("o" * 40))
        )
        check_order_link_settings(
            settings(auth_jwt_secret=SecretStr(DEVELOPMENT_JWT_SECRET), development_mode=True)
        )

    def test_the_order_link_secret_is_never_the_jwt_secret(self) -> None:
        with pytest.raises(RefusedSettings, match="ORDER_LINK_SECRET is AUTH_JWT_SECRET"):
            check_order_link_settings(
                settings(
                    auth_jwt_secret=SecretStr(REAL),
                    order_link_secret=SecretStr(REAL),
                    development_mode=True,
                )
            )

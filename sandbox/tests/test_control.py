"""The sandboxes' control API opens only with its token: SANDBOX_CONTROL_TOKEN, or the development
token in development mode; outside it, without a token, it is off. The provider APIs and the
browser pages never ask for it. And the client side: ControlAuth sends the token where it is due.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import ValidationError

from booking.sandbox import google, konnect
from booking.sandbox.control import ControlAuth
from booking.sandbox.settings import DEVELOPMENT_CONTROL_TOKEN, SandboxSettings

API_KEY = "sandbox-api-key-id:sandbox-api-key-secret"
WALLET = "000000000000000000000001"
TOKEN = "a-staging-token-from-the-secret-manager-0123456789"
FAULT = {"kind": "http_503", "count": 1}

AppFactory = Callable[[SandboxSettings], FastAPI]
APPS = pytest.mark.parametrize("create_app", [konnect.create_app, google.create_app])


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def sandbox() -> AsyncIterator[Callable[..., httpx.AsyncClient]]:
    """`sandbox(create_app, **settings)`: a client (sending no token by itself) for a sandbox
    with these settings; `development_mode` and `control_token` are the test's, never the
    environment's."""
    clients: list[httpx.AsyncClient] = []

    def make(create_app: AppFactory, **settings: Any) -> httpx.AsyncClient:
        values = {"development_mode": False, "control_token": None, **settings}
        app = create_app(SandboxSettings(**values))
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sandbox")
        clients.append(http)
        return http

    yield make
    for http in clients:
        await http.aclose()


def refused(response: httpx.Response) -> str:
    """The 401's detail, once its form is checked."""
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["www-authenticate"].startswith("Bearer ")
    return response.json()["detail"]


@APPS
class TestTheToken:
    async def test_without_a_token_a_control_call_is_401_and_changes_nothing(
        self, sandbox, create_app
    ):
        http = sandbox(create_app, control_token=TOKEN)
        detail = refused(await http.post("/_sandbox/faults", json=FAULT))
        assert "Authorization: Bearer" in detail
        listed = await http.get("/_sandbox/faults", headers=bearer(TOKEN))
        assert listed.json() == {"faults": []}

    @pytest.mark.parametrize(
        "authorization",
        [
            "Bearer wrong-token",
            f"Bearer {TOKEN[:-1]}",  # all but its last character
            f"Bearer {TOKEN}x",
            f"Basic {TOKEN}",
            TOKEN,
            "Bearer ",
        ],
    )
    async def test_a_wrong_token_is_401(self, sandbox, create_app, authorization):
        http = sandbox(create_app, control_token=TOKEN)
        response = await http.post(
            "/_sandbox/faults", json=FAULT, headers={"Authorization": authorization}
        )
        refused(response)
        listed = await http.get("/_sandbox/faults", headers=bearer(TOKEN))
        assert listed.json() == {"faults": []}

    async def test_the_right_token_opens_it(self, sandbox, create_app):
        http = sandbox(create_app, control_token=TOKEN)
        added = await http.post("/_sandbox/faults", json=FAULT, headers=bearer(TOKEN))
        assert added.status_code == 200, added.text
        assert len(added.json()["faults"]) == 1
        # The scheme is case-insensitive, as HTTP's are.
        listed = await http.get("/_sandbox/faults", headers={"Authorization": f"bearer {TOKEN}"})
        assert listed.status_code == 200

    async def test_without_the_token_no_path_or_body_is_judged_first(self, sandbox, create_app):
        # 401 before routing and validation: a caller without the token learns which control
        # paths exist, or what they take, from nothing.
        http = sandbox(create_app, control_token=TOKEN)
        refused(await http.get("/_sandbox/no-such-thing"))
        refused(await http.post("/_sandbox/faults", content=b"{not json"))
        refused(await http.get("/_sandbox"))

    async def test_health_needs_no_token(self, sandbox, create_app):
        http = sandbox(create_app)
        assert (await http.get("/health/live")).status_code == 200


class TestThePagesAndAPIsNeedNoToken:
    async def test_konnects_api_and_pay_page_are_open_with_the_control_api_off(self, sandbox):
        http = sandbox(konnect.create_app)
        refused(await http.get("/_sandbox/payments"))
        init = await http.post(
            "/api/v2/payments/init-payment",
            json={"receiverWalletId": WALLET, "amount": 1000},
            headers={"x-api-key": API_KEY},
        )
        assert init.status_code == 200, init.text
        ref = init.json()["paymentRef"]
        assert (await http.get(f"/pay/{ref}")).status_code == 200
        assert (await http.post(f"/pay/{ref}/pay")).status_code == 200  # no URL to go back to
        read = await http.get(f"/api/v2/payments/{ref}", headers={"x-api-key": API_KEY})
        assert read.json()["payment"]["status"] == "completed"

    async def test_googles_consent_page_is_open_with_the_control_api_off(self, sandbox):
        http = sandbox(google.create_app)
        refused(await http.get("/_sandbox/events"))
        consent = await http.get(
            "/o/oauth2/v2/auth",
            params={
                "client_id": "sandbox-client-id",
                "redirect_uri": "https://booking.example/api/calendar/oauth/callback",
                "response_type": "code",
                "scope": "https://www.googleapis.com/auth/calendar.events",
                "access_type": "offline",
                "state": "s",
            },
        )
        assert consent.status_code == 200, consent.text
        assert "Allow" in consent.text


@APPS
class TestDevelopmentMode:
    async def test_without_a_token_development_mode_takes_the_development_token(
        self, sandbox, create_app
    ):
        http = sandbox(create_app, development_mode=True)
        opened = await http.get("/_sandbox/faults", headers=bearer(DEVELOPMENT_CONTROL_TOKEN))
        assert opened.status_code == 200, opened.text
        refused(await http.get("/_sandbox/faults"))
        refused(await http.get("/_sandbox/faults", headers=bearer("anything-else")))

    async def test_outside_development_mode_without_a_token_the_control_api_is_off(
        self, sandbox, create_app
    ):
        http = sandbox(create_app, development_mode=False)
        detail = refused(
            await http.post(
                "/_sandbox/faults", json=FAULT, headers=bearer(DEVELOPMENT_CONTROL_TOKEN)
            )
        )
        assert "SANDBOX_CONTROL_TOKEN is not set" in detail
        refused(await http.get("/_sandbox/faults"))

    async def test_a_token_set_replaces_the_development_token(self, sandbox, create_app):
        http = sandbox(create_app, development_mode=True, control_token="short-but-local")
        refused(await http.get("/_sandbox/faults", headers=bearer(DEVELOPMENT_CONTROL_TOKEN)))
        opened = await http.get("/_sandbox/faults", headers=bearer("short-but-local"))
        assert opened.status_code == 200

    async def test_outside_development_mode_the_token_set_opens_it(self, sandbox, create_app):
        http = sandbox(create_app, development_mode=False, control_token=TOKEN)
        assert (await http.get("/_sandbox/faults", headers=bearer(TOKEN))).status_code == 200


class TestSettings:
    def test_the_environment_sets_the_token_and_development_mode(self, monkeypatch):
        monkeypatch.setenv("SANDBOX_CONTROL_TOKEN", TOKEN)
        monkeypatch.setenv("DEVELOPMENT_MODE", "false")
        settings = SandboxSettings()
        assert settings.development_mode is False
        assert settings.control_api_token() == TOKEN

    def test_by_default_there_is_no_token_and_no_development_mode(self, monkeypatch):
        for name in ("SANDBOX_CONTROL_TOKEN", "DEVELOPMENT_MODE"):
            monkeypatch.delenv(name, raising=False)
        settings = SandboxSettings()
        assert settings.development_mode is False
        assert settings.control_api_token() is None

    def test_a_blank_token_is_no_token(self, monkeypatch):
        monkeypatch.setenv("SANDBOX_CONTROL_TOKEN", "  ")
        assert SandboxSettings(development_mode=False).control_api_token() is None
        assert SandboxSettings(development_mode=True).control_api_token() == (
            DEVELOPMENT_CONTROL_TOKEN
        )

    @pytest.mark.parametrize(
        "token",
        [
            DEVELOPMENT_CONTROL_TOKEN,
            "REPLACE-WITH-A-LONG-RANDOM-TOKEN-FROM-A-SECRET-MANAGER",
            "x" * 31,
        ],
    )
    def test_outside_development_mode_a_guessable_token_is_refused(self, token):
        with pytest.raises(ValidationError, match="SANDBOX_CONTROL_TOKEN"):
            SandboxSettings(development_mode=False, control_token=token)
        # A laptop may use whatever it likes.
        assert SandboxSettings(development_mode=True, control_token=token).control_api_token()

    def test_the_serve_command_refuses_a_placeholder_token_in_one_line(self):
        env = {
            **os.environ,
            "DEVELOPMENT_MODE": "false",
            "SANDBOX_CONTROL_TOKEN": "REPLACE-WITH-A-LONG-RANDOM-TOKEN",
        }
        done = subprocess.run(
            [sys.executable, "-m", "booking.sandbox", "konnect", "serve"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 1
        assert done.stderr.startswith("sandbox-konnect refuses its settings: SANDBOX_CONTROL_TOKEN")
        assert "Traceback" not in done.stderr

    def test_the_forged_webhook_hosts_are_a_comma_separated_list(self, monkeypatch):
        monkeypatch.setenv("SANDBOX_KONNECT_FORGED_WEBHOOK_HOSTS", "Gateway, [::1],,10.0.0.5")
        assert SandboxSettings().konnect_forged_webhook_hosts == ["gateway", "::1", "10.0.0.5"]
        monkeypatch.delenv("SANDBOX_KONNECT_FORGED_WEBHOOK_HOSTS")
        assert SandboxSettings().konnect_forged_webhook_hosts == []


class TestControlAuth:
    """The client's side: one `auth=ControlAuth()` on a client, and its control calls carry the
    token while its other calls (provider APIs, the services) carry none of it."""

    @staticmethod
    async def sent(auth: ControlAuth, path: str, **kwargs: Any) -> str | None:
        seen: list[httpx.Request] = []

        def record(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return httpx.Response(200)

        transport = httpx.MockTransport(record)
        async with httpx.AsyncClient(transport=transport, auth=auth) as http:
            await http.get(f"http://sandbox{path}", **kwargs)
        return seen[0].headers.get("authorization")

    async def test_it_sends_the_token_on_control_calls_only(self):
        auth = ControlAuth("t0ken")
        assert await self.sent(auth, "/_sandbox/faults") == "Bearer t0ken"
        assert await self.sent(auth, "/api/v2/payments/x") is None
        assert await self.sent(auth, "/api/orders/x") is None
        assert await self.sent(auth, "/_sandboxes") is None

    async def test_a_request_s_own_authorization_is_kept(self):
        own = {"Authorization": "Bearer mine"}
        assert await self.sent(ControlAuth("t0ken"), "/_sandbox/faults", headers=own) == (
            "Bearer mine"
        )

    async def test_the_token_comes_from_the_environment_else_the_development_token(
        self, monkeypatch
    ):
        monkeypatch.setenv("SANDBOX_CONTROL_TOKEN", TOKEN)
        assert await self.sent(ControlAuth(), "/_sandbox/faults") == f"Bearer {TOKEN}"
        monkeypatch.delenv("SANDBOX_CONTROL_TOKEN")
        assert await self.sent(ControlAuth(), "/_sandbox/faults") == (
            f"Bearer {DEVELOPMENT_CONTROL_TOKEN}"
        )

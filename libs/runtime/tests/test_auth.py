"""JWT verification and the role dependency."""

from __future__ import annotations

import time

import httpx
import jwt
import pytest
from fastapi import Depends, FastAPI

from booking.runtime.auth import Identity, Role, issue_token, require_roles, verify_token
from booking.runtime.problems import install_problem_handlers
from booking.runtime.settings import RuntimeSettings

SECRET = "test-secret-0123456789abcdef0123456789"


@pytest.fixture
def client() -> httpx.AsyncClient:
    app = FastAPI()
    app.state.settings = RuntimeSettings(auth_jwt_secret=SECRET)
    install_problem_handlers(app)

    @app.get("/admin-only")
    async def admin_only(who: Identity = Depends(require_roles(Role.ADMIN))) -> dict:
        return {"sub": who.sub, "role": who.role}

    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class TestTokens:
    def test_a_token_round_trips_its_subject_and_role(self):
        identity = verify_token(SECRET, issue_token(SECRET, "m-1", "mentor"))
        assert identity == Identity(sub="m-1", role=Role.MENTOR)

    def test_an_expired_token_is_refused(self):
        token = issue_token(SECRET, "a", "admin", ttl_seconds=-10)
        with pytest.raises(Exception, match="expired"):
            verify_token(SECRET, token)

    def test_a_token_without_exp_is_refused(self):
        token = jwt.encode({"sub": "a", "role": "admin"}, SECRET, algorithm="HS256")
        with pytest.raises(Exception, match="exp"):
            verify_token(SECRET, token)

    def test_an_unknown_role_is_refused(self):
        exp = int(time.time()) + 60
        token = jwt.encode({"sub": "a", "role": "root", "exp": exp}, SECRET, algorithm="HS256")
        with pytest.raises(Exception, match="role"):
            verify_token(SECRET, token)

    def test_the_none_algorithm_is_refused(self):
        exp = int(time.time()) + 60
        token = jwt.encode({"sub": "a", "role": "admin", "exp": exp}, None, algorithm="none")
        with pytest.raises(Exception, match="not valid"):
            verify_token(SECRET, token)


class TestRoleDependency:
    async def test_no_token_is_401_problem_json(self, client):
        response = await client.get("/admin-only")
        assert response.status_code == 401
        assert response.headers["content-type"] == "application/problem+json"
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["detail"]

    async def test_a_wrongly_signed_token_is_401(self, client):
        token = issue_token("another-secret-0123456789abcdef0123", "a", "admin")
        assert (await client.get("/admin-only", headers=bearer(token))).status_code == 401

    async def test_the_wrong_role_is_403(self, client):
        token = issue_token(SECRET, "m", "mentee")
        response = await client.get("/admin-only", headers=bearer(token))
        assert response.status_code == 403
        assert "admin" in response.json()["detail"]

    async def test_the_right_role_passes_with_its_identity(self, client):
        response = await client.get(
            "/admin-only", headers=bearer(issue_token(SECRET, "a1", "admin"))
        )
        assert response.status_code == 200
        assert response.json() == {"sub": "a1", "role": "admin"}

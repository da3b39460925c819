"""The sandbox providers answer their health probes, and speak problem+json for the rest."""

import httpx
import pytest
from fastapi import FastAPI

from booking.sandbox import google, konnect


def client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sandbox")


@pytest.mark.parametrize(
    ("create_app", "service"),
    [
        (konnect.create_app, "sandbox-konnect"),
        (google.create_app, "sandbox-google"),
    ],
)
class TestHealth:
    async def test_live_answers_pass(self, create_app, service):
        async with client(create_app()) as http:
            response = await http.get("/health/live")
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/health+json"
        assert response.json()["status"] == "pass"
        assert response.json()["serviceId"] == service

    async def test_ready_answers_pass(self, create_app, service):
        async with client(create_app()) as http:
            response = await http.get("/health/ready")
        assert response.status_code == 200
        assert response.json()["status"] == "pass"


class TestPlaceholders:
    async def test_konnect_api_is_a_problem_404_until_built(self):
        async with client(konnect.create_app()) as http:
            response = await http.post("/api/v2/payments/init-payment", json={})
        assert response.status_code == 404
        assert response.headers["content-type"] == "application/problem+json"
        assert "init-payment" in response.json()["detail"]

    async def test_google_paths_are_a_problem_404_until_built(self):
        async with client(google.create_app()) as http:
            response = await http.post("/token", data={"grant_type": "refresh_token"})
        assert response.status_code == 404
        assert response.headers["content-type"] == "application/problem+json"

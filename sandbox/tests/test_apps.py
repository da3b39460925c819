"""The sandbox providers answer their health probes; each API speaks its provider's errors form,
the sandboxes' own paths problem+json."""

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


class TestUnknownPaths:
    async def test_konnect_unknown_api_paths_are_a_404_in_konnect_errors_form(self):
        key = {"x-api-key": "sandbox-api-key-id:sandbox-api-key-secret"}
        async with client(konnect.create_app()) as http:
            response = await http.post("/api/v2/payments/refund", json={}, headers=key)
        assert response.status_code == 404
        assert response.headers["content-type"] == "application/json"
        assert "payments/refund" in response.json()["errors"][0]["message"]

    async def test_google_unknown_calendar_paths_are_a_404_in_googles_error_shape(self):
        async with client(google.create_app()) as http:
            response = await http.get("/calendar/v3/users/me/calendarList")
        assert response.status_code == 404
        assert response.headers["content-type"] == "application/json"
        assert response.json()["error"]["errors"][0]["reason"] == "notFound"

    async def test_google_paths_outside_its_apis_are_a_problem_404(self):
        async with client(google.create_app()) as http:
            response = await http.get("/oauth2/v4/token")
        assert response.status_code == 404
        assert response.headers["content-type"] == "application/problem+json"

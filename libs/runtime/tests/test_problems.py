"""Errors answer as RFC 9457 problem+json, and a crash never leaks its stack trace."""

import httpx
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict

from booking.runtime.problems import install_problem_handlers


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")
    amount: int


def make_client() -> httpx.AsyncClient:
    app = FastAPI()
    install_problem_handlers(app)

    @app.post("/things")
    async def create(body: Body) -> dict:
        return {"amount": body.amount}

    @app.get("/boom")
    async def boom() -> dict:
        raise RuntimeError("secret internals")

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://t")


async def test_an_unknown_field_is_422_naming_the_field():
    async with make_client() as client:
        response = await client.post("/things", json={"amount": 1, "colour": "red"})
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == 422
    assert "colour" in problem["detail"]
    assert problem["errors"][0]["field"] == "colour"


async def test_an_unknown_route_is_404_problem_json():
    async with make_client() as client:
        response = await client.get("/nowhere")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"


async def test_an_unexpected_error_is_500_without_the_stack_trace():
    async with make_client() as client:
        response = await client.get("/boom")
    assert response.status_code == 500
    assert "secret internals" not in response.text
    assert response.headers["content-type"] == "application/problem+json"

"""Errors answer as RFC 9457 problem+json, and a crash never leaks its stack trace."""

import logging

import asyncpg
import httpx
from fastapi import APIRouter, Depends, FastAPI
from pydantic import BaseModel, ConfigDict
from sqlalchemy import text

from booking.devtools.fixtures import url_via
from booking.runtime.db import Database, database
from booking.runtime.host import create_service_app
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


async def test_a_request_that_meets_an_unreachable_database_gets_503_and_a_quiet_log(
    postgres_proxy, make_service, database_url, caplog
):
    service = await make_service(database_url=url_via(database_url, postgres_proxy))
    router = APIRouter()

    @router.get("/count")
    async def count(db: Database = Depends(database)) -> dict:
        async with db.transaction() as session:
            return {"one": await session.scalar(text("SELECT 1"))}

    app = create_service_app(service.runtime, [router])
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
        assert (await client.get("/count")).json() == {"one": 1}
        await postgres_proxy.cut()
        with caplog.at_level(logging.INFO):
            answers = [await client.get("/count") for _ in range(20)]
        await postgres_proxy.restore()
        assert (await client.get("/count")).json() == {"one": 1}

    for answer in answers:
        assert answer.status_code == 503, answer.text
        assert answer.headers["retry-after"] == "5"
        assert answer.headers["content-type"] == "application/problem+json"
        assert "try again" in answer.json()["detail"]
    mine = [r for r in caplog.records if r.name.startswith("booking.runtime.problems")]
    assert len(mine) == 1, [r.getMessage() for r in mine]  # once, not once per request
    assert not any(r.exc_info for r in caplog.records)


async def test_the_drivers_lost_connection_errors_get_503_without_a_trace(make_service, caplog):
    """Errors the driver raises on a connection Postgres dropped, met bare on the driver (as
    `driver_connection` does), not wrapped by SQLAlchemy."""
    service = await make_service()
    router = APIRouter()
    raised = [
        asyncpg.InternalClientError("cannot switch to state 15; another operation is in progress"),
        asyncpg.InterfaceError("connection is closed"),
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    ]

    @router.get("/lost/{which}")
    async def lost(which: int) -> dict:
        raise raised[which]

    app = create_service_app(service.runtime, [router])
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
        with caplog.at_level(logging.INFO):
            answers = [await client.get(f"/lost/{which}") for which in range(len(raised))]

    for answer in answers:
        assert answer.status_code == 503, answer.text
        assert answer.headers["retry-after"] == "5"
    assert not any(r.exc_info for r in caplog.records)


async def test_an_error_that_is_not_an_outage_stays_a_500():
    app = FastAPI()
    install_problem_handlers(app, [LookupError])

    @app.get("/bug")
    async def bug() -> dict:
        raise KeyError("secret internals")

    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        answer = await client.get("/bug")
    assert answer.status_code == 500
    assert "secret" not in answer.text

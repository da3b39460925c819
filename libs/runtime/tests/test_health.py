"""Health reports: application/health+json, readiness on own dependencies, liveness on nothing."""

from __future__ import annotations

import asyncio
import re
from typing import Any, Literal

import httpx
import pytest
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import MetaData

from booking.devtools.fixtures import free_port, serving
from booking.runtime.health import Health, Observation
from booking.runtime.host import ServiceRuntime, create_service_app
from booking.runtime.tables import MessagingTables


class CheckEntry(BaseModel):
    """One check result as draft-inadarei-api-health-check defines it."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    componentType: str
    status: Literal["pass", "warn", "fail"]
    time: str
    observedValue: Any = None
    observedUnit: str | None = None
    output: str | None = None

    @field_validator("time")
    @classmethod
    def rfc3339(cls, value: str) -> str:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)", value)
        return value


class HealthReport(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: Literal["pass", "warn", "fail"]
    version: str | None = None
    serviceId: str | None = None
    description: str | None = None
    checks: dict[str, list[CheckEntry]] = Field(default_factory=dict)

    @field_validator("checks")
    @classmethod
    def keys_are_component_colon_measurement(cls, value: dict) -> dict:
        for key in value:
            assert re.fullmatch(r"[^:]+:[^:]+", key), key
        return value


def parse_report(response: httpx.Response) -> HealthReport:
    assert response.headers["content-type"].startswith("application/health+json")
    return HealthReport.model_validate(response.json())


class TestReadinessWithoutTheDatabase:
    async def test_ready_is_503_naming_the_database_while_live_stays_200(
        self, make_settings, rabbitmq_url
    ):
        closed = free_port()
        settings = make_settings(
            database_url=f"postgresql://postgres@127.0.0.1:{closed}/nowhere",
            health_check_timeout_seconds=3,
        )
        runtime = ServiceRuntime(
            name="no-db", settings=settings, tables=MessagingTables(MetaData(), "nodb")
        )
        async with serving(create_service_app(runtime)) as url, httpx.AsyncClient() as client:
            await runtime.broker.wait_ready(10)
            live = await client.get(f"{url}/health/live")
            ready = await client.get(f"{url}/health/ready")
            full = await client.get(f"{url}/health")

        assert live.status_code == 200
        assert parse_report(live).status == "pass"
        assert ready.status_code == 503
        report = parse_report(ready)
        assert report.status == "fail"
        [database] = report.checks["database:responseTime"]
        assert database.status == "fail"
        assert database.output
        assert report.checks["rabbitmq:connection"][0].status == "pass"
        assert full.status_code == 503
        assert parse_report(full).checks["outbox:lag"][0].status == "fail"


class TestReportsOfAHealthyService:
    async def test_a_running_service_reports_pass_with_every_standard_check(self, make_service):
        service = await make_service()
        app = create_service_app(service.runtime)
        transport = httpx.ASGITransport(app=app)  # the runtime is already started
        async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
            ready = await client.get("/health/ready")
            full = await client.get("/health")
            internal = await client.get("/internal/health")
            document = (await client.get("/openapi.json")).json()
        assert ready.status_code == 200, ready.text
        # The same full report at the path every process serves it on, which no ingress routes.
        assert set(parse_report(internal).checks) == set(parse_report(full).checks)
        assert "/internal/health" not in document["paths"]
        report = parse_report(full)
        assert report.status == "pass"
        assert set(report.checks) == {
            "database:responseTime",
            "rabbitmq:connection",
            "rabbitmq:consumers",
            "rabbitmq:queues",
            "outbox:lag",
            "deadLetters:kept",
        }
        assert report.checks["deadLetters:kept"][0].observedValue == 0
        assert report.checks["rabbitmq:consumers"][0].observedValue == 1
        assert report.checks["database:responseTime"][0].observedUnit == "ms"


class TestAHealthPathServedElsewhere:
    async def test_is_left_to_the_service_and_documented_as_it_answers(self, make_settings):
        runtime = ServiceRuntime(name="edge", settings=make_settings())
        own = APIRouter()

        @own.get("/health", summary="the overall status alone")
        async def overall() -> dict[str, str]:
            return {"status": "pass"}

        app = create_service_app(runtime, [own])
        transport = httpx.ASGITransport(app=app)  # no lifespan: nothing is checked here
        async with httpx.AsyncClient(transport=transport, base_url="http://edge") as client:
            answer = await client.get("/health")
            document = (await client.get("/openapi.json")).json()
        assert answer.json() == {"status": "pass"}
        assert document["paths"]["/health"]["get"]["summary"] == "the overall status alone"
        assert {"/health/live", "/health/ready"} <= set(document["paths"])


class TestChecks:
    async def test_checks_run_concurrently_each_under_its_own_timeout(self):
        health = Health(service="t", timeout=2.0)
        # Each of these passes only if the other two are running at the same time.
        together = asyncio.Barrier(3)

        async def meets_the_others(name: str) -> Observation:
            await together.wait()
            return Observation(name, "x", "pass")

        async def slow() -> Observation:
            await asyncio.sleep(30)
            return Observation("slow", "x", "pass")

        async def outside() -> Observation:
            await asyncio.sleep(30)
            return Observation("konnect", "reachable", "pass")

        for name in ("a", "b", "c"):
            health.add(name, "x", lambda name=name: meets_the_others(name), ready=True)
        health.add("slow", "x", slow, ready=True, timeout=0.3)
        health.add("konnect", "reachable", outside, ready=False, failure_status="warn", timeout=0.3)
        report = await health.report()
        assert {report["checks"][f"{n}:x"][0]["status"] for n in "abc"} == {"pass"}
        assert report["checks"]["slow:x"][0]["status"] == "fail"
        assert "0.3s" in report["checks"]["slow:x"][0]["output"]
        assert report["checks"]["konnect:reachable"][0]["status"] == "warn"
        assert report["status"] == "fail"
        ready = await health.report(ready_only=True)
        assert "konnect:reachable" not in ready["checks"]

    @pytest.mark.parametrize(
        ("statuses", "overall"),
        [(["pass", "pass"], "pass"), (["pass", "warn"], "warn"), (["warn", "fail"], "fail")],
    )
    async def test_the_overall_status_is_the_worst_check(self, statuses, overall):
        health = Health(service="t")
        for i, status in enumerate(statuses):

            async def check(status=status, i=i) -> Observation:
                return Observation(f"c{i}", "m", status)

            health.add(f"c{i}", "m", check, ready=True)
        assert (await health.report())["status"] == overall

"""Health reports in application/health+json (docs/health.md).

`/health/live` answers while the process does and checks nothing. `/health/ready` runs the checks
marked for readiness (the service's own dependencies); `/health` runs them all, and so does
`/internal/health`: the one path that gives the full report on every process, the gateway
included (whose public `/health` says only the overall status). Checks run concurrently, each
under its own timeout, and a check that times out or raises reports itself as failed (or warn,
for outside systems that readiness must never depend on).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse

Status = Literal["pass", "warn", "fail"]
HEALTH_MEDIA_TYPE = "application/health+json"
INTERNAL_HEALTH_PATH = "/internal/health"
"""The full report, tokenless, for monitoring inside the cluster: never routed by the ingress."""
_RANK = {"pass": 0, "warn": 1, "fail": 2}


@dataclass
class Observation:
    """One entry under `checks["component:measurement"]`."""

    component: str
    measurement: str
    status: Status
    component_type: str = "component"
    observed_value: Any = None
    observed_unit: str | None = None
    output: str | None = None

    @property
    def key(self) -> str:
        return f"{self.component}:{self.measurement}"

    def as_json(self, now: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "componentType": self.component_type,
            "status": self.status,
            "time": now,
        }
        if self.observed_value is not None:
            body["observedValue"] = self.observed_value
        if self.observed_unit:
            body["observedUnit"] = self.observed_unit
        if self.output:
            body["output"] = self.output
        return body


CheckFn = Callable[[], Awaitable[Observation | list[Observation]]]


@dataclass
class Check:
    component: str
    measurement: str
    run: CheckFn
    ready: bool
    component_type: str = "component"
    # How a timeout or exception is reported: outside systems say warn, never fail.
    failure_status: Status = "fail"
    timeout: float | None = None


def worst(statuses: list[Status]) -> Status:
    return max(statuses, key=_RANK.__getitem__, default="pass")


def timed_ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)


@dataclass
class Health:
    service: str
    version: str = "1"
    timeout: float = 2.0
    checks: list[Check] = field(default_factory=list)

    def add(
        self,
        component: str,
        measurement: str,
        run: CheckFn,
        *,
        ready: bool,
        component_type: str = "component",
        failure_status: Status = "fail",
        timeout: float | None = None,
    ) -> None:
        self.checks.append(
            Check(component, measurement, run, ready, component_type, failure_status, timeout)
        )

    async def _run(self, check: Check) -> list[Observation]:
        try:
            async with asyncio.timeout(check.timeout or self.timeout):
                result = await check.run()
        except TimeoutError:
            output = f"no answer within {check.timeout or self.timeout:g}s"
            return [self._failed(check, output)]
        except Exception as exc:
            return [self._failed(check, f"{type(exc).__name__}: {exc}"[:500])]
        return result if isinstance(result, list) else [result]

    @staticmethod
    def _failed(check: Check, output: str) -> Observation:
        return Observation(
            check.component,
            check.measurement,
            check.failure_status,
            check.component_type,
            output=output,
        )

    async def report(self, *, ready_only: bool = False) -> dict[str, Any]:
        selected = [c for c in self.checks if c.ready or not ready_only]
        results = await asyncio.gather(*(self._run(c) for c in selected))
        now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        checks: dict[str, list[dict[str, Any]]] = {}
        statuses: list[Status] = []
        for observations in results:
            for obs in observations:
                checks.setdefault(obs.key, []).append(obs.as_json(now))
                statuses.append(obs.status)
        return {
            "status": worst(statuses),
            "version": self.version,
            "serviceId": self.service,
            "description": f"health of the {self.service} service",
            "checks": checks,
        }

    def router(self, *, served_elsewhere: Collection[str] = ()) -> APIRouter:
        """The health routes, but for the paths in `served_elsewhere` (the gateway answers its
        `/health` and `/internal/health` itself): a shadowed route would still be documented."""
        router = APIRouter(tags=["health"])

        @router.get(
            "/health/live",
            response_class=HealthResponse,
            status_code=200,
            responses=HEALTH_RESPONSES,
        )
        async def live() -> HealthResponse:
            return HealthResponse(
                {"status": "pass", "version": self.version, "serviceId": self.service}
            )

        @router.get(
            "/health/ready",
            response_class=HealthResponse,
            status_code=200,
            responses=HEALTH_RESPONSES,
        )
        async def ready() -> HealthResponse:
            return HealthResponse(await self.report(ready_only=True))

        @router.get(
            "/health", response_class=HealthResponse, status_code=200, responses=HEALTH_RESPONSES
        )
        async def full() -> HealthResponse:
            return HealthResponse(await self.report())

        # Not in the OpenAPI document: no ingress routes /internal/, it is for the cluster's ops.
        @router.get(INTERNAL_HEALTH_PATH, response_class=HealthResponse, include_in_schema=False)
        async def internal() -> HealthResponse:
            return HealthResponse(await self.report())

        router.routes[:] = [
            r for r in router.routes if getattr(r, "path", None) not in served_elsewhere
        ]
        return router


HEALTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "pass or warn", "content": {HEALTH_MEDIA_TYPE: {}}},
    503: {"description": "fail", "content": {HEALTH_MEDIA_TYPE: {}}},
}


class HealthResponse(JSONResponse):
    """pass and warn answer 200, fail 503."""

    media_type = HEALTH_MEDIA_TYPE

    def __init__(self, content: dict[str, Any], **kwargs: Any) -> None:
        status_code = 503 if content.get("status") == "fail" else 200
        super().__init__(content, status_code=status_code, **kwargs)

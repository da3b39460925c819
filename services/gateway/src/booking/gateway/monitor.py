"""The system's health: the gateway aggregates every service's, and a monitor alerts.

`SystemHealth` asks each service for its `GET /health` at the same time, each under its own
timeout, over one pooled client, and folds the answers into the gateway's own report
(application/health+json; docs/health.md): one `checks["<service>:health"]` entry per service.
That report names hosts, queues and errors, so the public `/health` shows only its overall status;
the whole report is for admins (`GET /api/admin/health`) and for monitoring inside the cluster
(`GET /internal/health`, which the ingress does not route).
`/health/ready` and `/health/live` stay the runtime's: the gateway's own dependencies, and nothing.

`HealthMonitor` polls the services in the background and publishes HealthCheckFailed when one
turns fail (after a few failed polls in a row, so one slow answer is no alert) and
HealthCheckRecovered when it answers healthy again: one event per transition, not one per poll.
The gateway has no database and so no outbox: it publishes with publisher confirms straight
through the broker, and a transition that cannot be published waits until the broker is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, get_args

import httpx
from fastapi import APIRouter, Depends

from booking.contracts import Event, HealthCheckFailed, HealthCheckRecovered, wrap
from booking.contracts.http import Problem
from booking.gateway.upstreams import Service
from booking.runtime import context
from booking.runtime.auth import Role, require_roles
from booking.runtime.broker import Broker, OutgoingMessage
from booking.runtime.health import (
    HEALTH_MEDIA_TYPE,
    HEALTH_RESPONSES,
    INTERNAL_HEALTH_PATH,
    Health,
    HealthResponse,
    Observation,
    Status,
    timed_ms,
    worst,
)
from booking.runtime.transport import CancelSafeTransport

log = logging.getLogger(__name__)

SERVICES = tuple(str(service) for service in Service)
"""The services behind the gateway, in the order their checks are listed."""

MEASUREMENT = "health"
"""Each service's entry is `checks["<service>:health"]`."""

PRODUCER = "gateway"
_STATUSES: tuple[str, ...] = get_args(Status)
_OUTPUT_LIMIT = 500

_PROBLEM = {"application/problem+json": {"schema": Problem.model_json_schema()}}
ADMIN_HEALTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    **HEALTH_RESPONSES,
    401: {
        "description": "no token, or a malformed, expired or wrongly signed one",
        "content": _PROBLEM,
    },
    403: {"description": "the token is not an admin's", "content": _PROBLEM},
}


def _clip(text: str) -> str:
    return text if len(text) <= _OUTPUT_LIMIT else text[: _OUTPUT_LIMIT - 1] + "…"


def _summary(body: dict[str, Any]) -> str | None:
    """What is wrong inside a service's report: its checks that are not pass, with their output."""
    parts: list[str] = []
    checks = body.get("checks")
    if isinstance(checks, dict):
        for key, entries in checks.items():
            for entry in entries if isinstance(entries, list) else [entries]:
                if not isinstance(entry, dict) or entry.get("status", "pass") == "pass":
                    continue
                text = f"{key} {entry.get('status')}"
                if entry.get("output"):
                    text += f": {entry['output']}"
                parts.append(text)
    if not parts and isinstance(body.get("output"), str) and body["output"]:
        parts.append(body["output"])
    return _clip("; ".join(parts)) if parts else None


class SystemHealth:
    """The gateway's own checks plus every service's `/health`, gathered concurrently.

    `start()` opens the pooled HTTP client and `stop()` closes it; the app's lifespan runs both.
    """

    def __init__(
        self,
        health: Health,
        upstreams: Mapping[Service, str] | Mapping[str, str],
        *,
        timeout: float = 2.0,
        public_max_age: float = 1.0,
    ) -> None:
        self.health = health
        self.upstreams = {name: url.rstrip("/") for name, url in upstreams.items()}
        self.timeout = timeout
        self.public_max_age = public_max_age
        self._client: httpx.AsyncClient | None = None
        self._latest: tuple[float, Status] | None = None  # (monotonic time, overall status)
        self._refreshing: asyncio.Future[Status] | None = None

    async def start(self) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(
                # As the forwarding clients: never through an HTTP_PROXY from the environment.
                trust_env=False,
                timeout=httpx.Timeout(self.timeout),
                transport=CancelSafeTransport(50, 10),
                headers={"accept": f"{HEALTH_MEDIA_TYPE}, application/json"},
            )

    async def stop(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    async def check_services(self) -> dict[str, Observation]:
        """One observation per service, all asked at once; none takes longer than the timeout."""
        names = list(self.upstreams)
        results = await asyncio.gather(*(self.check_service(name) for name in names))
        return dict(zip(names, results, strict=True))

    async def check_service(self, name: str) -> Observation:
        start = time.perf_counter()

        def failed(output: str) -> Observation:
            return Observation(name, MEASUREMENT, "fail", "component", output=_clip(output))

        client = self._client
        if client is None:
            return failed("health aggregation not started")
        url = f"{self.upstreams[name]}/health"
        try:
            # httpx times each phase (connect, read, ...) on its own: this bounds the whole call.
            async with asyncio.timeout(self.timeout):
                response = await client.get(url)
        except TimeoutError:
            return failed(f"no answer from {url} within {self.timeout:g}s")
        except httpx.HTTPError as exc:
            reason = str(exc) or type(exc).__name__
            return failed(f"{url} unreachable: {type(exc).__name__}: {reason}")
        elapsed = timed_ms(start)
        try:
            body = response.json()
        except ValueError:
            code = response.status_code
            return failed(f"{url} answered HTTP {code} with a body that is not JSON")
        status = body.get("status") if isinstance(body, dict) else None
        if status not in _STATUSES:
            return failed(f"{url} answered HTTP {response.status_code} without a health status")
        return Observation(
            name,
            MEASUREMENT,
            status,
            "component",
            observed_value=elapsed,
            observed_unit="ms",
            output=_summary(body),
        )

    async def report(self) -> dict[str, Any]:
        """The gateway's full report: its own checks, then one entry per service; worst wins."""
        own, services = await asyncio.gather(self.health.report(), self.check_services())
        now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        checks = dict(own["checks"])
        for observation in services.values():
            checks[observation.key] = [observation.as_json(now)]
        statuses: list[Status] = [own["status"], *(o.status for o in services.values())]
        return {
            **own,
            "status": worst(statuses),
            "description": "health of the gateway and of every service behind it",
            "checks": checks,
        }

    async def overall(self) -> Status:
        """The overall status alone, for the public `/health`.

        Anyone may ask it, and each report asks every service: so one report answers every
        caller while it runs and for `public_max_age` seconds after, and a flood of requests
        costs the services one report per replica and interval, not one per request.
        """
        latest = self._latest
        if latest is not None and time.monotonic() - latest[0] < self.public_max_age:
            return latest[1]
        if self._refreshing is None:
            self._refreshing = asyncio.ensure_future(self._refresh())
        # Shielded: a caller who hangs up does not cancel the report the others wait for.
        return await asyncio.shield(self._refreshing)

    async def _refresh(self) -> Status:
        try:
            status: Status = (await self.report())["status"]
            self._latest = (time.monotonic(), status)
            return status
        finally:
            self._refreshing = None

    def router(self) -> APIRouter:
        """The gateway's `/health` (the overall status only), `/api/admin/health` and
        `/internal/health` (the aggregated report). Mount it ahead of the runtime's health
        router, whose `/health` and `/internal/health` these answer in place of."""
        router = APIRouter(tags=["health"])

        @router.get(
            "/health",
            response_class=HealthResponse,
            status_code=200,
            responses=HEALTH_RESPONSES,
            summary="The system's overall status: pass, warn (200) or fail (503)",
        )
        async def public_health() -> HealthResponse:
            return HealthResponse({"status": await self.overall()})

        @router.get(
            "/api/admin/health",
            response_class=HealthResponse,
            status_code=200,
            responses=ADMIN_HEALTH_RESPONSES,
            dependencies=[Depends(require_roles(Role.ADMIN))],
            summary="The health of the gateway and of every service, check by check",
        )
        async def admin_health() -> HealthResponse:
            return HealthResponse(await self.report())

        @router.get(INTERNAL_HEALTH_PATH, response_class=HealthResponse, include_in_schema=False)
        async def internal_health() -> HealthResponse:
            return HealthResponse(await self.report())

        return router


@dataclass
class _Component:
    """What the monitor remembers of one component between polls."""

    failures: int = 0  # consecutive failed polls
    alerted: bool = False  # a HealthCheckFailed was raised and no recovery since
    incident: str | None = None  # correlation id shared by an outage's Failed and Recovered
    failed_message_id: str | None = None


@dataclass(frozen=True)
class PendingEvent:
    """A transition decided but not yet confirmed by the broker. Its ids are fixed once."""

    event: Event
    message: OutgoingMessage


class HealthMonitor:
    """Polls every service's health and publishes each fail/recover transition exactly once.

    Several gateway replicas each run a monitor and may each publish the same transition (with
    different message ids): that is fine, the notifications service folds repeats of one alert
    (same type and subject within its window) into the open notification instead of adding one.
    """

    def __init__(
        self,
        system: SystemHealth,
        broker: Broker,
        *,
        exchange: str,
        interval: float = 15.0,
        failures_to_alert: int = 3,
        retry_interval: float = 1.0,
        publish_timeout: float = 10.0,
    ) -> None:
        if failures_to_alert < 1:
            raise ValueError("failures_to_alert must be at least 1")
        if interval <= 0 or retry_interval <= 0:
            raise ValueError("intervals must be positive")
        self.system = system
        self.broker = broker
        self.exchange = exchange
        self.interval = interval
        self.failures_to_alert = failures_to_alert
        # How often a pending transition is retried between polls while the broker is away.
        self.retry_interval = min(retry_interval, interval)
        self.publish_timeout = publish_timeout
        self.polls = 0
        self.pending: deque[PendingEvent] = deque()
        self._components: dict[str, _Component] = {}
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="health-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self.pending:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    await self.flush()
        for pending in self.pending:
            log.error(
                "health monitor stopping with %s for %s unpublished (broker unavailable)",
                pending.event.event_type(),
                getattr(pending.event, "component", "?"),
            )

    async def _run(self) -> None:
        next_poll = time.monotonic()
        while True:
            if time.monotonic() >= next_poll:
                next_poll = time.monotonic() + self.interval
                try:
                    await self.check()
                except Exception:
                    log.exception("health monitor poll failed")
            await self.flush()
            delay = next_poll - time.monotonic()
            if self.pending:
                delay = min(delay, self.retry_interval)
            await asyncio.sleep(max(delay, 0.0))

    async def poll(self) -> None:
        """One round: check every service, then publish what turned (or is still pending)."""
        await self.check()
        await self.flush()

    async def check(self) -> None:
        """Check every service and queue an event for each transition; publishes nothing."""
        observations = await self.system.check_services()
        for observation in observations.values():
            self._observe(observation)
        self.polls += 1

    def _observe(self, observation: Observation) -> None:
        component = observation.key
        state = self._components.setdefault(component, _Component())
        if observation.status == "fail":
            state.failures += 1
            if not state.alerted and state.failures >= self.failures_to_alert:
                state.alerted = True
                state.incident = str(uuid.uuid4())
                output = observation.output or "failing its health check"
                output = f"{output} ({state.failures} checks in a row)"
                failed = HealthCheckFailed(component=component, status="fail", output=output)
                state.failed_message_id = self._enqueue(failed, state.incident, None)
            return
        # pass or warn: the component answers healthy enough (200) again.
        state.failures = 0
        if state.alerted:
            state.alerted = False
            event = HealthCheckRecovered(
                component=component,
                status=observation.status,
                output=observation.output or f"answers {observation.status} again",
            )
            self._enqueue(event, state.incident or str(uuid.uuid4()), state.failed_message_id)
            state.incident = state.failed_message_id = None

    def _enqueue(self, event: Event, correlation_id: str, causation_id: str | None) -> str:
        envelope = wrap(
            event,
            message_id=uuid.uuid4(),
            correlation_id=correlation_id,
            causation_id=causation_id,
            producer=PRODUCER,
        )
        message = OutgoingMessage(
            body=envelope.model_dump_json().encode(),
            exchange=self.exchange,
            routing_key=event.routing_key(),
            message_id=str(envelope.message_id),
            correlation_id=envelope.correlation_id,
            type=envelope.type,
        )
        self.pending.append(PendingEvent(event, message))
        with context.correlated(correlation_id, causation_id):
            log.warning(
                "%s: %s %s",
                event.event_type(),
                getattr(event, "component", "?"),
                getattr(event, "output", ""),
            )
        return message.message_id

    async def flush(self) -> int:
        """Publish the pending transitions in order; stop at the first the broker won't confirm.

        Nothing is dropped: what fails stays pending and is retried (every `retry_interval`).
        """
        published = 0
        while self.pending:
            pending = self.pending[0]
            message = pending.message
            with context.correlated(message.correlation_id):
                try:
                    async with asyncio.timeout(self.publish_timeout):
                        await self.broker.publish(message)
                except Exception as exc:
                    log.warning(
                        "could not publish %s for %s, %d pending, will retry: %s",
                        message.type,
                        getattr(pending.event, "component", "?"),
                        len(self.pending),
                        str(exc) or type(exc).__name__,
                    )
                    return published
                log.info("published %s (%s)", message.type, message.message_id)
            self.pending.popleft()
            published += 1
        return published

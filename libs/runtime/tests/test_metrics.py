"""What /metrics tells an operator: one prefix for all of ours, a message's handling timed by
event type, the backlog gauges read on scrape, outcomes counted only once committed, outside
calls counted by result; and the access log, one JSON line per request."""

from __future__ import annotations

import importlib
import json
import logging
import uuid

import aio_pika
import httpx
import pytest
from fastapi import APIRouter
from prometheus_client import REGISTRY, Counter
from prometheus_client.parser import text_string_to_metric_families

from booking.contracts import wrap
from booking.devtools.fixtures import eventually
from booking.runtime import context, host, metrics
from booking.runtime.db import on_commit
from booking.runtime.host import create_service_app
from booking.runtime.logs import configure_logging
from booking.runtime.outside import RetriesExhausted, RetryPolicy, TransientAnswer

# prometheus_client's own collectors, which every process has.
CLIENT_FAMILIES = ("python_gc_", "python_info", "process_")


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of `name{labels}` in a /metrics answer, None when it has no such sample."""
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return found.value
    return None


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def publish(rabbitmq_url: str, settings, event) -> None:
    """`event` on the service's events exchange, as a producer's relay sends it."""
    envelope = wrap(event, message_id=uuid.uuid4(), correlation_id=str(uuid.uuid4()))
    connection = await aio_pika.connect(rabbitmq_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(settings.events_exchange)
        message = aio_pika.Message(
            envelope.model_dump_json().encode(), message_id=str(envelope.message_id)
        )
        await exchange.publish(message, event.routing_key())


async def scrape(runtime) -> str:
    app = create_service_app(runtime)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
        answer = await client.get("/metrics")
    assert answer.status_code == 200
    return answer.text


class TestNames:
    def test_every_metric_of_every_process_has_the_one_prefix(self):
        # Each service's app module, so that whatever they define is registered here too.
        for service in ("gateway", "orders", "payments", "calendar", "notifications"):
            importlib.import_module(f"booking.{service}.app")
        ours = [
            family.name
            for family in REGISTRY.collect()
            if not family.name.startswith(CLIENT_FAMILIES)
        ]
        assert ours
        assert [name for name in ours if not name.startswith(metrics.PREFIX)] == []

    def test_a_child_is_resolved_once(self):
        children = metrics.Children(metrics.MESSAGES_HANDLED)
        first = children("c", "T", "handled")
        assert children("c", "T", "handled") is first
        assert first is metrics.MESSAGES_HANDLED.labels("c", "T", "handled")
        assert children("c", "T", "retried") is not first


class TestConsumerMetrics:
    async def test_a_handled_message_is_timed_by_its_type_and_its_age_observed(
        self, make_service, new_event, rabbitmq_url
    ):
        service = await make_service()
        name = service.runtime.consumer.name
        timed = "booking_message_handler_duration_seconds_count"
        await publish(rabbitmq_url, service.settings, new_event())
        await eventually(
            lambda: value(timed, consumer=name, type="MentorRegistered") == 1,
            what="the handler timed",
        )
        assert value("booking_message_age_seconds_count", consumer=name) == 1
        assert value("booking_message_batch_duration_seconds_count", consumer=name) >= 1
        # Its age: from the event's occurred_at to the commit, so short here but above zero.
        assert 0 < value("booking_message_age_seconds_sum", consumer=name) < 30


class TestGaugesReadOnScrape:
    async def test_the_outbox_lag_is_the_age_of_the_oldest_unsent_event(
        self, make_service, new_event
    ):
        service = await make_service()
        schema = service.tables.schema
        relay = service.runtime.relay
        await relay.stop()
        await service.record(new_event())

        lagging = await scrape(service.runtime)
        assert sample(lagging, "booking_outbox_lag_seconds", schema=schema) > 0

        relay.start()

        async def sent_all() -> bool:
            return await service.unsent() == 0

        await eventually(sent_all, what="the event sent")
        sent = await scrape(service.runtime)
        assert sample(sent, "booking_outbox_lag_seconds", schema=schema) == 0

    async def test_queue_and_dead_letter_depths_are_read_when_scraped(
        self, make_service, new_event, rabbitmq_url
    ):
        async def fails(event, ctx) -> None:
            raise RuntimeError("this message can never be handled")

        service = await make_service(fails)
        queues = service.runtime.consumer.queues
        schema = service.tables.schema
        text = await scrape(service.runtime)
        assert sample(text, "booking_queue_consumers", queue=queues.main) == 1
        assert sample(text, "booking_queue_messages", queue=queues.main) == 0
        assert sample(text, "booking_dead_letter_queue_messages", queue=queues.dead_letter) == 0
        assert sample(text, "booking_dead_letters_waiting", schema=schema) == 0

        await publish(rabbitmq_url, service.settings, new_event())

        async def waiting() -> bool:
            text = await scrape(service.runtime)
            return sample(text, "booking_dead_letters_waiting", schema=schema) == 1

        await eventually(waiting, what="the dead letter counted on scrape")

    async def test_a_refresher_that_fails_leaves_the_scrape_answering(self, make_service):
        service = await make_service(start=False)

        async def broken() -> None:
            raise ConnectionError("the database is away")

        service.runtime.on_scrape(broken)
        text = await scrape(service.runtime)
        assert "booking_http_requests_total" in text


class TestOutcomesCountOnCommit:
    async def test_counted_after_the_commit_and_never_after_a_rollback(self, make_service):
        service = await make_service(start=False)
        counted = Counter("test_outcomes_total", "outcomes of this test", ["run"])
        run = uuid.uuid4().hex
        child = counted.labels(run)
        try:
            async with service.db.transaction() as session:
                on_commit(session, child.inc)
                assert child._value.get() == 0  # not before the commit
            assert child._value.get() == 1

            with pytest.raises(RuntimeError):
                async with service.db.transaction() as session:
                    on_commit(session, child.inc)
                    raise RuntimeError("rolled back")
            assert child._value.get() == 1
        finally:
            REGISTRY.unregister(counted)


class TestOutsideCalls:
    @staticmethod
    def policy(system: str) -> RetryPolicy:
        return RetryPolicy(system, max_attempts=3, base=0.0, retry_after_max=1.0)

    async def test_each_call_is_counted_by_result_timed_and_its_retries_counted(self):
        system = f"Test{uuid.uuid4().hex[:6]}"
        provider = system.lower()
        attempts = []

        async def flaky(attempt: int) -> str:
            attempts.append(attempt)
            if attempt < 3:
                raise TransientAnswer("503", retry_after=None)
            return "answer"

        async def down(attempt: int) -> str:
            raise TransientAnswer("503", retry_after=None)

        async def refuses(attempt: int) -> str:
            raise ValueError("400: no")

        assert await self.policy(system).call("init", flaky) == "answer"
        with pytest.raises(RetriesExhausted):
            await self.policy(system).call("init", down)
        with pytest.raises(ValueError):
            await self.policy(system).call("get", refuses)

        def calls(operation: str, result: str) -> float:
            return value(
                "booking_provider_calls_total",
                provider=provider,
                operation=operation,
                result=result,
            )

        assert calls("init", "ok") == 1
        assert calls("init", "unavailable") == 1
        assert calls("get", "refused") == 1
        assert value("booking_provider_retries_total", provider=provider, operation="init") == 4
        assert value("booking_provider_retries_total", provider=provider, operation="get") == 0
        duration = "booking_provider_call_duration_seconds_count"
        assert value(duration, provider=provider, operation="init") == 2


class TestAccessLog:
    @pytest.fixture
    def logged(self, capsys):
        """Log lines as configure_logging writes them: the JSON objects on stdout."""
        root = logging.getLogger()
        saved = root.handlers[:], root.level, host.access_log.level
        configure_logging("svc", "WARNING")  # access lines do not depend on LOG_LEVEL

        def lines() -> list[dict]:
            out = capsys.readouterr().out.strip().splitlines()
            return [json.loads(line) for line in out if line.startswith("{")]

        yield lines
        root.handlers[:], root.level = saved[0], saved[1]
        host.access_log.setLevel(saved[2])

    @staticmethod
    async def requests(runtime, *paths: str, headers=None) -> None:
        router = APIRouter()

        @router.get("/things/{thing_id}")
        async def thing(thing_id: str) -> dict:
            return {"id": thing_id}

        app = create_service_app(runtime, [router])
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://svc") as client:
            for path in paths:
                await client.get(path, headers=headers)

    async def test_one_json_line_per_request_with_the_route_template(self, make_service, logged):
        service = await make_service(start=False)
        await self.requests(
            service.runtime,
            "/things/secret-42?token=abc",
            "/nowhere",
            headers={"X-Correlation-ID": "booking-7"},
        )

        access = [line for line in logged() if line["logger"] == "booking.access"]
        assert [(a["method"], a["route"], a["status"]) for a in access] == [
            ("GET", "/things/{thing_id}", 200),
            ("GET", "unmatched", 404),
        ]
        first = access[0]
        assert first["message"] == "GET /things/{thing_id} 200"
        assert first["correlation_id"] == "booking-7"
        assert first["level"] == "INFO" and first["service"] == "svc"
        assert isinstance(first["duration_ms"], float) and first["duration_ms"] >= 0
        # The path itself (an id, a token in the query) is never written.
        assert "secret-42" not in json.dumps(access) and "abc" not in json.dumps(access)

    async def test_a_trace_id_on_the_record_is_written_with_it(self, make_service, logged):
        # Tracing adds trace_id to the records while a span is active: the line keeps it.
        def with_trace(record: logging.LogRecord) -> bool:
            record.trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
            return True

        service = await make_service(start=False)
        host.access_log.addFilter(with_trace)
        try:
            await self.requests(service.runtime, "/things/1")
        finally:
            host.access_log.removeFilter(with_trace)
        [line] = [line for line in logged() if line["logger"] == "booking.access"]
        assert line["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"

    async def test_probes_and_scrapes_are_left_out_unless_they_fail(self, make_service, logged):
        service = await make_service(start=False)
        await self.requests(service.runtime, "/health/live", "/metrics", "/health/ready")

        access = [line for line in logged() if line["logger"] == "booking.access"]
        # Not started: no broker, so readiness fails (503) and that one is logged.
        assert [(a["route"], a["status"]) for a in access] == [("/health/ready", 503)]

    async def test_access_log_false_turns_them_off(self, make_service, logged):
        service = await make_service(start=False, access_log=False)
        with context.correlated("booking-8"):
            await self.requests(service.runtime, "/things/1")
        assert [line for line in logged() if line["logger"] == "booking.access"] == []


def test_serve_runs_uvicorn_without_its_own_access_log(monkeypatch):
    # Uvicorn's line would carry the path with its query string (an order link's token).
    from fastapi import FastAPI

    from booking.runtime import cli
    from booking.runtime.settings import RuntimeSettings

    ran: dict = {}
    monkeypatch.setattr(cli.uvicorn, "run", lambda app, **options: ran.update(options))
    monkeypatch.setattr(cli, "settle_the_heap", lambda: None)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        cli.main(
            name="svc",
            settings_type=RuntimeSettings,
            create_app=lambda settings: FastAPI(),
            argv=["serve"],
        )
    finally:
        root.handlers[:], root.level = saved
    assert ran["access_log"] is False
    assert ran["log_config"] is None

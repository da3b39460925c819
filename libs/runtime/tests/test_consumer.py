"""The idempotent consumer: inbox, bounded retries with growing delay, dead letters."""

from __future__ import annotations

import itertools
import json
import logging
import time
import uuid

import aio_pika
import pytest

from booking.contracts import SystemErrorReported, parse_envelope, wrap
from booking.devtools.fixtures import eventually, url_via
from booking.runtime import metrics


async def publish_raw(url: str, exchange: str, routing_key: str, body: bytes, **props) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        target = (
            channel.default_exchange if exchange == "" else await channel.get_exchange(exchange)
        )
        await target.publish(aio_pika.Message(body=body, **props), routing_key)


def envelope_bytes(event, message_id: uuid.UUID | None = None) -> tuple[uuid.UUID, bytes]:
    message_id = message_id or uuid.uuid4()
    envelope = wrap(event, message_id=message_id, correlation_id=str(uuid.uuid4()))
    return message_id, envelope.model_dump_json().encode()


def handled(consumer: str, type_: str, outcome: str) -> float:
    return metrics.MESSAGES_HANDLED.labels(consumer, type_, outcome)._value.get()


async def dead_letters(service) -> list:
    """The dead letters the service keeps (its keeper moved them out of the dead-letter queue)."""
    dead = service.tables.dead_letters
    async with service.db.engine.connect() as conn:
        return list((await conn.execute(dead.select().order_by(dead.c.id))).all())


class TestIdempotentConsumer:
    async def test_the_same_message_delivered_three_times_changes_state_once(
        self, make_service, new_event, rabbitmq_url
    ):
        service = await make_service()
        event = new_event()
        message_id, body = envelope_bytes(event)
        name = service.runtime.consumer.name
        for _ in range(3):
            await publish_raw(
                rabbitmq_url,
                service.settings.events_exchange,
                event.routing_key(),
                body,
                message_id=str(message_id),
            )
        # Counted after each ack, so the three outcomes may be counted in any order.
        await eventually(
            lambda: (
                handled(name, "MentorRegistered", "duplicate") == 2
                and handled(name, "MentorRegistered", "handled") == 1
            ),
            what="one delivery handled and two recognised as duplicates",
        )
        assert await service.effect_count(str(event.mentor_id)) == 1

    async def test_events_recorded_by_a_handler_carry_the_correlation_chain(
        self, make_service, new_event, spy_on, rabbitmq_url
    ):
        async def forward(event, ctx) -> None:
            await ctx.record(new_event("caused"))

        service = await make_service(forward)
        spy = await spy_on(service.settings)
        cause = new_event("cause")
        message_id, body = envelope_bytes(cause)
        await publish_raw(rabbitmq_url, service.settings.events_exchange, cause.routing_key(), body)
        await eventually(lambda: len(spy.messages) >= 2, what="the caused event")
        original = parse_envelope(spy.messages[0].body)
        caused = parse_envelope(spy.messages[1].body)
        assert caused.correlation_id == original.correlation_id
        assert caused.causation_id == str(message_id)


class TestAfterCommitSteps:
    async def test_a_step_runs_after_the_commit_and_sees_the_committed_state(
        self, make_service, new_event, rabbitmq_url
    ):
        seen: list[int] = []
        service = None

        async def record_then_call(event, ctx) -> None:
            await ctx.session.execute(
                service.effects.insert().values(key=str(event.mentor_id), count=1)
            )

            async def step() -> None:
                # A step runs outside the handler's transaction: what it committed is visible.
                seen.append(await service.effect_count(str(event.mentor_id)))

            ctx.call_after_commit(step)

        service = await make_service(record_then_call)
        event = new_event()
        _, body = envelope_bytes(event)
        await publish_raw(rabbitmq_url, service.settings.events_exchange, event.routing_key(), body)
        await eventually(lambda: seen, what="the after-commit step")
        assert seen == [1]

    async def test_a_step_of_a_failed_handler_never_runs(
        self, make_service, new_event, rabbitmq_url
    ):
        ran: list[str] = []

        async def fail_after_registering(event, ctx) -> None:
            async def step() -> None:
                ran.append("step")

            ctx.call_after_commit(step)
            raise RuntimeError("the handler fails after asking for a step")

        service = await make_service(fail_after_registering)
        name = service.runtime.consumer.name
        event = new_event()
        _, body = envelope_bytes(event)
        await publish_raw(rabbitmq_url, service.settings.events_exchange, event.routing_key(), body)
        await eventually(lambda: handled(name, "MentorRegistered", "retried") >= 1, what="a retry")
        assert ran == []


class TestRetriesAndDeadLetters:
    async def test_a_handler_that_always_fails_is_retried_with_growing_delay_then_dead_lettered(
        self, make_service, new_event, spy_on, rabbitmq_url
    ):
        attempts: list[float] = []

        async def always_fails(event, ctx) -> None:
            attempts.append(time.monotonic())
            raise RuntimeError("the handler is broken")

        service = await make_service(
            always_fails, consumer_max_attempts=4, consumer_retry_base_delay_ms=150
        )
        spy = await spy_on(service.settings, "*.system_error_reported")
        event = new_event()
        message_id, body = envelope_bytes(event)
        await publish_raw(
            rabbitmq_url,
            service.settings.events_exchange,
            event.routing_key(),
            body,
            message_id=str(message_id),
        )

        reports = await eventually(
            lambda: spy.of_type("SystemErrorReported"), timeout=20, what="SystemErrorReported"
        )
        assert len(attempts) == 4
        gaps = [b - a for a, b in itertools.pairwise(attempts)]
        for gap, delay in zip(gaps, (0.15, 0.3, 0.6), strict=True):
            assert gap >= delay * 0.9, f"retry came after {gap:.3f}s, before its {delay}s delay"
        # Each wait at least its own, doubling delay: growth shown without racing the clock
        # (a loaded machine may add to any gap, never take from it).
        assert service.runtime.consumer.queues.retry_delays_ms == (150, 300, 600)

        [dead] = await eventually(lambda: dead_letters(service), what="the dead letter")
        assert dead.message_id == str(message_id)
        assert dead.reason == "retries_exhausted"
        assert dead.status == "kept"
        assert "the handler is broken" in dead.error
        assert dead.attempts == 4
        assert dead.consumer == service.runtime.consumer.name
        assert bytes(dead.body) == body  # the message itself, unchanged

        report = SystemErrorReported.model_validate(parse_envelope(reports[0].body).payload)
        assert report.dead_lettered_message_id == str(message_id)
        assert report.dead_letter_id == f"{service.runtime.name}:{dead.id}"
        assert report.consumer == service.runtime.consumer.name
        assert report.attempts == 4
        assert "the handler is broken" in report.error
        assert await service.effect_count(str(event.mentor_id)) == 0

    async def test_a_report_that_cannot_be_handled_is_dead_lettered_without_a_new_report(
        self, make_service, spy_on, rabbitmq_url
    ):
        async def always_fails(event, ctx) -> None:
            raise RuntimeError("the alert store is broken")

        service = await make_service(always_fails, event_type=SystemErrorReported)
        spy = await spy_on(service.settings)
        report = SystemErrorReported(
            service="orders",
            consumer="orders",
            message_type="PaymentCompleted",
            error="boom",
            dead_lettered_message_id=str(uuid.uuid4()),
            attempts=5,
        )
        message_id = uuid.uuid4()
        envelope = wrap(
            report, message_id=message_id, correlation_id=str(uuid.uuid4()), producer="orders"
        )
        await publish_raw(
            rabbitmq_url,
            service.settings.events_exchange,
            envelope.routing_key,
            envelope.model_dump_json().encode(),
            message_id=str(message_id),
        )

        [dead] = await eventually(lambda: dead_letters(service), what="the dead letter")
        assert dead.message_id == str(message_id)
        await spy.settle()
        # Only the report published above: failing on it published nothing, no report of it.
        assert spy.ids() == [str(message_id)]

    async def test_a_handler_that_fails_once_succeeds_on_retry(
        self, make_service, new_event, rabbitmq_url
    ):
        calls = []

        async def flaky(event, ctx) -> None:
            calls.append(1)
            if len(calls) == 1:
                raise ConnectionError("transient")
            await ctx.session.execute(
                service.effects.insert().values(key=str(event.mentor_id), count=1)
            )

        service = await make_service(flaky)
        event = new_event()
        _, body = envelope_bytes(event)
        await publish_raw(rabbitmq_url, service.settings.events_exchange, event.routing_key(), body)
        await eventually(
            lambda: service.effect_count(str(event.mentor_id)), what="the retried handling"
        )
        assert len(calls) == 2
        assert await dead_letters(service) == []


class TestBadInput:
    @pytest.mark.parametrize(
        ("body", "reason_fragment"),
        [
            (b"not json at all", "not a valid envelope"),
            (b'{"type": "MentorRegistered", "version": 1}', "message_id"),
        ],
    )
    async def test_a_malformed_message_is_dead_lettered_and_the_queue_keeps_flowing(
        self, make_service, new_event, spy_on, rabbitmq_url, body, reason_fragment
    ):
        service = await make_service()
        spy = await spy_on(service.settings, "*.system_error_reported")
        exchange = service.settings.events_exchange
        await publish_raw(rabbitmq_url, exchange, "orders.mentor_registered", body)
        good = new_event()
        _, good_body = envelope_bytes(good)
        await publish_raw(rabbitmq_url, exchange, good.routing_key(), good_body)

        await eventually(lambda: service.effect_count(str(good.mentor_id)), what="the good one")
        [dead] = await eventually(lambda: dead_letters(service), what="the dead letter")
        assert bytes(dead.body) == body
        assert dead.reason == "unreadable"
        assert reason_fragment in dead.error
        [report] = await eventually(lambda: spy.of_type("SystemErrorReported"), what="report")
        assert reason_fragment in parse_envelope(report.body).payload["error"]

    async def test_an_unknown_event_version_is_refused_with_a_clear_log_line_and_dead_lettered(
        self, make_service, new_event, spy_on, rabbitmq_url, caplog
    ):
        service = await make_service()
        spy = await spy_on(service.settings, "*.system_error_reported")
        event = new_event()
        message_id, body = envelope_bytes(event)
        future = json.loads(body) | {"version": 99}
        with caplog.at_level(logging.ERROR, logger="booking.runtime.consumer"):
            await publish_raw(
                rabbitmq_url,
                service.settings.events_exchange,
                event.routing_key(),
                json.dumps(future).encode(),
                message_id=str(message_id),
            )
            [dead] = await eventually(lambda: dead_letters(service), what="the dead letter")
        assert "MentorRegistered v99" in dead.error
        assert any(
            "MentorRegistered v99" in r.getMessage() and str(message_id) in r.getMessage()
            for r in caplog.records
        )
        [report] = await eventually(lambda: spy.of_type("SystemErrorReported"), what="report")
        assert parse_envelope(report.body).payload["dead_lettered_message_id"] == str(message_id)
        assert await service.effect_count(str(event.mentor_id)) == 0


class TestABrokenDatabaseIsNotAPoisonMessage:
    async def test_an_outage_pauses_the_consumer_and_spends_no_retry_then_all_is_handled(
        self, postgres_proxy, make_service, new_event, rabbitmq_url, database_url, caplog
    ):
        proxy = postgres_proxy
        service = await make_service(database_url=url_via(database_url, proxy))
        consumer = service.runtime.consumer
        name = consumer.name
        await proxy.cut()
        events = [new_event(f"during-{i}") for i in range(5)]
        with caplog.at_level(logging.WARNING):
            for event in events:
                _, body = envelope_bytes(event)
                await publish_raw(
                    rabbitmq_url, service.settings.events_exchange, event.routing_key(), body
                )
            await eventually(lambda: consumer.paused, what="the consumer paused")

            # Paused: nothing consumed, every delivery handed back to its queue, untouched.
            async def all_waiting_in_the_queue() -> bool:
                ready, consumers = await service.runtime.broker.queue_stats(name)
                return ready == 5 and consumers == 0

            await eventually(all_waiting_in_the_queue, what="the deliveries handed back")
            assert handled(name, "MentorRegistered", "retried") == 0

            await proxy.restore()
            for event in events:
                await eventually(
                    lambda event=event: service.effect_count(str(event.mentor_id)),
                    timeout=30,
                    what="each event handled once the database is back",
                )
        assert not consumer.paused
        assert handled(name, "MentorRegistered", "retried") == 0
        assert handled(name, "MentorRegistered", "dead_lettered") == 0
        assert await dead_letters(service) == []
        for event in events:
            assert await service.effect_count(str(event.mentor_id)) == 1
        # Said once by each part that met it (consumer, relay), not once per delivery, and
        # never with a stack trace.
        outage = [r.getMessage() for r in caplog.records if "unreachable while" in r.getMessage()]
        parts = [line.partition(" unreachable")[0] for line in outage]
        assert outage and len(parts) == len(set(parts)), outage
        assert not any(r.exc_info for r in caplog.records if r.levelno >= logging.WARNING)

    async def test_a_failure_of_the_message_while_the_database_answers_takes_the_retry_path(
        self, make_service, new_event, rabbitmq_url
    ):
        async def rejects(event, ctx) -> None:
            raise ValueError("this message breaks a rule")

        service = await make_service(rejects)
        event = new_event()
        _, body = envelope_bytes(event)
        await publish_raw(rabbitmq_url, service.settings.events_exchange, event.routing_key(), body)
        [dead] = await eventually(lambda: dead_letters(service), what="the dead letter")
        assert dead.reason == "retries_exhausted"
        assert not service.runtime.consumer.paused


class TestTheBrokersOwnDeadLetters:
    async def test_a_message_the_queue_gave_up_on_is_kept_and_reported(
        self, make_service, new_event, spy_on, rabbitmq_url
    ):
        # A consumer that dies on a message before it can ack never reaches its own retry
        # path: the quorum queue counts the deliveries and dead-letters it at its limit.
        service = await make_service(start=False)
        await service.runtime.declare_topology()
        spy = await spy_on(service.settings, "*.system_error_reported")
        queue_name = service.runtime.consumer.name
        event = new_event()
        message_id, body = envelope_bytes(event)
        await publish_raw(
            rabbitmq_url,
            service.settings.events_exchange,
            event.routing_key(),
            body,
            message_id=str(message_id),
        )
        connection = await aio_pika.connect(rabbitmq_url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(queue_name, passive=True)
            while (message := await queue.get(fail=False)) is not None:
                await message.nack(requeue=True)  # as a consumer that died would return it

        await service.runtime.start()
        [dead] = await eventually(lambda: dead_letters(service), what="the broker's dead letter")
        assert dead.reason == "delivery_limit"
        assert dead.message_id == str(message_id)
        assert "delivery limit" in dead.error
        assert bytes(dead.body) == body
        [report] = await eventually(lambda: spy.of_type("SystemErrorReported"), what="report")
        payload = parse_envelope(report.body).payload
        assert payload["dead_letter_id"] == f"{service.runtime.name}:{dead.id}"
        assert payload["dead_lettered_message_id"] == str(message_id)
        assert await service.effect_count(str(event.mentor_id)) == 0

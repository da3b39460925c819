"""The test machinery's cleanup: what a test declares in RabbitMQ is gone at its end."""

from __future__ import annotations

import asyncio
import json
import os
import uuid

import aio_pika
import asyncpg
import pytest
from aio_pika.exceptions import ChannelNotFoundEntity
from sqlalchemy import Column, Integer, MetaData, Table, Text

from booking.devtools.fixtures import (
    consumer_queue_names,
    delete_broker_objects,
    eventually,
    rabbitmqctl,
    schema_differences,
)
from booking.runtime.broker import Broker, ConsumerQueues, ConsumerTopology
from booking.runtime.settings import RuntimeSettings


async def existing(url: str, queues: list[str], exchanges: list[str]) -> list[str]:
    """Which of these names exist, by passive declares (each miss closes its channel)."""
    found = []
    async with await aio_pika.connect(url) as connection:
        for name in [*queues, *exchanges]:
            channel = await connection.channel()
            try:
                if name in queues:
                    await channel.declare_queue(name, passive=True)
                else:
                    await channel.declare_exchange(name, passive=True)
            except ChannelNotFoundEntity:
                continue
            found.append(name)
            await channel.close()
    return found


async def declare_consumer(url: str, settings: RuntimeSettings, consumer: str) -> None:
    """Declare `consumer`'s queues and the exchanges as the runtime does, then disconnect."""
    broker = Broker(
        url,
        client_name="testing-test",
        events_exchange=settings.events_exchange,
        alerts_exchange=settings.admin_alerts_exchange,
    )
    queues = ConsumerQueues.named(
        f"{settings.queue_prefix}{consumer}",
        settings.consumer_max_attempts,
        settings.consumer_retry_base_delay_ms,
    )
    await broker.declare_topology([ConsumerTopology(queues, ("#",))])


class TestDeleteBrokerObjects:
    async def test_every_service_queue_and_both_exchanges_are_deleted(
        self, make_settings, rabbitmq_url
    ):
        settings = make_settings(consumer_max_attempts=4)
        await declare_consumer(rabbitmq_url, settings, "payments")
        names = consumer_queue_names(settings, "payments")
        exchanges = [settings.events_exchange, settings.admin_alerts_exchange]
        # main, three delay queues, dead letters: all of them really were declared
        assert len(await existing(rabbitmq_url, names, exchanges)) == 7

        await delete_broker_objects(rabbitmq_url, settings)

        assert await existing(rabbitmq_url, names, exchanges) == []

    async def test_the_names_are_the_ones_the_running_consumer_uses(self, make_service):
        service = await make_service(consumer_max_attempts=3)
        queues = service.runtime.consumer.queues
        assert consumer_queue_names(service.settings, service.runtime.name) == [
            queues.main,
            queues.retry(1),
            queues.retry(2),
            queues.dead_letter,
        ]

    async def test_without_a_queue_prefix_nothing_is_deleted(self, rabbitmq_url):
        # The default names are a running system's: refusing beats deleting its queues.
        with pytest.raises(ValueError, match="queue_prefix"):
            await delete_broker_objects(rabbitmq_url, RuntimeSettings())


class TestSchemaDifferences:
    """The helper every service's "migrations match the tables" test trusts: a helper that
    always answered [] would let any migration drift through."""

    @pytest.fixture
    async def schema(self, database_url):
        name = f"test_schema_{os.getpid()}"
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute(
                f"CREATE SCHEMA {name}; CREATE TABLE {name}.things (id int PRIMARY KEY)"
            )
            yield name
            await conn.execute(f"DROP SCHEMA {name} CASCADE")
        finally:
            await conn.close()

    def things(self, schema: str, *extra: Column) -> MetaData:
        metadata = MetaData()
        Table("things", metadata, Column("id", Integer, primary_key=True), *extra, schema=schema)
        # Another schema's table in the same metadata: not this schema's business.
        Table("elsewhere", metadata, Column("id", Integer, primary_key=True), schema="other")
        return metadata

    async def test_a_schema_matching_its_tables_has_none(self, database_url, schema):
        assert await schema_differences(database_url, schema, self.things(schema)) == []

    async def test_a_column_the_migrations_lack_is_one(self, database_url, schema):
        metadata = self.things(schema, Column("name", Text))

        found = await schema_differences(database_url, schema, metadata)

        assert [(d[0], d[2], d[3].name) for d in found] == [("add_column", "things", "name")]

    async def test_a_table_the_tables_lack_is_one(self, database_url, schema):
        found = await schema_differences(database_url, schema, MetaData())

        assert [(d[0], d[1].name) for d in found] == [("remove_table", "things")]


class TestSpy:
    async def publish(self, spy, type_: str, payload: dict) -> None:
        exchange = await spy.channel.get_exchange(spy.exchange_name)
        body = json.dumps({"payload": payload}).encode()
        await exchange.publish(aio_pika.Message(body, type=type_), "test.spy")

    async def test_payloads_are_picked_by_type_and_by_field_as_json_renders_it(
        self, make_settings, spy_on
    ):
        spy = await spy_on(make_settings())
        order = uuid.uuid4()
        await self.publish(spy, "PaymentCompleted", {"order_id": str(order), "n": 1})
        await self.publish(spy, "PaymentCompleted", {"order_id": str(uuid.uuid4()), "n": 2})
        await self.publish(spy, "PaymentFailed", {"order_id": str(order), "n": 3})
        await spy.settle()

        assert [p["n"] for p in spy.payloads("PaymentCompleted", order_id=order)] == [1]
        assert [p["n"] for p in spy.payloads("PaymentCompleted", order_id=None)] == [1, 2]
        assert (await spy.one("PaymentFailed", order_id=order))["n"] == 3

    async def test_one_refuses_an_event_that_came_twice(self, make_settings, spy_on):
        spy = await spy_on(make_settings())
        for _ in range(2):
            await self.publish(spy, "PaymentCompleted", {"order_id": "x"})

        with pytest.raises(AssertionError):
            await spy.one("PaymentCompleted", order_id="x")


FAKE_RABBITMQCTL = """#!/bin/sh
# Like the real script: the work is done by a VM it starts, here a sleep that would outlive it.
sleep 300 &
echo $! > "$VM_PIDFILE"
wait
"""


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] == "Z"  # killed, not yet reaped
    except FileNotFoundError:
        return True


async def test_rabbitmqctl_past_its_timeout_kills_the_vm_it_started(tmp_path, monkeypatch):
    script = tmp_path / "rabbitmqctl"
    script.write_text(FAKE_RABBITMQCTL)
    script.chmod(0o755)
    pidfile = tmp_path / "vm.pid"
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("VM_PIDFILE", str(pidfile))

    # Killing only the script would leave its VM holding the output pipe: the call would hang.
    async with asyncio.timeout(30):
        assert await rabbitmqctl("list_queues", timeout=2) is None

    vm = int(pidfile.read_text())
    await eventually(lambda: gone(vm), timeout=5, what=f"the end of process {vm}")

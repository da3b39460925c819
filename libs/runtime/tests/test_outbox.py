"""The transactional outbox and its relay, against the real Postgres and RabbitMQ."""

from __future__ import annotations

import asyncio
import uuid

import aio_pika
import pytest
from sqlalchemy import func, select

from booking.contracts import PaymentFailed, parse_envelope
from booking.devtools.fixtures import TcpProxy, eventually, url_via
from booking.runtime.outbox import OutboxRelay


class Rollback(Exception):
    pass


class TestOutbox:
    async def test_a_rolled_back_event_is_never_published(self, make_service, spy_on, new_event):
        service = await make_service()
        spy = await spy_on(service.settings)
        with pytest.raises(Rollback):
            async with service.db.transaction() as session:
                await service.runtime.outbox.record(session, new_event("ghost"))
                raise Rollback
        # The relay publishes in commit order: once a later event arrives, an earlier one
        # would have arrived before it.
        [later] = await service.record(new_event("later"))
        await eventually(lambda: str(later) in spy.ids(), what="the later event")
        names = [m.body for m in spy.messages]
        assert not any(b'"ghost"' in body for body in names)
        assert len(spy.messages) == 1

    async def test_a_committed_event_is_published_once_with_its_id_persistent(
        self, make_service, spy_on, new_event
    ):
        service = await make_service(start=False)
        spy = await spy_on(service.settings)
        service.runtime.broker.start()
        await service.runtime.broker.wait_ready(10)
        relay = service.runtime.relay
        ids = await service.record(*(new_event(f"m{i}") for i in range(3)))

        assert await relay.relay_batch() == 3  # one claim publishes each row once
        assert await relay.relay_batch() == 0  # and nothing is left to claim
        await eventually(lambda: len(spy.messages) >= 3, what="three deliveries")

        assert sorted(spy.ids()) == sorted(str(i) for i in ids)
        for message in spy.messages:
            assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
            assert message.content_type == "application/json"
            assert message.type == "MentorRegistered"
            assert message.routing_key == "orders.mentor_registered"
        assert await service.unsent() == 0


class TestBrokerOutage:
    async def test_events_wait_in_the_outbox_while_the_broker_is_away_then_all_arrive(
        self, make_service, spy_on, rabbitmq_url, new_event
    ):
        host, port = "127.0.0.1", int(rabbitmq_url.rsplit(":", 1)[1].split("/")[0])
        proxy = TcpProxy(host, port)
        await proxy.start()
        try:
            service = await make_service(rabbitmq_url=url_via(rabbitmq_url, proxy))
            spy = await spy_on(service.settings, url=rabbitmq_url)  # not through the proxy

            await proxy.cut()
            await eventually(lambda: not service.runtime.broker.is_connected, what="the disconnect")
            # The service keeps accepting work: every commit succeeds and waits in the outbox.
            ids = []
            for i in range(20):
                ids += await service.record(new_event(f"during-outage-{i}"))
            assert await service.unsent() == 20
            report = await service.runtime.health.report(ready_only=True)
            assert report["checks"]["rabbitmq:connection"][0]["status"] == "fail"

            await proxy.restore()
            await eventually(
                lambda: set(spy.ids()) >= {str(i) for i in ids},
                timeout=30,
                what="every event delivered after the broker returned",
            )
            # The relay stamps its claim in a transaction it commits after the broker's
            # confirms, so the spy may see the messages a moment before the commit.
            await eventually(lambda: _is_zero(service.unsent()), what="the outbox emptied")
        finally:
            await proxy.stop()


class TestSeveralRelays:
    async def test_two_relays_on_one_outbox_publish_no_row_twice(
        self, make_service, spy_on, new_event
    ):
        service = await make_service(start=False, outbox_batch_size=50)
        spy = await spy_on(service.settings)
        runtime = service.runtime
        runtime.broker.start()
        await runtime.broker.wait_ready(10)
        ids = []
        for _ in range(10):
            ids += await service.record(*(new_event() for _ in range(100)))

        relays = [
            OutboxRelay(
                runtime.db.engine,
                service.tables,
                runtime.broker,
                outbox=runtime.outbox,
                listen_dsn=service.settings.database_url,
                batch_size=50,
                poll_interval=0.2,
            )
            for _ in range(2)
        ]
        for relay in relays:
            relay.start()
        try:
            await eventually(lambda: len(spy.messages) >= 1000, timeout=30, what="1000 deliveries")
            # A sentinel after everything: any duplicate would have arrived before it.
            [sentinel] = await service.record(new_event("sentinel"))
            await eventually(lambda: str(sentinel) in spy.ids(), what="the sentinel")
        finally:
            await asyncio.gather(*(r.stop() for r in relays))
        published = [i for i in spy.ids() if i != str(sentinel)]
        assert len(published) == len(set(published)) == 1000
        assert set(published) == {str(i) for i in ids}


async def _is_zero(count) -> bool:
    return await count == 0


class _Broker:
    """Confirms every publish, but refuses the messages named in `refuse`; or hangs on each."""

    def __init__(self, refuse: frozenset[str] = frozenset(), hang: bool = False) -> None:
        self.refuse = refuse
        self.hang = hang
        self.published: list[str] = []
        self.is_connected = True

    async def publish(self, message) -> None:
        if self.hang:
            await asyncio.Event().wait()
        if message.message_id in self.refuse:
            raise ConnectionError("not confirmed")
        self.published.append(message.message_id)


class TestRelayFailures:
    async def test_an_unconfirmed_row_is_unstamped_and_published_by_the_next_claim(
        self, make_service, new_event
    ):
        service = await make_service(start=False)
        runtime = service.runtime
        ok, refused = await service.record(new_event("ok"), new_event("refused"))
        broker = _Broker(refuse=frozenset({str(refused)}))
        relay = OutboxRelay(
            runtime.db.engine, service.tables, broker, outbox=runtime.outbox, listen_dsn=""
        )

        with pytest.raises(ConnectionError):
            await relay.relay_batch()
        assert broker.published == [str(ok)]
        assert await service.unsent() == 1
        outbox = service.tables.outbox
        async with runtime.db.engine.connect() as conn:
            error = await conn.scalar(
                select(outbox.c.last_error).where(outbox.c.message_id == refused)
            )
        assert error == "not confirmed"

        broker.refuse = frozenset()
        assert await relay.relay_batch() == 1
        assert broker.published == [str(ok), str(refused)]
        assert await service.unsent() == 0

    async def test_a_relay_cancelled_while_publishing_leaves_its_rows_unsent_and_claimable(
        self, make_service, new_event
    ):
        service = await make_service(start=False)
        runtime = service.runtime
        [event] = await service.record(new_event())
        stuck = OutboxRelay(
            runtime.db.engine,
            service.tables,
            _Broker(hang=True),
            outbox=runtime.outbox,
            listen_dsn="",
        )
        claim = asyncio.create_task(stuck.relay_batch())
        # The claim holds its row (locked and stamped, uncommitted) while the publish hangs.
        await eventually(
            lambda: _claimed_elsewhere(runtime.db.engine, service.tables), what="the row claimed"
        )
        claim.cancel()
        with pytest.raises(asyncio.CancelledError):
            await claim

        # Its transaction is gone (rolled back, or closed with its connection): the row is
        # unsent, unlocked, and claimed again through the same pool.
        assert await service.unsent() == 1
        broker = _Broker()
        relay = OutboxRelay(
            runtime.db.engine, service.tables, broker, outbox=runtime.outbox, listen_dsn=""
        )
        assert await relay.relay_batch() == 1
        assert broker.published == [str(event)]


class TestStopping:
    async def test_a_worker_woken_as_it_is_cancelled_ends_cancelled(self, make_service):
        # asyncio.wait_for on Python 3.11 returns the result when it finishes in the same loop
        # step as the cancel (gh-86296): the worker went on polling and stop() never returned.
        service = await make_service(start=False)
        relay = OutboxRelay(
            service.runtime.db.engine,
            service.tables,
            _Broker(),
            outbox=service.runtime.outbox,
            listen_dsn="",
            poll_interval=60,
        )
        waiting = asyncio.create_task(relay.wait_for_work())
        await asyncio.sleep(0)  # one loop step: it now waits for a token
        relay.wake()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting


async def _claimed_elsewhere(engine, tables) -> bool:
    """True once another transaction holds the outbox's only row (SKIP LOCKED skips it)."""
    outbox = tables.outbox
    async with engine.connect() as conn:
        free = await conn.scalar(
            select(func.count()).select_from(
                select(outbox.c.id).with_for_update(skip_locked=True).subquery()
            )
        )
    return free == 0


class TestUnroutableEvents:
    async def test_an_event_no_queue_takes_waits_is_alerted_once_and_goes_out_once_bound(
        self, make_service, spy_on, rabbitmq_url
    ):
        service = await make_service(outbox_unroutable_retry_max_seconds=0.5)
        alerts = await spy_on(service.settings, "*.system_error_reported")
        outbox = service.tables.outbox
        # Nobody binds payments.payment_failed on this test's exchange.
        events = [
            PaymentFailed(order_id=uuid.uuid4(), payment_ref="a" * 24, reason="expired")
            for _ in range(3)
        ]
        ids = await service.record(*events)

        [alert] = await eventually(lambda: alerts.of_type("SystemErrorReported"), what="alert")
        payload = parse_envelope(alert.body).payload
        assert (payload["kind"], payload["message_type"]) == ("unroutable", "PaymentFailed")
        assert "payments.payment_failed" in payload["error"]

        async def tried(times: int) -> bool:
            async with service.db.engine.connect() as conn:
                rows = (
                    await conn.execute(select(outbox).where(outbox.c.message_id.in_(ids)))
                ).all()
            return all(r.sent_at is None and r.attempts >= times for r in rows)

        # Tried again and again, kept each time, and the admins told once for all of them.
        await eventually(lambda: tried(3), timeout=20, what="three tries of each")
        async with service.db.engine.connect() as conn:
            reports = await conn.scalar(
                select(func.count())
                .select_from(outbox)
                .where(outbox.c.event_type == "SystemErrorReported")
            )
            last_error = await conn.scalar(
                select(outbox.c.last_error).where(outbox.c.message_id == ids[0])
            )
        assert reports == 1
        assert "unroutable" in last_error

        # A queue bound to them at last: every one is delivered, once.
        connection = await aio_pika.connect(rabbitmq_url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue(exclusive=True, auto_delete=True)
            await queue.bind(service.settings.events_exchange, "payments.payment_failed")
            received: list[str] = []

            async def keep(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                assert message.message_id is not None  # the relay names every message
                received.append(message.message_id)

            await queue.consume(keep, no_ack=True)
            await eventually(
                lambda: sorted(received) == sorted(str(i) for i in ids),
                timeout=20,
                what="the kept events delivered once bound",
            )
        await eventually(lambda: _is_zero(service.unsent()), what="the outbox emptied")

    async def test_an_event_kept_for_days_waits_the_longest_pause_and_no_more(self, make_service):
        # Tried thousands of times: the doubling pause stops at its maximum (2**9999 seconds
        # would overflow the database's arithmetic and stall the relay on every batch).
        service = await make_service(start=False, outbox_unroutable_retry_max_seconds=30)
        service.runtime.broker.start()
        await service.runtime.broker.wait_ready(10)
        outbox = service.tables.outbox
        [message_id] = await service.record(
            PaymentFailed(order_id=uuid.uuid4(), payment_ref="b" * 24, reason="expired")
        )
        async with service.db.transaction() as session:
            await session.execute(
                outbox.update().where(outbox.c.message_id == message_id).values(attempts=10_000)
            )
        assert await service.runtime.relay.relay_batch() == 0  # kept: nobody takes it
        async with service.db.engine.connect() as conn:
            row = (
                await conn.execute(select(outbox).where(outbox.c.message_id == message_id))
            ).one()
            waits = await conn.scalar(select(row.next_attempt_at - func.clock_timestamp()))
        assert row.sent_at is None
        assert 25 < waits.total_seconds() <= 30


class TestLinger:
    """Busy, a woken relay waits a moment so that the commits landing meanwhile share its claim;
    idle, it claims at once."""

    async def _relay(self, make_service, linger):
        service = await make_service(start=False)
        broker = _Broker()
        relay = OutboxRelay(
            service.runtime.db.engine,
            service.tables,
            broker,
            outbox=service.runtime.outbox,
            listen_dsn=service.settings.database_url,
            poll_interval=60,  # only the commits' NOTIFY wakes it
            linger=linger,
            concurrency=1,
        )
        batches: list[int] = []
        claim = relay.relay_batch

        async def counted() -> int:
            published = await claim()
            if published:
                batches.append(published)
            return published

        relay.relay_batch = counted  # type: ignore[method-assign]
        return service, relay, batches

    async def test_under_load_the_commits_of_the_linger_share_one_claim(
        self, make_service, new_event
    ):
        service, relay, batches = await self._relay(make_service, linger=0.5)
        await service.record(new_event(), new_event())
        relay.start()
        try:
            await eventually(lambda: batches == [2], what="the first batch of two")
            for _ in range(3):  # three commits 50 ms apart, each waking the relay
                await service.record(new_event())
                await asyncio.sleep(0.05)  # the pace of the arrivals, not a wait for an event
            # batches, not broker.published: a batch counts once its claim is stamped sent
            await eventually(lambda: sum(batches) == 5, what="all five published")
        finally:
            await relay.stop()
        assert batches == [2, 3]

    async def test_idle_a_commit_is_claimed_at_once(self, make_service, new_event):
        # A linger far longer than the wait: only a relay that does not linger when idle
        # publishes in time.
        service, relay, batches = await self._relay(make_service, linger=60)
        relay.start()
        try:
            for expected in (1, 2):
                await service.record(new_event())
                await eventually(lambda n=expected: len(batches) == n, timeout=5)
        finally:
            await relay.stop()
        assert batches == [1, 1]


class TestRecordAll:
    async def test_several_events_in_one_statement_in_their_order_each_id_once(
        self, make_service, new_event
    ):
        service = await make_service(start=False)
        outbox = service.runtime.outbox
        again = uuid.uuid4()
        async with service.db.transaction() as session:
            await outbox.record_all(
                session,
                [
                    (new_event("first"), again, None),
                    (new_event("second"), None, "elsewhere"),
                    (new_event("first, again"), again, None),
                ],
            )
        table = service.tables.outbox
        async with service.db.engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(table.c.message_id, table.c.exchange, table.c.body).order_by(table.c.id)
                )
            ).all()
        assert len(rows) == 2
        assert rows[0].message_id == again and '"first"' in rows[0].body
        assert rows[0].exchange == service.settings.events_exchange
        assert rows[1].exchange == "elsewhere" and '"second"' in rows[1].body

"""Dead letters an admin lists, inspects, replays and discards, over the service's HTTP routes."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import func, select, update

from booking.devtools.fixtures import eventually
from booking.runtime.auth import issue_token
from booking.runtime.host import create_service_app
from booking.runtime.housekeeping import Housekeeping

from .test_consumer import dead_letters, envelope_bytes, handled, publish_raw


class Switch:
    """A handler that fails while `broken` is set (a bug an admin fixes, then replays)."""

    def __init__(self) -> None:
        self.broken = True


@pytest.fixture
async def failing_service(make_service):
    switch = Switch()
    service = None

    async def handler(event, ctx) -> None:
        if switch.broken:
            raise RuntimeError("the handler is broken")
        await ctx.session.execute(
            service.effects.insert().values(key=str(event.mentor_id), count=1)
        )

    service = await make_service(handler)
    return service, switch


@pytest.fixture
async def admin_api(failing_service) -> AsyncIterator[httpx.AsyncClient]:
    service, _ = failing_service
    app = create_service_app(service.runtime)  # the runtime is already started
    secret = service.settings.auth_jwt_secret.get_secret_value()
    headers = {"Authorization": f"Bearer {issue_token(secret, 'admin-9', 'admin')}"}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://svc", headers=headers) as c:
        yield c


async def dead_letter_of(service, rabbitmq_url, event) -> tuple[uuid.UUID, bytes, str]:
    message_id, body = envelope_bytes(event)
    await publish_raw(
        rabbitmq_url,
        service.settings.events_exchange,
        event.routing_key(),
        body,
        message_id=str(message_id),
    )

    async def kept() -> list:
        return [d for d in await dead_letters(service) if d.message_id == str(message_id)]

    found: list = await eventually(kept, what="the dead letter")
    [dead] = found
    return message_id, body, f"{service.runtime.name}:{dead.id}"


async def audit_rows(service) -> list:
    actions = service.tables.admin_actions
    async with service.db.engine.connect() as conn:
        return list((await conn.execute(select(actions).order_by(actions.c.id))).all())


class TestListingAndReading:
    async def test_a_dead_letter_is_listed_and_read_with_its_whole_envelope(
        self, failing_service, admin_api, new_event, rabbitmq_url
    ):
        service, _ = failing_service
        event = new_event()
        message_id, _, dead_id = await dead_letter_of(service, rabbitmq_url, event)

        page = (await admin_api.get("/api/admin/dead-letters")).json()
        [item] = page["items"]
        assert item["id"] == dead_id
        assert (item["message_id"], item["type"], item["status"]) == (
            str(message_id),
            "MentorRegistered",
            "kept",
        )
        assert item["attempts"] == service.settings.consumer_max_attempts
        assert "the handler is broken" in item["error"]

        one = (await admin_api.get(f"/api/admin/dead-letters/{dead_id}")).json()
        assert one["envelope"]["message_id"] == str(message_id)
        assert one["envelope"]["payload"]["mentor_id"] == str(event.mentor_id)
        assert one["consumer"] == service.runtime.consumer.name
        assert one["reason"] == "retries_exhausted"

    async def test_pages_follow_the_cursor_newest_first(
        self, failing_service, admin_api, new_event, rabbitmq_url
    ):
        service, _ = failing_service
        for _ in range(3):
            await dead_letter_of(service, rabbitmq_url, new_event())

        first = (await admin_api.get("/api/admin/dead-letters", params={"limit": 2})).json()
        assert len(first["items"]) == 2 and first["next_cursor"]
        rest = (
            await admin_api.get(
                "/api/admin/dead-letters", params={"limit": 2, "cursor": first["next_cursor"]}
            )
        ).json()
        assert len(rest["items"]) == 1 and rest["next_cursor"] is None
        ids = [i["id"] for i in first["items"] + rest["items"]]
        numbers = [int(i.split(":")[1]) for i in ids]
        assert numbers == sorted(numbers, reverse=True)

    async def test_an_unknown_id_is_404_and_a_bad_cursor_422(self, failing_service, admin_api):
        service, _ = failing_service
        for path in (
            "/api/admin/dead-letters/nope:1",
            f"/api/admin/dead-letters/{service.runtime.name}:999",
        ):
            answer = await admin_api.get(path)
            assert answer.status_code == 404, answer.text
            assert answer.headers["content-type"] == "application/problem+json"
        answer = await admin_api.get("/api/admin/dead-letters", params={"cursor": "garbage"})
        assert answer.status_code == 422

    async def test_a_type_with_a_nul_is_422_not_a_500(self, failing_service, admin_api):
        # Postgres cannot compare text with a NUL in it: the database would refuse the query.
        listed = await admin_api.get("/api/admin/dead-letters", params={"type": "Order\x00Paid"})
        assert listed.status_code == 422, listed.text
        assert listed.headers["content-type"] == "application/problem+json"

    async def test_only_an_admin_may_see_them(self, failing_service, admin_api):
        service, _ = failing_service
        secret = service.settings.auth_jwt_secret.get_secret_value()
        mentee = {"Authorization": f"Bearer {issue_token(secret, 'm-1', 'mentee')}"}
        assert (await admin_api.get("/api/admin/dead-letters", headers=mentee)).status_code == 403
        assert (
            await admin_api.get("/api/admin/dead-letters", headers={"Authorization": ""})
        ).status_code == 401


class TestReplay:
    async def test_a_replay_after_the_fix_applies_the_message_once_and_is_audited(
        self, failing_service, admin_api, new_event, rabbitmq_url, spy_on
    ):
        service, switch = failing_service
        spy = await spy_on(service.settings)
        event = new_event()
        _, _, dead_id = await dead_letter_of(service, rabbitmq_url, event)
        switch.broken = False

        replayed = await admin_api.post(
            f"/api/admin/dead-letters/{dead_id}/replay", json={"reason": "bug fixed"}
        )
        assert replayed.status_code == 200, replayed.text
        assert replayed.json()["status"] == "replayed"
        assert replayed.json()["decided_by"] == "admin-9"
        await eventually(lambda: service.effect_count(str(event.mentor_id)), what="the replay")

        # The same replay again: 200, the same state, nothing sent, nothing audited again.
        again = await admin_api.post(f"/api/admin/dead-letters/{dead_id}/replay")
        assert again.status_code == 200
        assert again.json()["status"] == "replayed"
        assert again.json()["replayed_at"] == replayed.json()["replayed_at"]
        [audit] = await audit_rows(service)
        assert (audit.action, audit.by, audit.reason, audit.dead_letter_id) == (
            "replay_dead_letter",
            "admin-9",
            "bug fixed",
            dead_id,
        )
        [recorded] = await eventually(lambda: spy.of_type("AdminActionRecorded"), what="audit")
        await spy.settle()
        assert len(spy.of_type("AdminActionRecorded")) == 1
        assert recorded.routing_key == f"{service.runtime.name}.admin_action_recorded"
        assert await service.effect_count(str(event.mentor_id)) == 1

    async def test_a_replay_of_a_message_already_applied_changes_nothing(
        self, failing_service, admin_api, new_event, rabbitmq_url
    ):
        # A consumer that crashed after its commit and before its ack: the message was applied
        # (its inbox record is there), yet the broker dead-lettered it.
        service, switch = failing_service
        switch.broken = False
        event = new_event()
        message_id, body = envelope_bytes(event)
        await publish_raw(rabbitmq_url, service.settings.events_exchange, event.routing_key(), body)
        await eventually(lambda: service.effect_count(str(event.mentor_id)), what="applied")
        await publish_raw(
            rabbitmq_url,
            "",
            service.runtime.consumer.queues.dead_letter,
            body,
            message_id=str(message_id),
            headers={"x-death": [{"count": 10, "reason": "delivery_limit"}]},
        )
        [dead] = await eventually(lambda: dead_letters(service), what="the dead letter")
        dead_id = f"{service.runtime.name}:{dead.id}"
        assert (
            await admin_api.post(f"/api/admin/dead-letters/{dead_id}/replay")
        ).status_code == 200

        # The replay went through the inbox: handled as a duplicate, applied no second time.
        name = service.runtime.consumer.name
        await eventually(
            lambda: handled(name, "MentorRegistered", "duplicate") >= 1, what="the replay seen"
        )
        assert await service.effect_count(str(event.mentor_id)) == 1

    async def test_replay_all_takes_every_kept_one_of_the_type(
        self, failing_service, admin_api, new_event, rabbitmq_url
    ):
        service, switch = failing_service
        events = [new_event() for _ in range(2)]
        for event in events:
            await dead_letter_of(service, rabbitmq_url, event)
        switch.broken = False
        other = await admin_api.post(
            "/api/admin/dead-letters/replay", json={"type": "PaymentCompleted"}
        )
        assert other.json() == {"replayed": 0}
        answer = await admin_api.post(
            "/api/admin/dead-letters/replay", json={"type": "MentorRegistered"}
        )
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"replayed": 2}
        for event in events:
            await eventually(
                lambda event=event: service.effect_count(str(event.mentor_id)), what="replayed"
            )
        assert (await admin_api.post("/api/admin/dead-letters/replay", json={})).json() == {
            "replayed": 0
        }
        assert len(await audit_rows(service)) == 2

    async def test_a_message_that_fails_again_after_a_replay_is_kept_again(
        self, failing_service, admin_api, new_event, rabbitmq_url
    ):
        service, _ = failing_service  # still broken
        _, _, dead_id = await dead_letter_of(service, rabbitmq_url, new_event())
        await admin_api.post(f"/api/admin/dead-letters/{dead_id}/replay")

        async def kept_again() -> bool:
            [dead] = await dead_letters(service)
            return dead.status == "kept" and dead.times == 2

        await eventually(kept_again, timeout=20, what="the replayed message kept again")
        # And it can be replayed once more: a new send, not the first one's.
        again = await admin_api.post(f"/api/admin/dead-letters/{dead_id}/replay")
        assert again.json()["status"] == "replayed"


class TestDiscard:
    async def test_a_discard_needs_a_reason_is_audited_and_repeats_harmlessly(
        self, failing_service, admin_api, new_event, rabbitmq_url
    ):
        service, _ = failing_service
        _, _, dead_id = await dead_letter_of(service, rabbitmq_url, new_event())
        no_reason = await admin_api.post(f"/api/admin/dead-letters/{dead_id}/discard", json={})
        assert no_reason.status_code == 422

        discarded = await admin_api.post(
            f"/api/admin/dead-letters/{dead_id}/discard", json={"reason": "a test message"}
        )
        assert discarded.status_code == 200, discarded.text
        assert discarded.json()["status"] == "discarded"
        assert discarded.json()["decision_reason"] == "a test message"
        again = await admin_api.post(
            f"/api/admin/dead-letters/{dead_id}/discard", json={"reason": "again"}
        )
        assert again.status_code == 200
        assert again.json()["decision_reason"] == "a test message"
        # A discarded dead letter is never replayed.
        refused = await admin_api.post(f"/api/admin/dead-letters/{dead_id}/replay")
        assert refused.status_code == 409
        assert "discarded" in refused.json()["detail"]
        [audit] = await audit_rows(service)
        assert audit.action == "discard_dead_letter"

    async def test_a_replayed_one_cannot_be_discarded(
        self, failing_service, admin_api, new_event, rabbitmq_url
    ):
        service, switch = failing_service
        _, _, dead_id = await dead_letter_of(service, rabbitmq_url, new_event())
        switch.broken = False
        await admin_api.post(f"/api/admin/dead-letters/{dead_id}/replay")
        refused = await admin_api.post(
            f"/api/admin/dead-letters/{dead_id}/discard", json={"reason": "too late"}
        )
        assert refused.status_code == 409


class TestTheInboxKeepsWhatADeadLetterNeeds:
    async def test_an_old_inbox_record_stays_while_its_dead_letter_is_kept(
        self, failing_service, admin_api, new_event, rabbitmq_url
    ):
        service, switch = failing_service
        switch.broken = False
        event = new_event()
        message_id, body = envelope_bytes(event)
        await publish_raw(rabbitmq_url, service.settings.events_exchange, event.routing_key(), body)
        await eventually(lambda: service.effect_count(str(event.mentor_id)), what="applied")
        await publish_raw(rabbitmq_url, "", service.runtime.consumer.queues.dead_letter, body)
        [dead] = await eventually(lambda: dead_letters(service), what="the dead letter")
        inbox = service.tables.inbox
        async with service.db.transaction() as session:
            await session.execute(update(inbox).values(handled_at=func.now() - timedelta(days=400)))
        housekeeping = Housekeeping(
            service.db.engine,
            service.tables,
            outbox_retention=timedelta(days=7),
            inbox_retention=timedelta(days=30),
        )

        async def inbox_ids() -> set[uuid.UUID]:
            async with service.db.engine.connect() as conn:
                return set(await conn.scalars(select(inbox.c.message_id)))

        await housekeeping.prune()
        assert message_id in await inbox_ids()
        await admin_api.post(
            f"/api/admin/dead-letters/{service.runtime.name}:{dead.id}/discard",
            json={"reason": "applied already"},
        )
        await housekeeping.prune()
        assert message_id not in await inbox_ids()

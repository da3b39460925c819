"""Mentors and their identity-provider subjects over real HTTP: a subject given at registration
or linked by an admin acts as its mentor, one mentor per subject, each link announced and
audited once."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from sqlalchemy import text

from booking.runtime.auth import Role

OFFERING = {
    "title": "Career chat",
    "duration_minutes": 60,
    "price": {"amount": 120_000, "currency": "TND"},
}


def subject() -> str:
    """A subject as an identity provider gives one (Auth0's shape): never a mentor's id."""
    return f"auth0|{uuid.uuid4().hex}"


async def register(orders, headers: dict[str, str] | None = None, **fields: Any):
    body = {
        "name": "Amel Ben Salah",
        "email": f"amel.{uuid.uuid4().hex[:8]}@example.com",
        "timezone": "Africa/Tunis",
        **fields,
    }
    return await orders.client.post("/api/mentors", json=body, headers=headers or orders.admin)


async def registered(orders, **fields: Any) -> dict[str, Any]:
    answer = await register(orders, **fields)
    assert answer.status_code == 201, answer.text
    return answer.json()


async def add_offering(orders, mentor_id: str, headers: dict[str, str]):
    return await orders.client.post(
        f"/api/mentors/{mentor_id}/offerings", json=OFFERING, headers=headers
    )


async def offerings_of(orders, mentor_id: str) -> int:
    sql = "SELECT count(*) FROM orders.offerings WHERE mentor_id = :m"
    return await orders.scalar(sql, m=mentor_id)


async def link(orders, mentor_id: str, body: Any, headers: dict[str, str] | None = None):
    return await orders.client.put(
        f"/api/admin/mentors/{mentor_id}/identity", json=body, headers=headers or orders.admin
    )


async def stored_subject(orders, mentor_id: str) -> str | None:
    sql = "SELECT identity_subject FROM orders.mentors WHERE id = :m"
    return await orders.scalar(sql, m=mentor_id)


async def audit_rows(orders, mentor_id: str) -> list[dict[str, Any]]:
    """The mentor's link audit rows (the detail names the mentor; the table is every test's)."""
    async with orders.engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT * FROM orders.admin_actions WHERE action = 'link_mentor_identity' "
                "AND detail LIKE :like ORDER BY id"
            ),
            {"like": f"%{mentor_id}%"},
        )
        return [dict(row._mapping) for row in rows]


class TestRegisteringWithASubject:
    async def test_the_subject_is_stored_shown_and_announced(self, orders) -> None:
        sub = subject()
        mentor = await registered(orders, identity_subject=f"  {sub}  ")

        assert mentor["identity_subject"] == sub
        read = await orders.client.get(f"/api/mentors/{mentor['id']}", headers=orders.admin)
        assert read.json() == mentor
        assert await stored_subject(orders, mentor["id"]) == sub
        await orders.quiet()
        [announced] = orders.events("MentorRegistered", mentor_id=mentor["id"])
        assert announced["identity_subject"] == sub

    async def test_only_an_admin_and_the_mentor_read_the_subject(self, orders) -> None:
        sub = subject()
        mentor = await registered(orders, identity_subject=sub)
        path = f"/api/mentors/{mentor['id']}"

        as_mentee = await orders.client.get(path, headers=orders.token(Role.MENTEE, subject()))
        as_other = await orders.client.get(path, headers=orders.token(Role.MENTOR, subject()))
        as_himself = await orders.client.get(path, headers=orders.token(Role.MENTOR, sub))

        assert as_mentee.json() == {**mentor, "identity_subject": None}
        assert as_other.json() == {**mentor, "identity_subject": None}
        assert as_himself.json() == mentor

    async def test_a_subject_another_mentor_has_is_409_and_stores_nothing(self, orders) -> None:
        sub = subject()
        first = await registered(orders, identity_subject=sub)
        before = await orders.scalar("SELECT count(*) FROM orders.mentors")

        body = orders.problem(await register(orders, identity_subject=sub), 409)

        assert "another mentor" in body["detail"]
        assert await orders.scalar("SELECT count(*) FROM orders.mentors") == before
        await orders.quiet()
        assert [e["mentor_id"] for e in orders.events("MentorRegistered")] == [first["id"]]

    async def test_another_mentors_id_as_subject_is_409(self, orders) -> None:
        other = await registered(orders)
        orders.problem(await register(orders, identity_subject=other["id"]), 409)

    async def test_mentors_without_a_subject_do_not_collide(self, orders) -> None:
        for _ in range(2):
            assert (await registered(orders))["identity_subject"] is None

    @pytest.mark.parametrize(
        "value",
        ["", "   ", "auth0|a b", "sub\u0000", "s\u00e9bastien", "x" * 256, 42],
        ids=["empty", "blank", "inner space", "NUL", "not ASCII", "too long", "not text"],
    )
    async def test_a_bad_subject_is_a_422_problem_and_stores_nothing(
        self, orders, value: Any
    ) -> None:
        before = await orders.scalar("SELECT count(*) FROM orders.mentors")
        orders.problem(await register(orders, identity_subject=value), 422)
        assert await orders.scalar("SELECT count(*) FROM orders.mentors") == before


class TestActingAsAMentor:
    """Adding offerings: an admin, or a mentor token whose `sub` is the mentor's id or its
    identity subject; the rule is `acts_as_mentor`'s."""

    async def test_a_token_with_the_subject_acts_as_that_mentor_and_no_other(self, orders) -> None:
        sub = subject()
        mine = await registered(orders, identity_subject=sub)
        other = await registered(orders, identity_subject=subject())
        token = orders.token(Role.MENTOR, sub)

        added = await add_offering(orders, mine["id"], token)
        refused = await add_offering(orders, other["id"], token)

        assert added.status_code == 201, added.text
        assert added.json()["mentor_id"] == mine["id"]
        orders.problem(refused, 403)
        assert await offerings_of(orders, other["id"]) == 0

    async def test_a_mentor_token_with_another_subject_is_403(self, orders) -> None:
        mentor = await registered(orders, identity_subject=subject())

        for sub in (subject(), str(uuid.uuid4())):
            orders.problem(
                await add_offering(orders, mentor["id"], orders.token(Role.MENTOR, sub)), 403
            )
        assert await offerings_of(orders, mentor["id"]) == 0

    async def test_the_subject_in_another_role_does_not_act_as_the_mentor(self, orders) -> None:
        sub = subject()
        mentor = await registered(orders, identity_subject=sub)
        orders.problem(
            await add_offering(orders, mentor["id"], orders.token(Role.MENTEE, sub)), 403
        )
        assert await offerings_of(orders, mentor["id"]) == 0

    async def test_the_mentors_own_id_still_acts_as_the_mentor(self, orders) -> None:
        mentor = await registered(orders, identity_subject=subject())
        added = await add_offering(orders, mentor["id"], orders.token(Role.MENTOR, mentor["id"]))
        assert added.status_code == 201, added.text

    async def test_another_mentor_learns_nothing_of_an_unknown_mentor(self, orders) -> None:
        unknown = str(uuid.uuid4())
        refused = await add_offering(orders, unknown, orders.token(Role.MENTOR, subject()))
        orders.problem(refused, 403)
        orders.problem(await add_offering(orders, unknown, orders.admin), 404)


class TestLinkingASubject:
    """PUT /api/admin/mentors/{id}/identity: linked, announced and audited once; a repeat
    answers the mentor as it is."""

    async def test_a_link_acts_at_once_is_announced_and_audited(self, orders) -> None:
        mentor = await registered(orders)
        sub = subject()

        answer = await link(orders, mentor["id"], {"identity_subject": sub, "reason": " moved "})

        assert answer.status_code == 200, answer.text
        assert answer.json() == {**mentor, "identity_subject": sub}
        added = await add_offering(orders, mentor["id"], orders.token(Role.MENTOR, sub))
        assert added.status_code == 201, added.text
        await orders.quiet()
        [linked] = orders.events("MentorIdentityLinked", mentor_id=mentor["id"])
        assert {k: v for k, v in linked.items() if k != "linked_at"} == {
            "mentor_id": mentor["id"],
            "identity_subject": sub,
            "previous_subject": None,
            "by": "admin-1",
            "reason": "moved",
            "sequence": 1,
        }
        [audit] = await audit_rows(orders, mentor["id"])
        assert (audit["by"], audit["reason"]) == ("admin-1", "moved")
        assert mentor["id"] in audit["detail"] and sub in audit["detail"]
        [recorded] = [
            e
            for e in orders.events("AdminActionRecorded", action="link_mentor_identity")
            if mentor["id"] in e["detail"]
        ]
        assert recorded["service"] == "orders" and recorded["by"] == "admin-1"

    async def test_a_repeat_answers_the_mentor_and_announces_and_audits_nothing(
        self, orders
    ) -> None:
        mentor = await registered(orders)
        body = {"identity_subject": subject(), "reason": "first"}
        first = await link(orders, mentor["id"], body)
        repeats = await asyncio.gather(
            *(link(orders, mentor["id"], {**body, "reason": f"click {i}"}) for i in range(4))
        )

        assert {r.status_code for r in (first, *repeats)} == {200}
        assert all(r.json() == first.json() for r in repeats)
        await orders.quiet()
        assert len(orders.events("MentorIdentityLinked", mentor_id=mentor["id"])) == 1
        assert [a["reason"] for a in await audit_rows(orders, mentor["id"])] == ["first"]

    async def test_a_new_subject_replaces_the_old_one_which_acts_no_more(self, orders) -> None:
        old, new = subject(), subject()
        mentor = await registered(orders, identity_subject=old)

        answer = await link(orders, mentor["id"], {"identity_subject": new, "reason": "new IdP"})

        assert answer.json()["identity_subject"] == new
        orders.problem(
            await add_offering(orders, mentor["id"], orders.token(Role.MENTOR, old)), 403
        )
        added = await add_offering(orders, mentor["id"], orders.token(Role.MENTOR, new))
        assert added.status_code == 201, added.text
        await orders.quiet()
        [linked] = orders.events("MentorIdentityLinked", mentor_id=mentor["id"])
        assert (linked["previous_subject"], linked["sequence"]) == (old, 1)
        # The old subject is free again: another mentor may have it.
        assert (await registered(orders, identity_subject=old))["identity_subject"] == old

    async def test_each_change_counts_up_the_sequence(self, orders) -> None:
        mentor = await registered(orders)
        for sub in (subject(), subject(), subject()):
            answer = await link(orders, mentor["id"], {"identity_subject": sub, "reason": "r"})
            assert answer.status_code == 200, answer.text
        await orders.quiet()
        linked = orders.events("MentorIdentityLinked", mentor_id=mentor["id"])
        assert sorted(e["sequence"] for e in linked) == [1, 2, 3]
        assert len(await audit_rows(orders, mentor["id"])) == 3

    async def test_a_subject_another_mentor_has_is_409_and_nothing_changes(self, orders) -> None:
        sub = subject()
        await registered(orders, identity_subject=sub)
        mentor = await registered(orders)

        body = orders.problem(
            await link(orders, mentor["id"], {"identity_subject": sub, "reason": "r"}), 409
        )

        assert "another mentor" in body["detail"]
        assert await stored_subject(orders, mentor["id"]) is None
        await orders.quiet()
        assert orders.events("MentorIdentityLinked", mentor_id=mentor["id"]) == []
        assert await audit_rows(orders, mentor["id"]) == []

    async def test_another_mentors_id_as_subject_is_409(self, orders) -> None:
        other = await registered(orders)
        mentor = await registered(orders)
        answer = await link(orders, mentor["id"], {"identity_subject": other["id"], "reason": "r"})
        orders.problem(answer, 409)
        assert await stored_subject(orders, mentor["id"]) is None

    async def test_an_unknown_mentor_is_404_and_a_malformed_id_422(self, orders) -> None:
        unknown = str(uuid.uuid4())
        body = {"identity_subject": subject(), "reason": "r"}
        orders.problem(await link(orders, unknown, body), 404)
        orders.problem(await link(orders, "not-a-mentor-id", body), 422)
        assert await audit_rows(orders, unknown) == []

    @pytest.mark.parametrize(
        ("who", "status"), [("mentee", 403), ("mentor", 403), ("nobody", 401), ("forged", 401)]
    )
    async def test_only_an_admin_links(self, orders, who: str, status: int) -> None:
        mentor = await registered(orders)
        headers = {
            "mentee": orders.mentee(),
            "mentor": orders.token(Role.MENTOR, mentor["id"]),  # even the mentor itself
            "nobody": {},
            "forged": {"Authorization": "Bearer not.a.token"},
        }[who]
        answer = await orders.client.put(
            f"/api/admin/mentors/{mentor['id']}/identity",
            json={"identity_subject": subject(), "reason": "r"},
            headers=headers,
        )
        orders.problem(answer, status)
        assert await stored_subject(orders, mentor["id"]) is None
        assert await audit_rows(orders, mentor["id"]) == []

    @pytest.mark.parametrize(
        "body",
        [
            {},
            {"reason": "r"},
            {"identity_subject": "auth0|x"},
            {"identity_subject": "", "reason": "r"},
            {"identity_subject": "a b", "reason": "r"},
            {"identity_subject": "x" * 256, "reason": "r"},
            {"identity_subject": None, "reason": "r"},
            {"identity_subject": "auth0|x", "reason": "   "},
            {"identity_subject": "auth0|x", "reason": "r", "by": "someone-else"},
            ["auth0|x"],
        ],
        ids=[
            "empty",
            "no subject",
            "no reason",
            "empty subject",
            "space in subject",
            "subject too long",
            "null subject",
            "blank reason",
            "extra field",
            "not an object",
        ],
    )
    async def test_a_bad_body_is_422_and_nothing_changes(self, orders, body: Any) -> None:
        mentor = await registered(orders)
        orders.problem(await link(orders, mentor["id"], body), 422)
        assert await stored_subject(orders, mentor["id"]) is None
        assert await audit_rows(orders, mentor["id"]) == []

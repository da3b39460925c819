"""Rotating TOKEN_ENCRYPTION_KEY: `rotate_token_key` (and `python -m booking.calendar
rotate-token-key`) re-encrypts every stored refresh token with the newest key, so the old key
can be removed and every mentor's calendar still opens."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid

import pytest
from cryptography.fernet import Fernet
from pydantic import SecretStr

from booking.calendar.service import _store_rotated, rotate_token_key
from booking.calendar.tables import SCHEMA
from booking.calendar.tokens import InvalidToken, TokenCipher


def new_key() -> str:
    return Fernet.generate_key().decode()


def cipher(*keys: str) -> TokenCipher:
    return TokenCipher(SecretStr(",".join(keys)))


async def stored_tokens(calendar) -> dict[uuid.UUID, str]:
    rows = await calendar.db.fetch(
        f"SELECT mentor_id, refresh_token_encrypted FROM {SCHEMA}.connections"
    )
    return {row["mentor_id"]: row["refresh_token_encrypted"] for row in rows}


class TestRotation:
    async def test_after_a_rotation_the_old_key_can_go_and_every_calendar_still_opens(
        self, start_calendar, sandbox
    ) -> None:
        old, new = new_key(), new_key()
        before = await start_calendar(token_encryption_key=old)
        mentors = [await before.connected() for _ in range(5)]

        # Batches of two: three of them, the last one short.
        done = await rotate_token_key(before.service.db, cipher(new, old), batch_size=2)

        assert (done.rotated, done.remaining, done.unreadable) == (5, 0, 0)
        stored = await stored_tokens(before)
        for mentor in mentors:
            [refresh_token] = await sandbox.refresh_tokens(mentor.email)
            assert cipher(new).decrypt(stored[mentor.id]).get_secret_value() == refresh_token
            with pytest.raises(InvalidToken):
                cipher(old).decrypt(stored[mentor.id])

        # The service with the new key alone: a mentor's calendar opens (refresh, then insert).
        after = await start_calendar(token_encryption_key=new)
        paid = await after.pay(mentors[0])
        confirmed = await after.confirmed(paid.session_id)
        assert confirmed["event_id"]

    async def test_a_second_run_rotates_nothing_and_changes_no_row(self, start_calendar) -> None:
        old, new = new_key(), new_key()
        calendar = await start_calendar(token_encryption_key=old)
        for _ in range(3):
            await calendar.connected()
        first = await rotate_token_key(calendar.service.db, cipher(new, old), batch_size=2)
        rotated = await stored_tokens(calendar)

        again = await rotate_token_key(calendar.service.db, cipher(new, old), batch_size=2)

        assert (first.rotated, again.rotated, again.remaining) == (3, 0, 0)
        assert await stored_tokens(calendar) == rotated

    async def test_tokens_under_the_newest_key_already_are_left_as_they_are(
        self, start_calendar
    ) -> None:
        old, new = new_key(), new_key()
        calendar = await start_calendar(token_encryption_key=old)
        under_old = await calendar.connected()
        newer = await start_calendar(token_encryption_key=f"{new},{old}")
        under_new = await newer.connected()  # stored by a replica that has the new key first
        before = await stored_tokens(newer)

        done = await rotate_token_key(newer.service.db, cipher(new, old), batch_size=10)

        after = await stored_tokens(newer)
        assert done.rotated == 1
        assert after[under_new.id] == before[under_new.id]
        assert after[under_old.id] != before[under_old.id]

    async def test_a_token_no_key_opens_is_reported_and_left_as_it_is(self, start_calendar) -> None:
        old, new, lost = new_key(), new_key(), new_key()
        calendar = await start_calendar(token_encryption_key=old)
        kept = await calendar.connected()
        orphan = await calendar.connected()
        unreadable = cipher(lost).encrypt(SecretStr("a token under a key nobody has"))
        await calendar.db.execute(
            f"UPDATE {SCHEMA}.connections SET refresh_token_encrypted = $1 WHERE mentor_id = $2",
            unreadable,
            orphan.id,
        )

        done = await rotate_token_key(calendar.service.db, cipher(new, old), batch_size=10)

        assert (done.rotated, done.remaining, done.unreadable) == (1, 1, 1)
        stored = await stored_tokens(calendar)
        assert stored[orphan.id] == unreadable
        assert cipher(new).decrypt(stored[kept.id])

    async def test_a_token_stored_meanwhile_is_not_overwritten(self, calendar) -> None:
        # A mentor reconnects between the rotation's read and its write: the new token stays.
        mentor = await calendar.connected()
        [read] = (await stored_tokens(calendar)).values()
        reconnected = calendar.service.cipher.encrypt(SecretStr("the token of the reconnect"))
        await calendar.db.execute(
            f"UPDATE {SCHEMA}.connections SET refresh_token_encrypted = $1 WHERE mentor_id = $2",
            reconnected,
            mentor.id,
        )

        written = await _store_rotated(
            calendar.service.db, [(mentor.id, read, "what the rotation made of the old one")]
        )

        assert written == 0
        assert (await stored_tokens(calendar))[mentor.id] == reconnected


class TestCommand:
    """`python -m booking.calendar rotate-token-key`, run as an operator would."""

    @staticmethod
    async def run(database_url: str, keys: str) -> tuple[int, str, str]:
        environment = {**os.environ, "DATABASE_URL": database_url, "TOKEN_ENCRYPTION_KEY": keys}
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "booking.calendar",
            "rotate-token-key",
            env=environment,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate()
        assert process.returncode is not None
        return process.returncode, out.decode(), err.decode()

    async def test_it_rotates_every_row_and_says_the_old_key_can_go(self, start_calendar) -> None:
        old, new = new_key(), new_key()
        calendar = await start_calendar(token_encryption_key=old)
        mentors = [await calendar.connected() for _ in range(2)]

        status, out, err = await self.run(calendar.settings.database_url, f"{new},{old}")

        assert status == 0, err
        assert "re-encrypted 2 refresh token(s) with the newest key" in out
        assert "the older keys can be removed" in out
        stored = await stored_tokens(calendar)
        assert all(cipher(new).decrypt(stored[mentor.id]) for mentor in mentors)
        assert new not in out + err and old not in out + err

    async def test_it_fails_while_a_token_still_needs_a_key_other_than_the_newest(
        self, start_calendar
    ) -> None:
        old, new = new_key(), new_key()
        calendar = await start_calendar(token_encryption_key=old)
        mentor = await calendar.connected()
        await calendar.db.execute(
            f"UPDATE {SCHEMA}.connections SET refresh_token_encrypted = $1 WHERE mentor_id = $2",
            cipher(new_key()).encrypt(SecretStr("lost")),
            mentor.id,
        )

        status, out, _ = await self.run(calendar.settings.database_url, f"{new},{old}")

        assert status == 1
        assert "1 stored refresh token(s) still do not open with the newest key" in out
        assert "1 of them open with none of the keys" in out

    async def test_a_malformed_key_list_stops_it_before_the_database(self, migrated) -> None:
        old = new_key()

        status, out, err = await self.run(migrated, f"{new_key()};{old}")

        assert status != 0
        assert "TOKEN_ENCRYPTION_KEY must be one or more Fernet keys" in err
        assert "re-encrypted" not in out
        assert old not in out + err

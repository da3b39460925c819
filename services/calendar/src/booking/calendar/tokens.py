"""The mentors' refresh tokens at rest: Fernet-encrypted with TOKEN_ENCRYPTION_KEY.

A refresh token opens a mentor's calendar for as long as Google honours it, so the database
never holds one in plain text: a dump or a backup without the key is useless.

TOKEN_ENCRYPTION_KEY holds one or more Fernet keys separated by commas, newest first: a token is
encrypted with the first and opens with any of them, so a new key can be put in front while
the tokens stored under the older ones still open; `python -m booking.calendar
rotate-token-key` then re-encrypts those with the newest, after which the older keys can go.
"""

from __future__ import annotations

import re

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from pydantic import SecretStr

__all__ = ["InvalidToken", "TokenCipher", "fernet_keys"]

KEY_FORMAT = (
    "TOKEN_ENCRYPTION_KEY must be one or more Fernet keys separated by commas, newest first (a "
    "Fernet key is 32 random bytes in URL-safe base64, 44 characters; make one with "
    "`python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'`)"
)
# Exactly what Fernet.generate_key() writes. Fernet itself decodes leniently: it skips
# characters outside base64 and stops at padding, so `new;old` would pass as `new` alone.
_KEY = re.compile(r"[A-Za-z0-9_-]{43}=")


def fernet_keys(value: str) -> list[Fernet]:
    """The keys of a TOKEN_ENCRYPTION_KEY value, newest first.

    ValueError for an empty list, an empty entry, a malformed key or a key given twice; the
    message says which entry, never what it holds (it may be a near miss of a real key).
    """
    entries = [entry.strip() for entry in value.split(",")]
    count = len(entries)
    keys: list[Fernet] = []
    seen: dict[str, int] = {}
    for position, entry in enumerate(entries, start=1):
        where = f"key {position} of {count}"
        if not entry:
            empty = "is empty" if count == 1 else "is empty (a stray comma?)"
            raise ValueError(f"{KEY_FORMAT}: {where} {empty}")
        if entry in seen:
            raise ValueError(f"{KEY_FORMAT}: {where} repeats key {seen[entry]}")
        if not _KEY.fullmatch(entry):
            raise ValueError(f"{KEY_FORMAT}: {where} is not a Fernet key")
        keys.append(Fernet(entry))
        seen[entry] = position
    return keys


class TokenCipher:
    def __init__(self, keys: SecretStr) -> None:
        fernets = fernet_keys(keys.get_secret_value())
        self._newest = fernets[0]
        self._fernet = MultiFernet(fernets)
        self.key_count = len(fernets)

    def __repr__(self) -> str:
        return f"TokenCipher(keys=**********, key_count={self.key_count})"

    def encrypt(self, token: SecretStr) -> str:
        """The ciphertext to store, under the newest key (authenticated: a changed byte fails
        to decrypt)."""
        return self._fernet.encrypt(token.get_secret_value().encode()).decode("ascii")

    def decrypt(self, stored: str) -> SecretStr:
        """The token again, whichever of the keys encrypted it; `InvalidToken` if none did or
        the ciphertext was altered."""
        return SecretStr(self._fernet.decrypt(stored.encode("ascii")).decode())

    def is_current(self, stored: str) -> bool:
        """Whether the newest key opens `stored` (a rotation leaves it as it is)."""
        try:
            self._newest.decrypt(stored.encode("ascii"))
        except InvalidToken:
            return False
        return True

    def rotate(self, stored: str) -> str:
        """`stored` encrypted again with the newest key; `InvalidToken` if no key opens it."""
        return self._fernet.rotate(stored.encode("ascii")).decode("ascii")

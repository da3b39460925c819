"""The mentors' refresh tokens at rest: Fernet-encrypted with TOKEN_ENCRYPTION_KEY.

A refresh token opens a mentor's calendar for as long as Google honours it, so the database
never holds one in plain text: a dump or a backup without the key is useless.
"""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken
from pydantic import SecretStr

__all__ = ["InvalidToken", "TokenCipher"]


class TokenCipher:
    def __init__(self, key: SecretStr) -> None:
        self._fernet = Fernet(key.get_secret_value().encode())

    def __repr__(self) -> str:
        return "TokenCipher(key=**********)"

    def encrypt(self, token: SecretStr) -> str:
        """The ciphertext to store (authenticated: a changed byte fails to decrypt)."""
        return self._fernet.encrypt(token.get_secret_value().encode()).decode("ascii")

    def decrypt(self, stored: str) -> SecretStr:
        """The token again; `InvalidToken` if the key is another or the ciphertext was altered."""
        return SecretStr(self._fernet.decrypt(stored.encode("ascii")).decode())

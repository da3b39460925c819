"""TokenCipher: refresh tokens encrypted with the newest of TOKEN_ENCRYPTION_KEY's keys, opened
with any of them, rotated to the newest; a malformed key list refused without showing it."""

import base64

import pytest
from cryptography.fernet import Fernet
from pydantic import SecretStr

from booking.calendar.tokens import InvalidToken, TokenCipher, fernet_keys

OLD = Fernet.generate_key().decode()
NEW = Fernet.generate_key().decode()
TOKEN = SecretStr("1//0g-refresh-token-of-a-mentor")


def cipher(*keys: str) -> TokenCipher:
    return TokenCipher(SecretStr(",".join(keys)))


class TestSeveralKeys:
    def test_a_token_stored_under_the_old_key_opens_after_a_new_key_is_put_first(self) -> None:
        stored = cipher(OLD).encrypt(TOKEN)
        assert cipher(NEW, OLD).decrypt(stored) == TOKEN

    def test_new_tokens_are_encrypted_with_the_first_key(self) -> None:
        stored = cipher(NEW, OLD).encrypt(TOKEN)
        assert cipher(NEW).decrypt(stored) == TOKEN
        with pytest.raises(InvalidToken):
            cipher(OLD).decrypt(stored)

    def test_spaces_around_the_keys_are_ignored(self) -> None:
        stored = cipher(OLD).encrypt(TOKEN)
        assert TokenCipher(SecretStr(f" {NEW} , {OLD} ")).decrypt(stored) == TOKEN

    def test_a_key_no_longer_listed_opens_nothing(self) -> None:
        stored = cipher(OLD).encrypt(TOKEN)
        with pytest.raises(InvalidToken):
            cipher(NEW).decrypt(stored)

    def test_the_keys_never_show_in_repr(self) -> None:
        shown = repr(cipher(NEW, OLD))
        assert NEW not in shown and OLD not in shown and "key_count=2" in shown


class TestRotation:
    def test_rotating_re_encrypts_under_the_newest_key_so_the_old_one_can_go(self) -> None:
        both = cipher(NEW, OLD)
        stored = cipher(OLD).encrypt(TOKEN)
        assert not both.is_current(stored)

        rotated = both.rotate(stored)

        assert both.is_current(rotated)
        assert cipher(NEW).decrypt(rotated) == TOKEN
        with pytest.raises(InvalidToken):
            cipher(OLD).decrypt(rotated)

    def test_a_token_under_the_newest_key_is_current(self) -> None:
        assert cipher(NEW, OLD).is_current(cipher(NEW).encrypt(TOKEN))

    def test_a_token_no_key_opens_cannot_be_rotated(self) -> None:
        stranger = cipher(Fernet.generate_key().decode()).encrypt(TOKEN)
        both = cipher(NEW, OLD)
        assert not both.is_current(stranger)
        with pytest.raises(InvalidToken):
            both.rotate(stranger)


SHORT = base64.urlsafe_b64encode(b"k" * 31).decode()

MALFORMED = {
    "empty": ("", "key 1 of 1 is empty"),
    "blank": ("   ", "key 1 of 1 is empty"),
    "a trailing comma": (f"{NEW},", "key 2 of 2 is empty (a stray comma?)"),
    "a leading comma": (f",{NEW}", "key 1 of 2 is empty"),
    "two commas": (f"{NEW},,{OLD}", "key 2 of 3 is empty"),
    "not base64": ("not a key at all!", "key 1 of 1 is not a Fernet key"),
    "31 bytes": (SHORT, "key 1 of 1 is not a Fernet key"),
    "a bad second key": (f"{NEW},{SHORT}x", "key 2 of 2 is not a Fernet key"),
    "not ASCII": (f"{NEW},clé", "key 2 of 2 is not a Fernet key"),
    "semicolons": (f"{NEW};{OLD}", "key 1 of 1 is not a Fernet key"),
    "a key twice": (f"{NEW},{OLD},{NEW}", "key 3 of 3 repeats key 1"),
    "a tail after the padding": (f"{NEW}x", "key 1 of 1 is not a Fernet key"),
    "no padding": (NEW.rstrip("="), "key 1 of 1 is not a Fernet key"),
    "standard base64": (base64.b64encode(b"\xfb" * 32).decode(), "is not a Fernet key"),
}


class TestMalformedKeys:
    @pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
    def test_a_malformed_key_list_is_refused_saying_which_entry_and_not_what_it_holds(
        self, case: str
    ) -> None:
        value, reason = MALFORMED[case]
        with pytest.raises(ValueError, match="TOKEN_ENCRYPTION_KEY must be") as refused:
            fernet_keys(value)
        message = str(refused.value)
        assert reason in message
        for entry in filter(None, (part.strip() for part in value.split(","))):
            assert entry not in message

    def test_the_cipher_refuses_them_too(self) -> None:
        with pytest.raises(ValueError, match="key 2 of 2 is empty"):
            TokenCipher(SecretStr(f"{NEW},"))

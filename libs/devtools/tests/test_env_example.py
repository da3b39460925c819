""".env.example lists every setting the system reads, each once, commented out with its default,
and Compose's own variables apart: a field added to a settings class without a line there fails
here."""

from __future__ import annotations

import json
import re
from decimal import Decimal
from pathlib import Path
from typing import Any

from dotenv import dotenv_values
from pydantic import AliasChoices, AliasPath, SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from booking.calendar.settings import CalendarSettings
from booking.devtools.devrun import DevRunSettings
from booking.devtools.infra import InfraSettings
from booking.gateway.settings import GatewaySettings
from booking.notifications.settings import NotificationsSettings
from booking.orders.settings import OrdersSettings
from booking.payments.settings import PaymentsSettings
from booking.runtime.settings import RuntimeSettings
from booking.sandbox.settings import SandboxSettings

ROOT = Path(__file__).resolve().parents[3]
ENV_EXAMPLE = ROOT / ".env.example"
COMPOSE = ROOT / "docker-compose.yml"

SETTINGS_CLASSES: tuple[type[BaseSettings], ...] = (
    RuntimeSettings,
    OrdersSettings,
    PaymentsSettings,
    CalendarSettings,
    NotificationsSettings,
    GatewaySettings,
    SandboxSettings,
    InfraSettings,
    DevRunSettings,
)

SETTING = re.compile(r"^#? ?([A-Z][A-Z0-9_]*)=(.*)$")
# Compose's own variables: comments to every reader but this test, so no setting's name.
COMPOSE_SETTING = re.compile(r"^# compose: ([A-Z][A-Z0-9_]*)=(.*)$")
# `${NAME}`, `${NAME:-default}`, `${NAME-default}` in docker-compose.yml.
COMPOSE_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def environment_name(cls: type[BaseSettings], name: str, field: FieldInfo) -> str:
    """The variable pydantic-settings reads the field from (every class is case-insensitive)."""
    alias = field.validation_alias or field.alias
    if isinstance(alias, AliasChoices):
        # Any choice is read; the first name among them is the one to document.
        alias = next(c for c in alias.choices if isinstance(c, str | AliasPath))
    if isinstance(alias, AliasPath):
        alias = str(alias.path[0])
    if isinstance(alias, str):
        return alias.upper()
    return (str(cls.model_config.get("env_prefix", "")) + name).upper()


def read_fields() -> dict[str, list[tuple[str, FieldInfo]]]:
    """Each environment name, with every class field read from it (a few are shared)."""
    found: dict[str, list[tuple[str, FieldInfo]]] = {}
    for cls in SETTINGS_CLASSES:
        for name, field in cls.model_fields.items():
            found.setdefault(environment_name(cls, name, field), []).append(
                (f"{cls.__name__}.{name}", field)
            )
    return found


def example_lines() -> list[str]:
    return ENV_EXAMPLE.read_text().splitlines()


def written_settings() -> list[tuple[str, str]]:
    return [(m[1], m[2]) for line in example_lines() if (m := SETTING.match(line))]


def written_compose_variables() -> list[tuple[str, str]]:
    return [(m[1], m[2]) for line in example_lines() if (m := COMPOSE_SETTING.match(line))]


def matches(written: str, default: Any) -> bool | None:
    """Whether `written` is `default` as the environment would say it; None where the default
    has no one spelling (a path under this checkout, a factory)."""
    if isinstance(default, SecretStr):
        default = default.get_secret_value()
    if default is None:
        return written == ""
    if isinstance(default, bool):
        return written.lower() == str(default).lower()
    if isinstance(default, int | float | Decimal):
        try:
            return Decimal(written) == Decimal(str(default))
        except ArithmeticError:
            return False
    if isinstance(default, str):
        return written == default
    if isinstance(default, tuple | list):  # comma-separated in the environment
        return [p.strip() for p in written.split(",") if p.strip()] == [str(d) for d in default]
    if isinstance(default, dict):
        return json.loads(written or "null") == default
    return None


def test_the_file_names_every_setting_and_nothing_else():
    written = {name for name, _ in written_settings()}
    expected = set(read_fields())

    missing, unknown = sorted(expected - written), sorted(written - expected)
    assert not missing, f"settings missing from .env.example: {missing}"
    assert not unknown, f".env.example names what no settings class reads: {unknown}"


def test_each_name_appears_once():
    names = [name for name, _ in written_settings()] + [
        name for name, _ in written_compose_variables()
    ]
    twice = sorted({name for name in names if names.count(name) > 1})
    assert not twice, f"named more than once in .env.example: {twice}"


def test_each_default_written_is_the_fields_default():
    fields = read_fields()
    mismatches = []
    for name, written in written_settings():
        # A subclass inherits the field: one line per distinct default, naming its first owner.
        seen: set[str] = set()
        for owner, field in fields.get(name, []):
            default = field.get_default(call_default_factory=True)
            if matches(written, default) is False and repr(default) not in seen:
                seen.add(repr(default))
                mismatches.append(f"{name}={written!r}, but {owner} defaults to {default!r}")
    print("\n".join(mismatches))
    assert not mismatches, "\n".join(mismatches)


def test_every_line_is_a_comment_or_a_setting():
    strays = [
        f"line {number}: {line!r}"
        for number, line in enumerate(example_lines(), start=1)
        if line.strip() and not (line.startswith("#") or SETTING.match(line))
    ]
    assert not strays, "\n".join(strays)


def test_every_setting_is_commented_out_so_a_copy_changes_nothing():
    live = [line for line in example_lines() if SETTING.match(line) and not line.startswith("#")]
    assert not live, live
    # As `make run` reads an .env file: nothing at all.
    assert dotenv_values(ENV_EXAMPLE) == {}


def test_every_setting_is_described_above_it():
    """A setting (or a run of them) follows a comment saying what it does, not a section's
    title or a blank line."""
    lines = example_lines()
    bare = []
    for number, line in enumerate(lines):
        if not SETTING.match(line):
            continue
        above = number - 1
        while above >= 0 and SETTING.match(lines[above]):
            above -= 1
        description = lines[above] if above >= 0 else ""
        if not description.startswith("# ") or description.startswith("# ==="):
            bare.append(line)
    assert not bare, f"settings without a description: {bare}"


def test_composes_own_variables_are_those_docker_compose_reads_beyond_the_settings():
    defaults: dict[str, set[str]] = {}
    for name, default in COMPOSE_VARIABLE.findall(COMPOSE.read_text()):
        defaults.setdefault(name, set()).add(default)
    composes_own = set(defaults) - set(read_fields())
    written = dict(written_compose_variables())

    assert set(written) == composes_own, (
        f"docker-compose.yml reads {sorted(composes_own - set(written))} not in .env.example's"
        f" Compose section; it lists {sorted(set(written) - composes_own)} Compose does not read"
    )
    for name, default in written.items():
        assert defaults[name] == {default}, f"{name}: docker-compose.yml says {defaults[name]}"

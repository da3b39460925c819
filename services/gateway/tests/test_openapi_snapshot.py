"""The gateway's OpenAPI document only grows: everything in openapi.snapshot.json (paths,
operations, parameters, request bodies, responses, schemas) is still in the live document,
unchanged. Additions pass: a new path, operation, response, schema, property or optional
parameter. A removal or a change fails, since a client written against the published document
would break.

After a deliberate change, rewrite the snapshot and commit it with the change:

    UPDATE_OPENAPI_SNAPSHOT=1 .venv/bin/python -m pytest \
        services/gateway/tests/test_openapi_snapshot.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from booking.gateway.app import create_app
from booking.gateway.settings import GatewaySettings

SNAPSHOT = Path(__file__).with_name("openapi.snapshot.json")
UPDATE = "UPDATE_OPENAPI_SNAPSHOT"


def live_document() -> dict[str, Any]:
    # Building the app opens no connection: the document is the routes' declarations.
    return create_app(GatewaySettings()).openapi()


def render(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def _parameter_key(parameter: dict[str, Any]) -> str:
    return (
        f"{parameter.get('in')}:{parameter.get('name')}"
        if "name" in parameter
        else json.dumps(parameter, sort_keys=True)
    )


def departures(old: Any, new: Any, where: str = "#") -> list[str]:
    """Where `new` no longer holds `old`: each entry is a JSON pointer and what happened.

    Objects may gain keys. A `parameters` list is matched by (in, name) and may gain optional
    parameters; a `required` list may gain only properties that are new themselves (a field
    added to a model), which the caller checks beside it. Any other list or value is compared
    whole.
    """
    if isinstance(old, dict) and isinstance(new, dict):
        found: list[str] = []
        for key, value in old.items():
            pointer = f"{where}/{str(key).replace('~', '~0').replace('/', '~1')}"
            if key not in new:
                found.append(f"{pointer}: removed")
            elif key == "parameters" and isinstance(value, list):
                found += _parameter_departures(value, new[key], pointer)
            elif key == "required" and isinstance(value, list) and isinstance(new[key], list):
                added = [name for name in new[key] if name not in value]
                known = old.get("properties", {})
                found += [
                    f"{pointer}: no longer requires {name!r}"
                    for name in value
                    if name not in new[key]
                ]
                found += [
                    f"{pointer}: now requires the existing {name!r}"
                    for name in added
                    if name in known
                ]
            else:
                found += departures(value, new[key], pointer)
        return found
    if old != new:
        return [f"{where}: was {json.dumps(old)}, is {json.dumps(new)}"]
    return []


def _parameter_departures(old: list[Any], new: list[Any], where: str) -> list[str]:
    now = {_parameter_key(parameter): parameter for parameter in new}
    before = {_parameter_key(parameter) for parameter in old}
    found: list[str] = []
    for parameter in old:
        key = _parameter_key(parameter)
        if key not in now:
            found.append(f"{where}[{key}]: removed")
            continue
        found += departures(parameter, now[key], f"{where}[{key}]")
        if now[key].get("required") and not parameter.get("required"):
            found.append(f"{where}[{key}]: now required")
    found += [
        f"{where}[{key}]: a new required parameter"
        for key, parameter in now.items()
        if key not in before and parameter.get("required")
    ]
    return found


def test_the_openapi_document_keeps_everything_it_published() -> None:
    live = live_document()
    if os.environ.get(UPDATE) == "1":
        SNAPSHOT.write_text(render(live))
    snapshot = json.loads(SNAPSHOT.read_text())
    found = departures(snapshot, live)
    assert not found, (
        f"the gateway's OpenAPI document removed or changed what it published ({len(found)}):\n"
        + "\n".join(found[:40])
        + f"\n\nIf that is meant (clients must follow), rewrite the snapshot:\n"
        f"  {UPDATE}=1 .venv/bin/python -m pytest services/gateway/tests/{Path(__file__).name}\n"
        "and commit services/gateway/tests/openapi.snapshot.json with the change."
    )


class TestTheComparison:
    """The rule itself, on small documents."""

    def test_additions_pass(self) -> None:
        old = {"paths": {"/a": {"get": {"parameters": [{"in": "query", "name": "x"}]}}}}
        new = {
            "paths": {
                "/a": {
                    "get": {
                        "parameters": [
                            {"in": "query", "name": "y", "required": False},
                            {"in": "query", "name": "x"},
                        ]
                    },
                    "post": {},
                },
                "/b": {},
            }
        }
        assert departures(old, new) == []

    def test_a_new_field_may_be_required_but_an_old_one_may_not_become_so(self) -> None:
        old = {"properties": {"a": {}, "b": {}}, "required": ["a"]}
        assert (
            departures(old, {"properties": {"a": {}, "b": {}, "c": {}}, "required": ["a", "c"]})
            == []
        )
        assert departures(old, {"properties": {"a": {}, "b": {}}, "required": ["a", "b"]}) == [
            "#/required: now requires the existing 'b'"
        ]

    def test_removals_and_changes_fail(self) -> None:
        old = {
            "paths": {"/a": {"get": {"parameters": [{"in": "query", "name": "x"}]}}},
            "components": {"schemas": {"S": {"type": "string", "enum": ["a", "b"]}}},
        }
        new = {
            "paths": {
                "/a": {
                    "get": {
                        "parameters": [
                            {"in": "query", "name": "x", "required": True},
                            {"in": "header", "name": "h", "required": True},
                        ]
                    },
                    "delete": {},
                }
            },
            "components": {"schemas": {"S": {"type": "string", "enum": ["a"]}}},
        }
        assert departures(old, new) == [
            "#/paths/~1a/get/parameters[query:x]: now required",
            "#/paths/~1a/get/parameters[header:h]: a new required parameter",
            '#/components/schemas/S/enum: was ["a", "b"], is ["a"]',
        ]
        assert departures({"paths": {"/a": {}}}, {"paths": {}}) == ["#/paths/~1a: removed"]

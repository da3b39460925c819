"""Stateful: chains of calls along the links of the gateway's own /openapi.json keep the
contract (booking.devtools.contract_run runs them; the whole-system tests run them against the real
services too).

The links are part of the public document, so they are checked as a client reads them as well:
each leads to an operation that exists, fills parameters it has, from fields the answer has.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from booking.devtools.contract_run import bounded, link_names, run_stateful_contract
from booking.gateway.app import create_app
from booking.gateway.upstreams import Service

# Under a minute on a shared two-core machine (the stand-ins answer at once).
RUN = bounded(max_examples=30, steps=10)


def test_chains_of_calls_along_the_links_keep_the_contract(
    system_in_thread: str, gateway_settings: Any
) -> None:
    secret = gateway_settings().auth_jwt_secret.get_secret_value()
    followed = run_stateful_contract(system_in_thread, secret, RUN)
    # The stand-ins answer every valid request the same way, so most links must have led to a
    # 2xx or 3xx (a link naming a field its answer lacks never does); which ones, in a bounded
    # run, is the draw's.
    names = link_names(followed)
    every = {name for _, _, name, _ in links_in(create_app(gateway_settings()).openapi())}
    assert len(names) >= len(every) * 2 // 3, sorted(names)


async def test_a_body_that_is_not_utf8_is_a_documented_400_that_reaches_no_service(
    system: Any,
) -> None:
    """Found by the stateful run: FastAPI answers 400 to a body it cannot decode (422 to one
    that is not JSON), which the document did not list."""
    response = await system.client.post(
        "/api/mentors",
        content=b"\x04\xff\xfe{",
        headers={**system.auth("admin"), "content-type": "application/json"},
    )
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert system.received() == {}
    document = (await system.client.get("/openapi.json")).json()
    assert "400" in document["paths"]["/api/mentors"]["post"]["responses"]


async def test_a_taken_identity_subject_is_a_documented_409_passed_back(system: Any) -> None:
    """Found by the stateful run against the real services: orders refuses a mentor whose
    identity subject acts as another already (409), which the document did not list."""
    problem = {
        "type": "about:blank",
        "title": "Conflict",
        "status": 409,
        "detail": "this identity subject acts as another mentor already",
        "instance": "/api/mentors",
    }
    system.upstreams[Service.ORDERS].answer = lambda _: JSONResponse(
        problem, 409, media_type="application/problem+json"
    )
    body = {
        "name": "Amel",
        "email": "amel@example.com",
        "timezone": "Africa/Tunis",
        "identity_subject": "auth0|amel",
    }
    response = await system.client.post("/api/mentors", json=body, headers=system.auth("admin"))
    assert response.status_code == 409
    assert response.json() == problem
    document = (await system.client.get("/openapi.json")).json()
    assert "409" in document["paths"]["/api/mentors"]["post"]["responses"]


# --- the links as a client reads them -----------------------------------------------------------


def resolved(schema: dict[str, Any], document: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def field_at(schema: dict[str, Any], pointer: str, document: dict[str, Any]) -> bool:
    """Whether a body of `schema` can have a value at the JSON pointer `pointer` (`/items/0/id`)."""
    for token in pointer.strip("/").split("/"):
        schema = resolved(schema, document)
        choices = [resolved(s, document) for s in schema.get("anyOf", [schema])]
        schema = next((s for s in choices if s.get("type") != "null"), schema)
        if schema.get("type") == "array" and token.isdigit():
            schema = schema["items"]
        elif token in schema.get("properties", {}):
            schema = schema["properties"][token]
        else:
            return False
    return True


def links_in(document: dict[str, Any]) -> list[tuple[str, dict[str, Any], str, dict[str, Any]]]:
    """Each link of the document: (its source, e.g. `POST /api/mentors 201`, the answer it
    starts from, its name, its definition)."""
    return [
        (f"{method.upper()} {path} {status}", response, name, link)
        for path, operations in document["paths"].items()
        for method, operation in operations.items()
        for status, response in operation["responses"].items()
        for name, link in response.get("links", {}).items()
    ]


def operation_at(reference: str, document: dict[str, Any]) -> dict[str, Any] | None:
    """The operation an operationRef (`#/paths/~1api~1bookings/post`) names, if any."""
    if not reference.startswith("#/paths/"):
        return None
    path, _, method = reference.removeprefix("#/paths/").rpartition("/")
    path = path.replace("~1", "/").replace("~0", "~")
    return document["paths"].get(path, {}).get(method)


def test_every_link_leads_to_an_operation_and_fills_it_from_the_answer(
    gateway_settings: Any,
) -> None:
    document = create_app(gateway_settings()).openapi()
    links = links_in(document)
    assert len(links) == 31
    for source, response, name, link in links:
        where = f"{source} -> {name}"
        target = operation_at(link["operationRef"], document)
        assert target is not None, f"{where}: {link['operationRef']} is no operation"
        answer = response["content"]["application/json"]["schema"]
        parameters = {p["name"] for p in target.get("parameters", [])}
        body = target.get("requestBody", {}).get("content", {}).get("application/json", {})
        filled = {**link.get("parameters", {}), **link.get("requestBody", {})}
        assert filled, f"{where}: fills nothing"
        for name, expression in filled.items():
            if name in link.get("parameters", {}):
                assert name in parameters, f"{where}: the target has no parameter {name}"
            else:
                assert field_at(body["schema"], name, document), f"{where}: no body field {name}"
            assert expression.startswith("$response.body#/"), f"{where}: {expression}"
            pointer = expression.removeprefix("$response.body#")
            assert field_at(answer, pointer, document), f"{where}: the answer has no {pointer}"

"""For tests only (it imports schemathesis, a development dependency): the stateful contract run
the gateway's tests (against stand-ins) and the whole-system tests (against the real services)
share.

schemathesis follows the links of the gateway's own /openapi.json, a chain of calls at a time (a
mentor registered, given an offering, booked; the order read, cancelled, its escrow settled; a
notification read and deleted; a dead letter inspected, replayed, discarded), and fails on a 5xx
or on an answer that breaks the document.
"""

from __future__ import annotations

import re
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import schemathesis
from hypothesis import HealthCheck, Phase, seed, settings
from hypothesis import strategies as st
from hypothesis.errors import FlakyStrategyDefinition
from schemathesis.checks import not_a_server_error
from schemathesis.generation.stateful.state_machine import StepInput, StepOutput
from schemathesis.schemas import BaseSchema
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from booking.runtime.auth import Role, issue_token

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def bounded(max_examples: int, steps: int) -> settings:
    """`max_examples` chains of at most `steps` calls (drawn from a fixed seed: see
    run_stateful_contract)."""
    return settings(
        max_examples=max_examples,
        stateful_step_count=steps,
        deadline=None,
        phases=[Phase.generate],  # shrinking would replay chains against a live system for long
        suppress_health_check=list(HealthCheck),
        database=None,
    )


MENTEE = "stateful-mentee"  # one mentee books and reads their own orders
MENTOR_ROUTES = re.compile(r"^/api/mentors/\{mentor_id\}/(offerings|calendar)")


def authorization(case: Any, secret: str) -> dict[str, str]:
    """A mentee books and reads their orders; a mentor acts on their own offerings and calendar
    (the token's subject is the mentor in the path); an admin does the rest."""
    path = case.operation.path
    if path in ("/api/bookings", "/api/orders/{order_id}"):
        sub, role = MENTEE, Role.MENTEE
    elif MENTOR_ROUTES.match(path):
        sub, role = str((case.path_parameters or {}).get("mentor_id") or "nobody"), Role.MENTOR
    else:
        sub, role = "stateful-admin", Role.ADMIN
    return {"Authorization": f"Bearer {issue_token(secret, sub, role)}"}


def _plausible(operation: str, body: dict[str, Any], n: int) -> dict[str, Any]:
    """The body as a real client would write it (varied by `n`), within the services' default
    bounds: what random data rarely gets right (a whole number of minutes, a price in a
    currency Konnect takes, a start in the coming months, a deliverable address, an identity
    subject of its own), so that chains go past their first step."""
    if operation == "POST /api/mentors/{mentor_id}/offerings":
        price = {"amount": 1000 * (1 + n % 1000), "currency": "TND"}  # 1 to 1000 TND
        return {**body, "duration_minutes": 15 + n % 466, "price": price}  # 15 min to 8 h
    if operation == "POST /api/mentors" and body.get("identity_subject") is not None:
        # One subject acts as one mentor: one drawn twice would be a 409 the second time, and a
        # later run would find the system answering otherwise.
        return {**body, "identity_subject": f"stateful|{uuid.uuid4().hex}"}
    if operation == "POST /api/bookings":
        mentee = body.get("mentee")
        if isinstance(mentee, dict):
            mentee = {**mentee, "email": "mentee@example.com"}
        start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        start += timedelta(days=1, hours=n % (24 * 300))
        return {**body, "start_at": start.isoformat(), "mentee": mentee}
    return body


# How many times a run goes on after a live system answered a replayed call otherwise.
RESTARTS = 5


def run_stateful_contract(
    url: str, secret: str, run: settings, paths: str | None = None
) -> Counter[str]:
    """Run the state machine against the gateway at `url` (only the operations whose path
    matches the regular expression `paths`, if given); how often each link was followed to a
    2xx or 3xx answer, by transition (`POST /api/mentors -> [201] AddOffering -> POST ...`)."""
    schema: BaseSchema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    if paths is not None:
        schema = schema.include(path_regex=paths)
    # Only the document's own links: schemathesis would otherwise infer its own, and a link the
    # document lacks, or one that leads nowhere, would go unnoticed.
    schema.config.phases.stateful.inference.algorithms = []

    @schema.hook
    def flatmap_body(context: Any, body: Any) -> st.SearchStrategy[Any]:
        """A quarter of the bodies as drawn, the rest made plausible (see _plausible): the
        stateless contract test already sends random bodies everywhere."""
        if not isinstance(body, dict) or context.operation is None:
            return st.just(body)
        label = context.operation.label
        return st.integers(0, 2**16).map(
            lambda n: body if n % 4 == 0 else _plausible(label, body, n // 4)
        )

    @schema.hook
    def flatmap_headers(context: Any, headers: Any) -> st.SearchStrategy[Any]:
        """Most Idempotency-Keys made unique: a key drawn twice would be refused the second time
        (used with another body), and a later run would find the system answering otherwise."""
        if not isinstance(headers, dict) or "Idempotency-Key" not in headers:
            return st.just(headers)
        unique = {**headers, "Idempotency-Key": uuid.uuid4().hex}
        return st.integers(0, 3).map(lambda n: headers if n == 0 else unique)

    followed: Counter[str] = Counter()
    scenarios = 0

    class Workflow(schema.as_state_machine()):  # type: ignore[misc]
        def teardown(self) -> None:
            nonlocal scenarios
            scenarios += 1
            super().teardown()

        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            return {"headers": authorization(case, secret)}

        def step(self, input: StepInput) -> StepOutput:
            output: StepOutput = super().step(input)
            transition = input.transition
            if transition is not None and input.is_applied and output.response.status_code < 400:
                followed[transition.id] += 1
            return output

        def validate_response(
            self, response: Any, case: Any, additional_checks: Any = None, **kwargs: Any
        ) -> None:
            case.validate_response(
                response,
                checks=CHECKS,
                headers=kwargs.get("headers"),
                transport_kwargs=kwargs or None,
                recorder=self.recorder,
            )

    for attempt in range(1 + RESTARTS):
        if scenarios >= run.max_examples:
            break
        seed(attempt)(Workflow)  # the same chains every time against the same answers
        try:
            Workflow.run(settings=settings(run, max_examples=run.max_examples - scenarios))
            break
        except FlakyStrategyDefinition:
            # A live system's state moves on (a consumer catches up, a slot is taken): a call
            # Hypothesis replays is answered otherwise, which it takes for a flaky strategy. As
            # schemathesis' own runner does, go on with a fresh run; a failed check still fails.
            continue
    return followed


def link_names(followed: Counter[str]) -> set[str]:
    """The names of the links followed (`AddOffering`), whatever answer they started from."""
    return {transition.split("] ")[1].split(" -> ")[0] for transition in followed}

"""Property-based: requests generated from the gateway's own /openapi.json never meet a 5xx
and never get an answer that breaks the document (schemathesis over hypothesis).

Driven from a plain test rather than schemathesis' pytest plugin, which does not run under
this pytest version.
"""

from __future__ import annotations

from typing import Any

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.core.result import Err

from booking.devtools.contract_run import CHECKS
from booking.runtime.auth import Role, issue_token


def test_the_gateway_keeps_its_contract(system_in_thread: str, gateway_settings: Any) -> None:
    secret = gateway_settings().auth_jwt_secret.get_secret_value()
    tokens = {role: issue_token(secret, "contract-test", role) for role in Role}
    schema = schemathesis.openapi.from_url(f"{system_in_thread}/openapi.json")
    operations = []
    for result in schema.exclude(path_regex="^/health").get_all_operations():  # not ours
        if isinstance(result, Err):  # a path the schema cannot describe
            raise result.err()
        operations.append(result.ok())
    assert len(operations) == 28

    for operation in operations:
        # A mentee books; an admin may do everything else.
        role = Role.MENTEE if operation.path == "/api/bookings" else Role.ADMIN
        headers = {"Authorization": f"Bearer {tokens[role]}"}

        @given(case=operation.as_strategy())
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
        def keeps_the_contract(case: Any) -> None:
            case.call_and_validate(headers=headers, checks=CHECKS)  # noqa: B023 (run at once)

        keeps_the_contract()

"""`make demo` (`python -m demo`) against the system as `make run` starts it: it runs clean, twice
on the same system, narrates every step, and never shows a stack trace; it starts by printing the
admin dashboard's URL and an admin token to sign in with; without a system it says so in one
line."""

from __future__ import annotations

import asyncio
import re
import sys

import httpx
import pytest

from booking.devtools.fixtures import free_port
from booking.runtime.auth import Role, verify_token
from booking.runtime.settings import RuntimeSettings

pytestmark = pytest.mark.e2e

DEMO_SECONDS = 240  # seven steps, each bounded by the demo's own --timeout, on a loaded machine
STEPS = (
    "[1/7] Is the system running?",
    "[2/7] An admin opens the live alert feed",
    "[3/7] The admin registers two mentors",
    "[4/7] Amira Ben Salah connects her Google Calendar",
    "[5/7] A mentee books a session with Amira Ben Salah and pays",
    "[6/7] A mentee books a session with Karim Jaziri (no Google) and pays",
    "[7/7] The system's health",
)


async def run_demo(env: dict[str, str]) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "demo",
        "--timeout",
        "60",
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(DEMO_SECONDS):
            output, _ = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"the demo did not finish within {DEMO_SECONDS}s")
    assert process.returncode is not None  # communicate() waited for the exit
    return process.returncode, output.decode(errors="replace")


def printed(label: str, output: str) -> str:
    """The value the narrator showed as `label: value` (the first such line)."""
    found = re.search(rf"^ +{re.escape(label)}: +(\S+)$", output, re.MULTILINE)
    assert found, f"the demo printed no {label!r}:\n{output}"
    return found[1]


class TestTheDemo:
    async def test_it_runs_clean_and_again_on_the_same_system(self, running_system):
        for run in ("first", "second"):
            code, output = await run_demo(running_system.env)

            assert code == 0, f"{run} run:\n{output}"
            assert "Traceback" not in output, output
            for step in STEPS:
                assert step in output, f"{run} run lacks {step!r}:\n{output}"
            assert "pay here:" in output and "-> 200" in output  # the pay URL, the webhook
            assert "ok order confirmed, session scheduled" in output
            assert "Meet link:       https://meet.google.com/" in output
            assert "on the websocket: [Error] IntegrationFailure" in output
            assert "reason:          mentor_not_integrated" in output
            assert "orders:health" in output and "ok overall:" in output

    async def test_it_starts_with_the_dashboard_and_an_admin_token_for_it(self, running_system):
        code, output = await run_demo(running_system.env)

        assert code == 0, output
        assert "to watch the alerts arrive live" in output
        dashboard, token = printed("dashboard", output), printed("admin token", output)
        # Both come before the first step: there is time to sign in before step 6's alert.
        assert output.index(token) < output.index(STEPS[0]), output
        assert dashboard == f"{running_system.gateway}/admin/"
        secret = running_system.env.get("AUTH_JWT_SECRET") or (
            RuntimeSettings().auth_jwt_secret.get_secret_value()
        )
        assert verify_token(secret, token).role is Role.ADMIN
        async with httpx.AsyncClient(timeout=30, trust_env=False) as http:
            page = await http.get(dashboard)
            # What the dashboard's sign-in asks of the token: the admins' notifications.
            signed_in = await http.get(
                f"{running_system.gateway}/api/admin/notifications",
                params={"limit": 1},
                headers={"Authorization": f"Bearer {token}"},
            )
        assert page.status_code == 200 and "Admin token" in page.text
        assert signed_in.status_code == 200, signed_in.text

    async def test_without_a_system_it_says_so_in_one_line(self):
        env = {"GATEWAY_PORT": str(free_port()), "PATH": "/usr/bin:/bin", "NO_COLOR": "1"}

        code, output = await run_demo(env)

        assert code == 1
        assert "Traceback" not in output
        [stopped] = [line for line in output.splitlines() if line.startswith("demo stopped:")]
        assert "does not answer: start it with `make run`" in stopped

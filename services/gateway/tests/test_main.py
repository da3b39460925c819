"""`python -m booking.gateway`: what the gateway process loads (its resident memory, issue 6)."""

import json
import os
import subprocess
import sys
from collections.abc import Callable

from booking.devtools.fixtures import free_port, serving_process
from booking.gateway.settings import GatewaySettings

# Runs the module's preamble and imports as `python -m booking.gateway --help` does (argparse
# exits before serving), then reports what is loaded and whether an admin token still verifies.
PROBE = """
import json, runpy, sys
sys.argv = ["booking.gateway", "--help"]
try:
    runpy.run_module("booking.gateway", run_name="__main__", alter_sys=True)
except SystemExit:
    pass
from booking.runtime.auth import issue_token, verify_token
identity = verify_token("s" * 32, issue_token("s" * 32, "admin-1", "admin", ttl_seconds=60))
loaded = sorted(name for name, module in sys.modules.items() if module is not None)
print(json.dumps({"modules": loaded, "sub": identity.sub}))
"""


def probe(**env: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, **env},
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


class TestWhatTheGatewayLoads:
    def test_no_database_toolkit_no_rsa_no_command_line_and_no_reload_libraries(self) -> None:
        loaded = {name.partition(".")[0] for name in probe()["modules"]}
        assert loaded & {"sqlalchemy", "cryptography", "rich", "pygments", "watchfiles"} == set()

    def test_admin_tokens_still_verify_without_cryptography(self) -> None:
        assert probe()["sub"] == "admin-1"

    def test_with_an_identity_provider_it_loads_cryptography_for_rs256_and_es256(self) -> None:
        loaded = probe(AUTH_JWKS_URL="https://idp.example/jwks")["modules"]
        assert "cryptography" in {name.partition(".")[0] for name in loaded}


class TestServe:
    async def test_the_peer_is_never_taken_from_x_forwarded_for(
        self, gateway_settings: Callable[..., GatewaySettings]
    ) -> None:
        # uvicorn's own proxy-header handling (on by default, trusting loopback, or anyone with
        # FORWARDED_ALLOW_IPS="*") would make each forged header a new client; `serve` turns it
        # off, so the gateway's TRUSTED_PROXIES (none here) is the only rule.
        settings = gateway_settings()
        port = free_port()
        env = {
            **os.environ,
            "GATEWAY_PORT": str(port),
            "FORWARDED_ALLOW_IPS": "*",
            "DEVELOPMENT_MODE": "false",  # loopback is limited like anyone
            "AUTH_JWT_SECRET": "a-deployed-signing-secret-0123456789",
            "WEBHOOK_RATE_LIMIT_PER_MINUTE": "1",
            "RABBITMQ_URL": settings.rabbitmq_url.get_secret_value(),
            "EVENTS_EXCHANGE": settings.events_exchange,
            "ADMIN_ALERTS_EXCHANGE": settings.admin_alerts_exchange,
            "QUEUE_PREFIX": settings.queue_prefix,
            "PAYMENTS_URL": f"http://127.0.0.1:{free_port()}",  # nothing listens: a 503
        }
        async with serving_process("gateway", env, port, health="/health/live") as http:
            found = [
                await http.get(
                    "/api/payments/webhook?payment_ref=p",
                    headers={"X-Forwarded-For": f"198.51.100.{n}"},
                )
                for n in range(2)
            ]

        assert [r.status_code for r in found] == [503, 429]
        assert "from 127.0.0.1" in found[1].json()["detail"]

"""`python -m booking.gateway`: what the gateway process loads (its resident memory, issue 6)."""

import json
import subprocess
import sys

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


def probe() -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


class TestWhatTheGatewayLoads:
    def test_no_database_toolkit_no_rsa_no_command_line_and_no_reload_libraries(self) -> None:
        loaded = {name.partition(".")[0] for name in probe()["modules"]}
        assert loaded & {"sqlalchemy", "cryptography", "rich", "pygments", "watchfiles"} == set()

    def test_admin_tokens_still_verify_without_cryptography(self) -> None:
        assert probe()["sub"] == "admin-1"

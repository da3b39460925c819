import os
import sys

# Resident memory (issue 6: <= 100 MB with 1,000 admin websockets). Before anything imports them:
# - cryptography (~10 MB resident: its Rust extension and libcrypto's pages) is in the image for
#   the calendar's Google keys; PyJWT loads it when present. Without an identity provider the
#   gateway verifies HS256 only; with one (AUTH_JWKS_URL), RS256 and ES256 need it.
# - httpx imports its command line (click, rich, pygments: ~3 MB) when they are installed, as in
#   the dev environment; the image has no rich, and the gateway runs no CLI.
# - watchfiles (~1 MB: a Rust extension) is uvicorn's --reload, which the gateway never uses.
# A None entry makes their import fail, which each of those libraries expects and handles.
_provider = any(k.upper() == "AUTH_JWKS_URL" and v.strip() for k, v in os.environ.items())
for _unused in ("httpx._main", "watchfiles", *(() if _provider else ("cryptography",))):
    sys.modules.setdefault(_unused, None)  # type: ignore[arg-type]

from booking.gateway.app import create_app  # noqa: E402
from booking.gateway.settings import GatewaySettings  # noqa: E402
from booking.runtime.cli import main  # noqa: E402

# What the imports built (~73,000 objects, a 23 ms full collection on its own) is frozen out of
# the collector's way before serving, as in every service (booking.runtime.cli.settle_the_heap):
# a full collection with a thousand admins connected then scans theirs only. Without it,
# bench.alerts_fanout's delivery p99 was 150-190 ms (target 100) in four runs of four; with it
# 36-87 ms.
main(name="gateway", settings_type=GatewaySettings, create_app=create_app)

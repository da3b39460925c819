"""`python -m demo` (`make demo`): the walkthrough against the system `make run` started.

Exit 0 when every step worked; 1 with one line saying why when one did not; 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from demo.walkthrough import DemoStopped, Narrator, System, Walkthrough, colour_wanted


async def main(args: argparse.Namespace) -> int:
    narrator = Narrator(colour=colour_wanted())
    try:
        system = System.from_environment(os.environ)
        if args.gateway:
            system = System(args.gateway.rstrip("/"), system.konnect, system.google, system.secret)
        walkthrough = Walkthrough(system, narrator, timeout=args.timeout)
    except DemoStopped as exc:
        print(f"\ndemo stopped: {exc}", file=sys.stderr)
        return 1
    try:
        await walkthrough.run()
    except DemoStopped as exc:
        print(f"\ndemo stopped: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug here must still read as one line, not a stack trace
        print(f"\ndemo stopped by an unexpected {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        await walkthrough.close()
    return 0


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m demo",
        description="A narrated walkthrough of the system `make run` started (same environment:"
        " GATEWAY_PORT, SANDBOX_KONNECT_PORT, SANDBOX_GOOGLE_PORT, BIND_HOST, AUTH_JWT_SECRET).",
    )
    parser.add_argument("--gateway", help="the gateway's base URL (default: from GATEWAY_PORT)")
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="seconds each step may wait (default 30)"
    )
    return parser.parse_args()


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main(arguments())))
    except KeyboardInterrupt:
        print("\ndemo interrupted", file=sys.stderr)
        sys.exit(130)

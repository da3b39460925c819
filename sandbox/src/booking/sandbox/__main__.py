"""`python -m booking.sandbox konnect serve` and `python -m booking.sandbox google serve`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

from booking.runtime.logs import configure_logging
from booking.sandbox import google, konnect
from booking.sandbox.settings import SandboxSettings

AppFactory = Callable[[SandboxSettings], FastAPI]
# provider -> (its app, built from the settings; its port)
PROVIDERS: dict[str, tuple[AppFactory, Callable[[SandboxSettings], int]]] = {
    "konnect": (konnect.create_app, lambda s: s.konnect_port),
    "google": (google.create_app, lambda s: s.google_port),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m booking.sandbox")
    parser.add_argument("provider", choices=sorted(PROVIDERS))
    parser.add_argument("command", choices=["serve"], help="serve the stand-in over HTTP")
    args = parser.parse_args(argv)

    try:
        settings = SandboxSettings()
    except ValidationError as exc:
        # One line an operator can act on (a placeholder token, say), not a traceback.
        reasons = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
        sys.exit(f"sandbox-{args.provider} refuses its settings: {reasons}")
    configure_logging(f"sandbox-{args.provider}", settings.log_level)
    create_app, port = PROVIDERS[args.provider]
    uvicorn.run(
        create_app(settings),
        host=settings.bind_host,
        port=port(settings),
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":
    main()

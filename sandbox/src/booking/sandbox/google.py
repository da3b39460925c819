"""The Google stand-in (OAuth 2.0 consent and token endpoints, Calendar API v3).

A placeholder for now: it answers its health probes, and every other path gets a 404
problem+json until the OAuth and Calendar behaviour of /work/shared/reference/providers.md is
built here.
"""

from fastapi import FastAPI

from booking.runtime.health import Health
from booking.runtime.problems import install_problem_handlers

SERVICE = "sandbox-google"


def create_app() -> FastAPI:
    app = FastAPI(title="Google sandbox", openapi_url=None)
    # Unknown paths (all of OAuth and Calendar, for now) answer 404 as problem+json.
    install_problem_handlers(app)
    # No dependencies: /health/live, /health/ready and /health all simply pass.
    app.include_router(Health(service=SERVICE).router())
    return app

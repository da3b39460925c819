"""The Konnect stand-in (payment gateway, API v2 under /api/v2).

A placeholder for now: it answers its health probes, and every /api/v2 call gets a 404
problem+json until the payment behaviour of /work/shared/reference/providers.md is built here.
"""

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from booking.runtime.health import Health
from booking.runtime.problems import install_problem_handlers, problem

SERVICE = "sandbox-konnect"


def create_app() -> FastAPI:
    app = FastAPI(title="Konnect sandbox", openapi_url=None)
    install_problem_handlers(app)
    # No dependencies: /health/live, /health/ready and /health all simply pass.
    app.include_router(Health(service=SERVICE).router())

    @app.api_route("/api/v2/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def not_yet(path: str, request: Request) -> JSONResponse:
        return problem(
            404,
            f"the Konnect sandbox does not serve {request.method} /api/v2/{path} yet",
            instance=request.url.path,
        )

    return app

"""The admins' dashboard: one page at `/admin`, its files in `static/` beside this module.

Plain ES modules and CSS that the gateway serves itself: no framework, no build step, nothing
fetched from elsewhere, so the page works offline. The page holds no server-side session: the
admin pastes a token, and the page speaks the public API and `/ws/admin` as any client would.
Only the files that are there are served (no path from the URL reaches the filesystem).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from starlette.responses import FileResponse, RedirectResponse, Response

STATIC = Path(__file__).with_name("static")
PREFIX = "/admin"

_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}

# Everything the page loads is its own; its scripts build the DOM without innerHTML, and this
# policy makes sure nothing inline or foreign runs even if text ever slipped through as markup.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidated on each load: a deploy's new page is never mixed with an old module.
    "Cache-Control": "no-cache",
}


def router(static: Path = STATIC) -> APIRouter:
    """`GET /admin/` (the page) and `GET /admin/<file>` (its modules, styles and icon)."""
    files = {
        path.name: path
        for path in sorted(static.iterdir())
        if path.is_file() and path.suffix in _MEDIA_TYPES
    }
    router = APIRouter(include_in_schema=False)

    def send(name: str) -> Response:
        path = files.get(name)
        if path is None:
            raise HTTPException(404, f"the dashboard has no file {name!r}")
        return FileResponse(path, media_type=_MEDIA_TYPES[path.suffix], headers=SECURITY_HEADERS)

    @router.get(PREFIX)
    async def dashboard_without_slash(request: Request) -> Response:
        # The page's modules are relative to it, so it lives at /admin/.
        query = f"?{request.url.query}" if request.url.query else ""
        return RedirectResponse(f"{PREFIX}/{query}", status_code=308)

    @router.get(f"{PREFIX}/")
    async def dashboard() -> Response:
        return send("index.html")

    @router.get(PREFIX + "/{name}")
    async def dashboard_file(name: str) -> Response:
        return send(name)

    return router

"""The page Konnect sends the payer back to: `/pay/return/<order id>?outcome=...&token=...`.

Payments gives every payment these two addresses (`outcome=success` and `outcome=failed`), with
an order link: a token that reads that one order and nothing else. The page signs nobody in: it
follows the order through `GET /api/orders/<id>/events?access_token=<the token>`, as any client
of the public API would, and says what happened and what comes next. A missing or bad token
still gets the page, which says the link is invalid or expired once the stream refuses it.

Plain files in `static/`, as the dashboard's: no framework, nothing fetched from elsewhere, the
same strict headers (no inline script; no Referer, so the token never leaves with a click on
the Meet link or the pay link). The token rides in the address, so access logs drop it.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from uuid import UUID

from fastapi import APIRouter, HTTPException
from starlette.responses import FileResponse, Response

from booking.gateway.dashboard import SECURITY_HEADERS

STATIC = Path(__file__).with_name("static")
PREFIX = "/pay/return"

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}


def router(static: Path = STATIC) -> APIRouter:
    """`GET /pay/return/<order id>` (the page) and `GET /pay/return/assets/<file>` (its script,
    styles and icon, relative to the page)."""
    assets = {path.name: path for path in static.iterdir() if path.suffix in _TYPES}
    page = assets.pop("index.html")
    hide_link_tokens_from_access_logs()
    router = APIRouter(include_in_schema=False)

    @router.get(PREFIX + "/assets/{name}")
    async def return_page_asset(name: str) -> Response:
        path = assets.get(name)
        if path is None:
            raise HTTPException(404, f"the return page has no file {name!r}")
        return FileResponse(path, media_type=_TYPES[path.suffix], headers=SECURITY_HEADERS)

    @router.get(PREFIX + "/{order_id}")
    async def return_page(order_id: str) -> Response:
        # A mangled link still gets the page, which tells the payer so; the status says it too.
        status = 200 if _is_uuid(order_id) else 404
        return FileResponse(
            page, status_code=status, media_type=_TYPES[".html"], headers=SECURITY_HEADERS
        )

    return router


def _is_uuid(text: str) -> bool:
    try:
        UUID(text)
    except ValueError:
        return False
    return True


# --- logs ---------------------------------------------------------------------------------------

# `token=` (this page's address) and `access_token=` (the stream it opens), wherever a query has
# them; the value goes up to the next parameter.
_LINK_TOKEN = re.compile(r"([?&](?:access_)?token=)[^&#\s\"']*")


class _DropLinkTokens(logging.Filter):
    """An access log line (uvicorn's: client, method, path with query, version, status) keeps
    its path and loses the token: whoever reads the logs must not be able to follow the order."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and any(isinstance(a, str) and "token=" in a for a in args):
            record.args = tuple(
                _LINK_TOKEN.sub(r"\1[redacted]", a) if isinstance(a, str) else a for a in args
            )
        return True


def hide_link_tokens_from_access_logs() -> None:
    """Access logs are off under `serve`; a deployment that runs uvicorn with them on still
    never writes an order link's token."""
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, _DropLinkTokens) for f in access.filters):
        access.addFilter(_DropLinkTokens())

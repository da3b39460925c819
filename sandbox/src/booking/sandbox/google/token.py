"""Google's token endpoint, `POST /token`, form-encoded as Google takes it.

The client authenticates with `client_id` + `client_secret` in the form or with HTTP Basic;
`grant_type` is `authorization_code` (a code from the consent, once, within ten minutes, with
the consent's redirect_uri) or `refresh_token` (a new access token; no new refresh token).
Errors are OAuth's `{"error", "error_description"}`: a dead refresh token is 400 invalid_grant.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Callable
from datetime import datetime
from urllib.parse import parse_qsl, unquote_plus

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from booking.sandbox.google.errors import faulted, oauth_error
from booking.sandbox.google.faults import Faults
from booking.sandbox.google.oauth import GrantRefused, OAuth
from booking.sandbox.settings import SandboxSettings

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def basic_credentials(header: str) -> tuple[str, str] | None:
    """(client_id, client_secret) from `Authorization: Basic ...`; each part form-url-encoded
    as RFC 6749 2.3.1 says."""
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    client_id, colon, secret = decoded.partition(":")
    return (unquote_plus(client_id), unquote_plus(secret)) if colon else None


def token_router(
    settings: SandboxSettings,
    oauth: OAuth,
    faults: Faults,
    clock: Callable[[], datetime],
) -> APIRouter:
    router = APIRouter(include_in_schema=False)
    client_id = settings.google_client_id
    client_secret = settings.google_client_secret.get_secret_value().encode()
    lifetime = settings.google_access_token_seconds

    def authenticated(request: Request, form: dict[str, str]) -> JSONResponse | None:
        """The 401 for a client that did not prove who it is, or None."""
        credentials = basic_credentials(request.headers.get("authorization", ""))
        given_id, given_secret = credentials or (
            form.get("client_id", ""),
            form.get("client_secret", ""),
        )
        if given_id != client_id:
            return oauth_error(401, "invalid_client", "The OAuth client was not found.")
        if not hmac.compare_digest(given_secret.encode(), client_secret):
            return oauth_error(401, "invalid_client", "Unauthorized")
        return None

    @router.post("/token")
    async def issue_token(request: Request) -> Response:
        if answer := await faulted(faults, "token"):
            return answer
        try:
            form = dict(parse_qsl((await request.body()).decode(), keep_blank_values=True))
        except UnicodeDecodeError:
            return oauth_error(400, "invalid_request", "The body is not form-encoded UTF-8.")
        if answer := authenticated(request, form):
            return answer
        grant_type = form.get("grant_type", "")
        try:
            if grant_type == "authorization_code":
                if not form.get("code"):
                    return oauth_error(400, "invalid_request", "Missing required parameter: code")
                tokens = oauth.exchange(
                    client_id, form["code"], form.get("redirect_uri", ""), lifetime, clock()
                )
            elif grant_type == "refresh_token":
                if not form.get("refresh_token"):
                    return oauth_error(
                        400, "invalid_request", "Missing required parameter: refresh_token"
                    )
                tokens = oauth.refresh(client_id, form["refresh_token"], lifetime, clock())
            else:
                return oauth_error(
                    400, "unsupported_grant_type", f"Invalid grant_type: {grant_type}"
                )
        except GrantRefused as exc:
            return oauth_error(400, exc.error, exc.description)
        return JSONResponse(tokens, headers=NO_STORE)

    return router

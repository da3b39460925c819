"""Calendar API v3 under /calendar/v3: event insert, read and delete, and freeBusy, as Google
answers.

Every call needs `Authorization: Bearer <access token>`; a missing, unknown, expired or revoked
one is 401 `authError`. Errors are Google's `{"error": {...}}`, never problem+json. A queued
fault switch answers before anything else (auth included), as Google's front end would.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from booking.sandbox.google.calendars import (
    SEND_UPDATES,
    CalendarError,
    Calendars,
    FreeBusyQuery,
    bad,
    not_found,
)
from booking.sandbox.google.errors import auth_error, faulted, refusal
from booking.sandbox.google.faults import CallKind, Faults
from booking.sandbox.google.oauth import AccessToken, OAuth
from booking.sandbox.settings import SandboxSettings


async def json_body(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except ValueError:
        raise bad("Parse Error", "parseError") from None


def conference_data_version(request: Request) -> int:
    given = request.query_params.get("conferenceDataVersion", "0")
    if given not in ("0", "1"):
        raise bad(f"Invalid conferenceDataVersion value: {given}")
    return int(given)


def send_updates(request: Request) -> str:
    given = request.query_params.get("sendUpdates", "none")
    if given not in SEND_UPDATES:
        raise bad(f"Invalid sendUpdates value: {given}")
    return given


def calendar_router(
    settings: SandboxSettings,
    oauth: OAuth,
    calendars: Calendars,
    faults: Faults,
    clock: Callable[[], datetime],
) -> APIRouter:
    router = APIRouter(prefix="/calendar/v3", include_in_schema=False)
    public_url = settings.google_public_url

    async def caller(request: Request, call: CallKind) -> AccessToken | Response:
        """Who is calling, or the fault or 401 that answers instead."""
        if answer := await faulted(faults, call):
            return answer
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        token = oauth.authenticate(value.strip(), clock()) if scheme.lower() == "bearer" else None
        return token or auth_error()

    @router.post("/calendars/{calendar_id}/events")
    async def insert_event(calendar_id: str, request: Request) -> Response:
        token = await caller(request, "insert")
        if isinstance(token, Response):
            return token
        try:
            if not calendars.reaches(token.account, calendar_id):
                raise not_found()
            event = calendars.insert(
                token.account,
                await json_body(request),
                conference_data_version(request),
                send_updates(request),
                settings.google_meet_pending_reads,
                clock(),
            )
        except CalendarError as exc:
            return refusal(exc)
        return JSONResponse(event.read(public_url))

    @router.get("/calendars/{calendar_id}/events/{event_id}")
    async def get_event(calendar_id: str, event_id: str, request: Request) -> Response:
        token = await caller(request, "get")
        if isinstance(token, Response):
            return token
        event = calendars.get(token.account, event_id)
        if event is None or not calendars.reaches(token.account, calendar_id):
            return refusal(not_found())
        return JSONResponse(event.read(public_url))

    @router.delete("/calendars/{calendar_id}/events/{event_id}")
    async def delete_event(calendar_id: str, event_id: str, request: Request) -> Response:
        """204 with no body; then the event reads back `cancelled`, and a second delete is 410."""
        token = await caller(request, "delete")
        if isinstance(token, Response):
            return token
        try:
            if not calendars.reaches(token.account, calendar_id):
                raise not_found()
            calendars.delete(token.account, event_id, send_updates(request), clock())
        except CalendarError as exc:
            return refusal(exc)
        return Response(status_code=204)

    @router.post("/freeBusy")
    async def free_busy(request: Request) -> Response:
        token = await caller(request, "freebusy")
        if isinstance(token, Response):
            return token
        try:
            query = FreeBusyQuery.parse(await json_body(request))
        except CalendarError as exc:
            return refusal(exc)
        return JSONResponse(calendars.free_busy(token.account, query))

    @router.api_route(
        "/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    )
    async def unknown(path: str) -> Response:
        # Not one of the calls the sandbox plays (and never a fault's: see faults.py).
        return refusal(not_found())

    return router

"""The calendar service's HTTP routes: connecting a mentor's Google calendar, and an admin's
retry of a session's scheduling.

The gateway forwards the caller's Authorization header; every route but Google's callback
verifies the token and the role again, so the service reached directly is no more open than
through the gateway. Which mentor a token may act as is decided here, by `acts_as_mentor`, with
the identity-provider subject MentorRegistered or MentorIdentityLinked gave the mentor (the
gateway only checks the role). Errors are problem+json.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from fastapi import APIRouter, Body, Depends, HTTPException, Query, Response
from fastapi.responses import RedirectResponse

from booking.calendar.service import (
    CalendarService,
    ConnectRefused,
    RetryRefused,
    UnknownMentor,
    UnknownSession,
)
from booking.contracts.http import CalendarConnection, OptionalReason, SessionScheduling
from booking.runtime.auth import Identity, Role, acts_as_mentor, require_roles

_PROBLEM: dict[str, Any] = {"content": {"application/problem+json": {}}}


def _unknown(mentor_id: UUID) -> HTTPException:
    return HTTPException(404, f"no mentor has the id {mentor_id}")


def calendar_router(calendar: CalendarService) -> APIRouter:
    router = APIRouter(tags=["calendar"])

    async def acting_as_the_mentor(
        mentor_id: UUID, identity: Identity = Depends(require_roles(Role.ADMIN, Role.MENTOR))
    ) -> Identity:
        """403 unless the caller may act as the mentor in the path; asked before whether the
        mentor exists, so another mentor learns nothing of it (an unknown mentor has no
        subject)."""
        if not acts_as_mentor(identity, mentor_id, await calendar.identity_subject(mentor_id)):
            raise HTTPException(403, "a mentor may act only on their own calendar")
        return identity

    @router.get(
        "/api/mentors/{mentor_id}/calendar/connect",
        status_code=302,
        response_class=Response,
        response_model=None,
        responses={
            302: {
                "description": "to Google's consent page",
                "headers": {"Location": {"schema": {"type": "string"}}},
            },
            404: {"description": "no such mentor", **_PROBLEM},
        },
        dependencies=[Depends(acting_as_the_mentor)],
        summary="Start connecting a mentor's Google Calendar",
    )
    async def connect_calendar(mentor_id: UUID) -> Response:
        try:
            url = await calendar.consent_url(mentor_id)
        except UnknownMentor:
            raise _unknown(mentor_id) from None
        return RedirectResponse(url, status_code=302)

    @router.get(
        "/api/calendar/oauth/callback",
        response_model=CalendarConnection,
        responses={
            400: {"description": "bad, expired or replayed state; consent denied", **_PROBLEM},
            502: {"description": "Google refused or could not be reached", **_PROBLEM},
        },
        summary="Where Google sends the browser back (the signed state says who)",
    )
    async def finish_calendar_connection(
        code: str | None = Query(None, max_length=2000),
        state: str | None = Query(None, max_length=2000),
        error: str | None = Query(None, max_length=200),
    ) -> CalendarConnection:
        try:
            return await calendar.connect(code=code, state=state, error=error)
        except ConnectRefused as refused:
            raise HTTPException(refused.status, refused.detail) from None

    @router.get(
        "/api/mentors/{mentor_id}/calendar",
        response_model=CalendarConnection,
        responses={404: {"description": "no such mentor", **_PROBLEM}},
        dependencies=[Depends(acting_as_the_mentor)],
        summary="A mentor's calendar connection",
    )
    async def calendar_connection(mentor_id: UUID) -> CalendarConnection:
        try:
            return await calendar.connection_status(mentor_id)
        except UnknownMentor:
            raise _unknown(mentor_id) from None

    @router.delete(
        "/api/mentors/{mentor_id}/calendar",
        status_code=204,
        response_class=Response,
        response_model=None,
        responses={404: {"description": "no such mentor", **_PROBLEM}},
        dependencies=[Depends(acting_as_the_mentor)],
        summary="Disconnect a mentor's calendar (its tokens are forgotten)",
    )
    async def disconnect_calendar(mentor_id: UUID) -> Response:
        try:
            await calendar.disconnect(mentor_id)
        except UnknownMentor:
            raise _unknown(mentor_id) from None
        return Response(status_code=204)

    @router.post(
        "/api/admin/sessions/{session_id}/retry-scheduling",
        response_model=SessionScheduling,
        responses={
            404: {"description": "no such session", **_PROBLEM},
            409: {"description": "the session was cancelled", **_PROBLEM},
        },
        summary="Try a failed scheduling again now (a final one too); the retry schedule restarts",
    )
    async def retry_scheduling(
        session_id: UUID,
        body: OptionalReason = Body(default_factory=OptionalReason),
        identity: Identity = Depends(require_roles(Role.ADMIN)),
    ) -> SessionScheduling:
        try:
            return await calendar.retry_scheduling(
                session_id, by=identity.sub, reason=body.reason or "scheduling retried"
            )
        except UnknownSession:
            raise HTTPException(404, f"no paid session has the id {session_id}") from None
        except RetryRefused as refused:
            raise HTTPException(409, str(refused)) from None

    return router

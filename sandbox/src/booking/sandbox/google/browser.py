"""What a browser opens: Google's consent page with Allow and Deny, its decision, and the page
an event's htmlLink points to.

The consent checks are Google's: a request it cannot honour (unknown client, no redirect_uri,
a response_type other than `code`, no calendar scope) gets a 400 error page, never a redirect.
Allow sends the browser to `redirect_uri?code=..&state=..`; Deny to `?error=access_denied`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from html import escape
from urllib.parse import parse_qsl

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from booking.sandbox.google.calendars import Calendars
from booking.sandbox.google.oauth import ConsentRefused, ConsentRequest, OAuth
from booking.sandbox.settings import SandboxSettings

AUTH_PATH = "/o/oauth2/v2/auth"
DECISION_PATH = f"{AUTH_PATH}/decision"
SCOPE_NAMES = {
    "https://www.googleapis.com/auth/calendar.events": "View and edit events on all your calendars",
    "https://www.googleapis.com/auth/calendar": "See, edit, share and delete all your calendars",
}

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} | Google sandbox</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 30rem; margin: 3rem auto; color: #202124; }}
.account {{ font-weight: 600; }}
.error {{ color: #b3261e; }}
ul {{ padding-left: 1.2rem; }}
form {{ margin-top: 1.5rem; }}
button {{ font-size: 1rem; padding: .5rem 1.5rem; border-radius: .3rem; border: 0;
  cursor: pointer; margin-right: .5rem; }}
button.allow {{ background: #1a73e8; color: #fff; }}
button.deny {{ background: #e8eaed; color: #202124; }}
</style></head>
<body><p><small>Google sandbox: no real Google account is involved.</small></p>
<h1>{title}</h1>
{body}
</body></html>
"""


def page(title: str, body: str, status_code: int = 200) -> HTMLResponse:
    return HTMLResponse(PAGE.format(title=escape(title), body=body), status_code=status_code)


def error_page(exc: ConsentRefused) -> HTMLResponse:
    body = (
        f'<p class="error">Error 400: {escape(exc.error)}</p>'
        f"<p>{escape(exc.description)}</p>"
        "<p>The app's request is not valid, so Google cannot send you back to it.</p>"
    )
    return page("Access blocked: this app's request is invalid", body, 400)


def consent_page(consent: ConsentRequest) -> HTMLResponse:
    account = consent.account()
    scopes = "".join(
        f"<li>{escape(SCOPE_NAMES.get(scope, scope))} <small>({escape(scope)})</small></li>"
        for scope in consent.scope.split()
    )
    fields = "".join(
        f'<input type="hidden" name="{escape(name)}" value="{escape(value)}">'
        for name, value in {**consent.as_params(), "account": account}.items()
    )
    offline = (
        "<p>It will keep this access when you are not using it (offline access).</p>"
        if consent.offline
        else ""
    )
    body = (
        f'<p>Signed in as <span class="account">{escape(account)}</span></p>'
        f"<p>The app <strong>{escape(consent.client_id)}</strong> wants to:</p>"
        f"<ul>{scopes}</ul>{offline}"
        f'<form method="post" action="{DECISION_PATH}">{fields}'
        '<button class="allow" type="submit" name="decision" value="allow">Allow</button>'
        '<button class="deny" type="submit" name="decision" value="deny">Deny</button>'
        "</form>"
    )
    return page("Sign in with Google", body)


def decide(
    oauth: OAuth,
    consent: ConsentRequest,
    allow: bool,
    account: str | None,
    now: datetime,
) -> str:
    """Where the browser goes after Allow (a new code) or Deny."""
    if not allow:
        return consent.denied()
    return consent.granted(oauth.approve(consent, account, now).value)


def browser_router(
    settings: SandboxSettings,
    oauth: OAuth,
    calendars: Calendars,
    clock: Callable[[], datetime],
) -> APIRouter:
    router = APIRouter(include_in_schema=False)

    def consent_of(params: Mapping[str, str]) -> ConsentRequest:
        return ConsentRequest.parse(params, settings.google_client_id)

    @router.get(AUTH_PATH)
    async def show_consent(request: Request) -> Response:
        try:
            consent = consent_of(request.query_params)
        except ConsentRefused as exc:
            return error_page(exc)
        return consent_page(consent)

    @router.post(DECISION_PATH)
    async def take_decision(request: Request) -> Response:
        try:
            form = dict(parse_qsl((await request.body()).decode(), keep_blank_values=True))
        except UnicodeDecodeError:
            form = {}
        try:
            consent = consent_of(form)
        except ConsentRefused as exc:
            return error_page(exc)
        decision = form.get("decision")
        if decision not in ("allow", "deny"):
            return error_page(ConsentRefused("invalid_request", "Choose Allow or Deny."))
        location = decide(oauth, consent, decision == "allow", form.get("account"), clock())
        return RedirectResponse(location, 303)

    @router.get("/calendar/event")
    async def show_event(eid: str = "") -> HTMLResponse:
        event = calendars.find_by_eid(eid)
        if event is None:
            return page("Event not found", "<p>There is no event at this address.</p>", 404)
        shown = event.as_json(settings.google_public_url)
        start, end = event.start.echo, event.end.echo
        lines = [
            f"<p>{escape(start.get('dateTime') or start['date'])} to "
            f"{escape(end.get('dateTime') or end['date'])}</p>",
            f"<p>Calendar of {escape(event.account)}</p>",
        ]
        if event.description:
            lines.append(f"<p>{escape(event.description)}</p>")
        if link := shown.get("hangoutLink"):
            anchor = f'<a href="{escape(link)}">{escape(link)}</a>'
            lines.append(f"<p>Join with Google Meet: {anchor}</p>")
        guests = "".join(f"<li>{escape(a['email'])}</li>" for a in event.attendees)
        if guests:
            lines.append(f"<p>Guests:</p><ul>{guests}</ul>")
        return page(event.summary or "(No title)", "\n".join(lines))

    return router

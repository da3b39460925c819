"""Calendars and their events as Calendar API v3 keeps them: one `primary` calendar per account
(also addressed by the account's email), the insert's checks, the Meet link that may arrive a
few reads late, deletion (the event stays, `cancelled`, and its id is never free again), and
free/busy.

Pure: no I/O, and every function that needs the time is given `now`.
"""

from __future__ import annotations

import base64
import re
import secrets
import string
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from booking.sandbox.google.clock import rfc3339

# Client-chosen event ids: base32hex (a-v, 0-9), 5 to 1024 characters.
EVENT_ID = re.compile(r"[a-v0-9]{5,1024}")
DATE_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|z|[+-]\d{2}:\d{2})?")
SEND_UPDATES = ("all", "externalOnly", "none")
MEET = "hangoutsMeet"
MEET_ICON = (
    "https://fonts.gstatic.com/s/i/productlogos/meet_2020q4/v6/web-512dp/"
    "logo_meet_2020q4_color_2x_web_512dp.png"
)


class CalendarError(Exception):
    """A refusal in Calendar's terms: the HTTP status, the reason, the message."""

    def __init__(self, status: int, reason: str, message: str, domain: str = "global") -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.domain = domain


def bad(message: str, reason: str = "invalid") -> CalendarError:
    return CalendarError(400, reason, message)


def not_found() -> CalendarError:
    return CalendarError(404, "notFound", "Not Found")


def deleted() -> CalendarError:
    """A second delete of an event: gone already (clients treat it as done)."""
    return CalendarError(410, "deleted", "Resource has been deleted")


def new_event_id() -> str:
    """26 base32hex characters, the shape of the ids Google makes."""
    return base64.b32hexencode(secrets.token_bytes(16)).decode().lower().rstrip("=")


def new_meet_code() -> str:
    """`xxx-yyyy-zzz`, the shape of a Meet code."""
    letters = string.ascii_lowercase
    return "-".join("".join(secrets.choice(letters) for _ in range(n)) for n in (3, 4, 3))


def rfc3339_in(moment: datetime, zone: tzinfo) -> str:
    """Seconds precision in `zone`, Z for UTC: how Google writes event times and busy periods."""
    return moment.astimezone(zone).isoformat(timespec="seconds").replace("+00:00", "Z")


def parse_zone(name: Any, what: str) -> tzinfo | None:
    if name is None:
        return None
    try:
        if not isinstance(name, str) or not name:
            raise ValueError(name)
        return ZoneInfo(name)
    except (ValueError, ZoneInfoNotFoundError):
        raise bad(f"Invalid time zone definition for {what}.") from None


def parse_instant(text: Any, zone: tzinfo | None, what: str) -> datetime:
    """An RFC 3339 date-time; one without an offset needs `zone`."""
    if not isinstance(text, str) or not DATE_TIME.fullmatch(text):
        raise bad(f"Invalid {what}.")
    try:
        moment = datetime.fromisoformat(text.upper())
    except ValueError:
        raise bad(f"Invalid {what}.") from None
    if moment.tzinfo is None:
        if zone is None:
            raise bad(f"Missing time zone definition for {what}.", "required")
        moment = moment.replace(tzinfo=zone)
    return moment


@dataclass(frozen=True)
class When:
    """An event's start or end: an instant, and how to write it back."""

    at: datetime
    echo: dict[str, str]

    @classmethod
    def parse(cls, value: Any, name: str) -> When:
        if not isinstance(value, dict) or not ({"dateTime", "date"} & set(value)):
            raise bad(f"Missing {name} time.", "required")
        zone = parse_zone(value.get("timeZone"), f"{name} time")
        if "dateTime" in value:
            at = parse_instant(value["dateTime"], zone, f"{name} time")
            # Google writes the time back in the event's time zone (the calendar's, UTC here).
            echo = {"dateTime": rfc3339_in(at, zone or UTC)}
        else:
            try:
                day = date.fromisoformat(value["date"])
            except (TypeError, ValueError):
                raise bad(f"Invalid {name} time.") from None
            at = datetime.combine(day, time(), zone or UTC)
            echo = {"date": day.isoformat()}
        if zone is not None:
            echo["timeZone"] = value["timeZone"]
        return cls(at, echo)


@dataclass
class Conference:
    """The Meet data of an event: `pending` for its first `pending_reads` reads, then `success`."""

    request_id: str
    solution_type: str
    meet_code: str
    pending_reads: int

    @property
    def pending(self) -> bool:
        return self.pending_reads > 0

    @property
    def meet_url(self) -> str | None:
        return None if self.pending else f"https://meet.google.com/{self.meet_code}"

    def read(self) -> dict[str, Any]:
        """What a client reading the event now sees; each read brings the Meet link nearer."""
        seen = self.as_json()
        self.pending_reads = max(self.pending_reads - 1, 0)
        return seen

    def as_json(self) -> dict[str, Any]:
        create = {
            "requestId": self.request_id,
            "conferenceSolutionKey": {"type": self.solution_type},
            "status": {"statusCode": "pending" if self.pending else "success"},
        }
        if self.pending:
            return {"createRequest": create}
        return {
            "createRequest": create,
            # Video first, as Google lists them; clients should pick it by type all the same.
            "entryPoints": [
                {
                    "entryPointType": "video",
                    "uri": self.meet_url,
                    "label": f"meet.google.com/{self.meet_code}",
                },
                {
                    "entryPointType": "more",
                    "uri": f"https://tel.meet/{self.meet_code}?pin=1234567890123",
                    "pin": "1234567890123",
                },
            ],
            "conferenceSolution": {
                "key": {"type": MEET},
                "name": "Google Meet",
                "iconUri": MEET_ICON,
            },
            "conferenceId": self.meet_code,
        }


def parse_conference(body: dict[str, Any], meet_pending_reads: int) -> Conference | None:
    data = body.get("conferenceData")
    create = data.get("createRequest") if isinstance(data, dict) else None
    if create is None:
        return None
    if not isinstance(create, dict):
        raise bad("Invalid conference create request.")
    request_id = create.get("requestId")
    if not isinstance(request_id, str) or not request_id:
        raise bad("Missing conference create request id.", "required")
    key = create.get("conferenceSolutionKey")
    kind = key.get("type") if isinstance(key, dict) else None
    if kind != MEET:
        raise bad("Invalid conference type value.")
    return Conference(request_id, kind, new_meet_code(), meet_pending_reads)


def optional_text(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise bad(f"Invalid value for: {name}")
    return value


def parse_attendees(value: Any, organizer: str) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise bad("Invalid value for: attendees")
    attendees = []
    for given in value:
        email = given.get("email") if isinstance(given, dict) else None
        if not isinstance(email, str) or not email.strip():
            raise bad("Missing attendee email.", "required")
        attendee = {**given, "email": email.strip()}
        if attendee["email"].lower() == organizer:
            # The organizer listed as a guest: Google marks it and counts it as accepted.
            attendee.update(organizer=True, self=True, responseStatus="accepted")
        attendee.setdefault("responseStatus", "needsAction")
        attendees.append(attendee)
    return attendees


@dataclass
class Event:
    id: str
    account: str
    start: When
    end: When
    created_at: datetime
    summary: str | None = None
    description: str | None = None
    location: str | None = None
    attendees: list[dict[str, Any]] = field(default_factory=list)
    transparency: str = "opaque"
    conference: Conference | None = None
    send_updates: str = "none"
    status: str = "confirmed"
    updated_at: datetime | None = None
    # The sendUpdates of the delete that cancelled it (who was told).
    deleted_send_updates: str | None = None

    @property
    def eid(self) -> str:
        """The `eid` of htmlLink: base64url of "<event id> <calendar>", as Google makes it."""
        raw = f"{self.id} {self.account}".encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @property
    def busy(self) -> bool:
        return self.status == "confirmed" and self.transparency == "opaque"

    def read(self, public_url: str) -> dict[str, Any]:
        """The event as a client's insert or get sees it (the Meet data moves on)."""
        return self._json(public_url, self.conference.read() if self.conference else None)

    def as_json(self, public_url: str) -> dict[str, Any]:
        """The event as it stands, without counting as a read."""
        return self._json(public_url, self.conference.as_json() if self.conference else None)

    def cancel(self, send_updates: str, now: datetime) -> None:
        """Deleted: Google keeps the event, `cancelled`, and still answers a read of it."""
        if self.status == "cancelled":
            raise deleted()
        self.status = "cancelled"
        self.updated_at = now
        self.deleted_send_updates = send_updates

    def _json(self, public_url: str, conference: dict[str, Any] | None) -> dict[str, Any]:
        stamp = rfc3339(self.created_at)
        me = {"email": self.account, "self": True}
        event: dict[str, Any] = {
            "kind": "calendar#event",
            "etag": f'"{int(self.created_at.timestamp() * 1000)}"',
            "id": self.id,
            "status": self.status,
            "htmlLink": f"{public_url}/calendar/event?eid={self.eid}",
            "created": stamp,
            "updated": rfc3339(self.updated_at) if self.updated_at else stamp,
            "summary": self.summary,
            "description": self.description,
            "location": self.location,
            "creator": me,
            "organizer": me,
            "start": self.start.echo,
            "end": self.end.echo,
            "transparency": "transparent" if self.transparency == "transparent" else None,
            "iCalUID": f"{self.id}@google.com",
            "sequence": 0,
            "attendees": self.attendees or None,
            "reminders": {"useDefault": True},
            "eventType": "default",
        }
        if conference is not None:
            entry_points = conference.get("entryPoints", [])
            # The Meet link once it exists: the video entry point's.
            event["hangoutLink"] = next(
                (e["uri"] for e in entry_points if e["entryPointType"] == "video"), None
            )
            event["conferenceData"] = conference
        # Google leaves out what an event does not have, rather than sending nulls.
        return {name: value for name, value in event.items() if value is not None}


@dataclass(frozen=True)
class FreeBusyQuery:
    time_min: datetime
    time_max: datetime
    zone: tzinfo
    ids: list[str]

    @classmethod
    def parse(cls, body: Any) -> FreeBusyQuery:
        if not isinstance(body, dict):
            raise bad("Parse Error", "parseError")
        zone = parse_zone(body.get("timeZone"), "timeZone") or UTC
        bounds = []
        for name in ("timeMin", "timeMax"):
            if body.get(name) is None:
                raise bad(f"Missing {name} parameter.", "required")
            bounds.append(parse_instant(body[name], zone, name))
        time_min, time_max = bounds
        if time_max < time_min:
            raise CalendarError(
                400, "timeRangeEmpty", "The specified time range is empty.", "calendar"
            )
        items = body.get("items") or []
        if not isinstance(items, list) or not all(
            isinstance(item, dict) and isinstance(item.get("id"), str) for item in items
        ):
            raise bad("Invalid value for: items")
        return cls(time_min, time_max, zone, [item["id"] for item in items])


@dataclass
class Calendars:
    """Every event of every account's calendar, in the order they were inserted."""

    events: dict[tuple[str, str], Event] = field(default_factory=dict)

    @staticmethod
    def reaches(account: str, calendar_id: str) -> bool:
        """Whether `account` can reach `calendar_id`: its own calendar, by either name."""
        return calendar_id == "primary" or calendar_id.lower() == account

    def insert(
        self,
        account: str,
        body: Any,
        conference_data_version: int,
        send_updates: str,
        meet_pending_reads: int,
        now: datetime,
    ) -> Event:
        if not isinstance(body, dict):
            raise bad("Parse Error", "parseError")
        event_id = body.get("id")
        if event_id is None:
            event_id = new_event_id()
        elif not isinstance(event_id, str) or not EVENT_ID.fullmatch(event_id):
            raise bad("Invalid resource id value.")
        start = When.parse(body.get("start"), "start")
        end = When.parse(body.get("end"), "end")
        if end.at < start.at:
            raise CalendarError(
                400, "timeRangeEmpty", "The specified time range is empty.", "calendar"
            )
        transparency = body.get("transparency") or "opaque"
        if transparency not in ("opaque", "transparent"):
            raise bad("Invalid value for: transparency")
        event = Event(
            id=event_id,
            account=account,
            start=start,
            end=end,
            created_at=now,
            summary=optional_text(body, "summary"),
            description=optional_text(body, "description"),
            location=optional_text(body, "location"),
            attendees=parse_attendees(body.get("attendees"), account),
            transparency=transparency,
            # Without conferenceDataVersion=1 Google ignores conferenceData, silently.
            conference=(
                parse_conference(body, meet_pending_reads) if conference_data_version >= 1 else None
            ),
            send_updates=send_updates,
        )
        if (account, event_id) in self.events:
            raise CalendarError(409, "duplicate", "The requested identifier already exists.")
        self.events[(account, event_id)] = event
        return event

    def get(self, account: str, event_id: str) -> Event | None:
        return self.events.get((account, event_id))

    def delete(self, account: str, event_id: str, send_updates: str, now: datetime) -> Event:
        """Cancel the event: 404 if the account has none of that id, 410 if it is cancelled.

        The event is kept (a read still answers it, `cancelled`), so its id stays taken: an
        insert under it again is 409 duplicate, as at Google.
        """
        event = self.get(account, event_id)
        if event is None:
            raise not_found()
        event.cancel(send_updates, now)
        return event

    def find_by_eid(self, eid: str) -> Event | None:
        try:
            raw = base64.urlsafe_b64decode(eid + "=" * (-len(eid) % 4)).decode()
        except (ValueError, UnicodeDecodeError):
            return None
        event_id, _, account = raw.partition(" ")
        return self.get(account, event_id)

    def all(self, account: str | None = None, calendar_id: str | None = None) -> list[Event]:
        return [
            event
            for event in self.events.values()
            if (account is None or event.account == account)
            and (calendar_id is None or self.reaches(event.account, calendar_id))
        ]

    def free_busy(self, account: str, query: FreeBusyQuery) -> dict[str, Any]:
        calendars: dict[str, Any] = {}
        for calendar_id in query.ids:
            if not self.reaches(account, calendar_id):
                error = {"domain": "global", "reason": "notFound"}
                calendars[calendar_id] = {"errors": [error], "busy": []}
                continue
            periods = self.busy(account, query.time_min, query.time_max)
            calendars[calendar_id] = {
                "busy": [
                    {"start": rfc3339_in(start, query.zone), "end": rfc3339_in(end, query.zone)}
                    for start, end in periods
                ]
            }
        return {
            "kind": "calendar#freeBusy",
            "timeMin": rfc3339(query.time_min),
            "timeMax": rfc3339(query.time_max),
            "calendars": calendars,
        }

    def busy(
        self, account: str, time_min: datetime, time_max: datetime
    ) -> list[tuple[datetime, datetime]]:
        """The account's busy periods within [time_min, time_max): clipped, overlaps merged."""
        periods = sorted(
            (max(e.start.at, time_min), min(e.end.at, time_max))
            for e in self.all(account)
            if e.busy
        )
        merged: list[tuple[datetime, datetime]] = []
        for start, end in periods:
            if start >= end:
                continue
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], end))
            else:
                merged.append((start, end))
        return merged

    def clear(self) -> None:
        self.events.clear()

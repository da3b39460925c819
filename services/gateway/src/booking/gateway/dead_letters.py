"""The four services' dead letters as one list, and replays across them (docs/recovery.md,
sections 3 and 7).

Each service keeps its own dead letters and pages them newest first by (dead_lettered_at, id),
its cursor meaning "strictly before (at, id)". Across the services the order is
(dead_lettered_at desc, service in the fixed order orders, payments, calendar, notifications,
id desc), and the gateway's cursor is the last item's position: (at, service, n). The next page
is what comes strictly after that position, which each service's own cursor can say:

- a service sorted before the last item's: its items at `at` were all shown, so (at, 0);
- that service: (at, n);
- a service sorted after it: none of its items at `at` were shown, so (at, 2**63 - 1).

Every service is asked for `limit` items from there, and the first `limit` of the merge are the
page. A listing without every service would be a wrong page, not a short one: a service that
does not answer fails the whole request, naming it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from fastapi import Request
from pydantic import ValidationError
from starlette.responses import Response

from booking.contracts.http import (
    MAX_MINOR_UNITS,
    DeadLetter,
    DeadLetterCursor,
    DeadLetterFilter,
    DeadLetterPage,
    Replayed,
    cursor_text,
    cursor_token,
)
from booking.gateway.upstreams import (
    Answer,
    Service,
    Unanswered,
    Upstreams,
    failed_service,
    failure_problem,
    passed_back,
)
from booking.runtime.problems import problem

log = logging.getLogger(__name__)

_Body = TypeVar("_Body", DeadLetterPage, Replayed)

SERVICES = tuple(Service)
"""The fixed order of the services among dead letters of the same instant."""

_BAD_CURSOR = "cursor is not one this listing gave; start again without it"


def service_of(dead_letter_id: str) -> Service:
    """The service that keeps `dead_letter_id` (`payments:42`); ValueError when none does."""
    prefix, colon, number = dead_letter_id.partition(":")
    if (
        not colon
        or prefix not in SERVICES
        or not number.isascii()
        or not number.isdigit()
        or not 0 < int(number) <= MAX_MINOR_UNITS
    ):
        raise ValueError(
            f"there is no dead letter {dead_letter_id}: a dead letter's id is <service>:<n>, "
            f"the service one of {', '.join(SERVICES)}"
        )
    return Service(prefix)


@dataclass(frozen=True)
class Position:
    """Where a dead letter stands in the merged list: when, which service, its number there."""

    at: datetime
    service: Service
    number: int

    @classmethod
    def of(cls, item: DeadLetter, service: Service) -> Position:
        """ValueError when `item` is not one of `service`'s."""
        if service_of(item.id) is not service or item.service != service:
            raise ValueError(f"{item.id} is not a dead letter of {service}")
        return cls(item.dead_lettered_at, service, int(item.id.partition(":")[2]))

    def newest_first(self) -> tuple[datetime, int, int]:
        """A key that sorts positions newest first when sorted in reverse."""
        return (self.at, -SERVICES.index(self.service), self.number)

    def after_it_in(self, service: Service) -> DeadLetterCursor:
        """The cursor of `service`'s own listing for what comes after this position."""
        mine, its = SERVICES.index(self.service), SERVICES.index(service)
        if its < mine:
            return DeadLetterCursor(self.at, 0)
        if its == mine:
            return DeadLetterCursor(self.at, self.number)
        return DeadLetterCursor(self.at, MAX_MINOR_UNITS)

    def encode(self) -> str:
        return cursor_token(f"{self.at.isoformat()}|{self.service}|{self.number}")

    @classmethod
    def decode(cls, token: str) -> Position:
        """ValueError for a token the merged listing did not give."""
        try:
            at, service, number = cursor_text(token).split("|")
            position = cls(datetime.fromisoformat(at), Service(service), int(number))
            # An instant outside the years 1 to 9999 in UTC (0001-01-01T00:00+01:00) is no
            # position: the services' database could not take it.
            position.at.astimezone(UTC)
        except (ValueError, OverflowError):
            raise ValueError(_BAD_CURSOR) from None
        if position.at.tzinfo is None or not 0 < position.number <= MAX_MINOR_UNITS:
            raise ValueError(_BAD_CURSOR)
        return position


def merge(pages: Mapping[Service, DeadLetterPage], limit: int) -> DeadLetterPage:
    """The first `limit` of the services' pages, each asked for `limit` after one position.

    Raises ValueError when a service's page holds another service's dead letter.
    """
    positioned = [
        (Position.of(item, service), item) for service, page in pages.items() for item in page.items
    ]
    positioned.sort(key=lambda pair: pair[0].newest_first(), reverse=True)
    taken = positioned[:limit]
    # More after this page: the merge had more, or a service has more than it gave.
    more = len(positioned) > limit or any(page.next_cursor for page in pages.values())
    return DeadLetterPage(
        items=[item for _, item in taken],
        next_cursor=taken[-1][0].encode() if more and taken else None,
    )


class AnsweredInstead(Exception):
    """Not every service gave its 200: `answer` is what the caller gets instead."""

    def __init__(self, answer: Response) -> None:
        super().__init__(answer.status_code)
        self.answer = answer


async def list_everywhere(
    up: Upstreams,
    request: Request,
    *,
    event_type: str | None,
    status: str | None,
    limit: int,
    after: Position | None,
) -> Response:
    """GET /api/admin/dead-letters without `service`: every service asked, the pages merged."""
    filters = {"limit": str(limit)}
    if event_type is not None:
        filters["type"] = event_type
    if status is not None:
        filters["status"] = status
    queries = {
        service: filters
        if after is None
        else {**filters, "cursor": after.after_it_in(service).encode()}
        for service in SERVICES
    }
    try:
        answers = await _ask_every_service(up, request, queries=queries)
        pages = {
            service: _read(DeadLetterPage, answer, service) for service, answer in answers.items()
        }
    except AnsweredInstead as instead:
        return instead.answer
    try:
        merged = merge(pages, limit)
    except ValueError as exc:
        log.warning("a service listed a dead letter that is not its own: %s", exc)
        return problem(502, f"a service gave no valid answer: {exc}")
    return Response(merged.model_dump_json(), media_type="application/json")


async def replay_everywhere(up: Upstreams, request: Request, body: DeadLetterFilter) -> Response:
    """POST /api/admin/dead-letters/replay without `service`: every service replays its kept
    dead letters (of `type`), and the counts are added up."""
    content = body.model_dump_json(exclude_none=True).encode()
    try:
        answers = await _ask_every_service(up, request, content=content, replaying=True)
        replayed = sum(
            _read(Replayed, answer, service).replayed for service, answer in answers.items()
        )
    except AnsweredInstead as instead:
        return instead.answer
    return Response(Replayed(replayed=replayed).model_dump_json(), media_type="application/json")


async def _ask_every_service(
    up: Upstreams,
    request: Request,
    *,
    queries: Mapping[Service, Mapping[str, str]] | None = None,
    content: bytes | None = None,
    replaying: bool = False,
) -> dict[Service, Answer]:
    """Each service's 200, all asked at once. Raises AnsweredInstead when one gave none."""

    async def ask(service: Service) -> Answer | Unanswered:
        query = None if queries is None else queries[service]
        try:
            return await up.send(request, service, content=content, query=query)
        except Unanswered as unanswered:
            return unanswered

    async with asyncio.TaskGroup() as group:
        tasks = {service: group.create_task(ask(service)) for service in SERVICES}
    answers = {service: task.result() for service, task in tasks.items()}

    failed: dict[Service, Response] = {}
    answered: dict[Service, Answer] = {}
    for service, answer in answers.items():
        if isinstance(answer, Unanswered):
            failed[service] = answer.problem
        elif failed_service(answer):
            failed[service] = failure_problem(answer, service)
        else:
            answered[service] = answer
    if failed:
        # What the others replayed is done (and a second replay sends nothing twice): say so.
        replayed = _replays_done(answered) if replaying else None
        raise AnsweredInstead(_not_every_service(failed, replayed))
    for answer in answered.values():
        if answer.status_code != 200:
            # The request was refused (a token that expired on its way, say): as it was said.
            raise AnsweredInstead(passed_back(answer))
    return answered


def _read(model: type[_Body], answer: Answer, service: Service) -> _Body:
    try:
        return model.model_validate_json(answer.content)
    except ValidationError:
        log.warning("%s answered a body off the contract", service)
        raise AnsweredInstead(
            problem(502, f"the {service} service gave no valid answer", service=str(service))
        ) from None


def _replays_done(answered: Mapping[Service, Answer]) -> dict[Service, int]:
    done = {}
    for service, answer in answered.items():
        if answer.status_code == 200:
            with contextlib.suppress(ValidationError):
                done[service] = Replayed.model_validate_json(answer.content).replayed
    return done


def _not_every_service(
    failed: Mapping[Service, Response], replayed: Mapping[Service, int] | None
) -> Response:
    """One problem naming every service that gave no answer: the status of the first of them
    (in the services' order), the longest Retry-After any of them asked for."""
    first = next(iter(failed.values()))
    names = ", ".join(failed)
    reasons = "; ".join(f"{service}: {_detail(answer)}" for service, answer in failed.items())
    extra: dict[str, Any] = {}
    if replayed is None:
        detail = f"the dead letters cannot be listed without {names} ({reasons})"
    else:
        done = ", ".join(f"{count} in {service}" for service, count in replayed.items())
        detail = (
            f"not every service replayed its dead letters: {names} did not ({reasons}); "
            f"replayed {done or 'none'}; replaying again sends only what is still kept"
        )
        extra["replayed"] = sum(replayed.values())
    answer = problem(first.status_code, detail, services=list(failed), **extra)
    waits = [
        int(wait)
        for response in failed.values()
        if (wait := response.headers.get("retry-after", "")).isdigit()
    ]
    if waits:
        answer.headers["Retry-After"] = str(max(waits))
    return answer


def _detail(answer: Response) -> str:
    with contextlib.suppress(ValueError, AttributeError):
        detail = json.loads(bytes(answer.body)).get("detail")
        if isinstance(detail, str) and detail:
            return detail
    return f"HTTP {answer.status_code}"

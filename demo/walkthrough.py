"""The walkthrough's steps, what it prints, and how it talks to the running system.

Everything goes through the gateway, as a browser or Konnect would, except what a person does
outside the system: pressing Allow on Google's consent page and Pay on Konnect's page, which the
sandboxes' control APIs (`/_sandbox/...`) do for us. Every wait has a deadline, and every failure
becomes `DemoStopped` with one line that says what did not work and what to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI

from booking.contracts.money import format_money
from booking.devtools.devrun import CHILDREN, DevRunError, probe_host
from booking.gateway.dashboard import PREFIX as DASHBOARD_PREFIX
from booking.runtime.auth import issue_token
from booking.runtime.settings import RuntimeSettings
from booking.sandbox.control import ControlAuth

T = TypeVar("T")
STEPS = 7
POLL_SECONDS = 0.2
# The demo's tokens, the dashboard's included: long enough to watch a few runs with one.
TOKEN_SECONDS = 3600


class DemoStopped(Exception):
    """The walkthrough cannot go on; the message says why in one line."""


# --- where the system is --------------------------------------------------------------------------


@dataclass(frozen=True)
class System:
    gateway: str
    konnect: str
    google: str
    secret: str

    @classmethod
    def from_environment(cls, env: Mapping[str, str]) -> System:
        """Where `make run` puts each process, given the same environment (ports, BIND_HOST)."""
        env = dict(env)
        try:
            ports = {child.name: child.port(env) for child in CHILDREN}
        except DevRunError as exc:
            raise DemoStopped(str(exc)) from None
        host = probe_host(env.get("BIND_HOST", "127.0.0.1"))
        try:
            secret = RuntimeSettings().auth_jwt_secret.get_secret_value()
        except ValueError as exc:  # pydantic's ValidationError: a setting in the environment
            first = str(exc).splitlines()[0]
            raise DemoStopped(f"the environment's settings are not valid: {first}") from None
        return cls(
            gateway=f"http://{host}:{ports['gateway']}",
            konnect=f"http://{host}:{ports['sandbox-konnect']}",
            google=f"http://{host}:{ports['sandbox-google']}",
            secret=secret,
        )

    def bearer(self, role: str, sub: str) -> str:
        return issue_token(self.secret, sub, role, ttl_seconds=TOKEN_SECONDS)

    def token(self, role: str, sub: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.bearer(role, sub)}"}

    @property
    def dashboard(self) -> str:
        # The page's modules are relative to it: /admin/, not the redirect at /admin.
        return f"{self.gateway}{DASHBOARD_PREFIX}/"


# --- what it prints -------------------------------------------------------------------------------


@dataclass
class Narrator:
    colour: bool = False
    out: Any = field(default_factory=lambda: sys.stdout)
    started: float = field(default_factory=time.monotonic)

    def _paint(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.colour else text

    def _print(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def title(self, text: str) -> None:
        self._print(self._paint("1", text))
        self._print(self._paint("1", "=" * len(text)))

    def step(self, number: int, text: str) -> None:
        self._print()
        self._print(self._paint("1;36", f"[{number}/{STEPS}] {text}"))

    def say(self, text: str) -> None:
        for line in text.splitlines():
            self._print(f"      {line}")

    def show(self, label: str, value: object) -> None:
        self._print(f"      {label + ':':<16} {value}")

    def ok(self, text: str) -> None:
        self._print(f"      {self._paint('32', 'ok')} {text}")

    def behind(self, text: str) -> None:
        """What the system did meanwhile, where a newcomer cannot see it."""
        lines = textwrap.wrap(text, width=84, initial_indent="behind the scenes: ")
        for line in lines:
            self._print(self._paint("2", f"      | {line}"))

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def money(value: Mapping[str, Any] | None) -> str:
    """{amount: 120000, currency: TND} as `120.000 TND` (the contract's minor-units table)."""
    if not value:
        return "-"
    return format_money(int(value["amount"]), value["currency"])


def short(url: str, keep: tuple[str, ...] = ()) -> str:
    """A URL with only the query parameters worth reading."""
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query)
    params = [f"{k}={v}" for k, v in pairs if k in keep]
    base = f"{parts.scheme}://{parts.netloc}{parts.path}"
    if not params:
        return base
    return base + "?" + "&".join(params) + (" ..." if len(params) < len(pairs) else "")


# --- talking to the system ------------------------------------------------------------------------


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:200] or response.reason_phrase
    if isinstance(body, dict):
        for key in ("detail", "title", "error", "message"):
            if isinstance(body.get(key), str):
                return body[key][:300]
        if isinstance(body.get("detail"), list):  # FastAPI's validation errors
            return json.dumps(body["detail"])[:300]
    return json.dumps(body)[:300]


_HINTS = {
    401: "the token was refused: is AUTH_JWT_SECRET the same here as for `make run`?",
    403: "the token's role may not do this",
    429: "rate-limited: wait a minute, or raise RATE_LIMIT_PER_MINUTE for `make run`",
    502: "a service behind the gateway failed: see `make run`'s output",
    503: "a service behind the gateway is down: see `make run`'s output",
    504: "a service behind the gateway is too slow: see `make run`'s output",
}


class Http:
    """One client per party (the gateway, each sandbox) that turns failures into one line."""

    def __init__(
        self,
        base: str,
        name: str,
        hint: str,
        auth: httpx.Auth | None = None,
        refused_hint: str | None = None,
    ) -> None:
        self.base = base
        self.name = name
        self.hint = hint
        # What a 401 means here, when not the gateway's (a sandbox's control token).
        self.refused_hint = refused_hint
        # trust_env=False: a proxy from the environment must not swallow loopback calls.
        self.client = httpx.AsyncClient(base_url=base, timeout=15, trust_env=False, auth=auth)

    async def close(self) -> None:
        await self.client.aclose()

    async def request(
        self, method: str, url: str, *, expect: tuple[int, ...] = (200,), **kwargs: Any
    ) -> httpx.Response:
        path = urlsplit(url).path or url
        try:
            response = await self.client.request(method, url, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout):
            raise DemoStopped(f"{self.name} at {self.base} does not answer: {self.hint}") from None
        except httpx.TimeoutException:
            raise DemoStopped(
                f"{self.name} at {self.base} did not answer {method} {path} in time;"
                " the system may be overloaded: see `make run`'s output"
            ) from None
        except httpx.HTTPError as exc:
            raise DemoStopped(
                f"{method} {path} to {self.name} failed: {type(exc).__name__}: {exc}"
            ) from None
        if response.status_code not in expect:
            hint = _HINTS.get(response.status_code)
            if response.status_code == 401 and self.refused_hint:
                hint = self.refused_hint
            raise DemoStopped(
                f"{method} {path} answered {response.status_code}: {_detail(response)}"
                + (f" ({hint})" if hint else "")
            )
        return response

    async def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return await self.request("GET", url, **kwargs)

    async def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return await self.request("POST", url, **kwargs)


async def until(probe: Callable[[], Awaitable[T | None]], what: str, timeout: float) -> T:
    """Poll `probe` until it returns something; stop the demo after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        found = await probe()
        if found:
            return found
        if time.monotonic() >= deadline:
            raise DemoStopped(
                f"{what} did not happen within {timeout:g}s: see `make run`'s output for why"
            )
        await asyncio.sleep(POLL_SECONDS)


class AdminFeed:
    """An admin connected to `/ws/admin`: collects notifications, answers the server's pings."""

    def __init__(self, socket: ClientConnection, hello: dict[str, Any]) -> None:
        self.socket = socket
        self.hello = hello
        self.notifications: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()
        self.closed: str | None = None
        self._reader = asyncio.create_task(self._read())

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, system: System, headers: dict[str, str], timeout: float):
        url = system.gateway.replace("http://", "ws://", 1) + "/ws/admin"
        try:
            socket = await connect(
                url, additional_headers=headers, open_timeout=timeout, proxy=None
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            hint = _HINTS.get(status, "")
            raise DemoStopped(
                f"the gateway refused the admin websocket {url} with {status}"
                + (f" ({hint})" if hint else "")
            ) from None
        except (OSError, TimeoutError, InvalidURI) as exc:
            raise DemoStopped(
                f"the admin websocket {url} could not be opened:"
                f" {type(exc).__name__}: {exc or 'no answer'}"
            ) from None
        try:
            try:
                async with asyncio.timeout(timeout):
                    hello = json.loads(await socket.recv())
            except (TimeoutError, ConnectionClosed):
                raise DemoStopped(f"the admin websocket {url} sent no hello") from None
            feed = cls(socket, hello)
            try:
                yield feed
            finally:
                feed._reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await feed._reader
        finally:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await socket.close()

    async def _read(self) -> None:
        try:
            async for raw in self.socket:
                frame = json.loads(raw)
                if frame.get("type") == "ping":
                    await self.socket.send('{"type": "pong"}')
                elif frame.get("type") == "notification":
                    self.notifications.append(frame["data"])
                    self.arrived.set()
        except ConnectionClosed as exc:
            self.closed = f"closed by the gateway ({exc.rcvd.code if exc.rcvd else 'no code'})"
        self.closed = self.closed or "closed by the gateway"
        self.arrived.set()

    async def alert_about(self, timeout: float, **match: str) -> dict[str, Any]:
        """The first notification whose metadata holds `match`, waiting up to `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            for item in self.notifications:
                metadata = item.get("metadata") or {}
                if all(metadata.get(k) == v for k, v in match.items()):
                    return item
            if self.closed:
                raise DemoStopped(f"the admin websocket was {self.closed} before the alert came")
            self.arrived.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise DemoStopped(
                    f"no alert about {match} reached the admin websocket within {timeout:g}s:"
                    " see `make run`'s output (notifications, gateway)"
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await self.arrived.wait()


class OrderStream:
    """The mentee following an order at `GET /api/orders/{id}/events` (Server-Sent Events):
    each change as it happens, nothing polled."""

    def __init__(self, order_id: str, response: httpx.Response) -> None:
        self.order_id = order_id
        self.lines = response.aiter_lines()
        self.last: dict[str, Any] | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls, api: Http, order_id: str, headers: dict[str, str]
    ) -> AsyncIterator[OrderStream]:
        path = f"/api/orders/{order_id}/events"
        try:
            # No read timeout: an idle stream only sends a keepalive comment every 15 s.
            async with api.client.stream(
                "GET", path, headers=headers, timeout=httpx.Timeout(15, read=None)
            ) as response:
                if response.status_code != 200:
                    await response.aread()
                    hint = _HINTS.get(response.status_code)
                    raise DemoStopped(
                        f"GET {path} answered {response.status_code}: {_detail(response)}"
                        + (f" ({hint})" if hint else "")
                    )
                yield cls(order_id, response)
        except httpx.HTTPError as exc:
            raise DemoStopped(
                f"the order stream {path} failed: {type(exc).__name__}: {exc}"
            ) from None

    async def until(
        self, wanted: Callable[[dict[str, Any]], bool], what: str, timeout: float
    ) -> dict[str, Any]:
        """The first state of the order that is `wanted`, as the stream brings it."""
        try:
            async with asyncio.timeout(timeout):
                data = None
                async for line in self.lines:
                    if line.startswith("data: "):
                        data = line.removeprefix("data: ")
                    elif not line and data is not None:
                        self.last, data = json.loads(data), None
                        if wanted(self.last):
                            return self.last
        except TimeoutError:
            raise DemoStopped(
                f"{what} did not happen within {timeout:g}s: see `make run`'s output for why"
            ) from None
        ended = self.last["status"] if self.last else "unknown"
        raise DemoStopped(f"order {self.order_id} ended {ended} before {what}")


# --- the walkthrough ------------------------------------------------------------------------------


@dataclass
class Walkthrough:
    system: System
    say: Narrator
    timeout: float = 30.0
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:6])

    def __post_init__(self) -> None:
        # Printed for the dashboard too, so the person watching signs in as the demo's admin.
        self.admin_token = self.system.bearer("admin", f"demo-admin-{self.run_id}")
        self.admin = {"Authorization": f"Bearer {self.admin_token}"}
        self.mentee = self.system.token("mentee", f"demo-mentee-{self.run_id}")
        down = "start it with `make run` (or set GATEWAY_PORT as for `make run`)"
        self.api = Http(self.system.gateway, "the gateway", down)
        # The sandboxes' control API takes SANDBOX_CONTROL_TOKEN, or `make run`'s development one.
        refused = (
            "the sandbox refused its control token: is SANDBOX_CONTROL_TOKEN the same here as"
            " for `make run`?"
        )
        self.konnect = Http(
            self.system.konnect,
            "the sandbox Konnect",
            "start the system with `make run` (or set SANDBOX_KONNECT_PORT as for it)",
            auth=ControlAuth(),
            refused_hint=refused,
        )
        self.google = Http(
            self.system.google,
            "the sandbox Google",
            "start the system with `make run` (or set SANDBOX_GOOGLE_PORT as for it)",
            auth=ControlAuth(),
            refused_hint=refused,
        )

    async def close(self) -> None:
        for client in (self.api, self.konnect, self.google):
            await client.close()

    async def run(self) -> None:
        say = self.say
        say.title("Mentor booking: a walkthrough of the whole system")
        say.say(f"gateway {self.system.gateway}; run {self.run_id}")
        self.show_dashboard()
        await self.check_running()
        say.step(2, "An admin opens the live alert feed")
        async with AdminFeed.open(self.system, self.admin, self.timeout) as feed:
            say.show("websocket", self.system.gateway.replace("http", "ws", 1) + "/ws/admin")
            last_id = feed.hello.get("last_id")
            say.ok(f"connected; the server says hello (newest alert id {last_id})")
            amira, karim = await self.register_mentors()
            await self.connect_google(amira)
            await self.book_and_confirm(amira)
            await self.book_and_fail(karim, feed)
            await self.health()
        say._print()
        say.say(f"Done in {say.elapsed():.1f} s. Run it again whenever you like: every run")
        say.say("makes its own mentors and bookings.")

    def show_dashboard(self) -> None:
        """Where a person can watch step 6's alert arrive. The page reads no token from its URL,
        only one pasted into its sign-in form, so the URL and the token are printed apart."""
        say = self.say
        say._print()
        say.say("Open the dashboard with this token to watch the alerts arrive live:")
        say.show("dashboard", self.system.dashboard)
        say.show("admin token", self.admin_token)
        # The walkthrough may well reach its alert before anyone has signed in.
        how = (
            "(paste the token into the page's Admin token box and press Sign in; it is good for"
            f" {TOKEN_SECONDS // 60} minutes. Alerts raised before you sign in are in the page's"
            " list; run the demo again to see new ones arrive. Nothing opens by itself.)"
        )
        say.say("\n".join(textwrap.wrap(how, width=84)))

    # 1
    async def check_running(self) -> None:
        self.say.step(1, "Is the system running?")
        for client in (self.api, self.konnect, self.google):
            await client.get("/health/live")
            self.say.ok(f"{client.name} answers at {client.base}")

    # 3
    async def register_mentors(self) -> tuple[dict[str, Any], dict[str, Any]]:
        say = self.say
        say.step(3, "The admin registers two mentors, and each offers a paid session")
        mentors = []
        for name, login, price in (
            ("Amira Ben Salah", "amira", 120_000),
            ("Karim Jaziri", "karim", 90_000),
        ):
            email = f"{login}-{self.run_id}@example.com"  # her Google account too
            created = await self.api.post(
                "/api/mentors",
                json={"name": name, "email": email, "timezone": "Africa/Tunis"},
                headers=self.admin,
                expect=(201,),
            )
            mentor = created.json()
            offering = (
                await self.api.post(
                    f"/api/mentors/{mentor['id']}/offerings",
                    json={
                        "title": "System design review",
                        "duration_minutes": 60,
                        "price": {"amount": price, "currency": "TND"},
                    },
                    headers=self.system.token("mentor", mentor["id"]),
                    expect=(201,),
                )
            ).json()
            mentor["offering"] = offering
            mentors.append(mentor)
            say.ok(f"{name} <{email}>: mentor {mentor['id']}")
            say.say(
                f'   offers "{offering["title"]}", {offering["duration_minutes"]} min,'
                f" {money(offering['price'])} (offering {offering['id']})"
            )
        for mentor in mentors:
            await self.known_to_calendar(mentor)
        say.ok("the calendar service knows both (GET /api/mentors/{id}/calendar: not connected)")
        say.behind(
            "orders stored each mentor and published MentorRegistered; the calendar service"
            " consumed it from RabbitMQ and keeps its own record of the mentor."
        )
        return mentors[0], mentors[1]

    async def known_to_calendar(self, mentor: dict[str, Any]) -> None:
        """The calendar service has consumed MentorRegistered (until then it answers 404)."""

        async def known() -> bool:
            status = await self.api.get(
                f"/api/mentors/{mentor['id']}/calendar", headers=self.admin, expect=(200, 404)
            )
            return status.status_code == 200

        await until(known, f"the calendar service learning of mentor {mentor['id']}", self.timeout)

    # 4
    async def connect_google(self, mentor: dict[str, Any]) -> None:
        say = self.say
        say.step(4, f"{mentor['name']} connects her Google Calendar (Karim never does)")
        start = await self.api.get(
            f"/api/mentors/{mentor['id']}/calendar/connect",
            headers=self.system.token("mentor", mentor["id"]),
            expect=(302,),
        )
        consent = start.headers.get("location", "")
        say.say("The gateway answers 302: the browser goes to Google's consent page:")
        say.show("consent", short(consent, ("scope", "access_type", "prompt", "login_hint")))
        say.say("She presses Allow (the sandbox Google's control API presses it for us).")
        approved = await self.google.post("/_sandbox/oauth/approve", json={"auth_url": consent})
        back = approved.json()["location"]
        say.show("Google sends", short(back) + "?code=...&state=...")
        # The callback as the browser would follow it: Google's redirect_uri, our gateway.
        finished = await self.api.get(back)
        connection = finished.json()
        if not connection.get("connected"):
            raise DemoStopped(f"the callback answered but did not connect: {connection}")
        say.ok(
            f"connected: calendar {connection.get('calendar_id')}, at {connection['connected_at']}"
        )
        say.behind(
            "the calendar service checked the signed state, traded the code for Google tokens"
            " and stored the refresh token encrypted."
        )

    # 5
    async def book_and_confirm(self, mentor: dict[str, Any]) -> None:
        say = self.say
        say.step(5, f"A mentee books a session with {mentor['name']} and pays")
        async with self.book_and_pay(mentor, days=7) as stream:

            def settled(order: dict[str, Any]) -> bool:
                if order["status"] in ("payment_failed", "cancelled") or (
                    order["session"]["status"] in ("scheduling_failed", "cancelled")
                ):
                    raise DemoStopped(
                        f"order {order['id']} ended {order['status']}, its session"
                        f" {order['session']['status']}, instead of confirmed: see `make run`'s"
                        " output"
                    )
                return order["status"] == "confirmed"

            order = await stream.until(settled, f"order {stream.order_id} confirmed", self.timeout)
        say.ok(f"the order's stream brought it confirmed (event id {order['version']})")
        session = order["session"]
        say.ok(f"order {order['status']}, session {session['status']}")
        say.show("Meet link", session["meet_link"])
        say.show("calendar event", session["calendar_event_id"])
        say.show("paid", money(order["amount_paid"]))
        if order.get("escrow"):
            say.show("platform fee", money(order["escrow"]["platform_fee"]))
            say.show(
                "escrow",
                money(order["escrow"]["escrow_amount"])
                + f" (for the mentor; {order['escrow'].get('status')})",
            )
        say.behind(
            "payments asked Konnect about the payment and applied it once (PaymentCompleted);"
            " orders marked the order paid (OrderPaid); calendar created the Google event with"
            " its Meet link (CalendarBookingConfirmed); orders confirmed the order"
            " (OrderConfirmed), so payments releases the escrow a day after the session."
        )

    # 6
    async def book_and_fail(self, mentor: dict[str, Any], feed: AdminFeed) -> None:
        say = self.say
        say.step(6, f"A mentee books a session with {mentor['name']} (no Google) and pays")
        async with self.book_and_pay(mentor, days=8) as stream:
            say.say("The calendar step cannot succeed: the admin's websocket should hear of it.")
            alert = await feed.alert_about(self.timeout, order_id=stream.order_id)
            metadata = alert.get("metadata") or {}
            say.ok(f"alert #{alert['id']} on the websocket: [{alert['severity']}] {alert['type']}")
            say.show("title", alert["title"])
            say.show("message", alert["message"])
            say.show("reason", metadata.get("reason"))
            order = await stream.until(
                lambda o: o["status"] == "paid" and o["session"]["status"] == "awaiting_calendar",
                f"order {stream.order_id} paid, its session waiting",
                self.timeout,
            )
        escrow = (order.get("escrow") or {}).get("status")
        say.ok(
            f"order {order['status']} (the escrow {escrow}), session {order['session']['status']}"
        )
        say.behind(
            "calendar published CalendarBookingFailed (mentor_not_integrated, not final);"
            " notifications stored the alert and fanned it out on admin.alerts; the gateway pushed"
            " it to every connected admin. Once Karim connects Google, the session is scheduled"
            " by itself; if the session starts first, the booking is abandoned and its escrow"
            " frozen for an admin to release or refund."
        )

    @contextlib.asynccontextmanager
    async def book_and_pay(
        self, mentor: dict[str, Any], *, days: int
    ) -> AsyncIterator[OrderStream]:
        """Book, follow the order's stream, pay with the pay link it brings; the stream, to
        follow the order further."""
        say = self.say
        start_at = datetime.now(UTC).replace(hour=10, minute=0, second=0, microsecond=0)
        start_at += timedelta(days=days)
        accepted = await self.api.post(
            "/api/bookings",
            json={
                "offering_id": mentor["offering"]["id"],
                "start_at": start_at.isoformat().replace("+00:00", "Z"),
                "mentee": {
                    "first_name": "Sami",
                    "last_name": "Bouazizi",
                    "email": f"sami-{self.run_id}@example.com",
                    "phone": "+216 20 123 456",
                },
            },
            headers={**self.mentee, "Idempotency-Key": f"demo-{self.run_id}-{days}"},
            expect=(202,),
        )
        order_id = accepted.json()["order_id"]
        say.ok(f"POST /api/bookings -> 202: order {order_id} ({accepted.json()['status']})")
        say.say(f"   for {start_at:%A %d %B, %H:%M} UTC, {money(mentor['offering']['price'])}")
        async with OrderStream.open(self.api, order_id, self.mentee) as stream:
            say.show("following", f"GET /api/orders/{order_id}/events (Server-Sent Events)")
            await self._pay(stream)
            yield stream

    async def _pay(self, stream: OrderStream) -> None:
        say, order_id = self.say, stream.order_id

        def payable(order: dict[str, Any]) -> bool:
            if order["status"] in ("cancelled", "payment_failed"):
                raise DemoStopped(
                    f"order {order_id} was {order['status']} before it could be paid:"
                    " payments could not open a Konnect payment; see `make run`'s output"
                )
            return bool((order.get("payment") or {}).get("pay_url"))

        order = await stream.until(payable, f"order {order_id}'s pay link", self.timeout)
        payment = order["payment"]
        say.behind(
            "orders committed the order with BookingRequested; payments opened a Konnect payment"
            " (PaymentInitiated); orders stored its pay link and recorded the change"
            " (OrderChanged, on the order.changes fanout), which the gateway streamed to us."
        )
        say.show("pay here", payment["pay_url"])
        say.say("The mentee presses Pay on Konnect's page (the sandbox's control API here);")
        say.say("Konnect then calls our webhook through the gateway.")
        paid = (await self.konnect.post(f"/_sandbox/payments/{payment['ref']}/complete")).json()
        for delivery in paid.get("webhooks", []):
            outcome = delivery.get("status_code") or delivery.get("error")
            say.show("webhook", f"GET {short(delivery['url'], ('payment_ref',))} -> {outcome}")
            if delivery.get("status_code") != 200:
                raise DemoStopped(
                    f"the webhook for payment {payment['ref']} got {outcome}; the gateway or"
                    " payments is not well: see `make run`'s output"
                )

    # 7
    async def health(self) -> None:
        say = self.say
        say.step(7, "The system's health, as the gateway reports it to an admin")
        # The public /health says only pass, warn or fail; the checks are an admin's to read.
        report = (
            await self.api.get("/api/admin/health", headers=self.admin, expect=(200, 503))
        ).json()
        say.say(
            "One line per component: the gateway's own (its broker connection, the alert feed\n"
            "and its admins), and one per service, which sums up that service's own report\n"
            "(database, broker, queues, dead letters, outbox lag) and took this long to answer."
        )
        rows = []
        for key, entries in (report.get("checks") or {}).items():
            for entry in entries:
                value = entry.get("observedValue")
                unit = entry.get("observedUnit") or ""
                shown = "" if value is None else f"{value} {unit}".strip()
                rows.append((key, entry.get("status", "?"), shown, entry.get("output") or ""))
        width = max((len(r[0]) for r in rows), default=10)
        for key, status, shown, output in rows:
            mark = say._paint({"pass": "32", "warn": "33"}.get(status, "31"), f"{status:<4}")
            line = f"{key:<{width}}  {mark}  {shown:<14}"
            say.say((line + "  " + output[:60]).rstrip() if status != "pass" else line.rstrip())
        if report.get("status") == "fail":
            say.say("overall: fail (the components marked fail above say why)")
        else:
            say.ok(f"overall: {report.get('status')}")


def colour_wanted() -> bool:
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR")

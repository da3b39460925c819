"""The admins' live alert websocket, /ws/admin .

Real RabbitMQ (the test publishes AdminNotificationRaised to its own `admin.alerts` fanout, as
the notifications service does), the gateway served over real HTTP, and a stand-in for the
notifications service that stores notifications, lists them as the real one does
(`afterId`, `limit`, `cursor`) and publishes what it stores.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aio_pika
import httpx
import jwt
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from faststream import AckPolicy
from faststream.rabbit.subscriber import RabbitSubscriber
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.uri import parse_uri

from booking.contracts import AdminNotificationRaised, wrap
from booking.devtools.fixtures import TcpProxy, eventually, free_port, serving, url_via
from booking.devtools.identity_provider import IdentityProvider, SigningKey, claims
from booking.gateway.alerts import AdminAlerts
from booking.gateway.alerts.frames import Alert, Sent
from booking.gateway.app import create_app
from booking.gateway.settings import GatewaySettings
from booking.runtime.auth import Role, issue_token

FRAME_TIMEOUT = 15.0  # seconds to wait for a frame that must come (a bound, not a measure)
# With a provider, AUTH_JWT_SECRET keeps its built-in value: the order links need a key of their
# own outside development mode (booking.runtime.auth.check_order_link_settings).
OWN_LINK_KEY = {"order_link_secret": "order-links-" + "k" * 32}

NOTIFICATION = {
    "id": 7,
    "type": "IntegrationFailure",
    "severity": "Error",
    "title": "Calendar booking failed",
    "message": "the mentor has no Google connection",
    "metadata": {"session_id": "s-1", "reason": "mentor_not_integrated"},
    "is_read": False,
    "read_at": None,
    "created_at": "2030-05-01T09:00:00Z",
    "fingerprint": "IntegrationFailure:mentor_not_integrated:m-1",
    "occurrences": 2,
    "last_occurred_at": "2030-05-01T09:05:00Z",
}


# --- the notifications service, as the websocket sees it ----------------------------------------


class NotificationsStandIn:
    """Stores notifications, lists them as the notifications service does, and publishes each new
    or counted-up one as AdminNotificationRaised to the fanout exchange."""

    def __init__(self, exchange: aio_pika.abc.AbstractExchange) -> None:
        self.exchange = exchange
        self.store: dict[int, dict[str, Any]] = {}
        self.last_id = 0
        self.requests: list[tuple[dict[str, str], str | None]] = []
        self.failing = False
        # Runs before a page with afterId is answered (its number, from 1): to act mid-replay.
        self.before_page: Callable[[int], Awaitable[None]] | None = None
        self.after_page: Callable[[int], Awaitable[None]] | None = None
        self.pages = 0
        self.app = FastAPI()
        self.app.add_api_route("/api/admin/notifications", self.list_page, methods=["GET"])

    async def list_page(self, request: Request) -> JSONResponse:
        query = dict(request.query_params)
        self.requests.append((query, request.headers.get("authorization")))
        if self.failing:
            return JSONResponse({"detail": "down for the test"}, 503)
        limit = int(query.get("limit", "50"))
        if "afterId" not in query:
            newest = sorted(self.store.values(), key=lambda n: n["id"], reverse=True)[:limit]
            return JSONResponse({"items": newest, "next_cursor": None})
        self.pages += 1
        page_number = self.pages
        if self.before_page is not None:
            await self.before_page(page_number)
        start = max(int(query["afterId"]), int(query.get("cursor", "0")))
        rest = sorted((n for n in self.store.values() if n["id"] > start), key=lambda n: n["id"])
        items = [dict(n) for n in rest[:limit]]
        more = len(rest) > limit
        answer = JSONResponse(
            {"items": items, "next_cursor": str(items[-1]["id"]) if more else None}
        )
        if self.after_page is not None:
            await self.after_page(page_number)
        return answer

    def keep(self, *, detail: str = "", **overrides: Any) -> dict[str, Any]:
        """Store a new notification without publishing it."""
        self.last_id += 1
        now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        order_id = str(uuid.uuid4())
        notification = {
            "id": self.last_id,
            "type": "PaymentAnomaly",
            "severity": "Critical",
            "title": f"Alert {self.last_id}",
            "message": "money arrived for a cancelled order",
            "metadata": {"order_id": order_id, "detail": detail},
            "is_read": False,
            "read_at": None,
            "created_at": now,
            "fingerprint": f"PaymentAnomaly:payment_for_cancelled_order:{order_id}",
            "occurrences": 1,
            "last_occurred_at": now,
            **overrides,
        }
        self.store[notification["id"]] = notification
        return notification

    async def raise_alert(self, **fields: Any) -> dict[str, Any]:
        """A new notification: stored, then published (as the outbox relay would)."""
        notification = self.keep(**fields)
        await self.publish(notification)
        return notification

    async def count_up(self, notification_id: int) -> dict[str, Any]:
        notification = self.store[notification_id]
        notification["occurrences"] += 1
        notification["last_occurred_at"] = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        await self.publish(notification)
        return dict(notification)

    async def publish(self, notification: dict[str, Any]) -> None:
        event = AdminNotificationRaised.model_validate(notification)
        envelope = wrap(event, message_id=uuid.uuid4(), correlation_id=str(uuid.uuid4()))
        await self.exchange.publish(
            aio_pika.Message(
                envelope.model_dump_json().encode(),
                content_type="application/json",
                message_id=str(envelope.message_id),
                type=envelope.type,
            ),
            routing_key="",
        )


# --- the gateway and its admins -----------------------------------------------------------------


@dataclass
class Gateway:
    url: str
    settings: GatewaySettings
    alerts: AdminAlerts

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://") + "/ws/admin"


@dataclass
class Admin:
    """A websocket client that answers pings and keeps what it received."""

    ws: ClientConnection
    frames: list[dict[str, Any]] = field(default_factory=list)
    answer_pings: bool = True

    async def next(self, timeout: float = FRAME_TIMEOUT) -> dict[str, Any]:
        """The next frame other than a ping."""
        while True:
            async with asyncio.timeout(timeout):
                frame = json.loads(await self.ws.recv())
            self.frames.append(frame)
            if frame["type"] != "ping":
                return frame
            if self.answer_pings:
                await self.ws.send(json.dumps({"type": "pong"}))

    async def hello(self) -> dict[str, Any]:
        frame = await self.next()
        assert frame["type"] == "hello", frame
        return frame

    async def notification(self) -> dict[str, Any]:
        frame = await self.next()
        assert frame["type"] == "notification", frame
        return frame["data"]

    async def notifications(self, count: int) -> list[dict[str, Any]]:
        return [await self.notification() for _ in range(count)]

    async def send(self, body: Any) -> None:
        await self.ws.send(body if isinstance(body, str | bytes) else json.dumps(body))

    async def closed(self) -> tuple[int, str]:
        """Read until the server closes; its close code and reason."""
        with contextlib.suppress(ConnectionClosed):
            while True:
                await self.next()
        assert self.ws.close_code is not None
        return self.ws.close_code, self.ws.close_reason or ""


def keys(notifications: list[dict[str, Any]]) -> list[tuple[int, int]]:
    return [(n["id"], n["occurrences"]) for n in notifications]


@dataclass
class AlertsWorld:
    settings: Callable[..., GatewaySettings]
    notifications: NotificationsStandIn
    notifications_url: str
    stack: contextlib.AsyncExitStack

    def token(self, role: Role | str = Role.ADMIN, **kwargs: Any) -> str:
        secret = self.settings().auth_jwt_secret.get_secret_value()
        return issue_token(secret, f"{role}-{uuid.uuid4().hex[:6]}", role, **kwargs)

    async def gateway(self, **overrides: Any) -> Gateway:
        """A gateway replica, served, its alert queue consumed."""
        settings = self.settings(**{"notifications_url": self.notifications_url, **overrides})
        app = create_app(settings)
        url = await self.stack.enter_async_context(serving(app))
        alerts: AdminAlerts = app.state.admin_alerts
        await eventually(lambda: alerts.feed.consuming, what="the alert queue consumed")
        return Gateway(url, settings, alerts)

    async def admin(
        self,
        gateway: Gateway,
        *,
        token: str | None = None,
        via: str = "header",
        query: str = "",
        hello: bool = True,
    ) -> Admin:
        token = token or self.token()
        url, headers = gateway.ws_url, {}
        if via == "header":
            headers["Authorization"] = f"Bearer {token}"
        else:
            query = f"access_token={token}" + (f"&{query}" if query else "")
        if query:
            url += f"?{query}"
        ws = await self.stack.enter_async_context(
            connect(url, additional_headers=headers, proxy=None, compression=None)
        )
        admin = Admin(ws)
        if hello:
            await admin.hello()
        return admin

    async def refusal(self, gateway: Gateway, url_suffix: str = "", **headers: str) -> Any:
        with pytest.raises(InvalidStatus) as refused:
            async with connect(gateway.ws_url + url_suffix, additional_headers=headers, proxy=None):
                pass
        return refused.value.response


@pytest.fixture
async def world(make_settings, rabbitmq_url: str) -> AsyncIterator[AlertsWorld]:
    tag = uuid.uuid4().hex[:8]
    # Nothing else is behind these gateways: their monitors need not poll often.
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    base: dict[str, Any] = {
        "admin_alerts_exchange": f"test.{tag}.alerts",
        "health_monitor_interval_seconds": 3600,
        "orders_url": closed,
        "payments_url": closed,
        "calendar_url": closed,
    }

    def settings(**overrides: Any) -> GatewaySettings:
        return make_settings(GatewaySettings, **{**base, **overrides})

    connection = await aio_pika.connect(rabbitmq_url)
    channel = await connection.channel(publisher_confirms=True)
    exchange = await channel.declare_exchange(
        base["admin_alerts_exchange"], aio_pika.ExchangeType.FANOUT, durable=True
    )
    notifications = NotificationsStandIn(exchange)
    try:
        async with contextlib.AsyncExitStack() as stack:
            url = await stack.enter_async_context(serving(notifications.app))
            yield AlertsWorld(settings, notifications, url, stack)
    finally:
        await channel.exchange_delete(base["admin_alerts_exchange"])
        await connection.close()


async def nothing_more(world: AlertsWorld, *admins: Admin) -> None:
    """No notification is on its way to `admins`: a marker alert raised now is the next each
    of them gets."""
    marker = await world.notifications.raise_alert(title="marker")
    for admin in admins:
        assert keys([await admin.notification()]) == [(marker["id"], 1)]


# --- the rules, without a server ---------------------------------------------------------------


def an_alert(id_: int, occurrences: int) -> Alert:
    return Alert(id=id_, occurrences=occurrences, frame="{}")


class TestWhatIsNews:
    def test_a_new_id_or_a_higher_count_is_news_a_repeat_or_a_lower_count_is_not(self) -> None:
        sent = Sent(limit=10)
        assert sent.take(an_alert(1, 1))
        assert not sent.take(an_alert(1, 1))
        assert sent.take(an_alert(1, 3))
        assert not sent.take(an_alert(1, 2))
        assert sent.take(an_alert(2, 1))

    def test_the_ids_seen_longest_ago_are_forgotten_first(self) -> None:
        sent = Sent(limit=2)
        for id_ in (1, 2, 3):
            sent.take(an_alert(id_, 1))
        assert len(sent) == 2
        assert sent.is_news(an_alert(1, 1))  # forgotten: at worst sent twice, never lost
        assert not sent.is_news(an_alert(3, 1))

    def test_a_listed_notification_reads_as_the_live_one(self) -> None:
        item = {**NOTIFICATION, "links": {"self": "/x"}}  # a field the event does not have
        live = Alert.of(AdminNotificationRaised.model_validate(NOTIFICATION))
        assert Alert.from_item(item) == live
        with pytest.raises(ValueError):
            Alert.from_item({"id": 1})


class TestSettings:
    def test_the_websocket_settings_come_from_the_environment(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        for name, value in {
            "ALERTS_PING_INTERVAL_SECONDS": "5",
            "ALERTS_PING_TIMEOUT_SECONDS": "7",
            "ALERTS_CLIENT_QUEUE_SIZE": "32",
            "ALERTS_REPLAY_PAGE_SIZE": "50",
            "ALERTS_NOTIFICATIONS_TIMEOUT_SECONDS": "2",
            "ALERTS_CLOSE_TIMEOUT_SECONDS": "3",
        }.items():
            monkeypatch.setenv(name, value)
        settings = GatewaySettings()
        assert settings.alerts_ping_interval_seconds == 5
        assert settings.alerts_ping_timeout_seconds == 7
        assert settings.alerts_client_queue_size == 32
        assert settings.alerts_replay_page_size == 50
        assert settings.alerts_notifications_timeout_seconds == 2
        assert settings.alerts_close_timeout_seconds == 3


# --- who may connect ----------------------------------------------------------------------------


class TestHandshake:
    """Refused handshakes are HTTP answers (problem+json): 401 no or bad token, 403 not admin."""

    async def test_no_token_is_refused_with_401(self, world: AlertsWorld) -> None:
        gateway = await world.gateway()
        response = await world.refusal(gateway)
        assert response.status_code == 401
        body = json.loads(response.body)
        assert body["status"] == 401 and "bearer token is required" in body["detail"]
        assert response.headers["www-authenticate"] == "Bearer"

    async def test_a_bad_or_expired_token_is_refused_with_401(self, world: AlertsWorld) -> None:
        gateway = await world.gateway()
        forged = issue_token("another-secret-0123456789abcdef0123", "x", Role.ADMIN)
        expired = world.token(Role.ADMIN, ttl_seconds=-10)
        for headers in (
            {"Authorization": "Bearer not-a-jwt"},
            {"Authorization": f"Bearer {forged}"},
            {"Authorization": f"Bearer {expired}"},
            {"Authorization": f"Basic {world.token()}"},
        ):
            response = await world.refusal(gateway, **headers)
            assert response.status_code == 401, headers
        response = await world.refusal(gateway, "?access_token=not-a-jwt")
        assert response.status_code == 401

    async def test_a_mentee_or_mentor_is_refused_with_403(self, world: AlertsWorld) -> None:
        gateway = await world.gateway()
        for role in (Role.MENTEE, Role.MENTOR):
            token = world.token(role)
            response = await world.refusal(gateway, Authorization=f"Bearer {token}")
            assert response.status_code == 403
            assert "for admins" in json.loads(response.body)["detail"]
            response = await world.refusal(gateway, f"?access_token={token}")
            assert response.status_code == 403

    async def test_an_admin_token_is_accepted_in_the_header_or_the_query(
        self, world: AlertsWorld
    ) -> None:
        gateway = await world.gateway()
        by_header = await world.admin(gateway, via="header")
        by_query = await world.admin(gateway, via="query")
        alert = await world.notifications.raise_alert()
        assert (await by_header.notification())["id"] == alert["id"]
        assert (await by_query.notification())["id"] == alert["id"]

    async def test_a_bad_after_id_on_the_url_is_refused_with_400(self, world: AlertsWorld) -> None:
        gateway = await world.gateway()
        token = world.token()
        response = await world.refusal(gateway, "?after_id=x", Authorization=f"Bearer {token}")
        assert response.status_code == 400
        assert "after_id" in json.loads(response.body)["detail"]

    async def test_the_token_in_the_query_never_reaches_the_logs(
        self, world: AlertsWorld, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.INFO)
        gateway = await world.gateway()
        token = world.token()
        await world.admin(gateway, token=token, via="query")
        await world.refusal(gateway, f"?access_token={world.token(Role.MENTEE)}")
        messages = [record.getMessage() for record in caplog.records]
        assert any("access_token=[redacted]" in m for m in messages), messages
        assert not any(token in m for m in messages)

    async def test_the_connection_ends_with_4401_when_the_token_expires(
        self, world: AlertsWorld
    ) -> None:
        gateway = await world.gateway()
        admin = await world.admin(gateway, token=world.token(ttl_seconds=2))
        code, reason = await admin.closed()
        assert code == 4401 and "expired" in reason

    async def test_a_token_that_outlives_several_pings_still_ends_the_connection_on_time(
        self, world: AlertsWorld
    ) -> None:
        # The timer for the token's end is set by the last ping before it, not at the connect.
        gateway = await world.gateway(
            alerts_ping_interval_seconds=0.5, alerts_ping_timeout_seconds=5
        )
        token = world.token(ttl_seconds=3)
        expires_at = jwt.decode(token, options={"verify_signature": False})["exp"]
        admin = await world.admin(gateway, token=token)
        async with asyncio.timeout(10):
            code, reason = await admin.closed()
        assert code == 4401 and "expired" in reason
        assert expires_at - 0.1 <= time.time() < expires_at + 1.5
        assert sum(f["type"] == "ping" for f in admin.frames) >= 2


class TestHandshakeWithAnIdentityProvider:
    """The websocket verifies tokens as the routes do: the app's verifier, the provider's keys
    (AUTH_JWKS_URL), its role claim, no HS256 outside development mode, and 503 while the keys
    cannot be fetched."""

    @pytest.fixture
    async def provider(self, world: AlertsWorld) -> IdentityProvider:
        idp = IdentityProvider(keys=[SigningKey.rsa(), SigningKey.ec()])
        return idp.served_at(await world.stack.enter_async_context(serving(idp.app)))

    @staticmethod
    def signed(key: SigningKey, sub: str, *roles: str) -> str:
        return key.sign(claims(sub, role=None, realm_access={"roles": list(roles)}))

    async def test_the_providers_admins_connect_and_nobody_else_does(
        self, world: AlertsWorld, provider: IdentityProvider
    ) -> None:
        gateway = await world.gateway(
            **provider.settings(auth_role_claim="realm_access.roles"), **OWN_LINK_KEY
        )
        rsa_key, ec_key = provider.keys
        by_header = await world.admin(gateway, token=self.signed(rsa_key, "a-1", "admin"))
        by_query = await world.admin(
            gateway, token=self.signed(ec_key, "a-2", "admin"), via="query"
        )
        alert = await world.notifications.raise_alert()
        assert (await by_header.notification())["id"] == alert["id"]
        assert (await by_query.notification())["id"] == alert["id"]

        refusals = {
            "an HS256 token, even signed with the secret": (world.token(Role.ADMIN), 401),
            "another key under the provider's kid": (
                self.signed(SigningKey.rsa(rsa_key.kid), "x", "admin"),
                401,
            ),
            "a mentor": (self.signed(rsa_key, "m-1", "mentor"), 403),
            "no role this system knows": (self.signed(rsa_key, "n-1", "offline_access"), 403),
        }
        for what, (token, status) in refusals.items():
            response = await world.refusal(gateway, Authorization=f"Bearer {token}")
            assert response.status_code == status, what
            assert json.loads(response.body)["status"] == status, what

    async def test_while_the_keys_cannot_be_fetched_a_new_kid_is_503_with_retry_after(
        self, world: AlertsWorld, provider: IdentityProvider
    ) -> None:
        gateway = await world.gateway(**provider.settings(), **OWN_LINK_KEY)
        provider.status = 503
        token = SigningKey.rsa().sign(claims("a-1", role="admin"))
        response = await world.refusal(gateway, Authorization=f"Bearer {token}")
        assert response.status_code == 503
        assert "keys cannot be fetched" in json.loads(response.body)["detail"]
        assert int(response.headers["retry-after"]) >= 1


# --- hello and the live feed --------------------------------------------------------------------


class TestHello:
    async def test_hello_carries_the_newest_notification_id(self, world: AlertsWorld) -> None:
        for _ in range(3):
            world.notifications.keep()
        gateway = await world.gateway()
        token = world.token()
        admin = await world.admin(gateway, token=token, hello=False)
        assert await admin.next() == {"type": "hello", "last_id": 3}
        # Asked newest first, one item, with the admin's own token.
        assert world.notifications.requests == [({"limit": "1"}, f"Bearer {token}")]

    async def test_hello_says_0_when_there_is_no_notification(self, world: AlertsWorld) -> None:
        gateway = await world.gateway()
        admin = await world.admin(gateway, hello=False)
        assert await admin.next() == {"type": "hello", "last_id": 0}

    async def test_without_the_notifications_service_hello_says_so_and_alerts_still_come(
        self, world: AlertsWorld
    ) -> None:
        gateway = await world.gateway(notifications_url=f"http://127.0.0.1:{free_port()}")
        admin = await world.admin(gateway, hello=False)
        hello = await admin.next()
        assert hello["type"] == "hello" and hello["last_id"] is None
        assert "could not be asked" in hello["detail"]
        alert = await world.notifications.raise_alert()
        assert (await admin.notification())["id"] == alert["id"]


class TestLiveFeed:
    async def test_a_published_alert_reaches_a_connected_admin(self, world: AlertsWorld) -> None:
        gateway = await world.gateway()
        admin = await world.admin(gateway)
        alert = await world.notifications.raise_alert(severity="Critical", detail="trace")
        assert await admin.notification() == alert

    async def test_a_counted_up_notification_arrives_again_as_an_update(
        self, world: AlertsWorld
    ) -> None:
        gateway = await world.gateway()
        admin = await world.admin(gateway)
        alert = await world.notifications.raise_alert()
        await world.notifications.count_up(alert["id"])
        await world.notifications.count_up(alert["id"])
        received = await admin.notifications(3)
        assert keys(received) == [(alert["id"], 1), (alert["id"], 2), (alert["id"], 3)]
        assert received[2]["last_occurred_at"] >= received[0]["last_occurred_at"]

    async def test_a_redelivered_or_stale_alert_is_not_sent_again(self, world: AlertsWorld) -> None:
        gateway = await world.gateway()
        admin = await world.admin(gateway)
        alert = await world.notifications.raise_alert()
        older = dict(alert)
        counted = await world.notifications.count_up(alert["id"])
        await world.notifications.publish(counted)  # the outbox relay delivers at least once
        await world.notifications.publish(older)  # and a lower count may come late
        assert keys(await admin.notifications(2)) == [(alert["id"], 1), (alert["id"], 2)]
        await nothing_more(world, admin)

    async def test_two_replicas_each_deliver_every_alert_once(self, world: AlertsWorld) -> None:
        """Show 5: an admin on each of two gateway replicas gets the same alert, once."""
        one, two = await world.gateway(), await world.gateway()
        assert one.alerts.feed.queue_name != two.alerts.feed.queue_name
        on_one, on_two = await world.admin(one), await world.admin(two)
        alert = await world.notifications.raise_alert()
        assert await on_one.notification() == alert
        assert await on_two.notification() == alert
        await nothing_more(world, on_one, on_two)


# --- resume: replay, then live, no gap, no duplicate --------------------------------------------


class TestResume:
    async def test_a_returning_admin_gets_exactly_what_it_missed_in_order_then_live(
        self, world: AlertsWorld
    ) -> None:
        """Show 6: disconnect, three alerts, resume with the last id: those three, then live."""
        gateway = await world.gateway(alerts_replay_page_size=2)  # the replay takes two pages
        first = await world.admin(gateway)
        seen = await world.notifications.raise_alert()
        assert (await first.notification())["id"] == seen["id"]
        await first.ws.close()

        missed = [await world.notifications.raise_alert() for _ in range(3)]

        again = await world.admin(gateway, hello=False)
        await again.send({"type": "resume", "after_id": seen["id"]})
        assert (await again.hello())["last_id"] == missed[-1]["id"]
        assert await again.notifications(3) == missed
        assert await again.next() == {"type": "resumed", "after_id": seen["id"], "replayed": 3}
        live = await world.notifications.raise_alert()
        assert await again.notification() == live
        await nothing_more(world, again)

    async def test_after_id_on_the_url_resumes_from_the_first_frame(
        self, world: AlertsWorld
    ) -> None:
        gateway = await world.gateway()
        missed = [world.notifications.keep() for _ in range(2)]
        admin = await world.admin(gateway, query="after_id=0", hello=False)
        assert (await admin.hello())["last_id"] == missed[-1]["id"]
        assert await admin.notifications(2) == missed
        assert (await admin.next())["type"] == "resumed"

    async def test_an_alert_raised_during_the_replay_arrives_once(self, world: AlertsWorld) -> None:
        gateway = await world.gateway(alerts_replay_page_size=1)
        admin = await world.admin(gateway)
        missed = [world.notifications.keep() for _ in range(3)]
        during: list[dict[str, Any]] = []

        async def raise_during_the_replay(page: int) -> None:
            if page == 2:
                # Stored before the page is read, so the replay lists it; and published, so
                # the live feed brings it too while the replay runs.
                during.append(await world.notifications.raise_alert(title="during"))
                # A notification the replay already sent counts up: that is news.
                during.append(await world.notifications.count_up(missed[0]["id"]))

        async def raise_after_the_last_read(page: int) -> None:
            if page == 4:  # after the last page was read: only the live feed brings it
                during.append(await world.notifications.raise_alert(title="late"))

        world.notifications.before_page = raise_during_the_replay
        world.notifications.after_page = raise_after_the_last_read
        await admin.send({"type": "resume", "after_id": 0})

        received: list[dict[str, Any]] = []
        while (frame := await admin.next())["type"] == "notification":
            received.append(frame["data"])
        assert frame["type"] == "resumed"
        while len(received) < 6:
            received.append(await admin.notification())
        # Replayed in order: 1, 2 (counted up before it was read), 3, then the one raised
        # during; then the live ones, once each.
        first = missed[0]["id"]
        assert keys(received[:4]) == [
            (first, 1),
            (missed[1]["id"], 1),
            (missed[2]["id"], 1),
            (during[0]["id"], 1),
        ]
        assert sorted(keys(received)) == sorted(
            {(first, 1), (first, 2), *keys(missed[1:]), *keys(during[::2])}
        )
        assert len(set(keys(received))) == len(received)
        await nothing_more(world, admin)

    async def test_a_resume_after_live_alerts_skips_what_was_sent_live(
        self, world: AlertsWorld
    ) -> None:
        gateway = await world.gateway()
        admin = await world.admin(gateway)
        before = world.notifications.keep()  # missed while away
        live = await world.notifications.raise_alert()
        assert (await admin.notification())["id"] == live["id"]
        await admin.send({"type": "resume", "after_id": before["id"] - 1})
        assert await admin.notification() == before
        assert await admin.next() == {
            "type": "resumed",
            "after_id": before["id"] - 1,
            "replayed": 1,
        }
        await nothing_more(world, admin)

    async def test_a_failed_replay_is_reported_and_the_live_feed_goes_on(
        self, world: AlertsWorld
    ) -> None:
        gateway = await world.gateway()
        admin = await world.admin(gateway)
        world.notifications.failing = True
        await admin.send({"type": "resume", "after_id": 0})
        error = await admin.next()
        assert error["type"] == "error" and error["code"] == "resume_failed"
        assert "HTTP 503" in error["detail"]
        world.notifications.failing = False
        alert = await world.notifications.raise_alert()
        assert await admin.notification() == alert

    async def test_bad_messages_get_an_error_frame_and_the_connection_stays(
        self, world: AlertsWorld
    ) -> None:
        gateway = await world.gateway()
        admin = await world.admin(gateway)
        for message in (
            "not json",
            "[1, 2]",
            {"type": "dance"},
            {"no": "type"},
            {"type": "resume"},
            {"type": "resume", "after_id": -1},
            {"type": "resume", "after_id": "7"},
            {"type": "resume", "after_id": True},
            {"type": "resume", "after_id": 1, "extra": 1},
            b"\x00binary",
            "x" * 5000,
        ):
            await admin.send(message)
            error = await admin.next()
            assert error["type"] == "error" and error["code"] == "bad_message", message
            assert error["detail"]
        await admin.send({"type": "ping"})
        assert await admin.next() == {"type": "pong"}
        alert = await world.notifications.raise_alert()
        assert await admin.notification() == alert


# --- slow clients and pings ---------------------------------------------------------------------


class NeverReads:
    """A websocket client that completes the handshake and then never reads a byte, with a tiny
    receive buffer, so that the server's writes to it back up quickly."""

    def __init__(self, url: str, token: str) -> None:
        self.protocol = ClientProtocol(parse_uri(url))
        request = self.protocol.connect()
        request.headers["Authorization"] = f"Bearer {token}"
        self.request = request
        self.port = int(url.split(":")[2].split("/")[0])
        self.sock: socket.socket | None = None

    async def open(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.port))
        self.protocol.send_request(self.request)
        await asyncio.get_running_loop().sock_sendall(sock, b"".join(self.protocol.data_to_send()))
        self.sock = sock

    async def read_to_the_end(self) -> list[Frame]:
        """Now read everything the server sent, to its close; the frames (text and close)."""
        assert self.sock is not None
        loop = asyncio.get_running_loop()
        while self.protocol.close_rcvd is None:
            async with asyncio.timeout(FRAME_TIMEOUT):
                data = await loop.sock_recv(self.sock, 1 << 16)
            if not data:
                break
            self.protocol.receive_data(data)
        self.sock.close()
        return [e for e in self.protocol.events_received() if isinstance(e, Frame)]


class TestSlowClients:
    async def test_a_client_that_never_reads_is_dropped_and_does_not_delay_the_others(
        self, world: AlertsWorld
    ) -> None:
        """Show 7: the fast admin gets every alert while the slow one backs up; then the slow
        one is dropped (4408), and the fast one still gets everything."""
        # The slow one's close frame waits until the test reads it: give it the time.
        gateway = await world.gateway(alerts_client_queue_size=4, alerts_close_timeout_seconds=60)
        feed = gateway.alerts.feed
        fast = await world.admin(gateway)
        slow = NeverReads(gateway.ws_url, world.token())
        await slow.open()
        await eventually(lambda: len(feed.subscribers) == 2, what="both admins connected")

        detail = "x" * 32_000  # large alerts (a stack trace): the slow socket backs up sooner
        raised: list[int] = []
        while len(feed.subscribers) == 2:
            assert len(raised) < 500, "the slow client was never dropped"
            alert = await world.notifications.raise_alert(detail=detail)
            raised.append(alert["id"])
            # Each alert reaches the fast admin before the next is raised: nobody waits.
            assert (await fast.notification())["id"] == alert["id"]
        for _ in range(3):  # and after the slow one is gone
            alert = await world.notifications.raise_alert(detail=detail)
            raised.append(alert["id"])
            assert (await fast.notification())["id"] == alert["id"]
        assert [f["data"]["id"] for f in fast.frames if f["type"] == "notification"] == raised

        frames = await slow.read_to_the_end()
        close = frames[-1]
        assert close.opcode is Opcode.CLOSE
        assert slow.protocol.close_rcvd is not None
        assert slow.protocol.close_rcvd.code == 4408
        assert "too slow" in slow.protocol.close_rcvd.reason
        received = [json.loads(bytes(f.data)) for f in frames if f.opcode is Opcode.TEXT]
        assert received[0]["type"] == "hello"
        ids = [f["data"]["id"] for f in received[1:]]
        assert ids == raised[: len(ids)] and len(ids) < len(raised)
        await eventually(lambda: gateway.alerts.dropped == 1, what="the drop counted")


class TestPings:
    async def test_an_admin_that_answers_pings_stays_connected(self, world: AlertsWorld) -> None:
        gateway = await world.gateway(
            alerts_ping_interval_seconds=0.2, alerts_ping_timeout_seconds=5
        )
        admin = await world.admin(gateway)
        for _ in range(3):
            async with asyncio.timeout(FRAME_TIMEOUT):
                assert json.loads(await admin.ws.recv()) == {"type": "ping"}
            await admin.send({"type": "pong"})
        alert = await world.notifications.raise_alert()
        assert await admin.notification() == alert

    async def test_an_admin_that_does_not_answer_is_dropped(self, world: AlertsWorld) -> None:
        gateway = await world.gateway(
            alerts_ping_interval_seconds=0.2, alerts_ping_timeout_seconds=0.5
        )
        admin = await world.admin(gateway)
        admin.answer_pings = False
        code, reason = await admin.closed()
        assert code == 4408 and "ping" in reason
        assert any(f["type"] == "ping" for f in admin.frames)


# --- the broker and health ----------------------------------------------------------------------


class TestFeedQueue:
    @pytest.fixture
    async def proxy(self, rabbitmq_url: str) -> AsyncIterator[TcpProxy]:
        host, port = rabbitmq_url.rsplit("@", 1)[-1].split("/")[0].split(":")
        proxy = TcpProxy(host, int(port))
        await proxy.start()
        try:
            yield proxy
        finally:
            await proxy.stop()

    async def test_after_a_broker_reconnect_a_new_queue_is_consumed_and_admins_catch_up(
        self, world: AlertsWorld, proxy: TcpProxy, rabbitmq_url: str
    ) -> None:
        gateway = await world.gateway(rabbitmq_url=url_via(rabbitmq_url, proxy))
        feed = gateway.alerts.feed
        admin = await world.admin(gateway)
        before = feed.queue_name

        seen = await world.notifications.raise_alert()
        assert await admin.notification() == seen

        await proxy.cut()
        await eventually(lambda: not feed.consuming, what="the feed noticing the cut")
        # Published while this replica has no queue: no queue of its own holds it.
        missed = await world.notifications.raise_alert()
        await proxy.restore()
        await eventually(
            lambda: feed.consuming and feed.queue_name != before, what="a new queue consumed"
        )
        # The admin catches up from the last id it was sent, then goes on live.
        assert await admin.notification() == missed
        assert await admin.next() == {"type": "resumed", "after_id": seen["id"], "replayed": 1}
        alert = await world.notifications.raise_alert()
        assert await admin.notification() == alert
        await nothing_more(world, admin)

    async def test_the_queue_is_a_faststream_subscriber_of_the_replica_alone_gone_with_it(
        self, world: AlertsWorld, rabbitmq_url: str
    ) -> None:
        gateway = await world.gateway()
        feed = gateway.alerts.feed
        assert isinstance(feed.consumer, RabbitSubscriber)
        queue = feed.consumer.queue
        assert queue.name == feed.queue_name
        assert (queue.exclusive, queue.auto_delete, queue.durable) == (True, True, False)
        assert feed.consumer.ack_policy is AckPolicy.ACK_FIRST  # taken with no_ack

        await feed.stop()  # the replica going away: its queue goes with its consumer
        async with await aio_pika.connect(rabbitmq_url) as connection:
            channel = await connection.channel()
            with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
                await channel.declare_queue(queue.name, passive=True)

    async def test_health_shows_the_queue_consumed_and_the_admins_connected(
        self, world: AlertsWorld
    ) -> None:
        gateway = await world.gateway()
        await world.admin(gateway)
        await world.admin(gateway)
        async with httpx.AsyncClient(base_url=gateway.url, trust_env=False, timeout=30) as client:
            checks = (await client.get("/internal/health")).json()["checks"]
            ready = (await client.get("/health/ready")).json()["checks"]
        consumers = checks["admin-alerts:consumers"][0]
        assert consumers["status"] == "pass" and consumers["observedValue"] == 1
        assert gateway.alerts.feed.queue_name in consumers["output"]
        connections = checks["admin-alerts:connections"][0]
        assert connections["observedValue"] == 2
        assert connections["observedUnit"] == "connections"
        assert not any(key.startswith("admin-alerts") for key in ready)


class TestConnectedAdminsMetric:
    async def test_metrics_count_the_admins_connected_to_the_replica(
        self, world: AlertsWorld
    ) -> None:
        gateway = await world.gateway()

        async def connected() -> float:
            async with httpx.AsyncClient(base_url=gateway.url, trust_env=False) as client:
                answer = await client.get("/metrics")
            [value] = [
                sample.value
                for family in text_string_to_metric_families(answer.text)
                for sample in family.samples
                if sample.name == "booking_admin_websockets"
            ]
            return value

        before = await connected()  # other gateways of this process count in the same registry
        first = await world.admin(gateway)
        await world.admin(gateway)
        assert await connected() == before + 2

        await first.ws.close()
        await eventually(
            lambda: gateway.alerts.connections and len(gateway.alerts.connections) == 1,
            what="the closed connection gone",
        )
        assert await connected() == before + 1

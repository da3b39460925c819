"""What the admins see, through the gateway: a failure in the system arrives on the live
websocket and is in the stored feed, and only admins may look.

Against the running system: a booking whose mentor never connected Google is paid, calendar
fails it (`mentor_not_integrated`), notifications stores the alert and fans it out, and the
gateway's `/ws/admin` pushes it to a connected admin.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

pytestmark = pytest.mark.e2e

FRAME_SECONDS = 30  # a failure travels through four services on a loaded machine


@pytest.fixture
async def admin_socket(running_system, market) -> AsyncIterator[ClientConnection]:
    url = running_system.gateway.replace("http://", "ws://") + "/ws/admin"
    async with connect(url, additional_headers=market.admin, open_timeout=30) as socket:
        async with asyncio.timeout(FRAME_SECONDS):
            hello = json.loads(await socket.recv())
        assert hello["type"] == "hello", hello
        yield socket


async def next_notification(socket: ClientConnection, **match: Any) -> dict[str, Any]:
    """The next notification frame whose metadata holds `match` (pings and others skipped)."""

    async def receive() -> dict[str, Any]:
        while True:
            frame = json.loads(await socket.recv())
            if frame["type"] != "notification":
                continue
            metadata = frame["data"]["metadata"]
            if all(metadata.get(k) == v for k, v in match.items()):
                return frame["data"]

    async with asyncio.timeout(FRAME_SECONDS):
        return await receive()


class TestTheLiveFeed:
    async def test_a_booking_that_cannot_be_scheduled_reaches_a_connected_admin(
        self, market, admin_socket
    ):
        offering = await market.offering()  # its mentor never connects Google
        order_id = await market.booked(offering)
        await market.pay(await market.payment_ref(order_id))

        alert = await next_notification(admin_socket, order_id=order_id)

        assert (alert["type"], alert["severity"]) == ("IntegrationFailure", "Error")
        assert alert["metadata"]["reason"] == "mentor_not_integrated"
        assert alert["metadata"]["mentor_id"] == offering["mentor_id"]
        assert alert["occurrences"] == 1 and alert["is_read"] is False

        listed = await market.api.get(
            "/api/admin/notifications",
            params={"type": "IntegrationFailure", "unreadOnly": "true"},
            headers=market.admin,
        )
        assert listed.status_code == 200, listed.text
        assert alert["id"] in [item["id"] for item in listed.json()["items"]]

    async def test_a_forged_webhook_is_a_warning_on_the_feed(self, market, admin_socket):
        forged = "0f" * 12

        await market.api.get("/api/payments/webhook", params={"payment_ref": forged})

        alert = await next_notification(admin_socket, payment_ref=forged)
        assert (alert["type"], alert["severity"]) == ("PaymentAnomaly", "Warning")


class TestOnlyAdmins:
    async def test_a_mentee_may_neither_list_nor_listen(self, running_system, market):
        listed = await market.api.get("/api/admin/notifications", headers=market.mentee)
        assert listed.status_code == 403

        url = running_system.gateway.replace("http://", "ws://") + "/ws/admin"
        with pytest.raises(InvalidStatus) as refused:
            async with connect(url, additional_headers=market.mentee, open_timeout=30):
                pass
        assert refused.value.response.status_code == 403

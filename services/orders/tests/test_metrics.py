"""The booking funnel on orders' /metrics: each outcome counted once its use case commits (a
repeat of an event that changes nothing counts nothing), and the oldest order still waiting for
its payment read on scrape. On the real broker; the registry is the process's, so each check is
a change."""

from __future__ import annotations

from booking.devtools.fixtures import scrape_metrics


def moved(before: dict, after: dict, outcome: str, reason: str = "") -> float:
    key = ("booking_bookings_total", frozenset({"outcome": outcome, "reason": reason}.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)


async def test_each_outcome_is_counted_once_committed(orders):
    before = await scrape_metrics(orders.client)
    confirmed = await orders.booked()
    expired = await orders.booked()
    failed = await orders.booked()

    await orders.pay(confirmed)
    await orders.handled(await orders.publish(confirmed.confirmed()))
    await orders.handled(await orders.publish(expired.initiated()))
    await orders.handled(await orders.publish(expired.failed(reason="expired")))
    await orders.handled(await orders.publish(failed.initiated()))
    await orders.handled(await orders.publish(failed.failed(reason="failed")))
    # Repeats under new message ids: handled, and nothing changes, so nothing is counted.
    await orders.handled(await orders.publish(confirmed.confirmed()))
    await orders.handled(await orders.publish(expired.failed(reason="expired")))
    after = await scrape_metrics(orders.client)

    assert moved(before, after, "requested") == 3
    assert moved(before, after, "confirmed") == 1
    assert moved(before, after, "failed", "payment_expired") == 1
    assert moved(before, after, "failed", "payment_failed") == 1
    assert moved(before, after, "cancelled", "admin") == 0

    cancelled = await orders.client.post(
        f"/api/admin/orders/{confirmed.order_id}/cancel",
        json={"reason": "the mentor is ill"},
        headers=orders.admin,
    )
    assert cancelled.status_code == 200, cancelled.text
    assert moved(after, await scrape_metrics(orders.client), "cancelled", "admin") == 1


async def test_the_oldest_pending_order_is_read_on_scrape(orders):
    booked = await orders.booked()  # pending: its payment has not opened
    # Booked 20 minutes ago (the sweeper fails such an order only at 30).
    await orders.backdate(booked.order_id, minutes=20)
    waiting = await scrape_metrics(orders.client)
    # At least its age: other tests' orders in this database may have waited longer.
    assert waiting[("booking_orders_oldest_pending_seconds", frozenset())] >= 20 * 60

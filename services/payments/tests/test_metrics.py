"""What payments' /metrics shows an operator after a booking is paid and after Konnect fails it:
payments by outcome, Konnect's calls by operation and result with their duration and retries,
the BookingRequested handler timed, and its queue read on scrape. The service runs on the real
broker against the sandbox Konnect; the registry is the process's, so each check is a change."""

from __future__ import annotations

from booking.devtools.fixtures import scrape_metrics


def read(metrics: dict, name: str, **labels: str) -> float:
    return metrics.get((name, frozenset(labels.items())), 0.0)


def moved(before: dict, after: dict, name: str, **labels: str) -> float:
    return read(after, name, **labels) - read(before, name, **labels)


KONNECT_CALLS = "booking_provider_calls_total"
KONNECT_DURATION = "booking_provider_call_duration_seconds_count"
KONNECT_RETRIES = "booking_provider_retries_total"


async def test_a_paid_booking_and_a_konnect_outage_move_the_metrics(
    payments_service, sandbox, book
):
    payments = payments_service
    consumer = f"{payments.settings.queue_prefix}payments"
    init = {"provider": "konnect", "operation": "init-payment"}
    before = await scrape_metrics(payments.http)

    # A booking whose payment opens, then is paid (the webhook reads it back from Konnect).
    event, ref = await book(payments)
    await sandbox.complete(ref)
    await payments.one("PaymentCompleted", event.order_id)
    paid = await scrape_metrics(payments.http)

    assert moved(before, paid, "booking_payments_total", outcome="initiated", reason="") == 1
    assert moved(before, paid, "booking_payments_total", outcome="completed", reason="") == 1
    assert moved(before, paid, KONNECT_CALLS, **init, result="ok") == 1
    assert moved(before, paid, KONNECT_DURATION, **init) == 1
    get = {"provider": "konnect", "operation": "get-payment"}
    assert moved(before, paid, KONNECT_CALLS, **get, result="ok") >= 1
    handled = {"consumer": consumer, "type": "BookingRequested"}
    assert moved(before, paid, "booking_messages_handled_total", **handled, outcome="handled") == 1
    assert moved(before, paid, "booking_message_handler_duration_seconds_count", **handled) == 1
    # Read on scrape: its queue, consumed and empty.
    assert read(paid, "booking_queue_consumers", queue=consumer) >= 1
    assert read(paid, "booking_queue_messages", queue=consumer) == 0

    # Konnect answers 503 to every attempt of the next init: the initiation fails.
    attempts = payments.settings.konnect_max_attempts
    await sandbox.fault("http_503", count=attempts, endpoint="init")
    failed = await payments.request_booking()
    await payments.one("PaymentInitiationFailed", failed.order_id)
    after = await scrape_metrics(payments.http)

    outcome = {"outcome": "initiation_failed", "reason": "konnect_unavailable"}
    assert moved(paid, after, "booking_payments_total", **outcome) == 1
    assert moved(paid, after, "booking_payments_total", outcome="initiated", reason="") == 0
    assert moved(paid, after, KONNECT_CALLS, **init, result="unavailable") == 1
    assert moved(paid, after, KONNECT_CALLS, **init, result="ok") == 0
    assert moved(paid, after, KONNECT_RETRIES, **init) == attempts - 1

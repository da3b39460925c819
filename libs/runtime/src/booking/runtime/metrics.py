"""Prometheus metrics every process exports at /metrics (docs/operations.md, Metrics).

Every metric of ours is named `booking_...` and defined here, in the default registry, so that
one place lists them (the dashboard's and the alert rules' tests read them from here). A hot
path takes a metric's child once (`Children`, or a module-level `.labels(...)`), never per
message: `.labels()` takes a lock and builds a key on every call.

The gauges that describe a backlog (outbox lag, queue and dead-letter depths, the oldest pending
order) are read when Prometheus scrapes: the runtime's `/metrics` route awaits the refreshers a
process registered (`ServiceRuntime.on_scrape`) and then renders, so no message pays for them.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

PREFIX = "booking_"

M = TypeVar("M", bound=MetricWrapperBase)


class Children(Generic[M]):
    """A labelled metric's children, each resolved once: `children("a", "b")` is the child
    `metric.labels("a", "b")` returned the first time."""

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: M) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


# Latencies of outside calls and of messages waiting span milliseconds to many minutes (retries,
# delay queues): the default buckets stop at 10 s.
_CALL_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
_AGE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)

# --- HTTP (booking.runtime.host) ---------------------------------------------------------------

HTTP_REQUESTS = Counter(
    "booking_http_requests_total",
    "HTTP requests answered, by method, route template and status",
    ["method", "route", "status"],
)
HTTP_LATENCY = Histogram(
    "booking_http_request_duration_seconds", "HTTP request latency, by route template", ["route"]
)

# --- messaging (booking.runtime.consumer, outbox, dead_letters) --------------------------------

MESSAGES_HANDLED = Counter(
    "booking_messages_handled_total",
    "Messages consumed, by consumer, event type and outcome "
    "(handled, duplicate, retried, dead_lettered)",
    ["consumer", "type", "outcome"],
)
HANDLER_LATENCY = Histogram(
    "booking_message_handler_duration_seconds",
    "Time in a handler, by consumer and event type (inside the transaction, commit excluded)",
    ["consumer", "type"],
)
BATCH_LATENCY = Histogram(
    "booking_message_batch_duration_seconds",
    "Time to handle a batch of deliveries: parsing, the transaction and its commit, the acks",
    ["consumer"],
)
MESSAGE_AGE = Histogram(
    "booking_message_age_seconds",
    "Age of each message its consumer handled, from the event's occurred_at to the commit "
    "(the outbox, the queue, any retries): the consumer lag in time",
    ["consumer"],
    buckets=_AGE_BUCKETS,
)
CONSUMER_PAUSES = Counter(
    "booking_consumer_pauses_total",
    "Times a consumer paused because its database was away",
    ["consumer"],
)
OUTBOX_PUBLISHED = Counter("booking_outbox_published_total", "Outbox events published", ["schema"])
OUTBOX_UNROUTABLE = Counter(
    "booking_outbox_unroutable_total",
    "Outbox events no queue took (kept for later)",
    ["schema", "type"],
)
DEAD_LETTERS_KEPT = Counter(
    "booking_dead_letters_kept_total", "Messages kept as dead letters", ["consumer", "type"]
)

# Read on scrape (booking.runtime.host.ServiceRuntime): each replica reports what it sees of the
# shared queue and schema, so a query over replicas takes the max, not the sum.
OUTBOX_LAG = Gauge(
    "booking_outbox_lag_seconds", "Age of the oldest unsent outbox event (0: none)", ["schema"]
)
QUEUE_MESSAGES = Gauge(
    "booking_queue_messages",
    "Messages ready in a consumer's queue, not yet delivered: the consumer lag in messages",
    ["queue"],
)
QUEUE_CONSUMERS = Gauge(
    "booking_queue_consumers", "Consumers attached to a consumer's queue", ["queue"]
)
DEAD_LETTER_QUEUE_MESSAGES = Gauge(
    "booking_dead_letter_queue_messages",
    "Messages in a consumer's dead-letter queue, not yet kept by its service",
    ["queue"],
)
DEAD_LETTERS_WAITING = Gauge(
    "booking_dead_letters_waiting",
    "Dead letters kept and waiting for an admin to replay or discard them",
    ["schema"],
)

# --- outside systems (booking.runtime.outside: Konnect, Google) ------------------------------

PROVIDER_CALLS = Counter(
    "booking_provider_calls_total",
    "Calls to an outside system, retries included, by provider, operation and result "
    "(ok; refused: an answer not worth retrying; unavailable: every attempt failed)",
    ["provider", "operation", "result"],
)
PROVIDER_LATENCY = Histogram(
    "booking_provider_call_duration_seconds",
    "Duration of a call to an outside system, its retries and their waits included",
    ["provider", "operation"],
    buckets=_CALL_BUCKETS,
)
PROVIDER_RETRIES = Counter(
    "booking_provider_retries_total",
    "Attempts at an outside system that failed and were tried again",
    ["provider", "operation"],
)

# --- the booking funnel (orders, payments) -----------------------------------------------------

BOOKINGS = Counter(
    "booking_bookings_total",
    "Bookings (orders) by outcome (requested, confirmed, failed, cancelled) and reason, counted "
    "when the use case commits it",
    ["outcome", "reason"],
)
PAYMENTS = Counter(
    "booking_payments_total",
    "Konnect payments by outcome (initiated, initiation_failed, completed, underpaid, expired) "
    "and reason, counted when the use case commits it",
    ["outcome", "reason"],
)
OLDEST_PENDING_ORDER = Gauge(
    "booking_orders_oldest_pending_seconds",
    "Age of the oldest order whose payment has not opened yet (0: none); read on scrape",
)

# --- the gateway's clients --------------------------------------------------------------------

ADMIN_WEBSOCKETS = Gauge(
    "booking_admin_websockets", "Admins connected to this replica's alert feed (/ws/admin)"
)
ADMIN_WEBSOCKETS_DROPPED = Counter(
    "booking_admin_websockets_dropped_total",
    "Admin alert websockets closed by the server",
    ["reason"],
)
ORDER_STREAMS = Gauge(
    "booking_order_streams", "Order event streams (Server-Sent Events) open on this replica"
)
ORDER_STREAMS_DROPPED = Counter(
    "booking_order_streams_dropped_total",
    "Order event streams closed by the server",
    ["reason"],
)
ORDER_READS = Counter(
    "booking_order_reads_total",
    "GET /api/orders/{id} through this replica, by where it was answered from",
    ["answered_by"],
)

# --- alerts routed to people (booking.notifications.dispatcher) ---------------------------------

ALERT_DELIVERIES = Counter(
    "booking_alert_deliveries_total",
    "Attempts to send an alert to people, by channel (webhook, email) and result (sent; "
    "retried: failed, tried again later; given_up: failed, the retry schedule spent)",
    ["channel", "result"],
)

"""Prometheus metrics every service exports at /metrics."""

from prometheus_client import Counter, Histogram

HTTP_REQUESTS = Counter(
    "http_requests_total", "HTTP requests answered", ["method", "route", "status"]
)
HTTP_LATENCY = Histogram("http_request_duration_seconds", "HTTP request latency", ["route"])
MESSAGES_HANDLED = Counter(
    "messages_handled_total", "Messages consumed, by outcome", ["consumer", "type", "outcome"]
)
HANDLER_LATENCY = Histogram("message_handler_duration_seconds", "Handler latency", ["consumer"])
OUTBOX_PUBLISHED = Counter("outbox_published_total", "Outbox events published", ["schema"])
CONSUMER_PAUSES = Counter(
    "consumer_pauses_total", "Times a consumer paused because its database was away", ["consumer"]
)
OUTBOX_UNROUTABLE = Counter(
    "outbox_unroutable_total", "Outbox events no queue took (kept for later)", ["schema", "type"]
)
DEAD_LETTERS_KEPT = Counter(
    "dead_letters_kept_total", "Messages kept as dead letters", ["consumer", "type"]
)

# --- alerts routed to people (booking.notifications.dispatcher) ---------------------------------

ALERT_DELIVERIES = Counter(
    "booking_alert_deliveries_total",
    "Attempts to send an alert to people, by channel (webhook, email) and result (sent; "
    "retried: failed, tried again later; given_up: failed, the retry schedule spent)",
    ["channel", "result"],
)

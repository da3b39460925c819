"""The admins' live alert feed: `WS /ws/admin`.

Protocol (JSON text frames):

- Handshake: an admin token in `Authorization: Bearer <token>`, or in the `access_token` query
  parameter (browsers cannot set headers on a websocket). The handshake is refused with an HTTP
  answer (problem+json): 401 without a token or with a bad or expired one, 403 for a token that is
  not an admin's. (A browser only sees a failed connection; it can check its token with any
  HTTP call.) Once the token expires, the server closes the connection with 4401.
- Server to client:
  `{"type": "hello", "last_id": N}` first: the newest notification's id (0 when there is none;
  `null`, with a `detail`, when the notifications service could not be asked: live alerts still
  come); `{"type": "notification", "data": {...}}` for each new or counted-up notification (a
  counted-up one has the same id and more `occurrences`); `{"type": "resumed", "after_id": K,
  "replayed": n}` when a replay is over; `{"type": "ping"}` every ALERTS_PING_INTERVAL_SECONDS;
  `{"type": "pong"}` to a client's ping; `{"type": "error", "code": ..., "detail": ...}` for a
  message the server cannot act on or a failure the client should know of (codes bad_message,
  resume_busy, resume_failed, feed_interrupted); the connection stays open.
- Client to server: `{"type": "resume", "after_id": K}` replays every notification after K,
  oldest first, from the notifications service, then the live feed continues, with no gap and no
  duplicate. `?after_id=K` on the URL does the same from the start. Sent before the hello
  arrives (or on the URL), nothing live comes before the replay; sent later, the replay skips what
  was already sent live. `{"type": "pong"}` answers a ping: any message within
  ALERTS_PING_TIMEOUT_SECONDS of a ping will do, else the connection is closed (4408).
  `{"type": "ping"}` is answered with a pong.
- After a broker reconnect the replica's queue is new, and what was published meanwhile is in
  no queue of its own: each admin connected there is caught up at once, as if it had resumed
  from the last id it was sent (or told in the hello); without such an id it gets an error
  feed_interrupted and resumes itself.
- A client that does not read fast enough (ALERTS_CLIENT_QUEUE_SIZE frames waiting for it) is
  closed with 4408 and the reason; it reconnects and resumes from its last id. It never slows
  the others. 1001: the gateway is shutting down.

Each replica has its own queue on the `admin.alerts` fanout (feed.py); one task per connection
writes to its socket (connection.py); hello and replays ask the notifications service with the
admin's own token (notifications.py); endpoint.py authenticates and keeps the connections.
"""

from booking.gateway.alerts.endpoint import AdminAlerts

__all__ = ["AdminAlerts"]

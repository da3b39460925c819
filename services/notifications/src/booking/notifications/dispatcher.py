"""The dispatcher: sends the deliveries the routing queued (service.py) to people, through the
channels configured (webhook.py, mailer.py), and records each attempt.

Every replica runs one, on an interval (`Every`, as the runtime's sweepers). A round claims due
deliveries with `FOR UPDATE SKIP LOCKED`, so replicas never take the same one, and stamps each
claimed one `sending` for a lease (the send timeout and a margin) in that same transaction; it
sends after the commit, every send under a timeout, and records the outcome: sent, or due again
on the retry schedule, or given up once the schedule is spent (about a day). A dispatcher that
dies mid-send leaves its claims to be taken again when their lease ends, with the same
idempotency key: a receiver that keeps keys sees a repeat as one. Nothing is retried in an event
consumer: a channel's outage never touches a message, so it never dead-letters one.

`run_once(now)` is one round at any `now` (tests drive time with it; the clock otherwise).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from booking.notifications.domain import Channel, Dispatch
from booking.notifications.service import NotificationsService
from booking.runtime import metrics
from booking.runtime.clock import utcnow
from booking.runtime.outages import OutageLog, describe
from booking.runtime.sweeping import Every, run_quietly

log = logging.getLogger(__name__)

BATCH_SIZE = 20
"""Deliveries claimed (and sent concurrently) per batch; a round takes batches until none is due."""
LEASE_MARGIN = timedelta(seconds=30)
"""Beyond the send timeout, before a claim may be taken again: recording the outcome included."""


class DeliveryFailed(Exception):
    """A channel did not take a delivery; the message says why in a few words (never a
    credential, nor a webhook's secret path)."""


class Sender(Protocol):
    """One channel's adapter."""

    channel: Channel

    @property
    def target(self) -> str:
        """Where it sends, for the admins (no credential): a host, a host and port."""
        ...

    async def open(self) -> None: ...

    async def aclose(self) -> None: ...

    async def send(self, dispatch: Dispatch) -> None:
        """Deliver, or raise `DeliveryFailed`."""
        ...


@dataclass
class Round:
    """What one round did."""

    sent: int = 0
    failed: int = 0
    """Attempts that failed (tried again later, or given up)."""
    given_up: int = 0


class Dispatcher:
    def __init__(
        self,
        service: NotificationsService,
        senders: Sequence[Sender],
        *,
        interval: float,
        send_timeout: float,
        failing_after: int,
        clock: Callable[[], datetime] = utcnow,
        batch_size: int = BATCH_SIZE,
    ) -> None:
        self.service = service
        self.senders = {sender.channel: sender for sender in senders}
        self.interval = interval
        self.send_timeout = send_timeout
        self.failing_after = failing_after
        self.clock = clock
        self.batch_size = batch_size
        self.lease = timedelta(seconds=send_timeout) + LEASE_MARGIN
        self.outage = OutageLog(log, "the database (alert dispatcher)")
        self._loop: Every | None = None

    def start(self) -> None:
        if self.senders:  # no channel configured: nothing to do, no query every interval
            self._loop = Every(self.interval, self._round, name="alert-dispatcher")
            self._loop.start()

    async def stop(self) -> None:
        if self._loop is not None:
            await self._loop.stop()
            self._loop = None

    async def _round(self) -> None:
        await run_quietly(self.run_once, self.outage, "dispatching alerts")

    async def run_once(self, now: datetime | None = None) -> Round:
        """Send everything due at `now` (default: the clock), a batch at a time."""
        done = Round()
        channels = list(self.senders)
        while channels:
            claimed = await self.service.claim_deliveries(
                now or self.clock(), channels, limit=self.batch_size, lease=self.lease
            )
            outcomes = await asyncio.gather(
                *(self._deliver(dispatch, now) for dispatch in claimed), return_exceptions=True
            )
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome  # the others were recorded; this one's lease will end
                sent, given_up = outcome
                done.sent += sent
                done.failed += not sent
                done.given_up += given_up
            if len(claimed) < self.batch_size:
                return done
        return done

    async def _deliver(self, dispatch: Dispatch, now: datetime | None) -> tuple[bool, bool]:
        """Send one claimed delivery and record the outcome: (sent, given up)."""
        sender = self.senders[dispatch.channel]
        error = await self._send(sender, dispatch)
        at = now or self.clock()
        if error is None:
            await self.service.record_sent(dispatch, at, sender.target)
            metrics.ALERT_DELIVERIES.labels(dispatch.channel.value, "sent").inc()
            log.info(
                "notification %d (occurrence %d) sent by %s",
                dispatch.notification_id,
                dispatch.occurrence,
                dispatch.channel.value,
            )
            return True, False
        retry_at = await self.service.record_failure(
            dispatch, error, at, sender.target, failing_after=self.failing_after
        )
        result = "retried" if retry_at is not None else "given_up"
        metrics.ALERT_DELIVERIES.labels(dispatch.channel.value, result).inc()
        if retry_at is None:
            log.error(
                "notification %d (occurrence %d) could not be sent by %s after %d attempts; "
                "given up: %s",
                dispatch.notification_id,
                dispatch.occurrence,
                dispatch.channel.value,
                dispatch.attempts,
                error,
            )
        else:
            log.warning(
                "notification %d (occurrence %d) not sent by %s (attempt %d: %s); next at %s",
                dispatch.notification_id,
                dispatch.occurrence,
                dispatch.channel.value,
                dispatch.attempts,
                error,
                retry_at.isoformat(),
            )
        return False, retry_at is None

    async def _send(self, sender: Sender, dispatch: Dispatch) -> str | None:
        """Send under the timeout; None when the channel took it, else why not."""
        try:
            async with asyncio.timeout(self.send_timeout):
                await sender.send(dispatch)
        except DeliveryFailed as failed:
            return str(failed) or "refused"
        except TimeoutError:
            return f"no answer within {self.send_timeout:g}s"
        except Exception as unexpected:  # a bug in an adapter must not stop the others
            log.exception("sending notification %d failed", dispatch.notification_id)
            return describe(unexpected)
        return None

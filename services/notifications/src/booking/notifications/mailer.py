"""Alerts by email: one plain-text message per delivery over SMTP (aiosmtplib), STARTTLS by
default, to every ALERT_SMTP_TO address.

SMTP has no idempotency key: the delivery's key is the message's `Message-ID` (mail clients
show one message for repeats of an id) and its `X-Idempotency-Key` header. A server that refuses,
no answer or a timeout is a failed attempt, tried again on the dispatcher's schedule; a message
some recipients took is sent (a retry would repeat it to them), and those refused are logged.
"""

from __future__ import annotations

import logging
from email.message import EmailMessage
from email.utils import formatdate

import aiosmtplib
from pydantic import validate_email

from booking.notifications.dispatcher import DeliveryFailed
from booking.notifications.domain import Channel, Dispatch, email_message
from booking.runtime.outages import describe

log = logging.getLogger(__name__)


class AlertMailer:
    channel = Channel.email

    def __init__(
        self,
        *,
        host: str,
        port: int,
        username: str | None,
        password: str | None,
        starttls: bool,
        sender: str,
        recipients: tuple[str, ...],
        timeout: float,
        dashboard: str,
    ) -> None:
        self.host = host
        self.port = port
        self.username = username
        self.password = password
        self.starttls = starttls
        self.sender = sender
        self.recipients = recipients
        self.timeout = timeout
        self.dashboard = dashboard

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    async def open(self) -> None:
        """A connection per message: alerts are few, and a held one would time out between."""

    async def aclose(self) -> None:
        pass

    def message(self, dispatch: Dispatch) -> EmailMessage:
        subject, text = email_message(dispatch, self.dashboard)
        _, sender = validate_email(self.sender)
        message = EmailMessage()
        message["From"] = self.sender
        message["To"] = ", ".join(self.recipients)
        message["Subject"] = subject
        message["Date"] = formatdate(localtime=False)
        message["Message-ID"] = f"<{dispatch.key}@{sender.rpartition('@')[2]}>"
        message["X-Idempotency-Key"] = dispatch.key
        message.set_content(text)
        return message

    async def send(self, dispatch: Dispatch) -> None:
        try:
            refused, _ = await aiosmtplib.send(
                self.message(dispatch),
                sender=validate_email(self.sender)[1],
                recipients=[validate_email(address)[1] for address in self.recipients],
                hostname=self.host,
                port=self.port,
                username=self.username,
                password=self.password,
                start_tls=self.starttls,
                timeout=self.timeout,
            )
        except (aiosmtplib.SMTPException, OSError) as error:
            raise DeliveryFailed(describe(error)) from None
        if refused:
            log.warning(
                "notification %d by email: refused by %s",
                dispatch.notification_id,
                ", ".join(f"{who} ({answer.code})" for who, answer in refused.items()),
            )

"""Settings of the notifications service (docs/settings.md; routing alerts: docs/alerts.md)."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import BeforeValidator, Field, SecretStr, field_validator, validate_email
from pydantic_core import PydanticCustomError
from pydantic_settings import NoDecode

from booking.notifications.domain import (
    Channel,
    InvalidFilter,
    NotificationType,
    RetrySchedule,
    Route,
    Routing,
    Severity,
    parse_level,
)
from booking.runtime.outside import is_loopback_host
from booking.runtime.settings import RefusedSettings, RuntimeSettings


def _comma_separated(value: object) -> object:
    """`a, b` as ("a", "b") (not JSON, as pydantic-settings would read a tuple); blank: ()."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


Names = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_comma_separated)]


class NotificationsSettings(RuntimeSettings):
    port: int = Field(default=8004, validation_alias="NOTIFICATIONS_PORT")

    # NOTIFICATION_DEDUP_WINDOW_SECONDS: a repeat of an alert (same fingerprint) this long after
    # its notification's first occurrence or sooner counts up on it instead of adding one.
    notification_dedup_window_seconds: float = Field(default=3600, gt=0)

    # Routing alerts to people (docs/alerts.md, "Routing alerts to people"). A channel is off
    # while unset. Checked as the service starts (`alert_routing`): a bad value stops it.
    # A webhook (Slack's incoming webhooks, or any receiver of the same JSON): http(s) URL. A
    # secret: a Slack webhook's path is its credential.
    alert_webhook_url: SecretStr | None = None
    alert_webhook_min_severity: str = "Error"
    alert_webhook_types: Names = ()  # NotificationType names; empty: every type
    # Email over SMTP.
    alert_smtp_host: str | None = None
    alert_smtp_port: int = Field(default=587, ge=1, le=65535)
    alert_smtp_username: str | None = None
    alert_smtp_password: SecretStr | None = None
    alert_smtp_starttls: bool = True
    alert_smtp_from: str | None = None
    alert_smtp_to: Names = ()
    alert_email_min_severity: str = "Error"
    alert_email_types: Names = ()
    # A counted-up notification is sent again on a channel at most once per this long.
    alert_quiet_period_seconds: float = Field(default=900, ge=0)
    # Retries of a failed delivery: the first after this long, each next twice as long, at most
    # ALERT_RETRY_MAX_SECONDS; given up ALERT_GIVE_UP_HOURS after it was queued.
    alert_retry_first_seconds: float = Field(default=10, gt=0)
    alert_retry_max_seconds: float = Field(default=3600, gt=0)
    alert_give_up_hours: float = Field(default=24, gt=0)
    # One send (connection included) may take this long.
    alert_send_timeout_seconds: float = Field(default=10, gt=0)
    # How often each replica's dispatcher looks for due deliveries.
    alert_dispatch_interval_seconds: float = Field(default=2, gt=0)
    # A delivery failing this many times in a row raises alert_channel_failing.
    alert_channel_failing_after_attempts: int = Field(default=3, ge=1)
    # Health warns when a delivery still to send was queued longer ago than this.
    alert_backlog_warn_seconds: float = Field(default=600, gt=0)

    @field_validator(
        "alert_webhook_url",
        "alert_smtp_host",
        "alert_smtp_username",
        "alert_smtp_password",
        "alert_smtp_from",
        mode="before",
    )
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        # A manifest's `ALERT_SMTP_HOST=` means "not set".
        return None if isinstance(value, str) and not value.strip() else value


def alert_routing(settings: NotificationsSettings) -> Routing:
    """The routing the settings describe; `RefusedSettings` naming every bad or missing one (a
    half-configured channel would drop alerts without a word)."""
    problems: list[str] = []
    routes: list[Route] = []

    def level(levels: type[Severity], value: str, name: str) -> Severity:
        try:
            return parse_level(levels, value, name)
        except InvalidFilter as refused:
            problems.append(str(refused))
            return Severity.Error

    def types(values: tuple[str, ...], name: str) -> frozenset[NotificationType]:
        chosen = set()
        for value in values:
            try:
                chosen.add(parse_level(NotificationType, value, name))
            except InvalidFilter as refused:
                problems.append(str(refused))
        return frozenset(chosen)

    webhook = settings.alert_webhook_url
    if webhook is not None:
        parts = urlsplit(webhook.get_secret_value().strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            problems.append("ALERT_WEBHOOK_URL must be an http:// or https:// URL with a host")
        routes.append(
            Route(
                Channel.webhook,
                level(Severity, settings.alert_webhook_min_severity, "ALERT_WEBHOOK_MIN_SEVERITY"),
                types(settings.alert_webhook_types, "ALERT_WEBHOOK_TYPES"),
            )
        )
    elif settings.alert_webhook_types:
        problems.append("ALERT_WEBHOOK_TYPES is set but ALERT_WEBHOOK_URL is not")

    if settings.alert_smtp_host is not None:
        problems += _smtp_problems(settings)
        routes.append(
            Route(
                Channel.email,
                level(Severity, settings.alert_email_min_severity, "ALERT_EMAIL_MIN_SEVERITY"),
                types(settings.alert_email_types, "ALERT_EMAIL_TYPES"),
            )
        )
    else:
        given = [
            name
            for name, value in (
                ("ALERT_SMTP_USERNAME", settings.alert_smtp_username),
                ("ALERT_SMTP_PASSWORD", settings.alert_smtp_password),
                ("ALERT_SMTP_FROM", settings.alert_smtp_from),
                ("ALERT_SMTP_TO", settings.alert_smtp_to),
                ("ALERT_EMAIL_TYPES", settings.alert_email_types),
            )
            if value
        ]
        if given:
            problems.append(f"{', '.join(given)} set but ALERT_SMTP_HOST is not")

    if settings.alert_retry_first_seconds > settings.alert_retry_max_seconds:
        problems.append("ALERT_RETRY_FIRST_SECONDS must not exceed ALERT_RETRY_MAX_SECONDS")
    if problems:
        raise RefusedSettings("alert routing: " + "; ".join(problems))
    return Routing(
        routes=tuple(routes),
        quiet_period=timedelta(seconds=settings.alert_quiet_period_seconds),
        retries=RetrySchedule(
            first=timedelta(seconds=settings.alert_retry_first_seconds),
            longest=timedelta(seconds=settings.alert_retry_max_seconds),
            give_up_after=timedelta(hours=settings.alert_give_up_hours),
        ),
    )


def _smtp_problems(settings: NotificationsSettings) -> list[str]:
    problems = []
    if settings.alert_smtp_from is None:
        problems.append("ALERT_SMTP_FROM must be set with ALERT_SMTP_HOST")
    elif (problem := _address_problem(settings.alert_smtp_from)) is not None:
        problems.append(f"ALERT_SMTP_FROM {problem}")
    if not settings.alert_smtp_to:
        problems.append("ALERT_SMTP_TO must name at least one address with ALERT_SMTP_HOST")
    for address in settings.alert_smtp_to:
        if (problem := _address_problem(address)) is not None:
            problems.append(f"ALERT_SMTP_TO: {address!r} {problem}")
    if settings.alert_smtp_password is not None and settings.alert_smtp_username is None:
        problems.append("ALERT_SMTP_PASSWORD is set but ALERT_SMTP_USERNAME is not")
    host = settings.alert_smtp_host or ""
    clear = not settings.alert_smtp_starttls and not is_loopback_host(host)
    if settings.alert_smtp_username is not None and clear and not settings.development_mode:
        problems.append(
            "ALERT_SMTP_STARTTLS is off: the SMTP login would cross the network in clear; "
            "turn it on (or reach a relay on this machine)"
        )
    return problems


def _address_problem(address: str) -> str | None:
    """Why `address` is not an email address (None: it is one)."""
    try:
        validate_email(address)
    except PydanticCustomError as refused:
        return f"is not an email address ({refused.message()})"
    return None

"""Composition root of the calendar service: settings, runtime, Google, handlers, routes, sweeper.

Nothing is created at import time; `create_app` builds it all and the lifespan opens the Google
client and starts the sweeper (one per replica), after the runtime has started.
"""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from booking.calendar.api import calendar_router
from booking.calendar.google import GoogleClient
from booking.calendar.handlers import subscribers
from booking.calendar.service import CalendarService, rotate_token_key
from booking.calendar.settings import DEVELOPMENT_TOKEN_KEY, CalendarSettings
from booking.calendar.sweeper import Sweeper
from booking.calendar.tables import SCHEMA, messaging
from booking.calendar.tokens import TokenCipher
from booking.runtime.auth import GENERATE_SECRET, secret_weakness
from booking.runtime.db import Database, create_engine
from booking.runtime.host import ServiceRuntime, create_service_app
from booking.runtime.outside import configured_check, reachable_check
from booking.runtime.settings import RefusedSettings


def create_app(settings: CalendarSettings | None = None) -> FastAPI:
    settings = settings or CalendarSettings()
    refuse_a_known_state_key(settings)
    refuse_the_development_token_key(settings)
    google = GoogleClient.from_settings(settings)
    runtime = ServiceRuntime(name="calendar", settings=settings, tables=messaging)
    assert runtime.db is not None and runtime.outbox is not None
    service = CalendarService(
        db=runtime.db,
        outbox=runtime.outbox,
        google=google,
        cipher=TokenCipher(settings.token_encryption_key),
        settings=settings,
    )
    runtime.subscribe(subscribers(service))
    sweeper = Sweeper(service, settings)

    runtime.health.add(
        "google",
        "configured",
        lambda: configured_check("google", google.configured, google.token_url),
        ready=False,
        component_type="system",
    )
    runtime.health.add(
        "google",
        "reachable",
        lambda: reachable_check("google", google.ping, google.token_url),
        ready=False,  # an outage at Google must not take our pods out
        component_type="system",
        failure_status="warn",
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await google.open()
        sweeper.start()
        try:
            yield
        finally:
            await sweeper.stop()
            await service.stop()
            await google.aclose()

    app = create_service_app(runtime, [calendar_router(service)], lifespan=lifespan)
    app.state.calendar = service
    app.state.sweeper = sweeper
    app.state.google = google
    return app


def refuse_a_known_state_key(settings: CalendarSettings) -> None:
    """The consent `state`'s HMAC key is OAUTH_STATE_SECRET or else derived from AUTH_JWT_SECRET,
    which a deployment with an identity provider may leave at its built-in value (it signs no
    token there): a key anyone can derive would let anyone forge a consent round trip."""
    if settings.development_mode:
        return
    own = settings.oauth_state_secret
    if own is not None and own.get_secret_value():
        name, weakness = "OAUTH_STATE_SECRET", secret_weakness(own.get_secret_value())
    else:
        name = "AUTH_JWT_SECRET, from which the consent state's key is derived,"
        weakness = secret_weakness(settings.auth_jwt_secret.get_secret_value())
    if weakness is not None:
        raise RefusedSettings(
            f"{name} {weakness}. Set OAUTH_STATE_SECRET to at least 32 random bytes "
            f"(e.g. {GENERATE_SECRET})"
        )


def refuse_the_development_token_key(settings: CalendarSettings) -> None:
    """The built-in TOKEN_ENCRYPTION_KEY is in the repository: refresh tokens under it are
    readable by anyone with the code, so only development mode may keep it."""
    if settings.development_mode:
        return
    keys = settings.token_encryption_key.get_secret_value().split(",")
    if DEVELOPMENT_TOKEN_KEY in (key.strip() for key in keys):
        raise RefusedSettings(
            "TOKEN_ENCRYPTION_KEY holds the built-in development key, which is published with "
            "the code. Set a key of your own (python -c 'from cryptography.fernet import "
            "Fernet; print(Fernet.generate_key().decode())')"
        )


ROTATION_BATCH_SIZE = 200


def rotate_token_key_command(settings: CalendarSettings) -> int:
    """`python -m booking.calendar rotate-token-key`: every stored refresh token re-encrypted
    with the first key of TOKEN_ENCRYPTION_KEY. Prints what it did; exit status 0 when the
    older keys may be removed, 1 when some stored token still needs them (or no key opens it)."""
    cipher = TokenCipher(settings.token_encryption_key)

    async def rotate() -> int:
        engine = create_engine(settings, pool_size=1)
        try:
            done = await rotate_token_key(
                Database(engine, SCHEMA), cipher, batch_size=ROTATION_BATCH_SIZE
            )
        finally:
            await engine.dispose()
        print(f"re-encrypted {done.rotated} refresh token(s) with the newest key")
        if done.remaining == 0:
            if cipher.key_count > 1:
                print(
                    "every stored refresh token opens with the newest key: the older keys can "
                    "be removed from TOKEN_ENCRYPTION_KEY"
                )
            return 0
        print(
            f"{done.remaining} stored refresh token(s) still do not open with the newest key: "
            "keep the older keys. Those written meanwhile by a replica still on the old keys "
            "are re-encrypted by running this again once every replica has the new key first"
        )
        if done.unreadable:
            print(
                f"{done.unreadable} of them open with none of the keys (see the log for the "
                "mentors): those mentors must connect their Google calendar again"
            )
        return 1

    return asyncio.run(rotate())

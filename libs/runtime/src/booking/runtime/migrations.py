"""Alembic for one service: its own schema, its own version table, nobody else's objects.

A service's `migrations/env.py` calls `run_env(metadata, schema)`; `upgrade(settings, package,
schema)` is what `python -m booking.<service> migrate` runs. Replicas that migrate at once are
serialised by an advisory lock.
"""

from __future__ import annotations

import asyncio

import sqlalchemy as sa
from alembic import command, context, op
from alembic.config import Config
from alembic.runtime.environment import NameFilterParentNames, NameFilterType
from sqlalchemy import Connection, MetaData, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from booking.runtime.settings import RuntimeSettings
from booking.runtime.tables import outbox_notify_ddl


def alembic_config(database_url: str, package: str, schema: str) -> Config:
    config = Config()
    config.set_main_option("script_location", f"{package}:migrations")
    config.attributes["database_url"] = database_url
    config.attributes["schema"] = schema
    return config


def upgrade(settings: RuntimeSettings, package: str, schema: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(settings.async_database_url, package, schema), revision)


def run_env(target_metadata: MetaData, schema: str) -> None:
    """The body of every service's env.py (online mode only: we always migrate a live database)."""
    config = context.config
    url = config.attributes.get("database_url") or RuntimeSettings().async_database_url

    def only_own_schema(
        name: str | None, type_: NameFilterType, parent_names: NameFilterParentNames
    ) -> bool:
        if type_ == "schema":
            return name == schema
        if type_ == "table":
            return bool(parent_names.get("schema_name") == schema)
        return True

    def migrate(connection: Connection) -> None:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            version_table_schema=schema,
            include_schemas=True,
            include_name=only_own_schema,
        )
        with context.begin_transaction():
            context.run_migrations()

    async def go() -> None:
        engine = create_async_engine(url, poolclass=NullPool)
        try:
            async with engine.connect() as connection:
                await connection.execute(
                    text("SELECT pg_advisory_lock(hashtext(:key))"), {"key": f"migrate:{schema}"}
                )
                # Created only when missing: a service's role in deployment owns its schema
                # (made by the database owner) and may not CREATE on the database, which
                # Postgres checks even for CREATE SCHEMA IF NOT EXISTS.
                exists = await connection.scalar(
                    text("SELECT 1 FROM pg_namespace WHERE nspname = :schema"),
                    {"schema": schema},
                )
                if not exists:
                    await connection.execute(text(f'CREATE SCHEMA "{schema}"'))
                await connection.commit()
                await connection.run_sync(migrate)
                await connection.commit()
        finally:
            await engine.dispose()

    asyncio.run(go())


def create_messaging_tables(schema: str) -> None:
    """Revision helper: the outbox and inbox of booking.runtime.tables, version 1."""
    op.create_table(
        "outbox",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("message_id", sa.Uuid, nullable=False, unique=True),
        sa.Column("exchange", sa.Text, nullable=False),
        sa.Column("routing_key", sa.Text, nullable=False),
        sa.Column("event_type", sa.Text, nullable=False),
        sa.Column("correlation_id", sa.Text, nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("last_error", sa.Text, nullable=True),
        schema=schema,
    )
    for statement in outbox_notify_ddl(schema):
        op.execute(statement)
    op.create_index(
        "ix_outbox_unsent",
        "outbox",
        ["id"],
        schema=schema,
        postgresql_where=sa.text("sent_at IS NULL"),
    )
    op.create_index(
        "ix_outbox_sent_at",
        "outbox",
        ["sent_at"],
        schema=schema,
        postgresql_where=sa.text("sent_at IS NOT NULL"),
    )
    op.create_table(
        "inbox",
        sa.Column("message_id", sa.Uuid, nullable=False),
        sa.Column("consumer", sa.Text, nullable=False),
        sa.Column("event_type", sa.Text, nullable=False),
        sa.Column(
            "handled_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.PrimaryKeyConstraint("message_id", "consumer", name="pk_inbox"),
        schema=schema,
    )
    op.create_index("ix_inbox_handled_at", "inbox", ["handled_at"], schema=schema)


def create_recovery_tables(schema: str) -> None:
    """Revision helper: what booking.runtime.tables added for recovery (version 2): the outbox's
    `next_attempt_at`, the dead letters and the admin actions."""
    op.add_column(
        "outbox",
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        schema=schema,
    )
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("consumer", sa.Text, nullable=False),
        sa.Column("message_id", sa.Text, nullable=True),
        sa.Column("event_type", sa.Text, nullable=True),
        sa.Column("routing_key", sa.Text, nullable=True),
        sa.Column("correlation_id", sa.Text, nullable=True),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.Column("headers", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("error", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("times", sa.Integer, nullable=False, server_default=sa.text("1")),
        sa.Column("status", sa.Text, nullable=False, server_default=sa.text("'kept'")),
        sa.Column("dead_lettered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("replayed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("discarded_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("decided_by", sa.Text, nullable=True),
        sa.Column("decision_reason", sa.Text, nullable=True),
        sa.UniqueConstraint("consumer", "message_id", name="uq_dead_letters_message"),
        schema=schema,
    )
    op.create_index(
        "ix_dead_letters_listing", "dead_letters", ["dead_lettered_at", "id"], schema=schema
    )
    op.create_index(
        "ix_dead_letters_kept",
        "dead_letters",
        ["message_id"],
        schema=schema,
        postgresql_where=sa.text("status = 'kept'"),
    )
    op.create_table(
        "admin_actions",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("by", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("order_id", sa.Uuid, nullable=True),
        sa.Column("session_id", sa.Uuid, nullable=True),
        sa.Column("dead_letter_id", sa.Text, nullable=True),
        sa.Column("detail", sa.Text, nullable=False, server_default=sa.text("''")),
        schema=schema,
    )
    op.create_index("ix_admin_actions_order_id", "admin_actions", ["order_id"], schema=schema)


def drop_recovery_tables(schema: str) -> None:
    op.drop_table("admin_actions", schema=schema)
    op.drop_table("dead_letters", schema=schema)
    op.drop_column("outbox", "next_attempt_at", schema=schema)


def drop_messaging_tables(schema: str) -> None:
    op.drop_table("inbox", schema=schema)
    op.drop_table("outbox", schema=schema)
    op.execute(f'DROP FUNCTION IF EXISTS "{schema}".notify_outbox()')

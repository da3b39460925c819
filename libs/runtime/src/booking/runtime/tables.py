"""The runtime's own tables, created in every service's schema: the outbox, the inbox, the
dead letters an admin may replay or discard, and the audit trail of admin actions; and the
column helpers the services' own tables share."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    DDL,
    BigInteger,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    UniqueConstraint,
    Uuid,
    event,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB


def one_of(column: str, values: tuple[str, ...]) -> str:
    """A CHECK constraint's text: `column` holds one of `values`."""
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def time_column(*, nullable: bool, default_now: bool = False) -> Column[datetime]:
    """A timezone-aware timestamp column (`now()` by default when `default_now`)."""
    return Column(
        DateTime(timezone=True),
        nullable=nullable,
        server_default=text("now()") if default_now else None,
    )


def outbox_table(metadata: MetaData, schema: str) -> Table:
    """Events written in the same transaction as the state change they record.

    A row is unsent until a relay publishes it with confirms and stamps `sent_at`; sent rows stay
    for audit until housekeeping prunes them. The partial index keeps the relay's scan to unsent
    rows; the other serves the pruning.
    """
    table = Table(
        "outbox",
        metadata,
        Column("id", BigInteger, primary_key=True, autoincrement=True),
        Column("message_id", Uuid, nullable=False, unique=True),
        Column("exchange", Text, nullable=False),
        Column("routing_key", Text, nullable=False),
        Column("event_type", Text, nullable=False),
        Column("correlation_id", Text, nullable=False),
        Column("body", Text, nullable=False),
        Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
        Column("sent_at", DateTime(timezone=True), nullable=True),
        Column("attempts", Integer, nullable=False, server_default=text("0")),
        Column("last_error", Text, nullable=True),
        # An event no queue took (unroutable) waits until then before it is published again.
        Column("next_attempt_at", DateTime(timezone=True), nullable=True),
        schema=schema,
    )
    Index("ix_outbox_unsent", table.c.id, postgresql_where=table.c.sent_at.is_(None))
    Index("ix_outbox_sent_at", table.c.sent_at, postgresql_where=table.c.sent_at.is_not(None))
    for statement in outbox_notify_ddl(schema):
        # SQLAlchemy leaves DDL's constructor unannotated.
        event.listen(table, "after_create", DDL(statement))  # type: ignore[no-untyped-call]
    return table


def notify_channel(schema: str) -> str:
    return f"outbox_{schema}"


def outbox_notify_ddl(schema: str) -> list[str]:
    """A statement trigger that NOTIFYs the relays: they hear of a commit the moment it lands.

    In the database rather than in `Outbox.record`, it costs the writer no round trip; Postgres
    delivers one notification per transaction, on commit, and none on rollback.
    """
    return [
        f"""
        CREATE OR REPLACE FUNCTION "{schema}".notify_outbox() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('{notify_channel(schema)}', '');
            RETURN NULL;
        END $$
        """,
        f"""
        CREATE TRIGGER outbox_notify AFTER INSERT ON "{schema}".outbox
        FOR EACH STATEMENT EXECUTE FUNCTION "{schema}".notify_outbox()
        """,
    ]


def inbox_table(metadata: MetaData, schema: str) -> Table:
    """Messages a consumer has handled. The primary key is what makes a redelivery a no-op."""
    table = Table(
        "inbox",
        metadata,
        Column("message_id", Uuid, nullable=False),
        Column("consumer", Text, nullable=False),
        Column("event_type", Text, nullable=False),
        Column("handled_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
        PrimaryKeyConstraint("message_id", "consumer", name="pk_inbox"),
        schema=schema,
    )
    Index("ix_inbox_handled_at", table.c.handled_at)
    return table


DEAD_LETTER_STATUSES = ("kept", "replayed", "discarded")


def dead_letters_table(metadata: MetaData, schema: str) -> Table:
    """Messages this service's consumer could not handle, kept until an admin decides.

    One row per consumer and message: a message dead-lettered again after a replay comes back
    to its row (kept again, `times` counts up). `body` is the message exactly as it came, so a
    replay sends the same bytes.
    """
    table = Table(
        "dead_letters",
        metadata,
        Column("id", BigInteger, primary_key=True, autoincrement=True),
        Column("consumer", Text, nullable=False),
        Column("message_id", Text, nullable=True),
        Column("event_type", Text, nullable=True),
        Column("routing_key", Text, nullable=True),
        Column("correlation_id", Text, nullable=True),
        Column("body", LargeBinary, nullable=False),
        Column("headers", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
        Column("reason", Text, nullable=False),
        Column("error", Text, nullable=False),
        Column("attempts", Integer, nullable=False),
        Column("times", Integer, nullable=False, server_default=text("1")),
        Column("status", Text, nullable=False, server_default=text("'kept'")),
        Column("dead_lettered_at", DateTime(timezone=True), nullable=False),
        Column("replayed_at", DateTime(timezone=True), nullable=True),
        Column("discarded_at", DateTime(timezone=True), nullable=True),
        Column("decided_by", Text, nullable=True),
        Column("decision_reason", Text, nullable=True),
        UniqueConstraint("consumer", "message_id", name="uq_dead_letters_message"),
        schema=schema,
    )
    # The admins' listing, newest first; and what is still kept (health, housekeeping).
    Index("ix_dead_letters_listing", table.c.dead_lettered_at, table.c.id)
    Index(
        "ix_dead_letters_kept",
        table.c.message_id,
        postgresql_where=text("status = 'kept'"),
    )
    return table


def admin_actions_table(metadata: MetaData, schema: str) -> Table:
    """Who did what, when and why: every admin action on this service, never deleted."""
    table = Table(
        "admin_actions",
        metadata,
        Column("id", BigInteger, primary_key=True, autoincrement=True),
        Column("action", Text, nullable=False),
        Column("by", Text, nullable=False),
        Column("reason", Text, nullable=False),
        Column("at", DateTime(timezone=True), nullable=False),
        Column("order_id", Uuid, nullable=True),
        Column("session_id", Uuid, nullable=True),
        Column("dead_letter_id", Text, nullable=True),
        Column("detail", Text, nullable=False, server_default=text("''")),
        schema=schema,
    )
    Index("ix_admin_actions_order_id", table.c.order_id)
    return table


class MessagingTables:
    """The runtime's tables of one schema, registered on that service's metadata."""

    def __init__(self, metadata: MetaData, schema: str) -> None:
        self.schema = schema
        self.outbox = outbox_table(metadata, schema)
        self.inbox = inbox_table(metadata, schema)
        self.dead_letters = dead_letters_table(metadata, schema)
        self.admin_actions = admin_actions_table(metadata, schema)

    @property
    def notify_channel(self) -> str:
        return notify_channel(self.schema)

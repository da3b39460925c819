"""The notifications schema's tables: the admin notifications, their deliveries to people, and
the messaging tables.

Type and severity are small integers (domain.NotificationType, domain.Severity) so that ops can
write `WHERE is_read = false AND severity = 3`. The migrations (`migrations/versions`) create
these; the definitions here say the same thing for the code that reads and writes them.
"""

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    SmallInteger,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import SQLModel

from booking.notifications.domain import Channel, DeliveryStatus
from booking.runtime.tables import MessagingTables, one_of

SCHEMA = "notifications"

messaging = MessagingTables(SQLModel.metadata, SCHEMA)

OPEN_FINGERPRINT = "ux_admin_notifications_open_fingerprint"

admin_notifications = Table(
    "admin_notifications",
    SQLModel.metadata,
    # Increasing, and committed in that order (repository.store_alert), so "after id K" misses
    # nothing that commits later.
    Column("id", BigInteger, Identity(), primary_key=True),
    Column("type", SmallInteger, nullable=False),
    Column("severity", SmallInteger, nullable=False),
    Column("title", Text, nullable=False),
    Column("message", Text, nullable=False),
    Column("metadata", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("is_read", Boolean, nullable=False, server_default=text("false")),
    Column("read_at", DateTime(timezone=True), nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("fingerprint", Text, nullable=False),
    Column("occurrences", Integer, nullable=False, server_default=text("1")),
    Column("last_occurred_at", DateTime(timezone=True), nullable=False),
    # The latest notification of its fingerprint, on which repeats within the window count up.
    # Closed when a repeat comes after the window (a new one opens) or a recovery ends it.
    Column("is_open", Boolean, nullable=False, server_default=text("true")),
    CheckConstraint("type BETWEEN 0 AND 4", name="ck_admin_notifications_type"),
    CheckConstraint("severity BETWEEN 0 AND 3", name="ck_admin_notifications_severity"),
    CheckConstraint("occurrences >= 1", name="ck_admin_notifications_occurrences"),
    CheckConstraint("is_read = (read_at IS NOT NULL)", name="ck_admin_notifications_read_at"),
    schema=SCHEMA,
)

# The feed's queries, newest first by id (the primary key serves the unfiltered list).
Index(
    "ix_admin_notifications_unread_severity",
    admin_notifications.c.severity,
    admin_notifications.c.id,
    postgresql_where=text("NOT is_read"),
)
Index("ix_admin_notifications_severity", admin_notifications.c.severity, admin_notifications.c.id)
Index("ix_admin_notifications_type", admin_notifications.c.type, admin_notifications.c.id)
Index("ix_admin_notifications_last_occurred_at", admin_notifications.c.last_occurred_at)
Index("ix_admin_notifications_created_at", admin_notifications.c.created_at)
# Dedup: at most one open notification per fingerprint; repeats conflict on it and count up.
Index(
    OPEN_FINGERPRINT,
    admin_notifications.c.fingerprint,
    unique=True,
    postgresql_where=text("is_open"),
)

DELIVERY_OCCURRENCE = "ux_alert_deliveries_occurrence"
CHANNELS = tuple(channel.value for channel in Channel)
STATUSES = tuple(status.value for status in DeliveryStatus)

# One row per (notification, occurrence, channel): queued in the transaction that stores or counts
# up the notification, sent by the dispatcher (booking.notifications.dispatcher).
alert_deliveries = Table(
    "alert_deliveries",
    SQLModel.metadata,
    Column("id", BigInteger, Identity(), primary_key=True),
    # A deleted notification is dealt with: what was still to send about it goes with it.
    Column(
        "notification_id",
        BigInteger,
        ForeignKey(f"{SCHEMA}.admin_notifications.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("occurrence", Integer, nullable=False),
    Column("channel", Text, nullable=False),
    Column("idempotency_key", Text, nullable=False, unique=True),
    Column("status", Text, nullable=False, server_default=text("'pending'")),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    # Due then (pending); a sending row's lease ends then.
    Column("next_attempt_at", DateTime(timezone=True), nullable=False),
    Column("last_error", Text, nullable=True),
    # The notification as it was at this occurrence (domain.snapshot): what is sent.
    Column("payload", JSONB, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("last_attempt_at", DateTime(timezone=True), nullable=True),
    Column("sent_at", DateTime(timezone=True), nullable=True),
    UniqueConstraint("notification_id", "occurrence", "channel", name=DELIVERY_OCCURRENCE),
    CheckConstraint(one_of("channel", CHANNELS), name="ck_alert_deliveries_channel"),
    CheckConstraint(one_of("status", STATUSES), name="ck_alert_deliveries_status"),
    CheckConstraint("occurrence >= 1", name="ck_alert_deliveries_occurrence"),
    CheckConstraint("attempts >= 0", name="ck_alert_deliveries_attempts"),
    CheckConstraint(
        "(status = 'sent') = (sent_at IS NOT NULL)", name="ck_alert_deliveries_sent_at"
    ),
    schema=SCHEMA,
)

# The dispatcher's claim: unsent rows by when they are due.
Index(
    "ix_alert_deliveries_due",
    alert_deliveries.c.next_attempt_at,
    postgresql_where=text("status IN ('pending', 'sending')"),
)

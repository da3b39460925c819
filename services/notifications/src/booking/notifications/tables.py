"""The notifications schema's tables."""

from sqlmodel import SQLModel

from booking.runtime.tables import MessagingTables

SCHEMA = "notifications"

messaging = MessagingTables(SQLModel.metadata, SCHEMA)

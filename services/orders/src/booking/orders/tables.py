"""The orders schema's tables."""

from sqlmodel import SQLModel

from booking.runtime.tables import MessagingTables

SCHEMA = "orders"

messaging = MessagingTables(SQLModel.metadata, SCHEMA)

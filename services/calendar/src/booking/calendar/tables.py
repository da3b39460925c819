"""The calendar schema's tables."""

from sqlmodel import SQLModel

from booking.runtime.tables import MessagingTables

SCHEMA = "calendar"

messaging = MessagingTables(SQLModel.metadata, SCHEMA)

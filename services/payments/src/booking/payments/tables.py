"""The payments schema's tables."""

from sqlmodel import SQLModel

from booking.runtime.tables import MessagingTables

SCHEMA = "payments"

messaging = MessagingTables(SQLModel.metadata, SCHEMA)

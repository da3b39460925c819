from sqlmodel import SQLModel

from booking.notifications.tables import SCHEMA
from booking.runtime.migrations import run_env

run_env(SQLModel.metadata, SCHEMA)

from sqlmodel import SQLModel

from booking.calendar.tables import SCHEMA
from booking.runtime.migrations import run_env

run_env(SQLModel.metadata, SCHEMA)

from sqlmodel import SQLModel

from booking.orders.tables import SCHEMA
from booking.runtime.migrations import run_env

run_env(SQLModel.metadata, SCHEMA)

"""Recovery: the outbox's retry time for unroutable events, the dead letters an admin may
replay or discard, and the audit trail of admin actions.

Revision ID: 0003
Revises: 0002
"""

from booking.runtime.migrations import create_recovery_tables, drop_recovery_tables

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

SCHEMA = "payments"


def upgrade() -> None:
    create_recovery_tables(SCHEMA)


def downgrade() -> None:
    drop_recovery_tables(SCHEMA)

"""Tracing: each payment keeps the trace context of the booking it pays for (`traceparent`), so
that Konnect's webhook, which carries none, joins the booking's trace.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

SCHEMA = "payments"


def upgrade() -> None:
    # Nullable, no default: adding it rewrites nothing, and a payment opened while tracing was
    # off has none.
    op.add_column("payments", sa.Column("traceparent", sa.Text(), nullable=True), schema=SCHEMA)


def downgrade() -> None:
    op.drop_column("payments", "traceparent", schema=SCHEMA)

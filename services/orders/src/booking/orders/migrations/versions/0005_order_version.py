"""Each order's version: it grows by one with every change of what the order view shows, and is
the id of the order's Server-Sent Events (OrderChanged). Orders that exist already start at 1.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

SCHEMA = "orders"


def upgrade() -> None:
    op.add_column(
        "orders",
        sa.Column("version", sa.BigInteger, nullable=False, server_default=sa.text("1")),
        schema=SCHEMA,
    )
    op.create_check_constraint(
        "ck_orders_version_positive", "orders", "version >= 1", schema=SCHEMA
    )


def downgrade() -> None:
    op.drop_constraint("ck_orders_version_positive", "orders", schema=SCHEMA)
    op.drop_column("orders", "version", schema=SCHEMA)

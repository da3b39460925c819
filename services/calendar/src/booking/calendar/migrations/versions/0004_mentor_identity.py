"""Mentors' identity-provider subjects, as MentorRegistered and MentorIdentityLinked tell them: a
token whose `sub` is a mentor's subject acts as that mentor. The sequence keeps the latest link.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

SCHEMA = "calendar"


def upgrade() -> None:
    op.add_column("mentors", sa.Column("identity_subject", sa.Text, nullable=True), schema=SCHEMA)
    op.add_column(
        "mentors",
        sa.Column("identity_sequence", sa.Integer, nullable=False, server_default=sa.text("0")),
        schema=SCHEMA,
    )


def downgrade() -> None:
    op.drop_column("mentors", "identity_sequence", schema=SCHEMA)
    op.drop_column("mentors", "identity_subject", schema=SCHEMA)

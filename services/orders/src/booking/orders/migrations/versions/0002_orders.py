"""Mentors, offerings, orders, their booked sessions (no overlap per mentor), idempotency keys.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

SCHEMA = "orders"

# Written out, not imported: a migration must not change when the code does.
ORDER_STATUSES = ("pending", "awaiting_payment", "paid", "confirmed", "payment_failed", "cancelled")
SESSION_STATUSES = (
    "pending_payment",
    "awaiting_calendar",
    "scheduled",
    "scheduling_failed",
    "cancelled",
)
# The sessions that hold their mentor's slot (domain.LIVE_SESSION_STATUSES): all but cancelled.
LIVE_SESSION_STATUSES = ("pending_payment", "awaiting_calendar", "scheduled", "scheduling_failed")


def _in(values: tuple[str, ...]) -> str:
    return ", ".join(f"'{v}'" for v in values)


def _now() -> sa.Column:
    return sa.Column(
        "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    )


def upgrade() -> None:
    # btree_gist lets one GiST exclusion constraint mix `mentor_id WITH =` and a range overlap.
    # It is a trusted extension (Postgres 13+), but creating it needs CREATE on the database: in
    # deployment, where orders logs in as a role limited to its schema, the database owner may
    # have to create it once beforehand (then this is a no-op).
    op.execute("CREATE EXTENSION IF NOT EXISTS btree_gist")

    op.create_table(
        "mentors",
        sa.Column("id", sa.Uuid, primary_key=True),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("email", sa.Text, nullable=False),
        sa.Column("timezone", sa.Text, nullable=False),
        _now(),
        schema=SCHEMA,
    )

    op.create_table(
        "offerings",
        sa.Column("id", sa.Uuid, primary_key=True),
        sa.Column("mentor_id", sa.Uuid, sa.ForeignKey(f"{SCHEMA}.mentors.id"), nullable=False),
        sa.Column("title", sa.Text, nullable=False),
        sa.Column("duration_minutes", sa.Integer, nullable=False),
        sa.Column("price_amount", sa.BigInteger, nullable=False),
        sa.Column("price_currency", sa.Text, nullable=False),
        _now(),
        sa.CheckConstraint("duration_minutes > 0", name="ck_offerings_duration_positive"),
        sa.CheckConstraint("price_amount >= 0", name="ck_offerings_price_not_negative"),
        schema=SCHEMA,
    )
    op.create_index("ix_offerings_mentor_id", "offerings", ["mentor_id"], schema=SCHEMA)

    op.create_table(
        "orders",
        sa.Column("id", sa.Uuid, primary_key=True),
        sa.Column("mentee_id", sa.Text, nullable=False),
        sa.Column("mentor_id", sa.Uuid, sa.ForeignKey(f"{SCHEMA}.mentors.id"), nullable=False),
        sa.Column(
            "offering_id", sa.Uuid, sa.ForeignKey(f"{SCHEMA}.offerings.id"), nullable=False
        ),
        sa.Column("title", sa.Text, nullable=False),
        sa.Column("amount", sa.BigInteger, nullable=False),
        sa.Column("currency", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("amount_paid", sa.BigInteger, nullable=False, server_default=sa.text("0")),
        sa.Column("payment_ref", sa.Text, nullable=True),
        sa.Column("pay_url", sa.Text, nullable=True),
        sa.Column("payment_status", sa.Text, nullable=True),
        sa.Column("platform_fee", sa.BigInteger, nullable=True),
        sa.Column("escrow_amount", sa.BigInteger, nullable=True),
        sa.Column("mentee_first_name", sa.Text, nullable=False),
        sa.Column("mentee_last_name", sa.Text, nullable=False),
        sa.Column("mentee_email", sa.Text, nullable=False),
        sa.Column("mentee_phone", sa.Text, nullable=True),
        _now(),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.CheckConstraint(f"status IN ({_in(ORDER_STATUSES)})", name="ck_orders_status"),
        sa.CheckConstraint(
            "amount >= 0 AND amount_paid >= 0 AND platform_fee >= 0 AND escrow_amount >= 0",
            name="ck_orders_money_not_negative",
        ),
        schema=SCHEMA,
    )
    op.create_index("ix_orders_mentee_id", "orders", ["mentee_id"], schema=SCHEMA)

    op.create_table(
        "booked_sessions",
        sa.Column("id", sa.Uuid, primary_key=True),
        sa.Column(
            "order_id",
            sa.Uuid,
            sa.ForeignKey(f"{SCHEMA}.orders.id"),
            nullable=False,
            unique=True,
        ),
        sa.Column("mentor_id", sa.Uuid, sa.ForeignKey(f"{SCHEMA}.mentors.id"), nullable=False),
        sa.Column("start_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("end_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("meet_link", sa.Text, nullable=True),
        sa.Column("calendar_event_id", sa.Text, nullable=True),
        sa.CheckConstraint("end_at > start_at", name="ck_booked_sessions_ends_after_start"),
        sa.CheckConstraint(
            f"status IN ({_in(SESSION_STATUSES)})", name="ck_booked_sessions_status"
        ),
        schema=SCHEMA,
    )
    # The slot rule itself: no two live sessions of one mentor overlap. '[)' makes a session
    # that ends at 10:00 and one that starts at 10:00 compatible. A cancelled session is
    # outside the WHERE, so cancelling frees the slot.
    op.execute(
        f"""
        ALTER TABLE "{SCHEMA}".booked_sessions
        ADD CONSTRAINT booked_sessions_no_overlap
        EXCLUDE USING gist (mentor_id WITH =, tstzrange(start_at, end_at, '[)') WITH &&)
        WHERE (status IN ({_in(LIVE_SESSION_STATUSES)}))
        """
    )

    op.create_table(
        "idempotency_keys",
        sa.Column("mentee_id", sa.Text, nullable=False),
        sa.Column("key", sa.Text, nullable=False),
        sa.Column("request_fingerprint", sa.Text, nullable=False),
        sa.Column("response_status", sa.Integer, nullable=True),
        sa.Column("response_body", postgresql.JSONB, nullable=True),
        _now(),
        sa.PrimaryKeyConstraint("mentee_id", "key", name="pk_idempotency_keys"),
        schema=SCHEMA,
    )


def downgrade() -> None:
    op.drop_table("idempotency_keys", schema=SCHEMA)
    op.drop_table("booked_sessions", schema=SCHEMA)
    op.drop_table("orders", schema=SCHEMA)
    op.drop_table("offerings", schema=SCHEMA)
    op.drop_table("mentors", schema=SCHEMA)
    # btree_gist stays: other objects in the database may use it.

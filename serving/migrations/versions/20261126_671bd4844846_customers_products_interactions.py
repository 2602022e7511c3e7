"""customers, products, interactions: the gateway's ingestion tables

Revision ID: 671bd4844846
Revises:
Create Date: 2026-11-26 03:55:33.379708

Written from `alembic revision --autogenerate` against recsys/database.py, with the model's own column
types spelled out (a migration must not import the models: they will change, this file must not).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

# revision identifiers, used by Alembic.
revision: str = "671bd4844846"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    utc_datetime = sa.DateTime(timezone=True)  # recsys.database.UTCDateTime stores this type
    op.create_table(
        "customers",
        sa.Column("id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("location", sa.String(length=64), nullable=True),
        sa.Column("device", sa.String(length=64), nullable=True),
        sa.Column("attributes", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False),
        sa.Column("created_at", utc_datetime, nullable=False),
        sa.Column("updated_at", utc_datetime, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_customers")),
    )
    op.create_table(
        "products",
        sa.Column("id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("category", sa.Integer(), nullable=False),
        sa.Column("shop", sa.Integer(), nullable=True),
        sa.Column("brand", sa.Integer(), nullable=True),
        sa.Column("price", sa.Numeric(precision=12, scale=2), nullable=True),
        sa.Column("available", sa.Boolean(), nullable=False),
        sa.Column("promoted", sa.Boolean(), nullable=False),
        sa.Column("created_at", utc_datetime, nullable=False),
        sa.Column("updated_at", utc_datetime, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_products")),
    )
    op.create_table(
        "interactions",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("event_id", sa.String(length=128), nullable=True),
        sa.Column("customer_id", sa.BigInteger(), nullable=False),
        sa.Column("product_id", sa.BigInteger(), nullable=False),
        sa.Column("type", sa.String(length=16), nullable=False),
        sa.Column("session_id", sa.String(length=128), nullable=False),
        sa.Column("cookie_id", sa.String(length=128), nullable=True),
        sa.Column("location", sa.String(length=64), nullable=True),
        sa.Column("device", sa.String(length=64), nullable=True),
        sa.Column("timestamp", utc_datetime, nullable=False),
        sa.Column("received_at", utc_datetime, nullable=False),
        sa.CheckConstraint(
            "type IN ('view', 'click', 'add_to_cart', 'purchase')", name=op.f("ck_interactions_interaction_type")
        ),
        sa.ForeignKeyConstraint(
            ["customer_id"], ["customers.id"], name=op.f("fk_interactions_customer_id_customers"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["product_id"], ["products.id"], name=op.f("fk_interactions_product_id_products"), ondelete="RESTRICT"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_interactions")),
        sa.UniqueConstraint("event_id", name=op.f("uq_interactions_event_id")),
    )
    op.create_index(op.f("ix_interactions_customer_id"), "interactions", ["customer_id"])
    op.create_index(op.f("ix_interactions_product_id"), "interactions", ["product_id"])
    op.create_index(op.f("ix_interactions_timestamp"), "interactions", ["timestamp"])


def downgrade() -> None:
    op.drop_table("interactions")  # its indexes go with it
    op.drop_table("products")
    op.drop_table("customers")

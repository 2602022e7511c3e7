"""forgotten customers: the tombstones of customers erased on request

Revision ID: c41f0e9a2d57
Revises: b7e2c4a19d30
Create Date: 2026-12-04 16:00:00

Written by hand from recsys/database.py, with the column types spelled out (a migration must not import
the models). `tests/test_ingestion_api.py` checks that the models and the migrated schema agree.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "c41f0e9a2d57"
down_revision: str | Sequence[str] | None = "b7e2c4a19d30"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "forgotten_customers",
        sa.Column("id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("forgotten_at", sa.DateTime(timezone=True), nullable=False),  # recsys.database.UTCDateTime
        sa.PrimaryKeyConstraint("id", name=op.f("pk_forgotten_customers")),
    )


def downgrade() -> None:
    op.drop_table("forgotten_customers")

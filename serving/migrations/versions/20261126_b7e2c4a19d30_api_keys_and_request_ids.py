"""api keys with scopes; the request id an interaction came from

Revision ID: b7e2c4a19d30
Revises: 671bd4844846
Create Date: 2026-11-26 07:00:00

Written by hand from recsys/database.py, with the column types spelled out (a migration must not import
the models). `tests/test_ingestion_api.py` checks that the models and the migrated schema agree.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "b7e2c4a19d30"
down_revision: str | Sequence[str] | None = "671bd4844846"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    utc_datetime = sa.DateTime(timezone=True)  # recsys.database.UTCDateTime stores this type
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("secret_hash", sa.String(length=64), nullable=False),
        sa.Column("scopes", sa.String(length=64), nullable=False),
        sa.Column("created_at", utc_datetime, nullable=False),
        sa.Column("revoked_at", utc_datetime, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("name", name=op.f("uq_api_keys_name")),
        sa.UniqueConstraint("secret_hash", name=op.f("uq_api_keys_secret_hash")),
    )
    # batch mode: SQLite cannot ALTER a table's columns in place; Alembic copies the table there.
    with op.batch_alter_table("interactions") as batch:
        batch.add_column(sa.Column("request_id", sa.String(length=128), nullable=True))
        batch.create_index(batch.f("ix_interactions_request_id"), ["request_id"])


def downgrade() -> None:
    with op.batch_alter_table("interactions") as batch:
        batch.drop_index(batch.f("ix_interactions_request_id"))
        batch.drop_column("request_id")
    op.drop_table("api_keys")

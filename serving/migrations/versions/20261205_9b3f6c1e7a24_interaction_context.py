"""interaction context: the dataset spec's other context features of an event, by name

Revision ID: 9b3f6c1e7a24
Revises: 5e8a7d13b2f4
Create Date: 2026-12-05 13:30:00

An interaction's `location` and `device` fill the spec columns `recsys.interactions.IngestionColumns` maps; the
spec's other context features (the default spec's `position`, shop_events' `slot` and `channel`) come in a JSON
`context` of their own. Rows stored before get `{}`. Written by hand from recsys/database.py, with the column type
spelled out (a migration must not import the models). `tests/test_ingestion_api.py` checks that the models and the
migrated schema agree.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "9b3f6c1e7a24"
down_revision: str | Sequence[str] | None = "5e8a7d13b2f4"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CONTEXT = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")  # recsys.database.AttributesType


def upgrade() -> None:
    with op.batch_alter_table("interactions") as batch:
        batch.add_column(sa.Column("context", CONTEXT, nullable=False, server_default="{}"))
    with op.batch_alter_table("interactions") as batch:
        batch.alter_column("context", server_default=None)  # the ORM's default, like customers' attributes


def downgrade() -> None:
    with op.batch_alter_table("interactions") as batch:
        batch.drop_column("context")

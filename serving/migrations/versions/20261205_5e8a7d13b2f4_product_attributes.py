"""product attributes: a product's features are the dataset spec's item features, by name

Revision ID: 5e8a7d13b2f4
Revises: c41f0e9a2d57
Create Date: 2026-12-05 10:00:00

The fixed `category`, `shop` and `brand` columns held the default spec's `item_category`, `item_shop` and
`item_brand` (the nightly extract mapped them so); they move into `attributes` under those names, and the downgrade
moves them back (a product without `item_category` gets category 0, the column being required there). Written by hand
from recsys/database.py, with the column types spelled out (a migration must not import the models).
`tests/test_ingestion_api.py` checks that the models and the migrated schema agree.
"""

from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "5e8a7d13b2f4"
down_revision: str | Sequence[str] | None = "c41f0e9a2d57"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ATTRIBUTES = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")  # recsys.database.AttributesType
MOVED = {"category": "item_category", "shop": "item_shop", "brand": "item_brand"}  # old column -> default spec name
BATCH_ROWS = 10_000


def upgrade() -> None:
    with op.batch_alter_table("products") as batch:
        batch.add_column(sa.Column("attributes", ATTRIBUTES, nullable=False, server_default="{}"))
    products = sa.table("products", sa.column("id", sa.BigInteger()), sa.column("attributes", ATTRIBUTES),
                        *(sa.column(old, sa.Integer()) for old in MOVED))  # fmt: skip
    _rewrite(products, lambda row: {"attributes": {new: row[old] for old, new in MOVED.items()
                                                   if row[old] is not None}})  # fmt: skip
    with op.batch_alter_table("products") as batch:
        batch.alter_column("attributes", server_default=None)  # the ORM's default, like customers'
        for old in MOVED:
            batch.drop_column(old)


def downgrade() -> None:
    with op.batch_alter_table("products") as batch:
        for old in MOVED:
            batch.add_column(sa.Column(old, sa.Integer(), nullable=True))
    products = sa.table("products", sa.column("id", sa.BigInteger()), sa.column("attributes", ATTRIBUTES),
                        *(sa.column(old, sa.Integer()) for old in MOVED))  # fmt: skip

    def columns(row: sa.RowMapping) -> dict[str, Any]:
        values = {old: _integer(row["attributes"].get(new)) for old, new in MOVED.items()}
        return {**values, "category": values["category"] or 0}

    _rewrite(products, columns)
    with op.batch_alter_table("products") as batch:
        batch.alter_column("category", existing_type=sa.Integer(), nullable=False)
        batch.drop_column("attributes")


def _rewrite(products: sa.TableClause, values: Callable[[sa.RowMapping], dict[str, Any]]) -> None:
    """Each product row updated with `values(row)`, read in pages of BATCH_ROWS by id."""
    connection = op.get_bind()
    last = 0
    while rows := connection.execute(sa.select(products).where(products.c.id > last).order_by(products.c.id)
                                     .limit(BATCH_ROWS)).mappings().all():  # fmt: skip
        for row in rows:
            connection.execute(sa.update(products).where(products.c.id == row["id"]).values(**values(row)))
        last = rows[-1]["id"]


def _integer(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and -(2**31) <= value < 2**31 else None

"""Feast entities: the user and the item, keyed by their raw ids (the ids the web tier sends)."""

from __future__ import annotations

import pyarrow as pa
from feast import Entity, ValueType
from feast.type_map import pa_to_feast_value_type

from feature_repo.tables import EntityTable


def entity(table: EntityTable, schema: pa.Schema) -> Entity:
    """The table's entity; its value type is the join key's type in the table (int64 ids become INT64)."""
    value_type: ValueType = pa_to_feast_value_type(str(schema.field(table.join_key).type))
    return Entity(
        name=table.kind,
        join_keys=[table.join_key],
        value_type=value_type,
        description=f"a {table.kind}, by the raw id `{table.join_key}`",
    )

"""Feast feature views: the encoded features of each entity, typed from the table's Parquet schema."""

from __future__ import annotations

from datetime import timedelta

import pyarrow as pa
from feast import Entity, FeatureView, Field, FileSource
from feast.type_map import pa_to_feast_value_type
from feast.types import FeastType, from_value_type

from feature_repo.tables import EntityTable


def feast_type(arrow_type: pa.DataType) -> FeastType:
    return from_value_type(pa_to_feast_value_type(str(arrow_type)))


def feature_view(table: EntityTable, entity: Entity, source: FileSource, schema: pa.Schema) -> FeatureView:
    return FeatureView(
        name=table.feature_view_name,
        entities=[entity],
        schema=[Field(name=name, dtype=feast_type(schema.field(name).type)) for name in table.features],
        source=source,
        # No expiry: a row is the entity's latest state, still right for a user last seen a year ago.
        ttl=timedelta(0),
        online=True,
        description=f"Encoded {table.kind} features (Categorify codes, code lists, normalized numbers), the "
                    "inputs the models take",
    )

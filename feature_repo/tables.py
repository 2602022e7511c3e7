"""The feature tables Feast serves, as `tasks.nvtabular_fit_transform.feature_tables` writes them.

One table per entity kind, one row per entity: the raw id as the web tier knows it (the spec's
user_id / item_id: the entity's join key), `<id>_encoded` (the Categorify code the models embed),
the spec's user or item features (Categorify codes) and `event_timestamp` (UTC, the entity's latest event).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from recsys.spec import DatasetSpec

# Names fixed by nvtabular_fit_transform.feature_tables; tests/test_feast_features.py reads its real output.
ENCODED_SUFFIX = "_encoded"
EVENT_TIMESTAMP = "event_timestamp"


class FeatureTableError(ValueError):
    """A feature table that does not hold what the spec says it should; the message names the file."""


@dataclasses.dataclass(frozen=True)
class EntityTable:
    """Which entity a feature table describes, its join key and its feature columns."""

    kind: str  # "user" or "item": the Feast entity's name
    join_key: str
    features: tuple[str, ...]

    @property
    def file_name(self) -> str:
        return f"{self.kind}_features.parquet"

    @property
    def feature_view_name(self) -> str:
        return f"{self.kind}_features"

    @property
    def source_name(self) -> str:
        return f"{self.kind}_features_source"

    def path(self, nvtabular_dir: Path) -> Path:
        # Absolute but not resolved: `<run>/nvtabular` is a link that a rerun of the step swaps atomically.
        return Path(nvtabular_dir).absolute() / self.file_name

    def read_schema(self, nvtabular_dir: Path) -> pa.Schema:
        """The table's Parquet schema, checked to hold the join key, every feature and the event time."""
        path = self.path(nvtabular_dir)
        if not path.exists():
            raise FeatureTableError(f"{path}: feature table not found (run nvtabular_fit_transform first)")
        schema = pq.read_schema(path)
        missing = [name for name in (self.join_key, *self.features, EVENT_TIMESTAMP) if name not in schema.names]
        if missing:
            raise FeatureTableError(f"{path}: missing columns {', '.join(missing)} (has {', '.join(schema.names)})")
        time_type = schema.field(EVENT_TIMESTAMP).type
        if not pa.types.is_timestamp(time_type):
            raise FeatureTableError(f"{path}: {EVENT_TIMESTAMP} must be a timestamp, is {time_type}")
        return schema


def entity_tables(spec: DatasetSpec) -> tuple[EntityTable, EntityTable]:
    """The user table and the item table of a dataset."""
    return (
        EntityTable("user", spec.user_id, (spec.user_id + ENCODED_SUFFIX, *spec.user_features)),
        EntityTable("item", spec.item_id, (spec.item_id + ENCODED_SUFFIX, *spec.item_features)),
    )

"""Feast data sources: one run's Parquet feature tables.

Each nightly run writes its tables under its own `<run>/nvtabular/`; applying a run's definitions
points the sources at that run's files (Feast keeps the view's materialization history when only the
source moves), and materialization reads from there.
"""

from __future__ import annotations

from pathlib import Path

from feast import FileSource
from feast.data_format import ParquetFormat

from feature_repo.tables import EVENT_TIMESTAMP, EntityTable


def feature_table_source(table: EntityTable, nvtabular_dir: Path) -> FileSource:
    return FileSource(
        name=table.source_name,
        path=str(table.path(nvtabular_dir)),
        file_format=ParquetFormat(),
        timestamp_field=EVENT_TIMESTAMP,
        description=f"latest encoded {table.kind} features per {table.kind}, written by nvtabular_fit_transform",
    )

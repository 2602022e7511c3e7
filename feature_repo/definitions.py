"""Every Feast object of one dataset, for one run's feature tables."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from feast import Entity, FeatureService, FeatureView, FileSource
from feast.feast_object import FeastObject

from feature_repo.entities import entity
from feature_repo.feature_services import feature_services
from feature_repo.feature_views import feature_view
from feature_repo.sources import feature_table_source
from feature_repo.tables import entity_tables
from recsys.spec import DatasetSpec


@dataclasses.dataclass(frozen=True)
class Definitions:
    entities: list[Entity]
    sources: list[FileSource]
    feature_views: list[FeatureView]
    feature_services: list[FeatureService]

    def objects(self) -> list[FeastObject]:
        return [*self.entities, *self.sources, *self.feature_views, *self.feature_services]


def build_definitions(spec: DatasetSpec, nvtabular_dir: Path) -> Definitions:
    """Entities, sources, views and services of `spec`, reading the tables in `nvtabular_dir`."""
    entities, sources, views = [], [], []
    for table in entity_tables(spec):
        schema = table.read_schema(nvtabular_dir)
        entities.append(entity(table, schema))
        sources.append(feature_table_source(table, nvtabular_dir))
        views.append(feature_view(table, entities[-1], sources[-1], schema))
    return Definitions(entities, sources, views, feature_services(views[0], views[1]))

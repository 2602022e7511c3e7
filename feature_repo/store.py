"""Opening the feature store and reading online features: shared by the pipeline, the tests and the gateway's
online path (serving/live_features.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from feast import FeatureStore

from feature_repo.config import FeastStoreConfig, project_name, repo_config
from feature_repo.tables import EntityTable, entity_tables
from recsys.spec import DatasetSpec


def open_feature_store(spec: DatasetSpec, config: FeastStoreConfig | None = None, *,
                       writes_always_land: bool = False) -> FeatureStore:  # fmt: skip
    """The dataset's feature store (nothing connects until it is used); see `repo_config`."""
    return FeatureStore(config=repo_config(project_name(spec), config or FeastStoreConfig.from_settings(),
                                           writes_always_land=writes_always_land))  # fmt: skip


def online_features(store: FeatureStore, table: EntityTable, ids: Sequence[Any]) -> dict[str, list[Any]]:
    """Column -> values, one value per id in the order given: the join key, then each feature.

    An id the store does not know gets None for every feature.
    """
    rows = [{table.join_key: value.item() if hasattr(value, "item") else value} for value in ids]  # numpy -> Python
    references = [f"{table.feature_view_name}:{name}" for name in table.features]
    return store.get_online_features(features=references, entity_rows=rows).to_dict()


def online_user_features(store: FeatureStore, spec: DatasetSpec, user_ids: Sequence[Any]) -> dict[str, list[Any]]:
    """The encoded user features of `user_ids` (raw ids), from the online store."""
    return online_features(store, entity_tables(spec)[0], user_ids)


def online_item_features(store: FeatureStore, spec: DatasetSpec, item_ids: Sequence[Any]) -> dict[str, list[Any]]:
    """The encoded item features of `item_ids` (raw ids), from the online store."""
    return online_features(store, entity_tables(spec)[1], item_ids)

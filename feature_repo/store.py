"""Opening the feature store and reading online features: shared by the pipeline, the tests and the gateway's
online path (serving/live_features.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

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


def delete_online_rows(store: FeatureStore, table: EntityTable, ids: Sequence[int], config: FeastStoreConfig) -> int:
    """Delete the entities' rows of every feature view from the Redis online store (a customer forgotten on
    request, serving/forget.py); return the rows deleted.

    Feast has no call that deletes one entity's row (its `delete_entity_values` scans every entity of a join
    key), so this deletes the Redis key Feast's Redis store writes an entity's features under, named by Feast's
    own key function: the serialized entity key and the project."""
    from feast.infra.online_stores.helpers import _redis_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.type_map import python_values_to_proto_values

    value_type = store.get_entity(table.kind).value_type
    keys = [_redis_key(store.project, EntityKey(join_keys=[table.join_key], entity_values=[value]),
                       store.config.entity_key_serialization_version)
            for value in python_values_to_proto_values([int(entity) for entity in ids], value_type)]  # fmt: skip
    if not keys:
        return 0
    client = config.redis_client()  # on a cluster, DEL of keys of several slots is split by slot
    try:
        return int(cast(int, client.delete(*keys)))
    finally:
        client.close()

"""Feast: definitions generated from the spec, applied and materialized into a real Redis, read back online.

The tests own Redis DB 13 and flush only that one, before and after each test; the registry lives in tmp_path.
The Redis Cluster test starts a cluster of its own (three primaries on free loopback ports) and stops it.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import redis

from feature_repo.config import FeastStoreConfig, project_name, redact_url, redis_connection_string
from feature_repo.definitions import build_definitions
from feature_repo.tables import FeatureTableError
from recsys.settings import Settings
from recsys.spec import DatasetSpec, load_spec
from tasks.feast_features import (
    FeastNotAppliedError,
    feast_apply,
    feast_materialize,
    materialization_window,
    online_item_features,
    online_user_features,
    open_feature_store,
)
from tests.redis_databases import redis_url
from tests.servers import redis_cluster

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TEST_REDIS_URL = redis_url("feast")
SPECS = [PROJECT_ROOT / "specs" / "aliccp.yaml", PROJECT_ROOT / "tests" / "data" / "shop_events.yaml"]
DAY_1 = datetime(2024, 3, 1, tzinfo=UTC)


@pytest.fixture
def redis_db13() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(TEST_REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError as error:
        pytest.fail(f"Redis is not reachable at {TEST_REDIS_URL} ({error}); `make setup` installs and starts it")
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def store_config(tmp_path: Path, redis_db13: redis.Redis) -> FeastStoreConfig:
    return FeastStoreConfig(redis_url=TEST_REDIS_URL, registry_path=tmp_path / "feast" / "registry.db")


def redis_contents(client: redis.Redis) -> dict:
    keys = sorted(client.scan_iter(count=1000))
    with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.hgetall(key)
        return dict(zip(keys, pipe.execute(), strict=True))


def entity_columns(spec: DatasetSpec, kind: str) -> tuple[str, list[str]]:
    """The raw id column and the feature columns nvtabular_fit_transform writes for users or items."""
    if kind == "user":
        return spec.user_id, [f"{spec.user_id}_encoded", *spec.user_features]
    return spec.item_id, [f"{spec.item_id}_encoded", *spec.item_features]


def snapshot_table(spec: DatasetSpec, kind: str, ids: list[int], times: list[datetime], offset: int) -> pd.DataFrame:
    """A feature table in nvtabular_fit_transform's layout, with values that depend on id and offset."""
    id_column, features = entity_columns(spec, kind)
    frame = pd.DataFrame({id_column: np.asarray(ids, dtype=np.int64)})
    for position, name in enumerate(features):
        frame[name] = (frame[id_column] * (position + 3) + offset) % 1000
    frame["event_timestamp"] = pd.to_datetime(times, utc=True)
    return frame


def write_snapshot(directory: Path, users: pd.DataFrame, items: pd.DataFrame) -> Path:
    directory.mkdir(parents=True)
    users.to_parquet(directory / "user_features.parquet", index=False)
    items.to_parquet(directory / "item_features.parquet", index=False)
    return directory


def expected_rows(table: pd.DataFrame, id_column: str, ids: list) -> dict[str, list]:
    rows = table.set_index(id_column).loc[ids].reset_index()
    return {column: rows[column].tolist() for column in rows.columns
            if column not in ("event_timestamp", "last_event_timestamp")}  # times are not features


# --- configuration and definitions (no Redis) ------------------------------------------------------------------


def test_redis_urls_become_feast_connection_strings():
    assert redis_connection_string("redis://127.0.0.1:6379/1") == "127.0.0.1:6379,db=1"
    assert redis_connection_string("redis://cache") == "cache:6379,db=0"
    assert (redis_connection_string("rediss://app:p%40ss=1@redis.internal:6380/2?socket_timeout=5")
            == "redis.internal:6380,db=2,username=app,password=p@ss=1,ssl=true,socket_timeout=5")  # fmt: skip
    assert redact_url("redis://:secret@h:6379/1") == "redis://:***@h:6379/1"
    with pytest.raises(ValueError, match="redis://"):
        redis_connection_string("http://127.0.0.1:6379/1")
    with pytest.raises(ValueError, match="','"):
        redis_connection_string("redis://:a%2Cb@127.0.0.1:6379/1")
    with pytest.raises(ValueError, match="must be a number"):
        redis_connection_string("redis://127.0.0.1:6379/cache")


def test_default_settings_keep_feast_in_a_redis_db_of_its_own():
    from recsys.settings import Settings

    settings = Settings()
    assert redis_connection_string(settings.feast_redis_url).split(",")[1] != "db=0"
    assert settings.feast_registry_path.suffix == ".db"


def test_window_runs_from_the_last_end_to_the_newest_row():
    times = pd.Series(pd.to_datetime(["2024-03-01 10:00:00.0000001", "2024-03-02 12:00:00.0000005"], utc=True))
    start, end = materialization_window(times, None)  # type: ignore[misc]
    assert start <= times.min() and end >= times.max()  # nanoseconds rounded outwards, no row left out
    assert materialization_window(times, end) is None  # nothing newer: a rerun loads nothing
    later = datetime(2024, 3, 1, 18, tzinfo=UTC)
    assert materialization_window(times, later) == (later, end)
    assert materialization_window(pd.Series([], dtype="datetime64[ns, UTC]"), None) is None


@pytest.mark.parametrize("spec_path", SPECS, ids=lambda path: path.stem)
def test_definitions_follow_the_spec(tmp_path: Path, spec_path: Path):
    spec = load_spec(spec_path)
    users = snapshot_table(spec, "user", [1, 2], [DAY_1, DAY_1], offset=0)
    items = snapshot_table(spec, "item", [7], [DAY_1], offset=0)
    definitions = build_definitions(spec, write_snapshot(tmp_path / "nvtabular", users, items))
    assert [(entity.name, entity.join_key) for entity in definitions.entities] == [
        ("user", spec.user_id), ("item", spec.item_id)]  # fmt: skip
    views = {view.name: view for view in definitions.feature_views}
    assert [f.name for f in views["user_features"].features] == entity_columns(spec, "user")[1]
    assert [f.name for f in views["item_features"].features] == entity_columns(spec, "item")[1]
    assert {source.path for source in definitions.sources} == {
        str((tmp_path / "nvtabular" / name).absolute()) for name in ("user_features.parquet", "item_features.parquet")
    }
    services = {service.name: {projection.name for projection in service.feature_view_projections}
                for service in definitions.feature_services}  # fmt: skip
    assert services == {"ranker": {"user_features", "item_features"}, "two_tower": {"user_features"}}
    assert project_name(spec) == spec.name


def test_a_table_missing_a_spec_feature_is_refused_with_its_path(tmp_path: Path):
    spec = load_spec(SPECS[1])
    users = snapshot_table(spec, "user", [1], [DAY_1], offset=0).drop(columns=[spec.user_features[0]])
    items = snapshot_table(spec, "item", [7], [DAY_1], offset=0)
    with pytest.raises(FeatureTableError, match=rf"user_features.parquet: missing columns {spec.user_features[0]}"):
        build_definitions(spec, write_snapshot(tmp_path / "nvtabular", users, items))


# --- the real NVTabular output (default spec) ----------------------------------------------------------------------


def test_online_features_equal_the_nvtabular_tables_and_a_rerun_changes_nothing(
    nvtabular_output, spec: DatasetSpec, store_config: FeastStoreConfig, redis_db13: redis.Redis
):
    _, nvtabular_dir, _ = nvtabular_output
    users = pd.read_parquet(nvtabular_dir / "user_features.parquet")
    items = pd.read_parquet(nvtabular_dir / "item_features.parquet")

    applied = feast_apply(nvtabular_dir, spec, store_config)
    materialized = feast_materialize(nvtabular_dir, spec, store_config)
    assert applied["feature_views"]["user_features"]["features"] == entity_columns(spec, "user")[1]
    for name, table in (("user_features", users), ("item_features", items)):
        view = materialized["feature_views"][name]
        assert view["rows"] == view["rows_in_window"] == len(table)
        assert view["checked"] == view["matching"] == min(1000, len(table))

    store = open_feature_store(spec, store_config)
    user_ids = users[spec.user_id].iloc[np.linspace(0, len(users) - 1, 50).astype(int)].tolist()
    item_ids = items[spec.item_id].iloc[np.linspace(0, len(items) - 1, 50).astype(int)].tolist()
    assert online_user_features(store, spec, user_ids) == expected_rows(users, spec.user_id, user_ids)
    assert online_item_features(store, spec, item_ids) == expected_rows(items, spec.item_id, item_ids)
    unknown = max(users[spec.user_id]) + 1
    online = online_user_features(store, spec, [unknown])
    assert online[spec.user_id] == [unknown]
    assert all(online[name] == [None] for name in entity_columns(spec, "user")[1])

    # Feast's keys end with the project name; the user and item hashes hold one view each.
    contents = redis_contents(redis_db13)
    assert len(contents) == len(users) + len(items)
    assert all(key.endswith(project_name(spec).encode()) for key in contents)

    intervals = {name: store.get_feature_view(name).materialization_intervals for name in materialized["feature_views"]}
    feast_apply(nvtabular_dir, spec, store_config)
    rerun = feast_materialize(nvtabular_dir, spec, store_config)
    assert all(view["window"] is None and view["rows_in_window"] == 0 for view in rerun["feature_views"].values())
    assert redis_contents(redis_db13) == contents
    store = open_feature_store(spec, store_config)
    assert {name: store.get_feature_view(name).materialization_intervals for name in intervals} == intervals


# --- incremental loads across nightly snapshots, on both specs ------------------------------------------------------


@pytest.mark.parametrize("spec_path", SPECS, ids=lambda path: path.stem)
def test_a_newer_snapshot_updates_only_what_is_newer(tmp_path: Path, spec_path: Path, store_config: FeastStoreConfig,
                                                     redis_db13: redis.Redis):  # fmt: skip
    spec = load_spec(spec_path)
    user_id, user_features = entity_columns(spec, "user")
    item_id, _ = entity_columns(spec, "item")
    old_users = list(range(100, 120))
    old_times = [DAY_1 + timedelta(minutes=i) for i in range(len(old_users))]
    users_1 = snapshot_table(spec, "user", old_users, old_times, offset=0)
    items_1 = snapshot_table(spec, "item", list(range(500, 510)), [DAY_1] * 10, offset=0)
    run_1 = write_snapshot(tmp_path / "runs" / "1" / "nvtabular", users_1, items_1)
    with pytest.raises(FeastNotAppliedError, match="run feast_apply"):
        feast_materialize(run_1, spec, store_config)
    feast_apply(run_1, spec, store_config)
    first = feast_materialize(run_1, spec, store_config)
    assert first["feature_views"]["user_features"]["rows_in_window"] == 20
    store = open_feature_store(spec, store_config)
    assert online_user_features(store, spec, old_users) == expected_rows(users_1, user_id, old_users)

    # The next night: users 110-114 and items 500-504 have newer events (at different times after the last
    # load) and new values, users 120-121 are new; user 115's values changed without a newer event time (as a
    # re-encoding would give): Feast keeps the stored row, and the check reports it.
    day_2 = DAY_1 + timedelta(days=1)
    updated, new, same_time = list(range(110, 115)), [120, 121], 115
    new_times = [DAY_1 + timedelta(hours=1), day_2 + timedelta(hours=1)]
    users_2 = snapshot_table(spec, "user", old_users + new, old_times + new_times, offset=0)
    changed = users_2[user_id].isin([*updated, *new, same_time])
    users_2.loc[changed, user_features] = snapshot_table(
        spec, "user", users_2.loc[changed, user_id].tolist(), [day_2] * int(changed.sum()), offset=7
    )[user_features].values
    users_2.loc[users_2[user_id].isin(updated), "event_timestamp"] = [day_2 + timedelta(hours=i) for i in range(5)]
    item_times = [DAY_1 + timedelta(hours=i + 1) for i in range(5)] + [DAY_1] * 5
    items_2 = snapshot_table(spec, "item", list(range(500, 510)), item_times, offset=0)
    items_2.loc[:4, entity_columns(spec, "item")[1]] += 1
    run_2 = write_snapshot(tmp_path / "runs" / "2" / "nvtabular", users_2, items_2)

    applied = feast_apply(run_2, spec, store_config)
    assert applied["feature_views"]["user_features"]["source"] == str(run_2.absolute() / "user_features.parquet")
    with pytest.raises(FeastNotAppliedError, match="run feast_apply"):
        feast_materialize(run_1, spec, store_config)
    second = feast_materialize(run_2, spec, store_config)
    user_view = second["feature_views"]["user_features"]
    assert user_view["previous_end"] == first["feature_views"]["user_features"]["window"][1]
    assert user_view["rows_in_window"] == len(updated) + len(new)
    assert user_view["checked"] == 22 and user_view["matching"] == 21 and user_view["differing_examples"] == [same_time]
    assert second["feature_views"]["item_features"]["rows_in_window"] == 5

    store = open_feature_store(spec, store_config)
    everyone = old_users + new
    online = online_user_features(store, spec, everyone)
    expected = expected_rows(users_2, user_id, everyone)
    position = everyone.index(same_time)
    for name in user_features:
        expected[name][position] = users_1.set_index(user_id).loc[same_time, name]
    assert online == expected
    assert online_item_features(store, spec, list(range(500, 510))) == expected_rows(
        items_2, item_id, list(range(500, 510))
    )
    assert online_user_features(store, spec, [999_999])[user_features[0]] == [None]

    before = redis_contents(redis_db13)
    assert feast_materialize(run_2, spec, store_config)["feature_views"]["user_features"]["window"] is None
    assert redis_contents(redis_db13) == before


# --- a Redis Cluster as the online store --------------------------------------------------------------------------


def test_a_cluster_url_becomes_a_connection_string_without_a_db():
    assert redis_connection_string("redis://127.0.0.1:7000", cluster=True) == "127.0.0.1:7000"
    assert redis_connection_string("redis://:s3cret@node-1:7000/0", cluster=True) == "node-1:7000,password=s3cret"
    with pytest.raises(ValueError, match=r"DB 0 only.*RECSYS_FEAST_REDIS_TYPE=redis_cluster"):
        redis_connection_string("redis://127.0.0.1:7000/1", cluster=True)
    with pytest.raises(ValueError, match="redis, redis_cluster"):
        FeastStoreConfig("redis://127.0.0.1:7000", Path("registry.db"), redis_type="redis_sentinel")
    settings = Settings(feast_redis_url="redis://node-1:7000", feast_redis_type="redis_cluster")
    assert FeastStoreConfig.from_settings(settings).cluster
    assert not FeastStoreConfig.from_settings(Settings()).cluster


def test_a_redis_cluster_holds_the_online_rows_for_reads_write_through_and_forgetting(tmp_path: Path):
    """Materialize, the gateway's async read and write-through, and a forget, on three primaries: Feast's rows
    spread over every node, and each path finds them wherever they are."""
    import asyncio

    from feature_repo.store import delete_online_rows
    from feature_repo.tables import entity_tables

    spec = load_spec(SPECS[0])
    user_id, user_features = entity_columns(spec, "user")
    ids = list(range(100, 160))
    users = snapshot_table(spec, "user", ids, [DAY_1] * len(ids), offset=0)
    items = snapshot_table(spec, "item", list(range(500, 540)), [DAY_1] * 40, offset=0)
    run = write_snapshot(tmp_path / "runs" / "1" / "nvtabular", users, items)
    with redis_cluster(tmp_path / "cluster") as nodes:
        config = FeastStoreConfig(redis_url=nodes[1], registry_path=tmp_path / "feast" / "registry.db",
                                  redis_type="redis_cluster")  # fmt: skip
        feast_apply(run, spec, config)
        materialized = feast_materialize(run, spec, config)
        assert materialized["feature_views"]["user_features"]["rows"] == len(ids)
        counts = [redis.Redis.from_url(node).dbsize() for node in nodes]
        assert sum(counts) == len(ids) + len(items) and all(counts), counts

        store = open_feature_store(spec, config)
        assert online_user_features(store, spec, ids) == expected_rows(users, user_id, ids)
        table = entity_tables(spec)[0]
        references = [f"{table.feature_view_name}:{name}" for name in table.features]
        changed = users[users[user_id] == 101].copy()
        changed[user_features] = changed[user_features] + 1
        changed["event_timestamp"] = pd.Timestamp(DAY_1 + timedelta(days=1))

        async def gateway_paths() -> dict[str, list]:
            # As serving/live_features.py does: write through with the async client, then read back.
            writer = open_feature_store(spec, config, writes_always_land=True)
            await writer.write_to_online_store_async(table.feature_view_name, df=changed)
            response = await writer.get_online_features_async(features=references, entity_rows=[{user_id: 101}])
            return response.to_dict()

        assert asyncio.run(gateway_paths()) == expected_rows(changed, user_id, [101])

        forgotten = ids[:25]  # keys of many slots, on every node: deleted slot by slot
        assert delete_online_rows(store, table, forgotten, config) == len(forgotten)
        after = online_user_features(store, spec, [*forgotten, ids[-1]])
        assert all(after[name][:-1] == [None] * len(forgotten) for name in user_features)
        assert after[user_features[0]][-1] == expected_rows(users, user_id, [ids[-1]])[user_features[0]][0]

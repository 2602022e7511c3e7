"""Publishing step: the per-user and per-item feature tables into Feast, served from Redis.

`feast_apply` registers the definitions generated from the spec (entities, sources, feature views,
feature services; see `feature_repo/`) with the sources pointing at this run's tables;
`feast_materialize` loads what is new since the last materialization into the Redis online store.

Materialization is explicit and clamped, never "up to now" (a future end date would block later
loads: feast-dev/feast#4222). Each feature view is loaded from the end of its last materialization,
as the registry records it, to the newest event time in this run's table. A rerun finds nothing newer
and writes nothing; the next night's tables load only their newer rows. Feast's Redis store skips a row
whose event time is not newer than the stored one (feast-dev/feast#2795), so the window's first
instant, already loaded, is re-read harmlessly, and a value that changed without a newer event time
does not land: materialization then samples rows and reports how many the online store still
serves differently, so such drift shows in the metrics and the log instead of going unnoticed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from feast import FeatureStore, FileSource
from feast.errors import FeatureViewNotFoundException

from feature_repo.config import FeastStoreConfig, project_name, redact_url, repo_config
from feature_repo.definitions import build_definitions
from feature_repo.store import online_features, online_item_features, online_user_features, open_feature_store
from feature_repo.tables import EVENT_TIMESTAMP, EntityTable, entity_tables
from recsys.spec import DatasetSpec

__all__ = [
    "FeastNotAppliedError",
    "feast_apply",
    "feast_materialize",
    "materialization_window",
    "online_item_features",
    "online_user_features",
    "open_feature_store",
    "registered_source_paths",
]

log = logging.getLogger(__name__)

DEFAULT_CHECK_SAMPLE = 1000


class FeastNotAppliedError(RuntimeError):
    """Materialization asked for tables the registry's sources do not point at: apply this run first."""


def feast_apply(nvtabular_dir: Path, spec: DatasetSpec, store_config: FeastStoreConfig | None = None) -> dict:
    """Register the spec's Feast definitions, sources pointing at the tables in `nvtabular_dir`.

    Idempotent: applying the same run again changes nothing; applying a newer run moves the sources
    to its tables and keeps each view's materialization history.
    """
    config = store_config or FeastStoreConfig.from_settings()
    definitions = build_definitions(spec, Path(nvtabular_dir))
    config.registry_path.parent.mkdir(parents=True, exist_ok=True)
    store = open_feature_store(spec, config)
    store.apply(definitions.objects())
    metrics = {
        "project": project_name(spec),
        "registry": str(config.registry_path),
        "online_store": redact_url(config.redis_url),
        "entities": {item.name: item.join_key for item in definitions.entities},
        "feature_views": {
            view.name: {"source": source.path, "features": [feature.name for feature in view.features]}
            for view, source in zip(definitions.feature_views, definitions.sources, strict=True)
        },
        "feature_services": [service.name for service in definitions.feature_services],
    }
    log.info("feast_apply: project %s, views %s, sources in %s", metrics["project"],
             ", ".join(metrics["feature_views"]), nvtabular_dir)  # fmt: skip
    return metrics


def registered_source_paths(store_config: FeastStoreConfig | None = None) -> set[Path]:
    """The files the registry's sources read, every project's (each the tables of the run that applied it last);
    none without a registry."""
    config = store_config or FeastStoreConfig.from_settings()
    if not config.registry_path.exists():
        return set()
    store = FeatureStore(config=repo_config("registry_reader", config))
    return {Path(source.path) for project in store.list_projects()
            for source in store.registry.list_data_sources(project.name) if isinstance(source, FileSource)}  # fmt: skip


def materialization_window(event_times: pd.Series, last_end: datetime | None) -> tuple[datetime, datetime] | None:
    """The [start, end] interval to load (both ends included, as Feast's file source reads them).

    From the last materialization's end (or the oldest row the first time) to the newest row;
    None when no row is newer than the last end.
    """
    if event_times.empty:
        return None
    newest = pd.Timestamp(event_times.max()).ceil("us").to_pydatetime()
    if last_end is None:
        return pd.Timestamp(event_times.min()).floor("us").to_pydatetime(), newest
    if newest <= last_end:
        return None
    return last_end, newest


def feast_materialize(nvtabular_dir: Path, spec: DatasetSpec, store_config: FeastStoreConfig | None = None, *,
                      check_sample: int = DEFAULT_CHECK_SAMPLE) -> dict:  # fmt: skip
    """Load the rows of this run's tables that are newer than the last materialization into Redis.

    `feast_apply` must have run for the same `nvtabular_dir`. Afterwards up to `check_sample` rows
    per table, spread over the table, are read back from the online store and compared.
    """
    config = store_config or FeastStoreConfig.from_settings()
    store = open_feature_store(spec, config)
    views = {}
    for table in entity_tables(spec):
        views[table.feature_view_name] = _materialize_table(store, table, Path(nvtabular_dir), check_sample)
    metrics = {"project": project_name(spec), "online_store": redact_url(config.redis_url), "feature_views": views}
    for name, view in views.items():
        log.info("feast_materialize: %s: window %s, %d of %d rows in it; %d of %d sampled rows served as in the "
                 "table", name, view["window"], view["rows_in_window"], view["rows"], view["matching"],
                 view["checked"])  # fmt: skip
        if view["matching"] < view["checked"]:
            log.warning("feast_materialize: %s: %d sampled rows differ online from this run's table, e.g. ids %s: "
                        "their values changed without a newer event time (Feast keeps the stored row) or they "
                        "are older than the last materialization", name, view["checked"] - view["matching"],
                        view["differing_examples"])  # fmt: skip
    return metrics


def _materialize_table(store: FeatureStore, table: EntityTable, nvtabular_dir: Path, check_sample: int) -> dict:
    path = table.path(nvtabular_dir)
    try:
        view = store.get_feature_view(table.feature_view_name)
    except FeatureViewNotFoundException as error:
        raise FeastNotAppliedError(f"{error}: run feast_apply for these tables first") from error
    registered = view.batch_source.path if isinstance(view.batch_source, FileSource) else None
    if registered != str(path):
        raise FeastNotAppliedError(f"feature view {view.name} reads {registered}, not {path}: "
                                   "run feast_apply for these tables first")  # fmt: skip
    data = pq.read_table(path, columns=[table.join_key, *table.features, EVENT_TIMESTAMP])
    event_times = data.column(EVENT_TIMESTAMP).to_pandas()
    if event_times.dt.tz is None:
        event_times = event_times.dt.tz_localize("UTC")  # Feast reads naive event times as UTC
    last_end = view.most_recent_end_time
    if last_end is not None and last_end.tzinfo is None:
        last_end = last_end.replace(tzinfo=UTC)
    window = materialization_window(event_times, last_end)
    started = time.perf_counter()
    if window is not None:
        store.materialize(window[0], window[1], feature_views=[view.name])
    seconds = time.perf_counter() - started
    if window is None:
        rows_in_window = 0
    else:
        rows_in_window = len(event_times) if last_end is None else int((event_times > last_end).sum())
    checked, matching, differing = _compare_sample(store, table, data, check_sample)
    return {
        "source": str(path),
        "rows": data.num_rows,
        "previous_end": last_end.isoformat() if last_end else None,
        "window": [window[0].isoformat(), window[1].isoformat()] if window else None,
        "rows_in_window": rows_in_window,
        "seconds": round(seconds, 3),
        "checked": checked,
        "matching": matching,
        "differing_examples": differing[:5],
    }


def _compare_sample(store: FeatureStore, table: EntityTable, data: pa.Table, size: int) -> tuple[int, int, list]:
    """(rows checked, rows the online store serves exactly as in `data`, ids of differing rows)."""
    if size <= 0 or data.num_rows == 0:
        return 0, 0, []
    positions = np.unique(np.linspace(0, data.num_rows - 1, num=min(size, data.num_rows)).round().astype(np.int64))
    expected = data.take(pa.array(positions)).to_pydict()
    ids: Sequence = expected[table.join_key]
    online = online_features(store, table, ids)
    differing = [
        ids[row] for row in range(len(ids))
        if any(online[name][row] != expected[name][row] for name in table.features)
    ]  # fmt: skip
    return len(ids), len(ids) - len(differing), differing

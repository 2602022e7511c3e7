"""Batch scoring of every known user (trainer environment), for the web tier's precomputed lookups.

For each user: the online pipeline's four stages (retrieval from the user tower's Faiss top-K, the
item-to-item source over the user's positives and the most clicked items; the business-rule filter; the
ranker; top-N by the ranker's probability blended with the retrieval's and the item-to-item score, with
weights chosen on the validation split unless given) in batches of users. Also the generic lists of new
visitors (popularity of positive interactions per segment of the spec's `segment_features`, seed 000, plus
one list over all segments under the key "*") and the item-to-item similar lists for the "browsing now" case. Writes
Parquet under the run; `publish_recommendations` loads it into Redis atomically.

Business rules (configuration): items a user bought (the spec's `purchase_target`) are never
recommended to them again; items listed as unavailable are removed from every list.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from models.blend import (
    BLEND_METHODS,
    DEFAULT_ITEM_TO_ITEM_WEIGHT,
    DEFAULT_RETRIEVAL_WEIGHT,
    NO_SOURCE_WEIGHTS,
    SOURCES,
    blend_scores,
    fit_blend_weights,
)
from models.online_pipeline import ItemsByUser, PipelineArtifacts, RecommendationPipeline, order
from recsys.dask_cluster import dask_execution, tasks_by_worker
from recsys.list_defaults import SIMILAR_N, TOP_K, TOP_N
from recsys.outputs import atomic_output_dir
from recsys.parquet_io import PartitionWriter, nvtabular_part_files
from recsys.recommendation_store import ALL_SEGMENTS, segment_key
from recsys.run_layout import RunLayout
from recsys.spec import DatasetSpec
from tasks.nvtabular_fit_transform import RAW_SUFFIX

log = logging.getLogger(__name__)


LIST_TYPE = pa.list_(pa.int64())
SCORES_TYPE = pa.list_(pa.float32())
# Every list keeps its order scores and each item's P(click) (the promotion rule's number): the ranker's for a
# user, the segment's click rate for a generic list, none (NaN) for similar products.
_LISTS = [("item_ids", LIST_TYPE), ("scores", SCORES_TYPE), ("click_probabilities", SCORES_TYPE)]
USER_SCHEMA = pa.schema([("user_id", pa.int64()), *_LISTS])
SEGMENT_SCHEMA = pa.schema([("segment", pa.string()), *_LISTS])
SIMILAR_SCHEMA = pa.schema([("item_id", pa.int64()), *_LISTS])


@dataclasses.dataclass(frozen=True)
class BatchScoreConfig:
    top_k: int = TOP_K  # retrieved candidates per user (the report's TopK)
    top_n: int = TOP_N  # items kept per user after ranking
    similar_n: int = SIMILAR_N  # similar items kept per item
    users_per_batch: int = 512
    # Weights of the two-tower's P(item | user) and of the item-to-item score in the final order next to the
    # ranker's P(click | shown) (models.blend.blend_scores); 0 and 0: the ranker alone. The published
    # scores are the blend. None: chosen on the run's validation split (`choose_blend_weights`).
    retrieval_weight: float | None = None
    item_to_item_weight: float | None = None
    # Weights of the indicators of the sources that retrieved each candidate (models.blend.SOURCES order).
    source_weights: tuple[float, ...] | None = None
    # How the weights left open are chosen on validation: "grid", "learned" or "choose" (`choose_blend_weights`).
    blend: str = BLEND_METHODS[0]
    # CSV with a column named like the spec's item id: items that must not be recommended.
    unavailable_items: Path | None = None
    # Validation users the weights are chosen on: a seeded sample of at most half of them, so that `evaluate`
    # judges the lists on the other half.
    validation_users: int = 3_000

    def __post_init__(self) -> None:
        for name in ("retrieval_weight", "item_to_item_weight"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must not be negative, got {value}")
        if self.source_weights is not None and len(self.source_weights) != len(SOURCES):
            raise ValueError(f"source_weights needs one weight per source ({', '.join(SOURCES)}), "
                             f"got {self.source_weights}")  # fmt: skip
        if self.blend not in BLEND_METHODS:
            raise ValueError(f"blend must be one of {', '.join(BLEND_METHODS)}, got {self.blend!r}")


# The grid `choose_blend_weights` searches: the old default first, so ties keep it.
RETRIEVAL_WEIGHTS = (DEFAULT_RETRIEVAL_WEIGHT, 0.0, 0.5, 4.0)
ITEM_TO_ITEM_WEIGHTS = (DEFAULT_ITEM_TO_ITEM_WEIGHT, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
CHOICE_K = 10  # the weights maximize NDCG@10 on validation
BLEND_USERS_FILE = "blend_users.npy"  # the validation users the weights were chosen on (evaluate leaves them out)
# Users a Dask task scores at most (on a cluster: `batch_score(dask_scheduler=...)`), in whole batches.
USERS_PER_SHARD = 50_000


def read_unavailable(path: Path | None, spec: DatasetSpec) -> set[int]:
    if path is None:
        return set()
    frame = pd.read_csv(path)
    if spec.item_id not in frame.columns:
        raise ValueError(f"{path}: unavailable items file needs a column '{spec.item_id}'")
    return {int(item) for item in frame[spec.item_id].dropna()}


def _read_splits(nvtabular_dir: Path, splits: tuple[str, ...], columns: list[str]) -> pd.DataFrame:
    parts = [pd.read_parquet(path, columns=columns) for split in splits
             for path in nvtabular_part_files(Path(nvtabular_dir) / split)]  # fmt: skip
    return pd.concat(parts, ignore_index=True)


def positives_by_user(nvtabular_dir: Path, spec: DatasetSpec,
                      splits: tuple[str, ...] = ("train", "valid")) -> dict[int, np.ndarray]:  # fmt: skip
    """Encoded ids of each raw user id's positives (the primary target) in the splits, oldest first (by the spec's
    timestamp, ties in file order), repeats kept: the item-to-item source's queries."""
    user = spec.user_id + RAW_SUFFIX
    rows = _read_splits(nvtabular_dir, splits, [user, spec.item_id, spec.primary_target, spec.timestamp])
    rows = rows[rows[spec.primary_target] == 1].sort_values([user, spec.timestamp], kind="stable")
    return {int(key): items.to_numpy(dtype=np.int64) for key, items in rows.groupby(user, sort=True)[spec.item_id]}


def seen_items_by_user(nvtabular_dir: Path, spec: DatasetSpec,
                       splits: tuple[str, ...] = ("train", "valid")) -> dict[int, np.ndarray]:  # fmt: skip
    """Encoded ids of the items never recommended again to each raw user id, from train and valid: the rows
    the spec's `exclude_seen` names (every interaction, or those positive in the given targets; by default
    the purchases)."""
    targets = spec.seen_targets
    if not spec.excludes_every_interaction and not targets:
        return {}
    seen = _read_splits(nvtabular_dir, splits, [spec.user_id + RAW_SUFFIX, spec.item_id, *targets])
    if not spec.excludes_every_interaction:
        seen = seen[(seen[list(targets)] == 1).any(axis=1)]
    grouped = seen.groupby(spec.user_id + RAW_SUFFIX)[spec.item_id]
    return {int(user): np.unique(items.to_numpy(dtype=np.int64)) for user, items in grouped}


def segment_lists(resplit_dir: Path, spec: DatasetSpec, top_n: int, unavailable: set[int]) -> pd.DataFrame:
    """Most clicked items per segment (share of the segment's positives), on the raw training split."""
    target = spec.primary_target
    columns = [spec.item_id, target, *spec.segment_features]
    parts = sorted((Path(resplit_dir) / "train").glob("part-*.parquet"))
    if not parts:
        raise FileNotFoundError(f"{Path(resplit_dir) / 'train'}: no part files (the run's resplit output)")
    frame = pd.concat([pd.read_parquet(path, columns=columns) for path in parts])
    positives = frame[(frame[target] == 1) & ~frame[spec.item_id].isin(unavailable)]
    rows = []
    groups = [((ALL_SEGMENTS,), positives)]
    if spec.segment_features:
        groups += list(positives.dropna(subset=list(spec.segment_features)).groupby(list(spec.segment_features)))
    for values, group in groups:
        counts = group[spec.item_id].value_counts(sort=True)
        top = counts.sort_index(kind="stable").sort_values(ascending=False, kind="stable").head(top_n)
        key = ALL_SEGMENTS if values == (ALL_SEGMENTS,) else segment_key(values)
        click_rate = (top.to_numpy() / max(len(group), 1)).astype(np.float32)
        rows.append({"segment": key, "item_ids": top.index.to_numpy(dtype=np.int64), "scores": click_rate,
                     "click_probabilities": click_rate})  # fmt: skip
    return pd.DataFrame(rows)


def _lists(raw_items: np.ndarray, scores: np.ndarray, click_probabilities: np.ndarray) -> dict[str, pa.Array]:
    """Row-wise lists (the `_LISTS` columns) without the MISSING padding."""
    keep = raw_items >= 0
    lengths = keep.sum(axis=1)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))

    def floats(values: np.ndarray) -> pa.Array:
        return pa.ListArray.from_arrays(offsets, pa.array(values[keep].astype(np.float32), type=pa.float32()))

    return {"item_ids": pa.ListArray.from_arrays(offsets, pa.array(raw_items[keep], type=pa.int64())),
            "scores": floats(scores), "click_probabilities": floats(click_probabilities)}


def choose_blend_weights(pipeline: RecommendationPipeline, nvtabular_dir: Path, spec: DatasetSpec,
                         config: BatchScoreConfig, unavailable: np.ndarray) -> dict[str, Any]:  # fmt: skip
    """The blend weights of the final order (`models.blend`), chosen on validation users, with what was measured.

    Measured as the lists will be made, but with what the run knew before validation: the item-to-item queries
    and the excluded items come from the train split only, and the relevant items are each sampled validation
    user's positives (the primary target) not seen in train. Two ways to choose, `config.blend`:
    - "grid": the retrieval and item-to-item weights with the best NDCG@10 on a grid (the sources' weights 0);
    - "learned": all five weights fitted to which retrieved candidates the users went on to interact with
      (`models.blend.fit_blend_weights`: every other retrieved candidate a negative);
    - "choose" (the default): both measured on two folds of the users (chosen or fitted on one half, NDCG@10 on
      the other), the better kept and redone on all of them.
    Weights the config fixes are kept, and only the grid searches the others. The sampled users are returned
    under "users" (at most half of those with positives: `evaluate` judges the rest).
    """
    users, relevant, seen = validation_targets(pipeline, nvtabular_dir, spec)
    has_item_to_item = pipeline.item_to_item is not None
    fixed = config.retrieval_weight is not None or config.item_to_item_weight is not None or (
        config.source_weights is not None)  # fmt: skip
    # A weight the config sets is kept; one left open is searched, or takes its default when there is nothing to
    # choose on (no validation user with positives left, or no item-to-item source).
    retrieval = ([config.retrieval_weight] if config.retrieval_weight is not None
                 else RETRIEVAL_WEIGHTS if len(users) >= 2 else [DEFAULT_RETRIEVAL_WEIGHT])  # fmt: skip
    item_to_item = ([config.item_to_item_weight] if config.item_to_item_weight is not None
                    else ITEM_TO_ITEM_WEIGHTS if len(users) >= 2 and has_item_to_item
                    else [DEFAULT_ITEM_TO_ITEM_WEIGHT])  # fmt: skip
    sources = list(config.source_weights) if config.source_weights is not None else list(NO_SOURCE_WEIGHTS)
    learn = config.blend != "grid" and not fixed and has_item_to_item and len(users) >= 4
    if len(retrieval) * len(item_to_item) == 1 and not learn:
        return {"method": "given", "retrieval_weight": retrieval[0], "item_to_item_weight": item_to_item[0],
                "source_weights": sources, "validation_users": 0, "users": np.empty(0, dtype=np.int64)}  # fmt: skip
    rng = np.random.default_rng(0)
    users, found, targets = validation_candidates(pipeline, nvtabular_dir, spec, config, unavailable,
                                                  (users, relevant, seen), rng)  # fmt: skip
    blend = _BlendChoice(found, targets)
    grid = {pair: blend.ndcg(pair[0], pair[1], sources) for pair in itertools.product(retrieval, item_to_item)}
    everyone = np.arange(len(users))
    chosen: dict[str, Any] = {"validation_users": len(users), f"validation_ndcg_at_{CHOICE_K}": {
        f"{weight:g}/{i2i_weight:g}": float(values.mean()) for (weight, i2i_weight), values in grid.items()}}
    method = "grid" if not learn else config.blend
    if learn and config.blend == "choose":
        halves = np.array_split(rng.permutation(len(users)), 2)
        held_out: dict[str, list[float]] = {"grid": [], "learned": []}
        for fit_on, measured_on in (halves, halves[::-1]):
            best = _best_of_grid(grid, fit_on)
            held_out["grid"].append(float(grid[best][measured_on].mean()))
            weights = blend.fit(fit_on)
            held_out["learned"].append(float(blend.ndcg(weights["retrieval_weight"], weights["item_to_item_weight"],
                                                        weights["source_weights"])[measured_on].mean()))  # fmt: skip
        chosen[f"held_out_ndcg_at_{CHOICE_K}"] = {name: float(np.mean(values)) for name, values in held_out.items()}
        method = max(held_out, key=lambda name: np.mean(held_out[name]))  # the grid on a tie: listed first
    if method == "learned":
        weights = blend.fit(everyone)
        chosen |= weights
        chosen[f"learned_ndcg_at_{CHOICE_K}"] = float(blend.ndcg(weights["retrieval_weight"],
                                                                  weights["item_to_item_weight"],
                                                                  weights["source_weights"]).mean())  # fmt: skip
    else:
        weight, i2i_weight = _best_of_grid(grid, everyone)
        chosen |= {"retrieval_weight": weight, "item_to_item_weight": i2i_weight, "source_weights": sources}
    log.info("batch_score: blend weights chosen (%s) on %d validation users: %s", method, len(users),
             json.dumps({key: value for key, value in chosen.items() if key != f"validation_ndcg_at_{CHOICE_K}"}))
    return {"method": method, **chosen, "users": users}


def validation_targets(pipeline: RecommendationPipeline, nvtabular_dir: Path, spec: DatasetSpec
                       ) -> tuple[np.ndarray, dict[int, np.ndarray], dict[int, np.ndarray]]:  # fmt: skip
    """Validation users the run knows with positives (the primary target) not seen in train, each one's such
    positives, and every user's items seen in train (the spec's `exclude_seen`)."""
    valid = positives_by_user(nvtabular_dir, spec, ("valid",))
    seen = seen_items_by_user(nvtabular_dir, spec, ("train",))
    empty = np.empty(0, dtype=np.int64)
    relevant = {user: np.setdiff1d(items, seen.get(user, empty)) for user, items in valid.items()}
    users = np.array(sorted(user for user, items in relevant.items() if len(items)), dtype=np.int64)
    _, known = pipeline.user_features(users)
    return users[known], relevant, seen


def validation_candidates(pipeline: RecommendationPipeline, nvtabular_dir: Path, spec: DatasetSpec,
                          config: BatchScoreConfig, unavailable: np.ndarray,
                          targets: tuple[np.ndarray, dict[int, np.ndarray], dict[int, np.ndarray]],
                          rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray], list[np.ndarray]]:
    """A seeded sample of at most half of `validation_targets`' users (`config.validation_users` at most), their
    candidates as batch scoring retrieves, filters and scores them with train-only histories and exclusions, and
    their relevant items: what the blend is chosen on (benchmarks/final_order.py compares other orders on it)."""
    users, relevant, seen = targets
    empty = np.empty(0, dtype=np.int64)
    sample = np.sort(rng.choice(len(users), size=min(config.validation_users, len(users) // 2), replace=False))
    users = users[sample]
    features, _ = pipeline.user_features(users)
    train_histories = ItemsByUser.from_mapping(positives_by_user(nvtabular_dir, spec, ("train",)))
    found = pipeline.candidates(features, top_k=config.top_k, histories=train_histories.of_users(users),
                                excluded=[seen.get(int(user), empty) for user in users],
                                unavailable=unavailable)  # fmt: skip
    return users, found, [relevant[int(user)] for user in users]


class _BlendChoice:
    """The retrieved candidates of the users the blend is chosen on, and how each user's list scores."""

    def __init__(self, found: dict[str, np.ndarray], targets: list[np.ndarray]) -> None:
        self.found, self.targets = found, targets

    def ndcg(self, weight: float, item_to_item_weight: float, source_weights: Sequence[float]) -> np.ndarray:
        """NDCG@10 of each user's list ordered with these weights."""
        from recsys.ranking_metrics import user_list_metrics

        found = self.found
        scores = blend_scores(found["candidates"], found["ranker_scores"], found["retrieval_scores"], weight,
                              found["item_to_item_scores"], item_to_item_weight, sources=found["sources"],
                              source_weights=source_weights)  # fmt: skip
        top, *_ = order(found["candidates"], scores, CHOICE_K)
        return user_list_metrics(top, self.targets, CHOICE_K)[f"ndcg_at_{CHOICE_K}"]

    def fit(self, rows: np.ndarray) -> dict[str, Any]:
        """The weights `fit_blend_weights` learns from these users (row numbers)."""
        found = {name: values[rows] for name, values in self.found.items()}
        return fit_blend_weights(found["candidates"], found["ranker_scores"], found["retrieval_scores"],
                                 found["item_to_item_scores"], found["sources"], [self.targets[row] for row in rows])


def _best_of_grid(grid: dict[tuple[float, float], np.ndarray], rows: np.ndarray) -> tuple[float, float]:
    """The grid's weights with the best mean NDCG over these users; the first of equals (the old default first)."""
    return max(grid, key=lambda pair: float(grid[pair][rows].mean()))


@dataclasses.dataclass(frozen=True)
class _Scoring:
    """What scoring a user needs besides the user: the run's pipeline, each user's items to leave out, the
    unavailable items and the blend weights."""

    pipeline: RecommendationPipeline
    seen_items: dict[int, np.ndarray]  # encoded items by raw user id
    unavailable: np.ndarray  # bool by item code
    weights: dict[str, Any]


def _scoring(run_dir: Path, spec: DatasetSpec, config: BatchScoreConfig) -> tuple[_Scoring, set[int]]:
    """The run's pipeline and what it leaves out (blend weights not chosen yet: {}), and the unavailable raw ids."""
    run = RunLayout(run_dir)
    pipeline = RecommendationPipeline(PipelineArtifacts.of_run(run.root), spec)
    unavailable_raw = read_unavailable(config.unavailable_items, spec)
    unavailable = np.zeros(len(pipeline.item_raw_ids), dtype=bool)
    codes = pipeline.encode_items(sorted(unavailable_raw))
    unavailable[codes[codes >= 0]] = True
    return _Scoring(pipeline, seen_items_by_user(run.nvtabular, spec), unavailable, {}), unavailable_raw


def _score_users(scoring: _Scoring, users: np.ndarray, config: BatchScoreConfig, writer: PartitionWriter,
                 progress: Any = None) -> None:  # fmt: skip
    """The lists of `users`, in batches of `config.users_per_batch` from the first, written in their order."""
    pipeline, weights = scoring.pipeline, scoring.weights
    for start in range(0, len(users), config.users_per_batch):
        batch = users[start : start + config.users_per_batch]
        features, _ = pipeline.user_features(batch)
        excluded = [scoring.seen_items.get(int(user), np.empty(0, dtype=np.int64)) for user in batch]
        histories = pipeline.histories.of_users(batch) if pipeline.histories is not None else None
        result = pipeline.recommend(features, top_k=config.top_k, top_n=config.top_n, histories=histories,
                                    excluded=excluded, unavailable=scoring.unavailable,
                                    retrieval_weight=weights["retrieval_weight"],
                                    item_to_item_weight=weights["item_to_item_weight"],
                                    source_weights=weights["source_weights"])  # fmt: skip
        lists = _lists(pipeline.raw_items(result["items"]), result["scores"], result["click_probabilities"])
        writer.write(pa.table({"user_id": pa.array(batch), **lists}, schema=USER_SCHEMA))
        if progress is not None:
            progress.update(len(batch))


# A Dask worker's scoring state, loaded by its first shard of a run and kept for the next (one run at a time).
_WORKER_SCORING: dict[tuple[str, str], _Scoring] = {}


def _score_shard(run_dir: str, spec: DatasetSpec, config: BatchScoreConfig, weights: dict[str, Any],
                 users: np.ndarray, directory: str, shard: int) -> int:  # fmt: skip
    """A Dask task: score `users` with the run's models and write them as `<directory>/part-<shard>-*.parquet`."""
    key = (str(run_dir), repr(config))
    if key not in _WORKER_SCORING:
        _WORKER_SCORING.clear()
        _WORKER_SCORING[key] = _scoring(Path(run_dir), spec, config)[0]
    scoring = dataclasses.replace(_WORKER_SCORING[key], weights=weights)
    with PartitionWriter(Path(directory), USER_SCHEMA, stem=f"part-{shard:05d}") as writer:
        _score_users(scoring, users, config, writer)
    return len(users)


def _release_worker_scoring() -> None:
    _WORKER_SCORING.clear()


def _shards(users: np.ndarray, config: BatchScoreConfig, workers: int) -> list[np.ndarray]:
    """`users` cut into whole batches of `config.users_per_batch`, at least two shards a worker where there are
    enough batches and at most USERS_PER_SHARD users a shard: each batch holds the users one process's batch
    would, so the lists are the same."""
    batches = -(-len(users) // config.users_per_batch)
    shards = max(min(2 * workers, batches), -(-len(users) // USERS_PER_SHARD), 1)
    per_shard = -(-batches // shards) * config.users_per_batch
    return [users[start : start + per_shard] for start in range(0, len(users), per_shard)]


def batch_score(run_dir: Path, output_dir: Path, spec: DatasetSpec, config: BatchScoreConfig = BatchScoreConfig(),
                model_versions: dict[str, str] | None = None, dask_scheduler: str | None = None) -> dict:  # fmt: skip
    """Score every user of the run's feature table; write users/, segments/, similar/ and _metrics.json.

    `dask_scheduler` (`recsys.dask_cluster`; None: in this process): where the users are scored, in shards of whole
    batches, each Dask task loading the run's models once per worker and writing its own part files into the output
    folder, which must be storage every worker reaches (as the run folder). The weights, the generic and the
    similar lists are made here."""
    from tqdm import tqdm

    run = RunLayout(run_dir)
    scoring, unavailable_raw = _scoring(run.root, spec, config)
    pipeline, unavailable = scoring.pipeline, scoring.unavailable
    user_ids = pipeline.user_table.raw_user_ids
    weights = choose_blend_weights(pipeline, run.nvtabular, spec, config, unavailable)
    tuned_users = weights.pop("users")
    scoring = dataclasses.replace(scoring, weights=weights)

    dask = None
    with dask_execution(dask_scheduler) as client, atomic_output_dir(Path(output_dir)) as staging:
        started = time.perf_counter()
        if client is None:
            with PartitionWriter(staging / "users", USER_SCHEMA) as writer:
                progress = tqdm(total=len(user_ids), unit="user", desc="batch_score", mininterval=5)
                _score_users(scoring, user_ids, config, writer, progress)
                progress.close()
        else:
            (staging / "users").mkdir()
            shards = _shards(np.asarray(user_ids), config, len(client.scheduler_info()["workers"]))
            futures = [client.submit(_score_shard, str(run.root.resolve()), spec, config, weights, shard,
                                     str((staging / "users").resolve()), number, pure=False)
                       for number, shard in enumerate(shards)]  # fmt: skip
            scored = sum(client.gather(futures))
            client.run(_release_worker_scoring)  # long-lived workers do not keep the models until the next run
            if scored != len(user_ids):
                raise RuntimeError(f"the Dask tasks scored {scored} users of {len(user_ids)}")
            dask = {"scheduler": dask_scheduler, "shards": len(shards), "tasks_by_worker": tasks_by_worker(client)}
        user_seconds = time.perf_counter() - started

        segments = segment_lists(run.resplit, spec, config.top_n, unavailable_raw)
        with PartitionWriter(staging / "segments", SEGMENT_SCHEMA) as writer:
            writer.write(pa.Table.from_pandas(segments, schema=SEGMENT_SCHEMA, preserve_index=False))

        catalog = np.flatnonzero(pipeline.retrievable & ~unavailable)
        with PartitionWriter(staging / "similar", SIMILAR_SCHEMA) as writer:
            for start in range(0, len(catalog), 4096):
                block = catalog[start : start + 4096]
                neighbours, similarity = pipeline.similar_items(block, config.similar_n, unavailable=unavailable)
                lists = _lists(pipeline.raw_items(neighbours), similarity, np.full(similarity.shape, np.nan))
                writer.write(pa.table({"item_id": pa.array(pipeline.raw_items(block)), **lists},
                                      schema=SIMILAR_SCHEMA))  # fmt: skip
        metrics = {
            "users": len(user_ids),
            "segments": len(segments),
            "similar_items": len(catalog),
            "users_per_second": len(user_ids) / user_seconds if user_seconds else None,
            "seconds": time.perf_counter() - started,
            "config": {**dataclasses.asdict(config), "unavailable_items": str(config.unavailable_items or "")},
            # The weights the lists were ordered with (the Triton export takes the same): chosen or given.
            "blend": weights,
            "unavailable_items": len(unavailable_raw),
            "model_versions": model_versions or {},
        }
        if dask is not None:
            metrics["dask"] = dask
        np.save(staging / BLEND_USERS_FILE, tuned_users)
        (staging / "_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("batch_score: %d users at %.0f users/s, %d segments, %d similar lists", metrics["users"],
             metrics["users_per_second"] or 0, metrics["segments"], metrics["similar_items"])  # fmt: skip
    return metrics

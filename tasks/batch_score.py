"""Batch scoring of every known user (trainer environment), for the web tier's precomputed lookups.

For each user: the online pipeline's four stages (user tower, Faiss top-K, business-rule filter,
ranker, top-N by the ranker's probability blended with the retrieval's, `retrieval_weight`) in batches
of users. Also the generic lists of new visitors (popularity of positive
interactions per segment of the spec's `segment_features`, seed 000, plus one list over all
segments under the key "*") and the item-to-item similar lists for the "browsing now" case. Writes
Parquet under the run; `publish_recommendations` loads it into Redis atomically.

Business rules (configuration): items a user bought (the spec's `purchase_target`) are never
recommended to them again; items listed as unavailable are removed from every list.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from models.online_pipeline import DEFAULT_RETRIEVAL_WEIGHT, PipelineArtifacts, RecommendationPipeline
from recsys.outputs import atomic_output_dir
from recsys.parquet_io import PartitionWriter, nvtabular_part_files
from recsys.spec import DatasetSpec
from tasks.nvtabular_fit_transform import RAW_SUFFIX

log = logging.getLogger(__name__)

ALL_SEGMENTS = "*"  # the generic list of visitors whose segment is unknown
SEGMENT_SEPARATOR = ":"

LIST_TYPE = pa.list_(pa.int64())
SCORES_TYPE = pa.list_(pa.float32())
USER_SCHEMA = pa.schema([("user_id", pa.int64()), ("item_ids", LIST_TYPE), ("scores", SCORES_TYPE)])
SEGMENT_SCHEMA = pa.schema([("segment", pa.string()), ("item_ids", LIST_TYPE), ("scores", SCORES_TYPE)])
SIMILAR_SCHEMA = pa.schema([("item_id", pa.int64()), ("item_ids", LIST_TYPE), ("scores", SCORES_TYPE)])


@dataclasses.dataclass(frozen=True)
class BatchScoreConfig:
    top_k: int = 500  # retrieved candidates per user (the report's TopK)
    top_n: int = 100  # items kept per user after ranking
    similar_n: int = 50  # similar items kept per item
    users_per_batch: int = 512
    # Weight of the two-tower's P(item | user) in the final order next to the ranker's P(click | shown)
    # (models.online_pipeline.blend_scores); 0: the ranker alone. The published scores are the blend.
    retrieval_weight: float = DEFAULT_RETRIEVAL_WEIGHT
    # CSV with a column named like the spec's item id: items that must not be recommended.
    unavailable_items: Path | None = None

    def __post_init__(self) -> None:
        if self.retrieval_weight < 0:
            raise ValueError(f"retrieval_weight must not be negative, got {self.retrieval_weight}")


def segment_key(values: list[Any]) -> str:
    """The Redis key part of a segment: its context values joined, e.g. 'DE:mobile'."""
    return SEGMENT_SEPARATOR.join(str(value) for value in values)


def read_unavailable(path: Path | None, spec: DatasetSpec) -> set[int]:
    if path is None:
        return set()
    frame = pd.read_csv(path)
    if spec.item_id not in frame.columns:
        raise ValueError(f"{path}: unavailable items file needs a column '{spec.item_id}'")
    return {int(item) for item in frame[spec.item_id].dropna()}


def seen_items_by_user(nvtabular_dir: Path, spec: DatasetSpec) -> dict[int, np.ndarray]:
    """Encoded ids of the items never recommended again to each raw user id, from train and valid: the rows
    the spec's `exclude_seen` names (every interaction, or those positive in the given targets; by default
    the purchases)."""
    targets = spec.seen_targets
    if not spec.excludes_every_interaction and not targets:
        return {}
    columns = [spec.user_id + RAW_SUFFIX, spec.item_id, *targets]
    parts = [pd.read_parquet(path, columns=columns) for split in ("train", "valid")
             for path in nvtabular_part_files(Path(nvtabular_dir) / split)]  # fmt: skip
    seen = pd.concat(parts, ignore_index=True)
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
        key = ALL_SEGMENTS if values == (ALL_SEGMENTS,) else segment_key(list(values))
        rows.append({"segment": key, "item_ids": top.index.to_numpy(dtype=np.int64),
                     "scores": (top.to_numpy() / max(len(group), 1)).astype(np.float32)})  # fmt: skip
    return pd.DataFrame(rows)


def _lists(raw_items: np.ndarray, scores: np.ndarray) -> tuple[pa.Array, pa.Array]:
    """Row-wise lists without the MISSING padding."""
    keep = raw_items >= 0
    lengths = keep.sum(axis=1)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    items = pa.ListArray.from_arrays(offsets, pa.array(raw_items[keep], type=pa.int64()))
    values = pa.ListArray.from_arrays(offsets, pa.array(scores[keep].astype(np.float32), type=pa.float32()))
    return items, values


def batch_score(run_dir: Path, output_dir: Path, spec: DatasetSpec, config: BatchScoreConfig = BatchScoreConfig(),
                model_versions: dict[str, str] | None = None) -> dict:  # fmt: skip
    """Score every user of the run's feature table; write users/, segments/, similar/ and _metrics.json."""
    from tqdm import tqdm

    run = Path(run_dir)
    pipeline = RecommendationPipeline(PipelineArtifacts.of_run(run), spec)
    unavailable_raw = read_unavailable(config.unavailable_items, spec)
    unavailable = np.zeros(len(pipeline.item_raw_ids), dtype=bool)
    codes = pipeline.encode_items(sorted(unavailable_raw))
    unavailable[codes[codes >= 0]] = True
    seen_items = seen_items_by_user(run / "nvtabular", spec)
    user_ids = pipeline.users.index.to_numpy(dtype=np.int64)

    started = time.perf_counter()
    with atomic_output_dir(Path(output_dir)) as staging:
        with PartitionWriter(staging / "users", USER_SCHEMA) as writer:
            progress = tqdm(total=len(user_ids), unit="user", desc="batch_score", mininterval=5)
            for start in range(0, len(user_ids), config.users_per_batch):
                batch = user_ids[start : start + config.users_per_batch]
                features, _ = pipeline.user_features(batch)
                excluded = [seen_items.get(int(user), np.empty(0, dtype=np.int64)) for user in batch]
                result = pipeline.recommend(features, top_k=config.top_k, top_n=config.top_n,
                                           excluded=excluded, unavailable=unavailable,
                                           retrieval_weight=config.retrieval_weight)  # fmt: skip
                items, scores = _lists(pipeline.raw_items(result["items"]), result["scores"])
                writer.write(pa.table({"user_id": pa.array(batch), "item_ids": items, "scores": scores},
                                      schema=USER_SCHEMA))  # fmt: skip
                progress.update(len(batch))
            progress.close()
        user_seconds = time.perf_counter() - started

        segments = segment_lists(run / "resplit", spec, config.top_n, unavailable_raw)
        with PartitionWriter(staging / "segments", SEGMENT_SCHEMA) as writer:
            writer.write(pa.Table.from_pandas(segments, schema=SEGMENT_SCHEMA, preserve_index=False))

        catalog = np.flatnonzero(pipeline.retrievable & ~unavailable)
        with PartitionWriter(staging / "similar", SIMILAR_SCHEMA) as writer:
            for start in range(0, len(catalog), 4096):
                block = catalog[start : start + 4096]
                neighbours, similarity = pipeline.similar_items(block, config.similar_n, unavailable=unavailable)
                items, scores = _lists(pipeline.raw_items(neighbours), similarity)
                writer.write(pa.table({"item_id": pa.array(pipeline.raw_items(block)), "item_ids": items,
                                       "scores": scores}, schema=SIMILAR_SCHEMA))  # fmt: skip
        metrics = {
            "users": len(user_ids),
            "segments": len(segments),
            "similar_items": len(catalog),
            "users_per_second": len(user_ids) / user_seconds if user_seconds else None,
            "seconds": time.perf_counter() - started,
            "config": {**dataclasses.asdict(config), "unavailable_items": str(config.unavailable_items or "")},
            "unavailable_items": len(unavailable_raw),
            "model_versions": model_versions or {},
        }
        (staging / "_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("batch_score: %d users at %.0f users/s, %d segments, %d similar lists", metrics["users"],
             metrics["users_per_second"] or 0, metrics["segments"], metrics["similar_items"])  # fmt: skip
    return metrics


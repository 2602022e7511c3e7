"""What the gateway's demo page shows beside a user's recommendations (report 5.5, figures 5.6 and 5.7).

`demo_data` (trainer environment) takes the validation users with the most clicks and writes, per user,
the items they clicked in validation and the candidates the retrieval stage finds for them: the query
tower and the Faiss index of `models/online_pipeline.py`, the same calls batch scoring and Triton make,
before business rules and ranking (the page measures the retrieval stage's recall on them). The final
list is not written here: the page asks the gateway's own recommender for it, so it shows what a visitor
gets now (published list, availability, promotion, sampling).

    <output>/users/part-00000.parquet   user_id, impressions, clicked_item_ids, candidate_item_ids, candidate_scores
    <output>/_metrics.json              users, top_k, mean retrieval recall@top_k over them, the source run

Raw ids throughout, as the web tier knows them. The format and its reader (the gateway's) are in
`recsys/demo_format.py`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from recsys.demo_format import LIST_TYPE, METRICS_FILE, USER_SCHEMA, hits
from recsys.outputs import atomic_output_dir
from recsys.parquet_io import PartitionWriter, nvtabular_part_files
from recsys.spec import DatasetSpec
from tasks.nvtabular_fit_transform import RAW_SUFFIX

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class DemoDataConfig:
    top_k: int = 200  # retrieved candidates shown per user (the report's demo showed 200)
    max_users: int = 500  # the validation users with the most clicks; the page lists them all in one picker
    users_per_batch: int = 512


def validation_clicks(nvtabular_dir: Path, spec: DatasetSpec) -> pd.DataFrame:
    """Per raw user id of the validation split: its rows and the raw ids of the items it clicked (sorted)."""
    import pandas as pd

    user, item, target = spec.user_id + RAW_SUFFIX, spec.item_id + RAW_SUFFIX, spec.primary_target
    files = nvtabular_part_files(Path(nvtabular_dir) / "valid")
    if not files:
        raise FileNotFoundError(f"{Path(nvtabular_dir) / 'valid'}: no part files (the run's nvtabular output)")
    rows = pd.concat([pd.read_parquet(path, columns=[user, item, target]) for path in files], ignore_index=True)
    impressions = rows.groupby(user).size()
    positives = rows.loc[rows[target] == 1, [user, item]].drop_duplicates().sort_values([user, item])
    clicked = positives.groupby(user)[item].agg(list)
    frame = pd.DataFrame({"impressions": impressions.loc[clicked.index], "clicked_item_ids": clicked})
    frame.index = frame.index.astype(np.int64)
    return frame


def demo_data(run_dir: Path, output_dir: Path, spec: DatasetSpec, config: DemoDataConfig = DemoDataConfig()) -> dict:
    """Write the demo users' validation clicks and retrieved candidates; returns the step's metrics."""
    from models.online_pipeline import (
        USER_FEATURES_FILE,
        ItemCatalog,
        PipelineArtifacts,
        PipelineColumns,
        Tower,
        UserFeatureTable,
        search,
    )
    from models.retrieval_index import load_index

    if config.top_k < 1 or config.max_users < 1:
        raise ValueError(f"top_k and max_users must be positive, got {config.top_k} and {config.max_users}")
    artifacts = PipelineArtifacts.of_run(Path(run_dir))
    columns = PipelineColumns.of_run(artifacts, spec)
    user_table = UserFeatureTable.read(artifacts.nvtabular_dir / USER_FEATURES_FILE, columns)
    catalog = ItemCatalog.read(artifacts.nvtabular_dir / "item_features.parquet", columns)
    query_tower = Tower.query(artifacts.two_tower_dir / "query_tower", columns)
    index = load_index(artifacts.faiss_index_dir)

    clicks = validation_clicks(artifacts.nvtabular_dir, spec)
    clickers = len(clicks)
    clicks = clicks[clicks.index.isin(user_table.raw_user_ids)]  # retrieval needs the user's features
    counts = clicks["clicked_item_ids"].map(len)
    order = np.lexsort((clicks.index.to_numpy(), -counts.to_numpy()))  # most clicks first, then by id
    chosen = clicks.iloc[order[: config.max_users]]

    recalls: list[float] = []
    with atomic_output_dir(Path(output_dir)) as staging:
        with PartitionWriter(staging / "users", USER_SCHEMA) as writer:
            for start in range(0, len(chosen), config.users_per_batch):
                batch = chosen.iloc[start : start + config.users_per_batch]
                features, _ = user_table.lookup(batch.index.to_numpy(np.int64))
                found, distances = search(index, query_tower.embed(features), config.top_k)
                raw = catalog.raw(found)
                candidates = [row[row >= 0].tolist() for row in raw]  # Faiss pads a small catalog with -1
                scores = [row[ids >= 0].astype(np.float32).tolist() for row, ids in zip(distances, raw, strict=True)]
                for clicked, retrieved in zip(batch["clicked_item_ids"], candidates, strict=True):
                    recalls.append(hits(retrieved, frozenset(clicked)) / len(clicked))
                writer.write(pa.table({
                    "user_id": pa.array(batch.index.to_numpy(np.int64)),
                    "impressions": pa.array(batch["impressions"].to_numpy(np.int64)),
                    "clicked_item_ids": pa.array(list(batch["clicked_item_ids"]), LIST_TYPE),
                    "candidate_item_ids": pa.array(candidates, LIST_TYPE),
                    "candidate_scores": pa.array(scores, pa.list_(pa.float32())),
                }, schema=USER_SCHEMA))  # fmt: skip
        metrics = {
            "users": len(chosen),
            "validation_users_with_clicks": clickers,
            "top_k": config.top_k,
            f"mean_retrieval_recall_at_{config.top_k}": float(np.mean(recalls)) if recalls else None,
            "config": dataclasses.asdict(config),
            "run": str(Path(run_dir).resolve()),
        }
        (staging / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("demo_data: %d of %d validation users with clicks, mean retrieval recall@%d %.3f", len(chosen),
             clickers, config.top_k, metrics[f"mean_retrieval_recall_at_{config.top_k}"] or 0.0)  # fmt: skip
    return metrics

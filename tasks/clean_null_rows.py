"""Step 2 of the data stage: drop rows with more than N null features (N=5, report section 5.2).

A row's nulls are counted over the spec's features, except in the `gateway` split (the gateway's
extracted interactions, see tasks/extract_interactions.py): the extract can never fill the user-item
crosses, the position and some item features, so its rows are judged by the same threshold over the
features an extract does fill (`extracted_features(spec)`). A gateway row whose customer has no profile
attributes still misses the user features and is dropped.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from recsys.outputs import atomic_output_dir
from recsys.parquet_io import PartitionWriter, iter_batches, read_schema
from recsys.spec import DatasetSpec
from tasks.extract_interactions import GATEWAY_SPLIT, extracted_features

log = logging.getLogger(__name__)

DEFAULT_MAX_NULL_FEATURES = 5


def null_feature_counts(batch: pa.RecordBatch, features: tuple[str, ...]) -> pa.Array:
    counts = pa.array([0] * batch.num_rows, type=pa.int32())
    for feature in features:
        counts = pc.add(counts, pc.cast(pc.is_null(batch.column(feature)), pa.int32()))
    return counts


def counted_features(split: str, spec: DatasetSpec) -> tuple[str, ...]:
    """The features whose nulls count against a row of `split`."""
    return extracted_features(spec) if split == GATEWAY_SPLIT else spec.features


def clean_null_rows(input_dir: Path, output_dir: Path, spec: DatasetSpec,
                    max_null_features: int = DEFAULT_MAX_NULL_FEATURES) -> dict:  # fmt: skip
    """Copy each split of `input_dir`, keeping rows with at most `max_null_features` null features.

    Nulls are counted over `counted_features(split, spec)`: every feature, or in the `gateway` split the
    extracted ones only. Metrics: rows before and after per split (the gateway split's too, when there is
    one) and, with a gateway split, the features counted for it (`gateway_features`).
    """
    if max_null_features < 0:
        raise ValueError(f"max_null_features must be 0 or more, got {max_null_features}")
    splits = sorted(path.name for path in Path(input_dir).iterdir() if path.is_dir() and path.name != "quarantine")
    metrics: dict = {"max_null_features": max_null_features, "rows_before": {}, "rows_after": {}}
    if GATEWAY_SPLIT in splits:
        metrics["gateway_features"] = list(extracted_features(spec))
    with atomic_output_dir(Path(output_dir)) as staging:
        for split in splits:
            before = 0
            features = counted_features(split, spec)
            with PartitionWriter(staging / split, read_schema(Path(input_dir) / split)) as writer:
                for batch in iter_batches(Path(input_dir) / split):
                    before += batch.num_rows
                    keep = pc.less_equal(null_feature_counts(batch, features), max_null_features)
                    writer.write(batch.filter(keep))
            metrics["rows_before"][split] = before
            metrics["rows_after"][split] = writer.rows
            log.info("clean_null_rows %s: %d rows before, %d after (more than %d null features of %d dropped)",
                     split, before, writer.rows, max_null_features, len(features))  # fmt: skip
        (staging / "_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics

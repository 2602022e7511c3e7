"""Step 5 of the data stage (trainer environment): fit the NVTabular workflow on train, transform both splits.

The workflow is built from the dataset spec: Categorify every categorical column (with the spec's
frequency threshold and per-column caps for huge cardinalities; a multi-valued one token by token, padded to
its width), fill and normalize continuous ones, tag ids, user, item and context
features and targets the way Merlin Models selects inputs, fit on train only, and save it so that
batch scoring and the Triton ensemble reuse the very same transforms. It also writes the per-user and
per-item feature tables (encoded features, raw entity ids, event timestamps) that Feast serves.

This module imports NVTabular and runs only in the trainer environment (see README).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from recsys.dask_cluster import dask_execution, partitions_for, tasks_by_worker
from recsys.device import merlin_cpu
from recsys.outputs import atomic_output_dir
from recsys.parquet_io import nvtabular_part_files
from recsys.spec import DatasetSpec

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

RAW_SUFFIX = "_raw"  # raw id columns kept next to the encoded ones, for joins with the web tier's ids
RAW_ID_TAG = "raw_id"


def build_workflow(spec: DatasetSpec, categories_dir: Path):  # type: ignore[no-untyped-def]
    """The workflow; Categorify writes its category tables under `categories_dir` (default would be the cwd).

    Each feature group is tagged first, then every plain categorical column of every group goes through one
    Categorify (a per-column cap in its max_size dict) and every continuous column through one FillMedian and
    Normalize: NVTabular's fit reads the data once per statistics operator, so one operator per column read the
    training data once per column (25 times for AliCCP). Tags pass through the operators unchanged."""
    import nvtabular as nvt
    from merlin.schema import Tags
    from nvtabular import ops

    from models.nvtabular_ops import PaddedListSlice, SplitTokens

    groups = [  # (columns, the tags Merlin Models selects them by)
        ([spec.user_id], ops.TagAsUserID),
        ([spec.item_id], ops.TagAsItemID),
        (list(spec.user_features), ops.TagAsUserFeatures),
        (list(spec.item_features), ops.TagAsItemFeatures),
        (list(spec.user_item_features), lambda: ops.AddTags(["user_item"])),
        (list(spec.context_features), lambda: ops.AddTags([Tags.CONTEXT])),
    ]
    by_kind: dict[str, list] = {"categorical": [], "continuous": [], "multi_valued": []}  # (columns, tagged node)
    for columns, tag in groups:
        for kind, nodes in by_kind.items():
            chosen = [column for column in columns if spec.feature_kind(column) == kind]
            if kind == "multi_valued":
                nodes.extend(([column], [column] >> tag()) for column in chosen)
            elif chosen:
                nodes.append((chosen, chosen >> tag()))

    def combined(nodes: list):  # type: ignore[no-untyped-def]
        return sum((node for _, node in nodes[1:]), nodes[0][1])

    def categorify(nodes: list):  # type: ignore[no-untyped-def]
        caps = {column: spec.categorify.max_size.get(column, 0) for columns, _ in nodes for column in columns}
        return ops.Categorify(freq_threshold=spec.categorify.freq_threshold, max_size=caps,
                              out_path=str(categories_dir))  # fmt: skip

    encoded = []
    if by_kind["categorical"]:
        encoded.append(combined(by_kind["categorical"]) >> categorify(by_kind["categorical"]))
    if by_kind["continuous"]:  # the median for missing values, then zero mean and unit variance
        encoded.append(combined(by_kind["continuous"]) >> ops.FillMedian() >> ops.Normalize()
                       >> ops.LambdaOp(_as_float32, dtype="float32"))  # fmt: skip
    for columns, node in by_kind["multi_valued"]:  # token by token, padded to the column's width
        options = spec.multi_valued[columns[0]]
        tokens = node >> ops.LambdaOp(SplitTokens(options.separator))
        encoded.append(tokens >> categorify([(columns, tokens)]) >> PaddedListSlice(options.max_tokens))
    outputs = sum(encoded[1:], encoded[0])
    outputs += list(spec.targets) >> ops.AddTags([Tags.BINARY_CLASSIFICATION, Tags.TARGET])
    raw_ids = [spec.user_id, spec.item_id] >> ops.Rename(postfix=RAW_SUFFIX) >> ops.AddTags([RAW_ID_TAG])
    timestamp = [spec.timestamp] >> ops.AddTags(["time"])
    return nvt.Workflow(outputs + raw_ids + timestamp)


def _as_float32(column):  # type: ignore[no-untyped-def]
    return column.astype("float32")


def _latest_per_entity(frame: pd.DataFrame, entity: str, timestamp: str) -> pd.DataFrame:
    return frame.sort_values([entity, timestamp], kind="stable").groupby(entity, sort=True).tail(1)


def feature_tables(transformed_dirs: list[Path], spec: DatasetSpec) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """Latest encoded features per user and per item, with the entity's latest event time.

    Reads the transformed files one at a time and keeps only the running latest row per entity, so
    memory is bounded by the number of users and items, not by the number of rows. Serving needs
    every known user, so the validation split (the newest data) counts too.
    """
    import pandas as pd
    import pyarrow.parquet as pq

    tables = {
        "user": (spec.user_id + RAW_SUFFIX, spec.user_id, list(spec.user_features)),
        "item": (spec.item_id + RAW_SUFFIX, spec.item_id, list(spec.item_features)),
    }
    latest: dict[str, pd.DataFrame | None] = {"user": None, "item": None}
    rows = 0
    for path in [path for directory in transformed_dirs for path in nvtabular_part_files(directory)]:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1_000_000):
            frame = batch.to_pandas()
            rows += len(frame)
            for name, (raw, encoded, features) in tables.items():
                part = frame[[raw, encoded, *features, spec.timestamp]]
                previous = latest[name]
                combined = part if previous is None else pd.concat([previous, part], ignore_index=True)
                latest[name] = _latest_per_entity(combined, raw, spec.timestamp)
    # Every row of a snapshot carries the snapshot's time (the newest event it saw), not its entity's
    # own last event: a refitted workflow may give an old entity new codes, and Feast's Redis store only
    # overwrites a row whose event time is newer than the stored one (DESIGN.md), so each new snapshot
    # must be newer for every entity. A rerun on the same data has the same time and the same codes.
    snapshot = max(int(frame[spec.timestamp].max()) for frame in latest.values() if frame is not None and len(frame))
    results = []
    for name, (raw, encoded, _) in tables.items():
        table = latest[name].reset_index(drop=True)  # type: ignore[union-attr]
        table["last_event_timestamp"] = pd.to_datetime(table.pop(spec.timestamp), unit="s", utc=True)
        table["event_timestamp"] = pd.Timestamp(snapshot, unit="s", tz="UTC")
        results.append(table.rename(columns={raw: raw.removesuffix(RAW_SUFFIX), encoded: f"{encoded}_encoded"}))
    return results[0], results[1], rows


def null_encodings(spec: DatasetSpec) -> dict[str, int]:
    """The code Categorify gives a missing value, per categorical column.

    Serving fills ranker inputs it cannot know for a new (user, item) pair (user-item crosses, the
    position an item will be shown at) with this code, the one the model saw for nulls in training.
    """
    from nvtabular.ops.categorify import NULL_OFFSET

    return {name: NULL_OFFSET for name in spec.categorical_columns}


def nvtabular_fit_transform(input_dir: Path, output_dir: Path, spec: DatasetSpec, *,
                            dask_scheduler: str | None = None) -> dict:  # fmt: skip
    """Fit on `input_dir/train`, write workflow/, train/, valid/, user_features.parquet, item_features.parquet.

    `dask_scheduler`: where the fit and transforms run (`recsys.dask_cluster`; None: in this process)."""
    import nvtabular as nvt
    import pyarrow.parquet as pq

    source = Path(input_dir)
    # On the CPU unless cudf imports (recsys.device.merlin_cpu): NVTabular's GPU path is RAPIDS, in neither lock.
    cpu = merlin_cpu()
    with dask_execution(dask_scheduler) as client, atomic_output_dir(Path(output_dir)) as staging:
        executed_before = tasks_by_worker(client) if client is not None else {}
        train, valid = (partitions_for(nvt.Dataset(sorted(str(p) for p in (source / split).glob("part-*.parquet")),
                                                   engine="parquet", cpu=cpu), client)
                        for split in ("train", "valid"))  # fmt: skip
        # Category tables are fitted aside; save() copies them into workflow/ (NVTabular's default is ./categories).
        workflow = build_workflow(spec, staging / "_categories")
        workflow.fit(train)
        workflow.save(str(staging / "workflow"))
        shutil.rmtree(staging / "_categories")
        # shuffle=None keeps row order, so a rerun on the same input writes the same files.
        workflow.transform(train).to_parquet(str(staging / "train"), shuffle=None, out_files_per_proc=None)
        workflow.transform(valid).to_parquet(str(staging / "valid"), shuffle=None, out_files_per_proc=None)
        dask = None
        if client is not None:  # what each worker ran of this step
            executed = tasks_by_worker(client)
            dask = {"scheduler": dask_scheduler, "tasks_by_worker": {
                worker: count - executed_before.get(worker, 0) for worker, count in executed.items()}}
        users, items, _ = feature_tables([staging / "train", staging / "valid"], spec)
        train_rows = sum(pq.ParquetFile(path).metadata.num_rows for path in nvtabular_part_files(staging / "train"))
        users.to_parquet(staging / "user_features.parquet", index=False)
        items.to_parquet(staging / "item_features.parquet", index=False)
        cardinalities = {
            column.name: int(column.int_domain.max) + 1
            for column in workflow.output_schema
            if column.name in spec.categorical_columns and column.int_domain is not None
            and column.int_domain.max is not None
        }
        metrics = {
            "train_rows": train_rows,
            "users": len(users),
            "items": len(items),
            "cardinalities": cardinalities,
            "output_columns": list(workflow.output_schema.column_names),
            "null_encodings": null_encodings(spec),
        }
        if dask is not None:
            metrics["dask"] = dask
        (staging / "_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("nvtabular_fit_transform: %d train rows, %d users, %d items", metrics["train_rows"], metrics["users"],
             metrics["items"])  # fmt: skip
    return metrics

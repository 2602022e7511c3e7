"""Step 3 of the data stage: move a share of the test rows into train (60% in the report, section 5.2).

AliCCP ships a 1:1 train/test split; moving 60% of test into train gives about 80:20. Which rows
move is decided by hashing each test row's position with a seed, so a rerun moves the same rows.
The remaining test rows become the validation split used by training and evaluation.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa

from recsys.outputs import atomic_output_dir
from recsys.parquet_io import PartitionWriter, iter_batches, read_schema
from recsys.sampling import row_fraction_mask
from recsys.spec import DatasetSpec

log = logging.getLogger(__name__)

DEFAULT_FRACTION = 0.6
RESPLIT_SALT = 0x7E57


def rows_table(original: dict[str, int], cleaned: dict[str, int], resplit: dict[str, int]) -> str:
    """The report's Table 5.2 (rows before and after preprocessing) as a Markdown table."""
    lines = [
        "| Data Set | Original Rows | Data After Cleaning | Data After Resplitting |",
        "|---|---:|---:|---:|",
        f"| Train | {original['train']:,} | {cleaned['train']:,} | {resplit['train']:,} |",
        f"| Test (valid) | {original['test']:,} | {cleaned['test']:,} | {resplit['valid']:,} |",
    ]
    return "\n".join(lines)


def resplit(input_dir: Path, output_dir: Path, spec: DatasetSpec, fraction: float = DEFAULT_FRACTION,
            seed: int = 0) -> dict:  # fmt: skip
    """Write `train` (all train rows plus the moved test rows) and `valid` (the other test rows)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"resplit fraction must be between 0 and 1, got {fraction}")
    source = Path(input_dir)
    schema = read_schema(source / "train")
    with atomic_output_dir(Path(output_dir)) as staging:
        with PartitionWriter(staging / "train", schema) as train, PartitionWriter(staging / "valid", schema) as valid:
            for batch in iter_batches(source / "train"):
                train.write(batch)
            position = 0
            for batch in iter_batches(source / "test"):
                move = row_fraction_mask(position, batch.num_rows, fraction, RESPLIT_SALT ^ seed)
                train.write(batch.filter(pa.array(move)))
                valid.write(batch.filter(pa.array(~move)))
                position += batch.num_rows
        counts = {"train": train.rows, "valid": valid.rows}
        metrics: dict = {"fraction": fraction, "seed": seed, "rows": counts}
        cleaning = _previous_metrics(source)
        if cleaning:
            metrics["table"] = rows_table(cleaning["original"], cleaning["cleaned"], counts)
            (staging / "rows_table.md").write_text(metrics["table"] + "\n")
            log.info("rows before and after preprocessing (report Table 5.2):\n%s", metrics["table"])
        (staging / "_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("resplit: moved %.0f%% of test into train: %d train rows, %d valid rows",
             fraction * 100, counts["train"], counts["valid"])  # fmt: skip
    return metrics


def _previous_metrics(clean_dir: Path) -> dict | None:
    path = clean_dir / "_metrics.json"
    if not path.exists():
        return None
    cleaning = json.loads(path.read_text())
    if not {"train", "test"} <= set(cleaning.get("rows_before", {})):
        return None
    return {"original": cleaning["rows_before"], "cleaned": cleaning["rows_after"]}

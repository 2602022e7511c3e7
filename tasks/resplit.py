"""Step 3 of the data stage: move a share of the test rows into train (60% in the report, section 5.2).

AliCCP ships a 1:1 train/test split; moving 60% of test into train gives about 80:20. Which rows
move is decided by hashing each test row's position with a seed, so a rerun moves the same rows.
The remaining test rows become the validation split used by training and evaluation.

Rows of the gateway's extracts (the `gateway` split of clean_null_rows, see
tasks/extract_interactions.py) all go to train: they are newer events the models should learn from,
while validation stays the held-out test rows, so that its metrics remain comparable night to night.
They are spread through train's part files in proportion to its own rows, never in files of their own:
NVTabular 23.08's Categorify cannot encode a partition (a part file) in which a column has no value at
all (`df[column].dropna().iloc[0]` in `_encode`), and the crosses and position of gateway rows are always
null. Where they went is in the metrics (`gateway_rows_in_train`: file -> row ranges), which validation
reads to hold those rows to the features an extract fills (tasks/validate.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from recsys.outputs import atomic_output_dir
from recsys.parquet_io import PartitionWriter, count_rows, iter_batches, read_schema
from recsys.sampling import row_fraction_mask
from recsys.spec import DatasetSpec
from tasks.extract_interactions import GATEWAY_SPLIT

log = logging.getLogger(__name__)

DEFAULT_FRACTION = 0.6
RESPLIT_SALT = 0x7E57
METRICS_FILE = "_metrics.json"


def gateway_row_ranges(resplit_dir: Path) -> dict[str, list[tuple[int, int]]]:
    """Which rows of each train part file of a resplit output came from the gateway: file -> [(start, stop)]."""
    path = Path(resplit_dir) / METRICS_FILE
    if not path.exists():
        return {}
    placed = json.loads(path.read_text()).get("gateway_rows_in_train", {})
    return {name: [(int(start), int(stop)) for start, stop in ranges] for name, ranges in placed.items()}


def rows_table(original: dict[str, int], cleaned: dict[str, int], resplit: dict[str, int]) -> str:
    """The report's Table 5.2 (rows before and after preprocessing) as a Markdown table.

    With a gateway split, one more line: its rows, all of which resplitting adds to Train (counted there too).
    """
    lines = [
        "| Data Set | Original Rows | Data After Cleaning | Data After Resplitting |",
        "|---|---:|---:|---:|",
        f"| Train | {original['train']:,} | {cleaned['train']:,} | {resplit['train']:,} |",
        f"| Test (valid) | {original['test']:,} | {cleaned['test']:,} | {resplit['valid']:,} |",
    ]
    if GATEWAY_SPLIT in original:
        lines.append(f"| Gateway interactions (into Train) | {original[GATEWAY_SPLIT]:,} | {cleaned[GATEWAY_SPLIT]:,} "
                     f"| {cleaned[GATEWAY_SPLIT]:,} |")  # fmt: skip
    return "\n".join(lines)


def resplit(input_dir: Path, output_dir: Path, spec: DatasetSpec, fraction: float = DEFAULT_FRACTION,
            seed: int = 0) -> dict:  # fmt: skip
    """Write `train` (all train rows, the moved test rows, all gateway rows) and `valid` (the other test rows).

    Metrics: the fraction, the seed, rows per output split, with a gateway split the number of its rows
    added to train (`gateway_rows_added_to_train`) and where they are (`gateway_rows_in_train`, see
    `gateway_row_ranges`), and Table 5.2 when `input_dir` is a clean_null_rows output.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"resplit fraction must be between 0 and 1, got {fraction}")
    source = Path(input_dir)
    schema = read_schema(source / "train")
    gateway = _GatewayRows(source / GATEWAY_SPLIT, schema, count_rows(source / "train"))
    with atomic_output_dir(Path(output_dir)) as staging:
        with PartitionWriter(staging / "train", schema) as train, PartitionWriter(staging / "valid", schema) as valid:
            for batch in iter_batches(source / "train"):
                gateway.write_with(batch, train)
            position = 0
            for batch in iter_batches(source / "test"):
                move = row_fraction_mask(position, batch.num_rows, fraction, RESPLIT_SALT ^ seed)
                train.write(batch.filter(pa.array(move)))
                valid.write(batch.filter(pa.array(~move)))
                position += batch.num_rows
            gateway.write_rest(train)  # a train split without rows: after the moved test rows
        counts = {"train": train.rows, "valid": valid.rows}
        metrics: dict = {"fraction": fraction, "seed": seed, "rows": counts}
        if gateway.present:
            metrics["gateway_rows_added_to_train"] = gateway.written
            metrics["gateway_rows_in_train"] = gateway.placements
        cleaning = _previous_metrics(source)
        if cleaning:
            metrics["table"] = rows_table(cleaning["original"], cleaning["cleaned"], counts)
            (staging / "rows_table.md").write_text(metrics["table"] + "\n")
            log.info("rows before and after preprocessing (report Table 5.2):\n%s", metrics["table"])
        (staging / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("resplit: moved %.0f%% of test and %d gateway rows into train: %d train rows, %d valid rows",
             fraction * 100, gateway.written, counts["train"], counts["valid"])  # fmt: skip
    return metrics


class _GatewayRows:
    """The gateway split's rows, written into train between its own rows, in the same proportion throughout."""

    def __init__(self, directory: Path, schema: pa.Schema, train_rows: int) -> None:
        self.present = directory.is_dir()
        self.total = count_rows(directory) if self.present else 0
        if self.total and not read_schema(directory).equals(schema, check_metadata=False):
            raise ValueError(f"{directory}: its schema differs from the train split's:\n{read_schema(directory)}")
        self.train_rows = train_rows
        self.train_written = self.written = 0
        self.placements: dict[str, list[list[int]]] = {}
        self._batches: Iterator[pa.RecordBatch] = iter_batches(directory) if self.total else iter(())
        self._pending: pa.RecordBatch | None = None

    def write_with(self, batch: pa.RecordBatch, writer: PartitionWriter) -> None:
        """Write a batch of train rows, each slice of it followed by the gateway rows due by then."""
        if not self.total:
            writer.write(batch)
            return
        # Slices small enough that the gateway rows after one fill at most half a part file: every file
        # holds train rows too, however many more gateway rows than train rows there are.
        step = max(1, writer.rows_per_file * self.train_rows // (2 * self.total))
        for offset in range(0, batch.num_rows, step):
            piece = batch.slice(offset, step)
            writer.write(piece)
            self.train_written += piece.num_rows
            self._write(self.total * self.train_written // self.train_rows - self.written, writer)

    def write_rest(self, writer: PartitionWriter) -> None:
        self._write(self.total - self.written, writer)

    def _write(self, rows: int, writer: PartitionWriter) -> None:
        while rows > 0:
            batch = self._pending if self._pending is not None else next(self._batches)
            piece, rest = batch.slice(0, rows), batch.slice(rows)
            self._pending = rest if rest.num_rows else None
            for name, start, stop in writer.write(piece):
                ranges = self.placements.setdefault(name, [])
                if ranges and ranges[-1][1] == start:
                    ranges[-1][1] = stop
                else:
                    ranges.append([start, stop])
            self.written += piece.num_rows
            rows -= piece.num_rows


def _previous_metrics(clean_dir: Path) -> dict | None:
    path = clean_dir / METRICS_FILE
    if not path.exists():
        return None
    cleaning = json.loads(path.read_text())
    if not {"train", "test"} <= set(cleaning.get("rows_before", {})):
        return None
    return {"original": cleaning["rows_before"], "cleaned": cleaning["rows_after"]}

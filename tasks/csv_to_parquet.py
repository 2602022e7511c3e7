"""Step 1 of the data stage: raw CSV files (and the gateway's extracts) to typed, partitioned Parquet.

Each split of the spec (`train`, `test`) is read from its CSV files. When the input folder also holds
the gateway's daily extracts (`interactions/day=YYYY-MM-DD/*.parquet`, written by
`tasks/extract_interactions.py`), they become one more split, `gateway`, with the same Arrow schema:
every file must have the spec's columns in types that cast to the spec's without loss, or the step fails
naming the file and the column. All days there are read, oldest first, and `sample_fraction` keeps the
same share of them as of the CSV rows. Without an `interactions/` folder there is no `gateway` split.

The fast path is pyarrow's streaming CSV reader with the spec's column types (bounded memory, one
block at a time). pyarrow stops at the first malformed row without saying which line it was on, so
when it fails the file is read again on a careful path (Python's csv module, which knows line numbers):
malformed rows go to a quarantine file with their line, column and reason, and the step fails only
when they exceed `max_bad_row_fraction` of the file. Output appears atomically or not at all.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import json
import logging
import re
from collections.abc import Collection, Iterator
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from recsys.errors import InputDataError
from recsys.outputs import atomic_output_dir
from recsys.parquet_io import READ_BATCH_ROWS, ROWS_PER_FILE, PartitionWriter, directory_bytes
from recsys.sampling import row_fraction_mask
from recsys.spec import DatasetSpec
from tasks.extract_interactions import GATEWAY_SPLIT, INTERACTIONS_FOLDER

log = logging.getLogger(__name__)

SNIFF_BYTES = 64 * 1024
CAREFUL_CHUNK_ROWS = 50_000
_INTEGER = re.compile(r"^\s*[+-]?\d+\s*$")
_FLOAT = re.compile(r"^\s*([+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(nan|inf|infinity))\s*$", re.IGNORECASE)
SAMPLE_SALT = 0x5A3F


@dataclasses.dataclass(frozen=True)
class CsvToParquetConfig:
    max_bad_row_fraction: float = 0.001  # above this share of malformed rows in a file, the step fails
    sample_fraction: float = 1.0  # keep this share of rows (deterministic), for quick runs
    rows_per_file: int = ROWS_PER_FILE
    block_size: int = 16 << 20  # bytes pyarrow parses at a time


@dataclasses.dataclass
class BadRow:
    line: int
    column: str
    reason: str
    text: str

    def describe(self, path: Path) -> str:
        where = f"{path.name} line {self.line}" + (f", column {self.column}" if self.column else "")
        return f"{where}: {self.reason}"


class _FastPathFailed(Exception):
    pass


def input_files(input_dir: Path, spec: DatasetSpec) -> dict[str, list[Path]]:
    files = {split: sorted(Path(input_dir).glob(pattern)) for split, pattern in spec.splits.items()}
    missing = [f"{split} ({spec.splits[split]})" for split, paths in files.items() if not paths]
    if missing:
        raise InputDataError(f"{input_dir}: no CSV files for split {', '.join(missing)}")
    return files


def check_header(path: Path, spec: DatasetSpec) -> list[str]:
    """Refuse files that are empty, binary or lack spec columns; return the header."""
    if path.stat().st_size == 0:
        raise InputDataError(f"{path}: the file is empty (expected a CSV header line)")
    with path.open("rb") as handle:
        sample = handle.read(SNIFF_BYTES)
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(sample, final=False)
    except UnicodeDecodeError as error:
        raise InputDataError(f"{path}: not a CSV text file (byte {error.start} is not UTF-8)") from error
    if "\x00" in text:
        raise InputDataError(f"{path}: not a CSV text file (it contains NUL bytes)")
    header = next(csv.reader(text.splitlines()[:1]), [])
    if not header or header == [""]:
        raise InputDataError(f"{path} line 1: the header line is empty")
    missing = [column for column in spec.columns if column not in header]
    if missing:
        raise InputDataError(
            f"{path} line 1: missing column(s) {', '.join(missing)} required by spec {spec.source}; "
            f"header has {', '.join(header[:40])}"
        )
    duplicated = sorted({column for column in header if header.count(column) > 1})
    if duplicated:
        raise InputDataError(f"{path} line 1: duplicated column(s) {', '.join(duplicated)}")
    return header


def _arrow_schema(spec: DatasetSpec) -> pa.Schema:
    return pa.schema([(name, pa.type_for_alias(type_name)) for name, type_name in spec.columns.items()])


def extract_files(input_dir: Path) -> dict[str, list[Path]] | None:
    """The gateway's extracts under `input_dir/interactions/`, by day (oldest first); None without that folder."""
    root = Path(input_dir) / INTERACTIONS_FOLDER
    if not root.is_dir():
        return None
    days: dict[str, list[Path]] = {}
    for folder in sorted(path for path in root.glob("day=*") if path.is_dir()):
        day = folder.name.removeprefix("day=")
        try:
            date.fromisoformat(day)
        except ValueError as error:
            raise InputDataError(f"{folder}: not a day folder of the gateway's extracts (day=YYYY-MM-DD)") from error
        # Hidden files are an extract's staging file, not yet renamed into place.
        files = sorted(path for path in folder.glob("*.parquet") if not path.name.startswith("."))
        if files:
            days[day] = files
    return days


def _casts_safely(source: pa.DataType, target: pa.DataType) -> bool:
    """Whether every value of type `source` has the same value in `target` (int32 -> int64: yes; int64 -> int32: no)."""
    if source == target or pa.types.is_null(source):  # an all-null column has the null type
        return True
    if pa.types.is_dictionary(source):
        return _casts_safely(source.value_type, target)
    if pa.types.is_string(target):
        return pa.types.is_string(source) or pa.types.is_large_string(source)
    if pa.types.is_boolean(source):
        return pa.types.is_integer(target) or pa.types.is_floating(target)
    if pa.types.is_integer(source) and pa.types.is_integer(target):
        wide, narrow = np.iinfo(target.to_pandas_dtype()), np.iinfo(source.to_pandas_dtype())
        return bool(wide.min <= narrow.min and narrow.max <= wide.max)
    if pa.types.is_floating(target):
        if pa.types.is_floating(source):
            return bool(source.bit_width <= target.bit_width)
        mantissa_bits = np.finfo(target.to_pandas_dtype()).nmant + 1
        return pa.types.is_integer(source) and source.bit_width < mantissa_bits
    return False


def check_extract_schema(path: Path, spec: DatasetSpec) -> None:
    """Refuse an extract that is not Parquet, lacks a spec column or has one that cannot be cast safely."""
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as error:
        raise InputDataError(f"{path}: not a readable Parquet file ({error})") from error
    for column, type_name in spec.columns.items():
        found = schema.get_all_field_indices(column)
        if not found:
            raise InputDataError(f"{path}: column {column} is missing (required by spec {spec.source})")
        if len(found) > 1:
            raise InputDataError(f"{path}: column {column} appears {len(found)} times")
        actual = schema.field(found[0]).type
        if not _casts_safely(actual, pa.type_for_alias(type_name)):
            raise InputDataError(
                f"{path}: column {column} is {actual}, which does not cast safely to {type_name} (spec {spec.source})"
            )


def _extract_batches(path: Path, spec: DatasetSpec) -> Iterator[pa.RecordBatch]:
    """The file's rows in the spec's columns, order and types (extra columns are left out)."""
    schema = _arrow_schema(spec)
    for batch in pq.ParquetFile(path).iter_batches(batch_size=READ_BATCH_ROWS, columns=list(spec.columns)):
        arrays = [batch.column(name).cast(schema.field(name).type, safe=True) for name in spec.columns]
        yield pa.RecordBatch.from_arrays(arrays, schema=schema)


def _convert_extracts(days: dict[str, list[Path]], input_dir: Path, spec: DatasetSpec, config: CsvToParquetConfig,
                      out_dir: Path, forgotten: _Forgotten) -> list[dict]:  # fmt: skip
    """Write the extracts, oldest day first, as the `gateway` split."""
    results = []
    seen = 0
    with PartitionWriter(out_dir / GATEWAY_SPLIT, _arrow_schema(spec), config.rows_per_file) as writer:
        for path in [path for paths in days.values() for path in paths]:
            rows_before = writer.rows
            read = 0
            forgotten_rows = 0
            for batch in _extract_batches(path, spec):
                # Sampled as the CSV rows are: a quick run stays a small copy of the full one, the gateway rows
                # keeping their share of train (unsampled, they would weigh 1/sample_fraction times more).
                rows, dropped = _write_sampled(batch, writer, seen + read, config, forgotten)
                read += rows
                forgotten_rows += dropped
            seen += read
            results.append({
                "split": GATEWAY_SPLIT, "file": path.relative_to(Path(input_dir) / INTERACTIONS_FOLDER).as_posix(),
                "bytes_in": path.stat().st_size, "rows_in": read, "rows_out": writer.rows - rows_before,
                "rows_quarantined": 0, "rows_forgotten": forgotten_rows,
            })  # fmt: skip
    return results


def _fast_batches(path: Path, spec: DatasetSpec, config: CsvToParquetConfig) -> Iterator[pa.RecordBatch]:
    schema = _arrow_schema(spec)
    try:
        reader = pa_csv.open_csv(
            path,
            read_options=pa_csv.ReadOptions(block_size=config.block_size),
            convert_options=pa_csv.ConvertOptions(
                column_types=schema,
                include_columns=list(spec.columns),
                strings_can_be_null=True,
                quoted_strings_can_be_null=True,
            ),
        )
        yield from reader
    except pa.ArrowInvalid as error:
        raise _FastPathFailed(str(error)) from error


def _bad_values(values: pa.Array, type_name: str) -> np.ndarray:
    """Mask of non-empty strings that do not parse as `type_name` (including integers out of range)."""
    if type_name == "string":
        return np.zeros(len(values), dtype=bool)
    trimmed = pc.utf8_trim_whitespace(values)
    present = pc.fill_null(pc.not_equal(trimmed, ""), False)
    pattern = _INTEGER.pattern if type_name.startswith("int") else _FLOAT.pattern
    parses = pc.fill_null(pc.match_substring_regex(trimmed, pattern, ignore_case=True), False)
    bad = pc.and_(present, pc.invert(parses))
    if type_name.startswith("int"):
        bad = pc.or_(bad, _out_of_range(pc.if_else(pc.or_(bad, pc.invert(present)), "0", trimmed), type_name))
    return bad.to_numpy(zero_copy_only=False)


def _out_of_range(digits: pa.Array, type_name: str) -> pa.Array:
    """Which integer strings do not fit `type_name`; vectorized unless some overflow int64 itself."""
    info = np.iinfo(np.dtype(type_name))
    try:
        numbers = pc.cast(digits, pa.int64())
    except pa.ArrowInvalid:  # more digits than int64 holds: rare, so the slow exact check is fine
        return pa.array([not info.min <= int(text) <= info.max for text in digits.to_pylist()])
    return pc.or_(pc.less(numbers, info.min), pc.greater(numbers, info.max))


def _careful_batches(path: Path, header: list[str], spec: DatasetSpec, bad_rows: list[BadRow]
                     ) -> Iterator[pa.RecordBatch]:  # fmt: skip
    """Parse with line numbers; append malformed rows to `bad_rows` and yield the good ones."""
    schema = _arrow_schema(spec)
    positions = [header.index(column) for column in spec.columns]
    width = len(header)
    with path.open(newline="", encoding="utf-8", errors="replace") as handle:
        reader = csv.reader(handle)
        next(reader)
        while True:
            lines: list[int] = []
            texts: list[list[str]] = []
            start_line = reader.line_num + 1
            for row in reader:
                if len(row) != width:
                    bad_rows.append(BadRow(start_line, "", f"expected {width} fields, found {len(row)}", ",".join(row)))
                else:
                    lines.append(start_line)
                    texts.append(row)
                start_line = reader.line_num + 1
                if len(texts) >= CAREFUL_CHUNK_ROWS:
                    break
            if not texts:
                return
            keep = np.ones(len(texts), dtype=bool)
            columns: list[pa.Array] = []
            for column, position in zip(spec.columns, positions, strict=True):
                values = pa.array([row[position] for row in texts], type=pa.string())
                bad = _bad_values(values, spec.columns[column]) & keep
                for index in np.flatnonzero(bad):
                    reason = f"{texts[index][position]!r} is not {spec.columns[column]}"
                    bad_rows.append(BadRow(lines[index], column, reason, ",".join(texts[index])))
                keep &= ~bad
                columns.append(values)
            mask = pa.array(keep)
            arrays = []
            for column, values in zip(spec.columns, columns, strict=True):
                values = pc.filter(values, mask)
                if spec.columns[column] != "string":
                    values = pc.utf8_trim_whitespace(values)
                # Empty fields are nulls, as on the fast path.
                values = pc.if_else(pc.equal(values, ""), pa.scalar(None, pa.string()), values)
                arrays.append(values.cast(pa.type_for_alias(spec.columns[column])))
            yield pa.RecordBatch.from_arrays(arrays, schema=schema)


def _write_quarantine(path: Path, bad_rows: list[BadRow]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["line", "column", "reason", "row"])
        for bad in sorted(bad_rows, key=lambda row: row.line):
            writer.writerow([bad.line, bad.column, bad.reason, bad.text])


@dataclasses.dataclass(frozen=True)
class _Forgotten:
    """The users whose rows every input loses (customers forgotten on request, serving/forget.py)."""

    user_id: str
    ids: pa.Array

    def rows(self, batch: pa.RecordBatch) -> np.ndarray | None:
        """A mask of the batch's rows of forgotten users; None when it has none."""
        if not len(self.ids):
            return None
        mask = pc.is_in(batch.column(self.user_id), value_set=self.ids).to_numpy(zero_copy_only=False)
        return mask if mask.any() else None


def _write_sampled(batch: pa.RecordBatch, writer: PartitionWriter, first_row: int, config: CsvToParquetConfig,
                   forgotten: _Forgotten) -> tuple[int, int]:  # fmt: skip
    """Write the batch's sampled rows but the forgotten users'; return (rows read, forgotten users' rows)."""
    # The sample is drawn by row position before forgotten rows drop out: the other rows' draws do not move.
    keep = (row_fraction_mask(first_row, batch.num_rows, config.sample_fraction, SAMPLE_SALT)
            if config.sample_fraction < 1.0 else None)  # fmt: skip
    dropped = forgotten.rows(batch)
    if dropped is not None:
        keep = ~dropped if keep is None else keep & ~dropped
    writer.write(batch if keep is None else batch.filter(pa.array(keep)))
    return batch.num_rows, 0 if dropped is None else int(dropped.sum())


def _convert_split(files: list[Path], headers: dict[Path, list[str]], split: str, spec: DatasetSpec,
                   config: CsvToParquetConfig, out_dir: Path, careful: bool, forgotten: _Forgotten
                   ) -> list[dict]:  # fmt: skip
    """Write one split's partition; the careful path quarantines bad rows instead of failing fast."""
    results = []
    seen = 0
    with PartitionWriter(out_dir / split, _arrow_schema(spec), config.rows_per_file) as writer:
        for path in files:
            header = headers[path]
            rows_before = writer.rows
            bad_rows: list[BadRow] = []
            read = forgotten_rows = 0
            batches = _careful_batches(path, header, spec, bad_rows) if careful else _fast_batches(path, spec, config)
            for batch in batches:
                rows, dropped = _write_sampled(batch, writer, seen + read, config, forgotten)
                read += rows
                forgotten_rows += dropped
            total = read + len(bad_rows)
            if bad_rows:
                _check_bad_rows(path, bad_rows, total, config)
                quarantine = out_dir / "quarantine" / f"{split}-{path.stem}.csv"
                quarantine.parent.mkdir(exist_ok=True)
                _write_quarantine(quarantine, bad_rows)
                log.warning("%s: %d malformed row(s) quarantined in %s", path, len(bad_rows), quarantine.name)
            seen += read
            results.append({
                "split": split, "file": path.name, "bytes_in": path.stat().st_size, "rows_in": total,
                "rows_out": writer.rows - rows_before, "rows_quarantined": len(bad_rows),
                "rows_forgotten": forgotten_rows,
            })  # fmt: skip
    return results


def _check_bad_rows(path: Path, bad_rows: list[BadRow], total: int, config: CsvToParquetConfig) -> None:
    if len(bad_rows) > config.max_bad_row_fraction * max(total, 1):
        examples = "; ".join(bad.describe(path) for bad in sorted(bad_rows, key=lambda row: row.line)[:5])
        raise InputDataError(
            f"{path}: {len(bad_rows)} of {total} rows are malformed, more than the allowed "
            f"{config.max_bad_row_fraction:.2%}; first ones: {examples}"
        )


def csv_to_parquet(input_dir: Path, output_dir: Path, spec: DatasetSpec,
                   config: CsvToParquetConfig = CsvToParquetConfig(), *,
                   forgotten_users: Collection[int] = ()) -> dict:  # fmt: skip
    """Convert every split's CSV files under `input_dir` to `output_dir/<split>/part-*.parquet`.

    The gateway's extracts under `input_dir/interactions/day=*/` (if that folder exists) become
    `output_dir/gateway/part-*.parquet`. The rows of `forgotten_users` (customers forgotten on request, the
    gateway database's tombstones) are dropped from every input. Metrics: rows and bytes per file and in all,
    rows per split, the forgotten users' rows dropped, and, with extracts, the days read (`gateway_days`).
    """
    id_type = pa.type_for_alias(spec.columns[spec.user_id])
    forgotten = _Forgotten(spec.user_id, pa.array(sorted(set(forgotten_users)), type=id_type))
    files = input_files(input_dir, spec)
    extracts = extract_files(input_dir)
    # Refuse bad files before any work.
    headers = {path: check_header(path, spec) for paths in files.values() for path in paths}
    for paths in (extracts or {}).values():
        for path in paths:
            check_extract_schema(path, spec)
    results: list[dict] = []
    with atomic_output_dir(Path(output_dir)) as staging:
        for split, paths in files.items():
            try:
                results += _convert_split(paths, headers, split, spec, config, staging, False, forgotten)
            except _FastPathFailed as error:
                log.warning("split %s: %s; reading again with line numbers", split, error)
                for leftover in (staging / split).glob("*"):
                    leftover.unlink()
                results += _convert_split(paths, headers, split, spec, config, staging, True, forgotten)
        splits = list(files)
        if extracts is not None:
            results += _convert_extracts(extracts, Path(input_dir), spec, config, staging, forgotten)
            splits.append(GATEWAY_SPLIT)
        metrics: dict = {
            "files": results,
            "rows_in": sum(result["rows_in"] for result in results),
            "rows_out": sum(result["rows_out"] for result in results),
            "rows_quarantined": sum(result["rows_quarantined"] for result in results),
            "rows_forgotten": sum(result["rows_forgotten"] for result in results),
            "bytes_in": sum(result["bytes_in"] for result in results),
            "bytes_out": directory_bytes(staging),
            "rows_out_by_split": {
                split: sum(r["rows_out"] for r in results if r["split"] == split) for split in splits
            },
        }
        if extracts is not None:
            metrics["gateway_days"] = list(extracts)
        (staging / "_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log.info(
        "csv_to_parquet: %d rows (%d bytes) in, %d rows (%d bytes) out, %d quarantined",
        metrics["rows_in"], metrics["bytes_in"], metrics["rows_out"], metrics["bytes_out"], metrics["rows_quarantined"],
    )  # fmt: skip
    return metrics

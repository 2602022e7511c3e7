"""Streaming Parquet reading and writing with bounded memory, shared by the data-stage steps."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROWS_PER_FILE = 1_000_000
READ_BATCH_ROWS = 256_000


class PartitionWriter:
    """Writes one partition directory as `part-00000.parquet`, `part-00001.parquet`, ... of bounded size; with a
    `stem`, as `<stem>-00000.parquet`, ... (several writers sharing a directory, e.g. `part-00003`: every name still
    matches `part_files` and sorts by writer, then file)."""

    def __init__(self, directory: Path, schema: pa.Schema, rows_per_file: int = ROWS_PER_FILE, stem: str = "part"
                 ) -> None:  # fmt: skip
        self.directory = Path(directory)
        self.stem = stem
        self.directory.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.rows_per_file = rows_per_file
        self.rows = 0
        self.files = 0
        self._writer: pq.ParquetWriter | None = None
        self._rows_in_file = 0

    def write(self, data: pa.RecordBatch | pa.Table) -> list[tuple[str, int, int]]:
        """Append the rows; where they went: (file name, first row in the file, row after the last) per file."""
        placements = []
        offset = 0
        while offset < data.num_rows:
            if self._writer is None or self._rows_in_file >= self.rows_per_file:
                self._open_next()
            assert self._writer is not None
            take = min(data.num_rows - offset, self.rows_per_file - self._rows_in_file)
            piece = data.slice(offset, take)
            table = pa.Table.from_batches([piece]) if isinstance(piece, pa.RecordBatch) else piece
            self._writer.write_table(table)
            placements.append((self._file_name(self.files - 1), self._rows_in_file, self._rows_in_file + take))
            self._rows_in_file += take
            self.rows += take
            offset += take
        return placements

    def _file_name(self, index: int) -> str:
        return f"{self.stem}-{index:05d}.parquet"

    def _open_next(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._writer = pq.ParquetWriter(self.directory / self._file_name(self.files), self.schema)
        self.files += 1
        self._rows_in_file = 0

    def close(self) -> None:
        if self._writer is None:  # an empty partition still gets one file, so readers see its schema
            self._open_next()
        assert self._writer is not None
        self._writer.close()
        self._writer = None

    def __enter__(self) -> PartitionWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        if exc_type is None:
            self.close()
        elif self._writer is not None:  # failing: release the file, write nothing more
            self._writer.close()
            self._writer = None


def part_files(directory: Path) -> list[Path]:
    return sorted(Path(directory).glob("part-*.parquet"))


def nvtabular_part_files(directory: Path) -> list[Path]:
    """NVTabular's output files `part_0.parquet`, `part_1.parquet`, ... in numeric order (row order)."""
    return sorted(Path(directory).glob("part_*.parquet"), key=lambda path: int(path.stem.split("_")[1]))


def read_schema(directory: Path) -> pa.Schema:
    files = part_files(directory)
    if not files:
        raise FileNotFoundError(f"no Parquet files in {directory}")
    return pq.read_schema(files[0])


def iter_batches(directory: Path, batch_rows: int = READ_BATCH_ROWS) -> Iterator[pa.RecordBatch]:
    for path in part_files(directory):
        yield from pq.ParquetFile(path).iter_batches(batch_size=batch_rows)


def count_rows(directory: Path) -> int:
    return sum(pq.ParquetFile(path).metadata.num_rows for path in part_files(directory))


def directory_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in Path(directory).rglob("*") if path.is_file())

import shutil
from datetime import date
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from recsys.errors import InputDataError
from recsys.parquet_io import count_rows
from tasks.csv_to_parquet import CsvToParquetConfig, csv_to_parquet


def _copy(small_raw: Path, target: Path) -> Path:
    target.mkdir()
    for name in ("train.csv", "test.csv"):
        shutil.copy(small_raw / name, target / name)
    return target


def _edit_lines(path: Path, edits: dict[int, str]) -> None:
    """Replace 1-based lines of a file."""
    lines = path.read_text().splitlines()
    for number, text in edits.items():
        lines[number - 1] = text
    path.write_text("\n".join(lines) + "\n")


def test_converts_with_spec_types_and_partitions(small_raw: Path, tmp_path: Path, spec):
    metrics = csv_to_parquet(small_raw, tmp_path / "parquet", spec)
    assert metrics["rows_in"] == metrics["rows_out"] == 10_000
    assert metrics["rows_out_by_split"] == {"train": 5_000, "test": 5_000}
    assert metrics["bytes_out"] > 0 and metrics["bytes_in"] > metrics["bytes_out"]
    schema = pq.read_schema(next((tmp_path / "parquet" / "train").glob("part-*.parquet")))
    assert str(schema.field("user_id").type) == "int64"
    assert str(schema.field("click").type) == "int8"
    assert str(schema.field("device").type) == "string"


def test_small_files_roll_into_several_parts(small_raw: Path, tmp_path: Path, spec):
    csv_to_parquet(small_raw, tmp_path / "parquet", spec, CsvToParquetConfig(rows_per_file=2_000))
    assert len(list((tmp_path / "parquet" / "train").glob("part-*.parquet"))) == 3
    assert count_rows(tmp_path / "parquet" / "train") == 5_000


def test_rerun_is_identical_and_never_duplicates(small_raw: Path, tmp_path: Path, spec):
    csv_to_parquet(small_raw, tmp_path / "parquet", spec)
    first = pq.read_table(tmp_path / "parquet" / "train")
    csv_to_parquet(small_raw, tmp_path / "parquet", spec)
    assert pq.read_table(tmp_path / "parquet" / "train").equals(first)


def test_sample_fraction_is_deterministic(small_raw: Path, tmp_path: Path, spec):
    config = CsvToParquetConfig(sample_fraction=0.25)
    csv_to_parquet(small_raw, tmp_path / "a", spec, config)
    csv_to_parquet(small_raw, tmp_path / "b", spec, config)
    rows = count_rows(tmp_path / "a" / "train")
    assert 1_000 < rows < 1_500
    assert pq.read_table(tmp_path / "a" / "train").equals(pq.read_table(tmp_path / "b" / "train"))


def test_malformed_rows_are_quarantined_with_line_and_column(small_raw: Path, tmp_path: Path, spec):
    raw = _copy(small_raw, tmp_path / "raw")
    lines = (raw / "train.csv").read_text().splitlines()
    _edit_lines(raw / "train.csv", {
        11: lines[10].rsplit(",", 1)[0],  # one field short
        21: "x" + lines[20],  # non-numeric user id
        31: lines[30] + ",7",  # one field too many
    })  # fmt: skip
    metrics = csv_to_parquet(raw, tmp_path / "parquet", spec, CsvToParquetConfig(max_bad_row_fraction=0.01))
    assert metrics["rows_quarantined"] == 3
    assert metrics["rows_out_by_split"]["train"] == 4_997
    quarantine = (tmp_path / "parquet" / "quarantine" / "train-train.csv").read_text()
    assert "11,,\"expected 28 fields, found 27\"" in quarantine
    assert "21,user_id," in quarantine and "is not int64" in quarantine
    assert "31,,\"expected 28 fields, found 29\"" in quarantine
    # the good rows around the bad ones all made it, with their values
    table = pq.read_table(tmp_path / "parquet" / "train")
    assert table.num_rows == 4_997


def test_too_many_malformed_rows_fail_and_leave_the_previous_output(small_raw: Path, tmp_path: Path, spec):
    csv_to_parquet(small_raw, tmp_path / "parquet", spec)
    raw = _copy(small_raw, tmp_path / "raw")
    _edit_lines(raw / "test.csv", {line: "1,2,3" for line in range(2, 40)})
    with pytest.raises(InputDataError, match=r"test.csv: 38 of 5000 rows are malformed.*test.csv line 2: expected 28"):
        csv_to_parquet(raw, tmp_path / "parquet", spec)
    assert count_rows(tmp_path / "parquet" / "test") == 5_000  # the previous complete output is untouched
    assert [path.name for path in tmp_path.glob(".parquet.*") if path.is_dir()] == [
        (tmp_path / "parquet").resolve().name
    ]  # no half-written staging directory left behind


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "test.csv: the file is empty"),
        (b"PAR1\x00\x15\x04\x15\x00\x00binary", "not a CSV text file"),
        (b"\xff\xfe\x00j\x00u\x00n\x00k", "not a CSV text file"),
        (b"user_id,item_id,click\n1,2,0\n", "test.csv line 1: missing column\\(s\\) item_category"),
        (b"\n1,2\n", "test.csv line 1: the header line is empty"),
    ],
)
def test_bad_files_are_refused_with_the_file_named(small_raw: Path, tmp_path: Path, spec, content, message):
    raw = _copy(small_raw, tmp_path / "raw")
    (raw / "test.csv").write_bytes(content)
    with pytest.raises(InputDataError, match=message):
        csv_to_parquet(raw, tmp_path / "parquet", spec)
    assert not (tmp_path / "parquet").exists()


def test_missing_split_files_are_named(tmp_path: Path, spec):
    (tmp_path / "raw").mkdir()
    with pytest.raises(InputDataError, match=r"no CSV files for split train \(train\*.csv\), test"):
        csv_to_parquet(tmp_path / "raw", tmp_path / "parquet", spec)


def test_out_of_range_values_and_quoted_newlines_on_the_careful_path(small_raw: Path, tmp_path: Path, spec):
    raw = _copy(small_raw, tmp_path / "raw")
    lines = (raw / "test.csv").read_text().splitlines()
    header = lines[0].replace('"', "").split(",")
    click = header.index("click")
    device = header.index("device")
    fields = lines[1].split(",")
    fields[click] = "300"  # does not fit int8
    overflowing = ",".join(fields)
    fields = lines[2].split(",")
    fields[device] = '"mobile\nphone"'  # a valid CSV field spanning two lines
    multiline = ",".join(fields)
    _edit_lines(raw / "test.csv", {2: overflowing, 3: multiline, 4: "99999999999999999999999" + lines[3][1:]})
    metrics = csv_to_parquet(raw, tmp_path / "parquet", spec, CsvToParquetConfig(max_bad_row_fraction=0.01))
    quarantine = (tmp_path / "parquet" / "quarantine" / "test-test.csv").read_text()
    assert "2,click,'300' is not int8" in quarantine
    assert "5,user_id,'99999999999999999999999" in quarantine  # line numbers count the quoted newline
    assert metrics["rows_quarantined"] == 2
    devices = pq.read_table(tmp_path / "parquet" / "test", columns=["device"]).column("device").to_pylist()
    assert "mobile\nphone" in devices


def test_forgotten_users_lose_their_rows_in_every_input_and_the_sample_of_others_stays(
    small_raw: Path, tmp_path: Path, spec
):
    """Customers forgotten on request (serving/forget.py): their rows go from the CSV splits and the gateway's
    extracts alike, and every other row keeps its place in a sampled run."""
    from tasks.extract_interactions import partition_path

    raw = _copy(small_raw, tmp_path / "raw")
    first = csv_to_parquet(raw, tmp_path / "all", spec)
    rows = pq.read_table(tmp_path / "all" / "train")
    forgotten = rows.column("user_id").unique().to_pylist()[:3]
    # One of them also has rows in a day's extract (the gateway's schema is the spec's).
    extract = partition_path(raw, date(2026, 12, 1))
    extract.parent.mkdir(parents=True)
    pq.write_table(rows.slice(0, 40).set_column(0, "user_id", pa.array([forgotten[0]] * 20 + [1] * 20,
                                                                       type=pa.int64())), extract)  # fmt: skip
    metrics = csv_to_parquet(raw, tmp_path / "parquet", spec, forgotten_users=forgotten)

    for split in ("train", "test", "gateway"):
        kept = pq.read_table(tmp_path / "parquet" / split).column("user_id")
        assert not pc.any(pc.is_in(kept, value_set=pa.array(forgotten))).as_py(), split
    in_csv = sum(pc.sum(pc.is_in(pq.read_table(tmp_path / "all" / split).column("user_id"),
                                 value_set=pa.array(forgotten))).as_py() for split in ("train", "test"))  # fmt: skip
    assert in_csv > 0 and metrics["rows_forgotten"] == in_csv + 20
    assert metrics["rows_out"] == first["rows_out"] + 40 - metrics["rows_forgotten"]

    # Sampled: the rows kept are the unforgotten rows of the same sample.
    config = CsvToParquetConfig(sample_fraction=0.5)
    csv_to_parquet(raw, tmp_path / "sampled", spec, config)
    csv_to_parquet(raw, tmp_path / "sampled_forgetting", spec, config, forgotten_users=forgotten)
    sampled = pq.read_table(tmp_path / "sampled" / "train")
    expected = sampled.filter(pc.invert(pc.is_in(sampled.column("user_id"), value_set=pa.array(forgotten))))
    assert pq.read_table(tmp_path / "sampled_forgetting" / "train").equals(expected)

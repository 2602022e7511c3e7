import json
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from recsys.parquet_io import PartitionWriter, count_rows
from tasks.clean_null_rows import clean_null_rows, null_feature_counts
from tasks.csv_to_parquet import csv_to_parquet
from tasks.resplit import resplit


@pytest.fixture
def parquet_dir(small_raw: Path, tmp_path: Path, spec) -> Path:
    csv_to_parquet(small_raw, tmp_path / "parquet", spec)
    return tmp_path / "parquet"


def test_drops_exactly_the_rows_with_more_than_n_null_features(tmp_path: Path, spec):
    features = list(spec.features)
    rows = []
    for nulls in range(len(features) + 1):  # one row with 0, 1, 2, ... null features
        rows.append({name: (None if index < nulls else 1) for index, name in enumerate(features)})
    table = pa.Table.from_pylist(rows, schema=pa.schema([(name, pa.int32()) for name in features]))
    for split in ("train", "test"):
        with PartitionWriter(tmp_path / "in" / split, table.schema) as writer:
            writer.write(table)
    metrics = clean_null_rows(tmp_path / "in", tmp_path / "out", spec, max_null_features=5)
    kept = pq.read_table(tmp_path / "out" / "train")
    assert kept.num_rows == 6
    assert pc.max(null_feature_counts(kept.to_batches()[0], spec.features)).as_py() == 5
    assert metrics["rows_before"] == {"train": len(features) + 1, "test": len(features) + 1}
    assert metrics["rows_after"] == {"train": 6, "test": 6}


def test_cleaning_the_generated_data_removes_about_the_planted_share(parquet_dir: Path, tmp_path: Path, spec):
    metrics = clean_null_rows(parquet_dir, tmp_path / "clean", spec)
    kept = metrics["rows_after"]["train"] / metrics["rows_before"]["train"]
    assert 0.76 < kept < 0.84  # 20% of rows carry more than five nulls


def test_resplit_moves_the_fraction_deterministically(parquet_dir: Path, tmp_path: Path, spec):
    clean_null_rows(parquet_dir, tmp_path / "clean", spec)
    cleaned = json.loads((tmp_path / "clean" / "_metrics.json").read_text())["rows_after"]
    metrics = resplit(tmp_path / "clean", tmp_path / "resplit", spec, fraction=0.6)
    assert metrics["rows"]["train"] + metrics["rows"]["valid"] == cleaned["train"] + cleaned["test"]
    moved = metrics["rows"]["train"] - cleaned["train"]
    assert moved / cleaned["test"] == pytest.approx(0.6, abs=0.03)
    assert "| Train | 5,000 |" in metrics["table"] and "Data After Resplitting" in metrics["table"]
    assert (tmp_path / "resplit" / "rows_table.md").read_text().startswith("| Data Set |")

    first_valid = pq.read_table(tmp_path / "resplit" / "valid")
    resplit(tmp_path / "clean", tmp_path / "resplit", spec, fraction=0.6)  # rerun: same rows, no duplicates
    assert pq.read_table(tmp_path / "resplit" / "valid").equals(first_valid)
    assert count_rows(tmp_path / "resplit" / "train") == metrics["rows"]["train"]
    other_seed = resplit(tmp_path / "clean", tmp_path / "other", spec, fraction=0.6, seed=1)
    assert not pq.read_table(tmp_path / "other" / "valid").equals(first_valid)
    assert other_seed["rows"]["valid"] == pytest.approx(metrics["rows"]["valid"], rel=0.1)


def test_resplit_refuses_a_fraction_outside_zero_to_one(parquet_dir: Path, tmp_path: Path, spec):
    with pytest.raises(ValueError, match=r"between 0 and 1, got 1\.5"):
        resplit(parquet_dir, tmp_path / "resplit", spec, fraction=1.5)

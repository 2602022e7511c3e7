import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.clean_null_rows import clean_null_rows
from tasks.csv_to_parquet import csv_to_parquet
from tasks.resplit import resplit
from tasks.validate import DataValidationError, suite_json, validate

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def resplit_dir(small_raw: Path, tmp_path_factory: pytest.TempPathFactory, spec) -> Path:
    base = tmp_path_factory.mktemp("validate")
    csv_to_parquet(small_raw, base / "parquet", spec)
    clean_null_rows(base / "parquet", base / "clean", spec)
    resplit(base / "clean", base / "resplit", spec)
    return base / "resplit"


def _broken_copy(resplit_dir: Path, target: Path, column: str, values: pa.Array) -> Path:
    for split in ("train", "valid"):
        (target / split).mkdir(parents=True)
        table = pq.read_table(resplit_dir / split).slice(0, len(values))
        if split == "valid":
            table = table.set_column(table.schema.get_field_index(column), column, values)
        pq.write_table(table, target / split / "part-00000.parquet")
    return target


def test_clean_data_passes(resplit_dir: Path, tmp_path: Path, spec):
    metrics = validate(resplit_dir, tmp_path / "validate", spec)
    assert metrics["success"] and metrics["expectations"] > 50
    assert "Result: PASSED" in (tmp_path / "validate" / "report.md").read_text()


def test_bad_labels_fail_with_a_readable_report(resplit_dir: Path, tmp_path: Path, spec):
    broken = _broken_copy(resplit_dir, tmp_path / "in", "click", pa.array([0, 1, 3] * 100, pa.int8()))
    with pytest.raises(DataValidationError) as failure:
        validate(broken, tmp_path / "validate", spec)
    report = str(failure.value)
    assert "FAILED" in report
    assert "valid/part-00000.parquet: column click: expect_column_values_to_be_in_set" in report
    assert "100 unexpected" in report and "[3, 3, 3" in report
    assert "train/" not in report  # the untouched split passed
    results = json.loads((tmp_path / "validate" / "results.json").read_text())
    assert results["success"] is False


def test_null_ids_fail(resplit_dir: Path, tmp_path: Path, spec):
    broken = _broken_copy(resplit_dir, tmp_path / "in", "user_id", pa.array([None, 5] * 50, pa.int64()))
    with pytest.raises(DataValidationError, match="column user_id: expect_column_values_to_not_be_null"):
        validate(broken, tmp_path / "validate", spec)


def test_wrong_type_fails(resplit_dir: Path, tmp_path: Path, spec):
    broken = _broken_copy(resplit_dir, tmp_path / "in", "position", pa.array([1.5] * 100, pa.float64()))
    with pytest.raises(DataValidationError, match="column position: expect_column_values_to_be_of_type"):
        validate(broken, tmp_path / "validate", spec)


def test_committed_suite_is_the_one_the_default_spec_builds(spec):
    committed = json.loads((PROJECT_ROOT / "great_expectations" / "expectations" / "aliccp.json").read_text())
    assert committed == json.loads(json.dumps(suite_json(spec))), "run `make expectations` after changing the spec"

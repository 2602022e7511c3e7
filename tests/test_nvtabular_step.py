"""The NVTabular step, run the way the DAG runs it: the trainer environment's CLI in a subprocess."""

from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from recsys.parquet_io import count_rows
from recsys.settings import get_settings
from recsys.trainer_env import TrainerStepError, run_trainer_step
from tests.conftest import read_nvtabular_output


@pytest.fixture(scope="module")
def nvtabular_run(nvtabular_output) -> tuple[Path, Path, dict]:
    return nvtabular_output


def test_transforms_both_splits_row_for_row(nvtabular_run, spec):
    resplit_dir, out, metrics = nvtabular_run
    assert (out / "workflow" / "workflow.pkl").exists()
    valid = read_nvtabular_output(out / "valid")
    assert len(valid) == count_rows(resplit_dir / "valid")
    assert metrics["train_rows"] == count_rows(resplit_dir / "train")
    raw_valid = pq.read_table(resplit_dir / "valid").to_pandas()
    assert (valid["user_id_raw"].to_numpy() == raw_valid[spec.user_id].to_numpy()).all()  # order kept


def test_categorical_columns_are_encoded_within_their_cardinality(nvtabular_run, spec):
    _, out, metrics = nvtabular_run
    train = read_nvtabular_output(out / "train")
    for column in spec.categorical_columns:
        assert train[column].min() >= 0
        assert train[column].max() < metrics["cardinalities"][column], column
    assert set(train[spec.primary_target].unique()) <= {0, 1}


def test_schema_tags_select_model_inputs(nvtabular_run):
    _, out, _ = nvtabular_run
    schema = (out / "train" / "schema.pbtxt").read_text()
    for tag in ("user_id", "item_id", "user", "item", "context", "binary_classification", "target"):
        assert f'"{tag}"' in schema


def test_feature_tables_have_one_row_per_known_entity_with_snapshot_time(nvtabular_run, spec):
    resplit_dir, out, metrics = nvtabular_run
    raw = pd.concat([pq.read_table(resplit_dir / split).to_pandas() for split in ("train", "valid")])
    users = pd.read_parquet(out / "user_features.parquet")
    items = pd.read_parquet(out / "item_features.parquet")
    # Serving needs every known user and item: the validation split (the newest data) counts too.
    assert users[spec.user_id].is_unique and len(users) == raw[spec.user_id].nunique() == metrics["users"]
    assert items[spec.item_id].is_unique and len(items) == raw[spec.item_id].nunique()
    assert set(spec.user_features) <= set(users.columns) and f"{spec.user_id}_encoded" in users.columns
    assert str(users["event_timestamp"].dtype).startswith("datetime64") and users["event_timestamp"].dt.tz is not None
    latest = pd.to_datetime(raw.groupby(spec.user_id)[spec.timestamp].max(), unit="s", utc=True)
    assert (users.set_index(spec.user_id)["last_event_timestamp"] == latest.loc[users[spec.user_id]]).all()
    # One snapshot time for every row, so that a newer snapshot overwrites every entity in Feast.
    assert users["event_timestamp"].nunique() == items["event_timestamp"].nunique() == 1
    assert users["event_timestamp"].iloc[0] == latest.max() == items["event_timestamp"].iloc[0]


def test_categorify_writes_its_tables_inside_the_output(nvtabular_run):
    _, out, _ = nvtabular_run
    assert any((out / "workflow" / "categories").glob("unique.*.parquet"))
    assert not (Path.cwd() / "categories").exists()


@pytest.mark.trainer
def test_a_failing_trainer_step_reports_its_output(tmp_path: Path):
    with pytest.raises(TrainerStepError, match="nvtabular-fit-transform' failed"):
        run_trainer_step(get_settings().trainer_python, "nvtabular-fit-transform",
                         ["--input", str(tmp_path / "missing"), "--output", str(tmp_path / "out")])  # fmt: skip
    assert not (tmp_path / "out").exists()

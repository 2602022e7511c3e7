"""End to end: `airflow dags test recsys_nightly` on generated data, in an Airflow home of its own."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pytest

from recsys.parquet_io import count_rows

PROJECT_ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.e2e

LOAD_REGISTERED_MODEL = """
import json, sys
import mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
example = pd.read_json(sys.argv[1] + "/input_example.json", orient="split")
print(json.dumps([float(score) for score in model.predict(example)]))
"""


@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The project's airflow.cfg with a throw-away metadata DB, log folder and data root."""
    config = PROJECT_ROOT / "airflow.cfg"
    assert config.exists(), "airflow.cfg is missing: run the README's setup command (make setup)"
    home = tmp_path_factory.mktemp("airflow")
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW_CONFIG": str(config),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
        "RECSYS_MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db",
        "RECSYS_MLFLOW_ARTIFACT_ROOT": str(home / "mlartifacts"),
    }
    subprocess.run([str(PROJECT_ROOT / ".venv/bin/airflow"), "db", "migrate"], env=env, check=True,
                   capture_output=True, timeout=300)  # fmt: skip
    return env


def run_dag(env: dict[str, str], data_root: Path, conf: dict) -> tuple[subprocess.CompletedProcess, Path | None]:
    """Run one DagRun; return the process and the run's output folder."""
    process = subprocess.run(
        [str(PROJECT_ROOT / ".venv/bin/airflow"), "dags", "test", "recsys_nightly", "-c", json.dumps(conf)],
        env={**env, "RECSYS_DATA_ROOT": str(data_root)}, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    runs = sorted((data_root / "runs").glob("*")) if (data_root / "runs").exists() else []
    return process, (runs[-1] if runs else None)


def _failed_tasks(output: str) -> list[str]:
    return [line for line in output.splitlines() if "new_state=failed" in line or "Task failed" in line]


def test_data_stage_end_to_end(airflow_env, medium_raw: Path, tmp_path: Path, spec):
    process, run = run_dag(airflow_env, tmp_path / "data", {"input_dir": str(medium_raw)})
    output = process.stdout + process.stderr
    assert process.returncode == 0, output[-3000:]
    assert run is not None and not _failed_tasks(output), output[-3000:]

    parquet = json.loads((run / "parquet" / "_metrics.json").read_text())
    assert parquet["rows_in"] == parquet["rows_out"] == 50_000
    cleaned = json.loads((run / "clean" / "_metrics.json").read_text())
    assert sum(cleaned["rows_after"].values()) < 0.85 * 50_000
    resplit = json.loads((run / "resplit" / "_metrics.json").read_text())
    assert "| Train | 25,000 |" in resplit["table"]
    assert "Data After Resplitting" in output  # Table 5.2 is in the run's log
    assert "Result: PASSED" in (run / "validate" / "report.md").read_text()
    nvtabular = json.loads((run / "nvtabular" / "_metrics.json").read_text())
    assert nvtabular["train_rows"] == count_rows(run / "resplit" / "train")
    users = pd.read_parquet(run / "nvtabular" / "user_features.parquet")
    assert len(users) == nvtabular["users"] > 300
    assert (run / "nvtabular" / "workflow" / "workflow.pkl").exists()

    # the ranker: trained, logged and registered in MLflow, with its AUC next to the oracle's
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=airflow_env["RECSYS_MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("recsys_ranker")
    [ranker_run] = client.search_runs([experiment.experiment_id])
    metrics = ranker_run.data.metrics
    print(f"ranker validation AUC {metrics['best_valid_auc']:.3f}, oracle AUC {metrics['oracle_auc']:.3f}")
    assert 0.6 < metrics["best_valid_auc"] < metrics["oracle_auc"]
    epochs_logged = len(client.get_metric_history(ranker_run.info.run_id, "valid_auc"))  # one point per epoch
    assert metrics["best_epoch"] <= epochs_logged <= int(ranker_run.data.params["epochs"])
    artifacts = {item.path for item in client.list_artifacts(ranker_run.info.run_id, "plots")}
    assert {"plots/auc_per_epoch.png", "plots/loss_per_epoch.png", "plots/roc.png"} <= artifacts
    [version] = client.search_model_versions("name='ranker'")
    assert version.run_id == ranker_run.info.run_id
    # the registered version loads and scores in the trainer environment, where it is meant to run
    from urllib.parse import urlparse

    [logged_model] = client.search_logged_models([experiment.experiment_id])
    local_model = urlparse(logged_model.artifact_location).path
    scored = subprocess.run(
        [str(PROJECT_ROOT / ".venv-trainer/bin/python"), "-c", LOAD_REGISTERED_MODEL, local_model],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert scored.returncode == 0, scored.stderr[-2000:]
    scores = json.loads(scored.stdout.strip().splitlines()[-1])
    assert len(scores) == 5 and all(0.0 < score < 1.0 for score in scores)

    # the two-tower model: whole-catalog recall per epoch, a popularity baseline, a registered query tower
    [two_tower_run] = client.search_runs([client.get_experiment_by_name("recsys_two_tower").experiment_id])
    retrieval = two_tower_run.data.metrics
    print(f"two-tower recall@100 {retrieval['best_recall_at_100']:.3f}, "
          f"popularity {retrieval['popularity_recall_at_100']:.3f}")  # fmt: skip
    assert retrieval["best_recall_at_500"] > 500 / int(two_tower_run.data.params["catalog_items"])  # beats random
    assert len(client.get_metric_history(two_tower_run.info.run_id, "recall_at_100")) >= retrieval["best_epoch"]
    plots = {item.path for item in client.list_artifacts(two_tower_run.info.run_id, "plots")}
    assert {"plots/loss_per_epoch.png", "plots/recall_per_epoch.png"} <= plots
    [two_tower_version] = client.search_model_versions("name='two_tower'")
    assert two_tower_version.run_id == two_tower_run.info.run_id


def test_failed_validation_stops_the_run_before_nvtabular(airflow_env, small_raw: Path, tmp_path: Path, spec):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("train.csv", "test.csv"):
        table = pa_csv.read_csv(small_raw / name)
        clicks = [2 if index % 10 == 0 else value for index, value in enumerate(table["click"].to_pylist())]
        table = table.set_column(table.schema.get_field_index("click"), "click", pa.array(clicks, pa.int8()))
        pa_csv.write_csv(table, raw / name)
    process, run = run_dag(airflow_env, tmp_path / "data", {"input_dir": str(raw)})
    output = process.stdout + process.stderr
    assert run is not None
    assert "expect_column_values_to_be_in_set" in output  # the readable report is in the task log
    report = (run / "validate" / "report.md").read_text()
    assert "Result: FAILED" in report and "column click" in report
    assert not (run / "nvtabular").exists()  # nothing downstream ran
    assert process.returncode != 0  # airflow dags test exits non-zero when the DagRun failed
    assert "AirflowFailException" in output  # bad data fails at once, without the retries meant for outages


def test_second_dataset_with_its_own_spec(airflow_env, small_raw: Path, tmp_path: Path):
    """A differently named dataset runs the whole data stage with only its spec changed."""
    renames = {"user_id": "customer", "item_id": "sku", "item_category": "sku_category", "item_brand": "sku_brand",
               "user_group": "customer_segment", "user_geography": "customer_region", "position": "slot",
               "device": "channel", "event_timestamp": "ts", "click": "clicked"}  # fmt: skip
    raw = tmp_path / "raw"
    raw.mkdir()
    for source, target in (("train.csv", "events_train_2024.csv"), ("test.csv", "events_holdout_2024.csv")):
        table = pa_csv.read_csv(small_raw / source).select(list(renames)).rename_columns(list(renames.values()))
        pa_csv.write_csv(table, raw / target)
    spec_path = PROJECT_ROOT / "tests" / "data" / "shop_events.yaml"
    conf = {"input_dir": str(raw), "spec": str(spec_path), "max_null_features": 1, "resplit_fraction": 0.5}
    process, run = run_dag(airflow_env, tmp_path / "data", conf)
    output = process.stdout + process.stderr
    assert process.returncode == 0 and not _failed_tasks(output), output[-3000:]
    assert run is not None
    users = pd.read_parquet(run / "nvtabular" / "user_features.parquet")
    expected = {"customer", "customer_encoded", "customer_segment", "customer_region", "event_timestamp"}
    assert expected <= set(users.columns)
    items = pd.read_parquet(run / "nvtabular" / "item_features.parquet")
    assert {"sku", "sku_category", "sku_brand"} <= set(items.columns)
    resplit = json.loads((run / "resplit" / "_metrics.json").read_text())
    assert resplit["fraction"] == 0.5

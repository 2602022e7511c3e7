"""The ranker comparison (report figure 5.4): DLRM, DCN-v2, MLP and NCF trained for real, logged as one MLflow run."""

from __future__ import annotations

import csv
import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from tasks.compare_rankers import COMPARISON_EXPERIMENT, compare_rankers, train_rankers_for_comparison
from tasks.track_training import VALIDATION_FINGERPRINT_TAG, log_ranker_run, validation_fingerprint

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def tracking_uri(mlflow_tracking_uri: str) -> Iterator[str]:
    previous = mlflow.get_tracking_uri()
    uri = mlflow_tracking_uri
    yield uri
    mlflow.set_tracking_uri(previous)


def read_artifact(run_id: str, path: str, destination: Path) -> bytes:
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path,
                                                    dst_path=str(destination))).read_bytes()  # fmt: skip


def test_comparison_run_logs_table_bar_chart_and_curves(compared_rankers, nvtabular_output, tracking_uri, tmp_path,
                                                        spec):  # fmt: skip
    _, nvtabular_dir, _ = nvtabular_output
    assert set(compared_rankers) == {"dlrm", "dcn", "mlp", "ncf"}
    histories = {model: json.loads((folder / "history.json").read_text()) for model, folder in compared_rankers.items()}
    assert {history["model"] for history in histories.values()} == {"dlrm", "dcn", "mlp", "ncf"}

    result = compare_rankers(compared_rankers, tracking_uri=tracking_uri, artifact_root=tmp_path / "artifacts",
                             run_name="comparison", nvtabular_dir=nvtabular_dir, spec=spec)  # fmt: skip
    client = MlflowClient(tracking_uri)
    [run] = client.search_runs([client.get_experiment_by_name(COMPARISON_EXPERIMENT).experiment_id])
    assert run.info.run_id == result["run_id"]
    best = max(histories, key=lambda model: histories[model]["valid_auc"])
    assert result["best_model"] == run.data.tags["best_model"] == best
    assert run.data.tags[VALIDATION_FINGERPRINT_TAG] == \
        validation_fingerprint(nvtabular_dir / "valid", spec)[VALIDATION_FINGERPRINT_TAG]  # fmt: skip
    for model, history in histories.items():
        assert run.data.metrics[f"{model}_best_valid_auc"] == pytest.approx(history["valid_auc"])
        assert run.data.metrics[f"{model}_train_samples_per_second"] == pytest.approx(
            history["train_samples_per_second"])  # fmt: skip
        assert len(client.get_metric_history(run.info.run_id, f"{model}_valid_auc")) == history["epochs_run"]
        assert len(client.get_metric_history(run.info.run_id, f"{model}_train_auc")) == history["epochs_run"]

    table = list(csv.DictReader(io.StringIO(read_artifact(run.info.run_id, "comparison.csv", tmp_path).decode())))
    assert [row["model"] for row in table] == sorted(histories, key=lambda m: -histories[m]["valid_auc"])
    for row in table:
        history = histories[row["model"]]
        assert float(row["best_valid_auc"]) == pytest.approx(history["valid_auc"])
        assert float(row["valid_logloss"]) == pytest.approx(history["valid_logloss"])
        assert int(row["best_epoch"]) == history["best_epoch"]
    markdown = read_artifact(run.info.run_id, "comparison.md", tmp_path).decode()
    assert markdown.count("\n") == 2 + len(histories) and f"| {best} | {histories[best]['valid_auc']:.4f} |" in markdown
    for plot in ("plots/ranker_comparison.png", "plots/auc_per_epoch.png"):
        image = read_artifact(run.info.run_id, plot, tmp_path)
        assert image.startswith(PNG_SIGNATURE) and len(image) > 10_000, plot
    assert json.loads(read_artifact(run.info.run_id, "histories/dcn.json", tmp_path)) == histories["dcn"]


def test_every_ranker_run_has_figure_5_3_and_the_validation_fingerprint(compared_rankers, nvtabular_output,
                                                                        tracking_uri, tmp_path, spec):  # fmt: skip
    _, nvtabular_dir, _ = nvtabular_output
    logged = log_ranker_run(compared_rankers["mlp"], nvtabular_dir, spec, tracking_uri=tracking_uri,
                            artifact_root=tmp_path / "artifacts", run_name="mlp")  # fmt: skip
    client = MlflowClient(tracking_uri)
    run = client.get_run(logged["run_id"])
    assert run.data.tags[VALIDATION_FINGERPRINT_TAG] == \
        validation_fingerprint(nvtabular_dir / "valid", spec)[VALIDATION_FINGERPRINT_TAG]  # fmt: skip
    assert int(run.data.tags["validation_rows"]) > 0
    for key in ("train_auc", "valid_auc"):  # figure 5.3's two curves, one point per epoch
        assert len(client.get_metric_history(run.info.run_id, key)) == 1
    assert {"plots/auc_per_epoch.png", "plots/loss_per_epoch.png", "plots/roc.png"} <= \
        {item.path for item in client.list_artifacts(run.info.run_id, "plots")}  # fmt: skip


def test_comparison_reuses_a_trained_ranker_and_refuses_other_data(compared_rankers, tracking_uri, tmp_path):
    reused = train_rankers_for_comparison(tmp_path / "unused", tmp_path / "out", trainer_python=Path("/nonexistent"),
                                          epochs=1, models=("dlrm",),
                                          trained={"dlrm": compared_rankers["dlrm"]})  # fmt: skip
    assert reused == {"dlrm": compared_rankers["dlrm"]}
    with pytest.raises(ValueError, match="unknown rankers"):
        train_rankers_for_comparison(tmp_path, tmp_path, trainer_python=Path("/nonexistent"), epochs=1,
                                     models=("xgboost",))  # fmt: skip
    other = tmp_path / "dcn_other_data"
    shutil.copytree(compared_rankers["dcn"], other)
    history = json.loads((other / "history.json").read_text())
    (other / "history.json").write_text(json.dumps({**history, "train_rows": history["train_rows"] + 1}))
    with pytest.raises(ValueError, match="not trained on the same data"):
        compare_rankers({"dlrm": compared_rankers["dlrm"], "dcn": other}, tracking_uri=tracking_uri,
                        artifact_root=tmp_path / "artifacts", run_name="mixed")  # fmt: skip

"""The ranker step in the trainer environment: it learns, stops early, and its saved model reloads."""

import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from recsys.settings import get_settings
from recsys.trainer_env import run_trainer_step

RELOAD = """
import faulthandler; faulthandler.enable(all_threads=True)  # an abort prints every thread's stack
import sys, json
import numpy as np, pandas as pd, tensorflow as tf
import merlin.models.tf as mm
from pathlib import Path
from tasks.train_ranker import _dataset, predict
from models.rankers import ranker_input_schema
out, nvt = Path(sys.argv[1]), Path(sys.argv[2])
model = tf.keras.models.load_model(out / "model")
valid = _dataset(nvt / "valid")
valid.schema = ranker_input_schema(valid.schema, "click")
scores = predict(model, valid, 4096)
saved = pd.read_parquet(out / "valid_predictions.parquet")["score"].to_numpy()
print(json.dumps({"max_abs_diff": float(np.abs(scores - saved).max()), "n": len(scores)}))
"""


@pytest.fixture(scope="module")
def ranker_run(nvtabular_output, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    _, nvtabular_dir, _ = nvtabular_output
    out = tmp_path_factory.mktemp("ranker") / "dlrm"
    metrics = run_trainer_step(get_settings().trainer_python, "train-ranker",
                               ["--input", str(nvtabular_dir), "--output", str(out), "--epochs", "6"])  # fmt: skip
    return out, metrics


def test_dlrm_learns_the_planted_signal(ranker_run, medium_raw: Path):
    _, metrics = ranker_run
    oracle = json.loads((medium_raw / "generation.json").read_text())["oracle_auc_test"]
    print(f"DLRM validation AUC {metrics['valid_auc']:.3f}, oracle AUC {oracle:.3f}")
    assert metrics["valid_auc"] > 0.6
    assert metrics["valid_auc"] < oracle


def test_history_has_per_epoch_auc_and_the_best_epoch_is_kept(ranker_run):
    out, metrics = ranker_run
    history = metrics["history"]
    assert len(history) == metrics["epochs_run"] >= metrics["best_epoch"]
    assert {"train_auc", "train_loss", "valid_auc", "valid_logloss"} <= set(history[0])
    assert metrics["valid_auc"] == max(row["valid_auc"] for row in history)
    if metrics["epochs_run"] < 6:  # stopped early: patience epochs without improvement
        assert metrics["epochs_run"] - metrics["best_epoch"] == 2
    saved = json.loads((out / "history.json").read_text())
    assert saved["best_epoch"] == metrics["best_epoch"]


def test_saved_model_reloads_with_the_same_predictions(ranker_run, nvtabular_output):
    out, _ = ranker_run
    _, nvtabular_dir, _ = nvtabular_output
    process = subprocess.run([str(get_settings().trainer_python), "-c", RELOAD, str(out), str(nvtabular_dir)],
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert process.returncode == 0, f"stdout: {process.stdout[-500:]}\nstderr: {process.stderr[-4000:]}"
    result = json.loads(process.stdout.strip().splitlines()[-1])
    assert result["n"] == len(pd.read_parquet(out / "valid_predictions.parquet"))
    assert result["max_abs_diff"] < 1e-5


@pytest.mark.parametrize("model", ["dcn", "mlp", "ncf"])
def test_the_other_rankers_of_figure_5_4_train(model, compared_rankers):
    """The comparison's rankers, trained one epoch each by this step with `--model` (conftest)."""
    metrics = json.loads((compared_rankers[model] / "history.json").read_text())
    assert metrics["model"] == model
    assert metrics["valid_auc"] > 0.55
    assert (compared_rankers[model] / "model" / "saved_model.pb").exists()

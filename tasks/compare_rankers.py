"""Compare the rankers of the report's figure 5.4 (DLRM, DCN-v2, NCF, and an MLP) trained on the same data.

`train_rankers_for_comparison` runs the trainer step `train-ranker --model X` once per model into folders of
their own (a model already trained by the run, with the same data and epochs, is reused);
`compare_rankers` (platform environment) reads their `history.json` files and logs one MLflow run in the
experiment `recsys_ranker_comparison`: the comparison table (`comparison.md`, `comparison.csv`: best validation
AUC, validation log loss at that epoch, best epoch, epochs run, training samples per second), a bar chart
(`plots/ranker_comparison.png`, figure 5.4), every model's train and validation AUC per epoch in one plot
(`plots/auc_per_epoch.png`, figure 5.3 for all of them) and each history, with per-model metrics
(`dlrm_best_valid_auc`, ...) and the tag `best_model`. Nothing is registered: the comparison informs the
choice of the DAG's `ranker_model` Param, the run's own ranker is the one that is gated and served.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from models.rankers import COMPARED_RANKERS
from recsys.spec import DatasetSpec
from tasks.track_training import configure_mlflow, validation_fingerprint

log = logging.getLogger(__name__)

COMPARISON_EXPERIMENT = "recsys_ranker_comparison"
COLUMNS = ("model", "best_valid_auc", "valid_logloss", "best_epoch", "epochs_run", "train_samples_per_second",
           "train_rows")  # fmt: skip


def train_rankers_for_comparison(nvtabular_dir: Path, output_dir: Path, *, trainer_python: Path, epochs: int,
                                 models: Sequence[str] = COMPARED_RANKERS, spec_path: Path | str | None = None,
                                 trained: Mapping[str, Path] | None = None) -> dict[str, Path]:  # fmt: skip
    """Train each of `models` with the trainer step into `output_dir/<model>`; return model -> folder.

    `trained` names folders of models already trained on the same data with the same epochs (the run's own
    ranker): they are used as they are.
    """
    from recsys.trainer_env import run_trainer_step

    unknown = [model for model in models if model not in COMPARED_RANKERS]
    if unknown:
        raise ValueError(f"unknown rankers {unknown}: choose from {', '.join(COMPARED_RANKERS)}")
    folders: dict[str, Path] = {}
    for model in models:
        if trained and model in trained:
            folders[model] = Path(trained[model])
            continue
        folder = Path(output_dir) / model
        arguments = ["--input", str(nvtabular_dir), "--output", str(folder), "--model", model, "--epochs", str(epochs)]
        if spec_path:
            arguments += ["--spec", str(spec_path)]
        run_trainer_step(trainer_python, "train-ranker", arguments)
        folders[model] = folder
    return folders


def comparison_table(histories: Mapping[str, dict]) -> list[dict[str, Any]]:
    """One row per model from its `history.json`, best validation AUC first."""
    rows = [{
        "model": model,
        "best_valid_auc": float(history["valid_auc"]),
        "valid_logloss": float(history["valid_logloss"]),
        "best_epoch": int(history["best_epoch"]),
        "epochs_run": int(history.get("epochs_run", len(history["history"]))),
        "train_samples_per_second": float(history["train_samples_per_second"]),
        "train_rows": int(history["train_rows"]),
    } for model, history in histories.items()]  # fmt: skip
    return sorted(rows, key=lambda row: row["best_valid_auc"], reverse=True)


def table_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = ["| model | best valid AUC | valid log loss | best epoch | epochs run | train samples/s |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    lines += [f"| {row['model']} | {row['best_valid_auc']:.4f} | {row['valid_logloss']:.4f} | {row['best_epoch']} | "
              f"{row['epochs_run']} | {row['train_samples_per_second']:,.0f} |" for row in rows]  # fmt: skip
    return "\n".join(lines) + "\n"


def table_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def compare_rankers(ranker_dirs: Mapping[str, Path], *, tracking_uri: str, artifact_root: str | Path, run_name: str,
                    nvtabular_dir: Path | None = None, spec: DatasetSpec | None = None) -> dict[str, Any]:  # fmt: skip
    """Log the comparison of the rankers in `ranker_dirs` (model -> train-ranker output) as one MLflow run.

    Refuses histories trained on different numbers of rows (not the same data). With `nvtabular_dir` and
    `spec`, the run carries the validation data's fingerprint, as the training runs do.
    """
    import mlflow

    if len(ranker_dirs) < 2:
        raise ValueError(f"a comparison needs two rankers or more, got {sorted(ranker_dirs)}")
    histories = {model: json.loads((Path(folder) / "history.json").read_text())
                 for model, folder in ranker_dirs.items()}  # fmt: skip
    train_rows = {model: history["train_rows"] for model, history in histories.items()}
    if len(set(train_rows.values())) != 1:
        raise ValueError(f"the rankers were not trained on the same data (training rows {train_rows})")
    rows = comparison_table(histories)
    best = rows[0]["model"]
    experiment_id = configure_mlflow(tracking_uri, artifact_root, COMPARISON_EXPERIMENT)
    with mlflow.start_run(experiment_id=experiment_id, run_name=run_name) as run, \
            tempfile.TemporaryDirectory() as scratch:  # fmt: skip
        mlflow.log_params({"models": ",".join(histories), "train_rows": rows[0]["train_rows"],
                           **{f"{model}_epochs": history["config"]["epochs"] for model, history in histories.items()}})
        tags = {"best_model": best}
        if nvtabular_dir is not None and spec is not None:
            tags.update(validation_fingerprint(Path(nvtabular_dir) / "valid", spec))
        mlflow.set_tags(tags)
        for row in rows:
            mlflow.log_metrics({f"{row['model']}_{key}": float(row[key]) for key in COLUMNS[1:-1]})
        for model, history in histories.items():  # each model's curves, as on its own training run
            for epoch in history["history"]:
                curves = ("train_auc", "valid_auc", "valid_logloss")
                mlflow.log_metrics({f"{model}_{key}": epoch[key] for key in curves}, step=epoch["epoch"])
            mlflow.log_dict(history, f"histories/{model}.json")
        mlflow.log_text(table_markdown(rows), "comparison.md")
        mlflow.log_text(table_csv(rows), "comparison.csv")
        plots = Path(scratch)
        mlflow.log_artifact(str(_bar_chart(rows, plots / "ranker_comparison.png")), artifact_path="plots")
        mlflow.log_artifact(str(_auc_curves(histories, plots / "auc_per_epoch.png")), artifact_path="plots")
        log.info("ranker comparison (MLflow run %s), best %s:\n%s", run.info.run_id, best, table_markdown(rows))
        return {"run_id": run.info.run_id, "best_model": best, "table": rows}


def _bar_chart(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """The report's figure 5.4: the models side by side on validation AUC, log loss and training speed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("best_valid_auc", "best validation AUC", "{:.4f}"), ("valid_logloss", "validation log loss", "{:.4f}"),
              ("train_samples_per_second", "training samples/s", "{:,.0f}"))  # fmt: skip
    figure, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
    names = [row["model"] for row in rows]
    for axis, (key, title, text) in zip(axes, panels, strict=True):
        values = [row[key] for row in rows]
        bars = axis.bar(names, values, color=[_color(name) for name in names])
        axis.bar_label(bars, labels=[text.format(value) for value in values], fontsize=8)
        axis.set_title(title)
        if key == "best_valid_auc":  # AUCs of rankers differ in the second decimal: start the axis near them
            axis.set_ylim(max(0.0, min(values) - 0.05), min(1.0, max(values) + 0.03))
        axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _color(model: str) -> str:
    """One color a model in every plot and every run, whatever the order of the table."""
    return f"C{COMPARED_RANKERS.index(model)}" if model in COMPARED_RANKERS else "C7"


def _auc_curves(histories: Mapping[str, dict], path: Path) -> Path:
    """The report's figure 5.3 for every model: train (dashed) and validation AUC per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for model, history in histories.items():
        color = _color(model)
        epochs = [row["epoch"] for row in history["history"]]
        axis.plot(epochs, [row["valid_auc"] for row in history["history"]], marker="o", color=color,
                  label=f"{model} valid")  # fmt: skip
        axis.plot(epochs, [row["train_auc"] for row in history["history"]], linestyle="--", color=color,
                  label=f"{model} train")  # fmt: skip
    axis.set_xlabel("epoch")
    axis.set_ylabel("AUC")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path

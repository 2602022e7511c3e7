"""Train the ranking model (trainer environment): DLRM by default, DCN-v2 or MLP by configuration.

Epoch by epoch on the NVTabular-transformed train split, with validation AUC and logloss after
every epoch and early stopping on validation AUC (the report's ranker overfit after epoch 2): the
weights of the best epoch are the ones saved. Writes the saved model, the per-epoch history and the
validation predictions (for ROC curves and the comparison with the generator's oracle AUC).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from recsys.device import merlin_cpu
from recsys.outputs import atomic_output_dir
from recsys.parquet_io import nvtabular_part_files
from recsys.spec import DatasetSpec

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RankerConfig:
    model: str = "dlrm"
    embedding_dim: int = 32
    mlp_layers: tuple[int, ...] = (128, 64)
    epochs: int = 8
    patience: int = 2  # epochs without a better validation AUC before stopping
    batch_size: int = 1024
    learning_rate: float = 1e-3
    seed: int = 0


def _auc_and_logloss(labels: Any, scores: Any) -> tuple[float, float]:
    import numpy as np
    import tensorflow as tf

    # Exact enough: 10,000 thresholds on probabilities in [0, 1].
    auc = tf.keras.metrics.AUC(num_thresholds=10_000)
    auc.update_state(labels, scores)
    clipped = np.clip(scores, 1e-7, 1 - 1e-7)
    logloss = float(-np.mean(labels * np.log(clipped) + (1 - labels) * np.log(1 - clipped)))
    return float(auc.result().numpy()), logloss


def _dataset(directory: Path) -> Any:
    from merlin.io import Dataset

    return Dataset([str(path) for path in nvtabular_part_files(directory)], engine="parquet", cpu=merlin_cpu())


def predict(model: Any, dataset: Any, batch_size: int) -> Any:
    import merlin.models.tf as mm

    loader = mm.Loader(dataset, batch_size=batch_size, shuffle=False)
    try:
        return model.predict(loader, verbose=0).reshape(-1)
    finally:
        # Joins the loader's daemon thread: one still inside TensorFlow's C++ code when the interpreter exits can
        # abort the process ("terminate called without an active exception", seen once in CI after a predict).
        loader.stop()


def train_ranker(nvtabular_dir: Path, output_dir: Path, spec: DatasetSpec,
                 config: RankerConfig = RankerConfig()) -> dict:  # fmt: skip
    """Train on `nvtabular_dir/train`, validate on `nvtabular_dir/valid`; write model/, history.json, predictions."""
    import merlin.models.tf as mm
    import numpy as np
    import pandas as pd
    import tensorflow as tf

    from models.rankers import build_ranker, ranker_input_schema

    tf.keras.utils.set_random_seed(config.seed)
    target = spec.primary_target
    train, valid = _dataset(Path(nvtabular_dir) / "train"), _dataset(Path(nvtabular_dir) / "valid")
    schema = ranker_input_schema(train.schema, target)
    train.schema, valid.schema = schema, schema
    labels = valid.to_ddf()[target].compute().to_numpy().astype("float32")

    model = build_ranker(schema, model=config.model, target=target, embedding_dim=config.embedding_dim,
                         mlp_layers=config.mlp_layers)  # fmt: skip
    model.compile(optimizer=tf.keras.optimizers.Adam(config.learning_rate),
                  metrics=[tf.keras.metrics.AUC(name="auc")])  # fmt: skip
    train_loader = mm.Loader(train, batch_size=config.batch_size, shuffle=True)
    history: list[dict] = []
    best: dict[str, Any] = {"auc": -1.0}
    started = time.perf_counter()

    class ValidateEachEpoch(tf.keras.callbacks.Callback):
        """Validation AUC and log loss after every epoch; keeps the best epoch; stops after `patience` worse ones.

        A callback of one `fit` call rather than one `fit` call per epoch: each call rebuilds Keras's data
        adapter, which reads a batch from Merlin's Loader and restarts it (benchmarks/model_stage.py).
        """

        epoch_start = started  # the first epoch's time includes the start of `fit`

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            nonlocal best
            logs = logs or {}
            fit_seconds = time.perf_counter() - self.epoch_start
            scores = predict(model, valid, config.batch_size * 4)
            valid_auc, valid_logloss = _auc_and_logloss(labels, scores)
            row = {"epoch": epoch + 1, "train_loss": float(logs["loss"]), "train_auc": float(logs["auc"]),
                   "valid_auc": valid_auc, "valid_logloss": valid_logloss, "fit_seconds": fit_seconds,
                   "seconds": time.perf_counter() - self.epoch_start}  # fmt: skip
            history.append(row)
            log.info("train_ranker %s epoch %d: %s", config.model, row["epoch"], json.dumps(row))
            if valid_auc > best["auc"]:
                best = {"auc": valid_auc, "epoch": row["epoch"], "weights": model.get_weights(), "scores": scores}
            elif row["epoch"] - best["epoch"] >= config.patience:
                log.info("early stopping: no better validation AUC for %d epochs", config.patience)
                model.stop_training = True
            self.epoch_start = time.perf_counter()

    model.fit(train_loader, epochs=config.epochs, verbose=0, callbacks=[ValidateEachEpoch()])
    model.set_weights(best["weights"])
    train_rows = int(train.to_ddf().shape[0].compute())
    with atomic_output_dir(Path(output_dir)) as staging:
        model.save(str(staging / "model"))
        pd.DataFrame({target: labels, "score": best["scores"]}).to_parquet(staging / "valid_predictions.parquet")
        metrics = {
            "model": config.model,
            "config": dataclasses.asdict(config),
            "best_epoch": best["epoch"],
            "epochs_run": len(history),
            "valid_auc": best["auc"],
            "valid_logloss": history[best["epoch"] - 1]["valid_logloss"],
            "train_rows": train_rows,
            # Training alone (as train_two_tower's): each epoch's validation is in its `seconds`, not here.
            "train_samples_per_second": train_rows * len(history) / sum(row["fit_seconds"] for row in history),
            "seconds": time.perf_counter() - started,
            "history": history,
            "input_columns": schema.without([target]).column_names,
            "mean_valid_score": float(np.mean(best["scores"])),
        }
        (staging / "history.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("train_ranker %s: best epoch %d, validation AUC %.4f", config.model, best["epoch"], best["auc"])
    return metrics

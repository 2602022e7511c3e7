"""The timings of `scripts/gpu_check.sh`: the project's own pipeline steps on each device, side by side.

Runs in the platform environment, as the DAG does: the data stage once, then for each device (RECSYS_DEVICE) the
steps from NVTabular to batch scoring through `tasks.pipeline.run_pipeline` (trainer steps in the environment
RECSYS_TRAINER_PYTHON names, started by `recsys.trainer_env` with the GPU lock's CUDA libraries), and the
`build-faiss-index` step on a catalog of random embeddings large enough for the IVF index. A step that fails stops
the check (RECSYS_DEVICE=gpu without a GPU fails at the first trainer step, saying so).

    .venv/bin/python scripts/gpu_check.py --landing DIR --work DIR [--devices gpu cpu] [--faiss-items 500000]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from recsys.device import DEVICE_VARIABLE
from recsys.run_layout import RunLayout
from recsys.settings import get_settings
from recsys.trainer_env import run_trainer_step
from tasks.pipeline import PipelineConfig, run_pipeline

# Briefly trained, as the tests' runs (tests/conftest.py): one epoch of each model.
CONFIG = PipelineConfig(two_tower_epochs=1, ranker_epochs=1)
DEVICE_STEPS = ("nvtabular_fit_transform", "train_two_tower", "train_ranker", "build_faiss_index", "batch_score")
EMBEDDING_DIM = 64


def write_random_embeddings(folder: Path, items: int, seed: int = 0) -> None:
    """`item_embeddings.parquet` as train_two_tower writes it (encoded id, then one column per dimension)."""
    import numpy as np
    import pandas as pd

    from models.retrieval_index import ITEM_EMBEDDINGS_FILE

    vectors = np.random.default_rng(seed).standard_normal((items, EMBEDDING_DIM), dtype=np.float32)
    frame = pd.DataFrame(vectors, columns=[str(column) for column in range(EMBEDDING_DIM)])
    frame.insert(0, "item_id", np.arange(1, items + 1, dtype=np.int64))
    folder.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(folder / ITEM_EMBEDDINGS_FILE, index=False)


def _row(label: str, values: list[float], digits: int = 1) -> None:
    print(f"{label:<44}" + "".join(f"{value:>12.{digits}f}" for value in values))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--landing", type=Path, required=True, help="generated CSV (recsys generate-data --out)")
    parser.add_argument("--work", type=Path, required=True, help="a new folder: run folders and the log go here")
    parser.add_argument("--devices", nargs="+", choices=["gpu", "cpu", "auto"], default=["gpu", "cpu"])
    parser.add_argument("--faiss-items", type=int, default=500_000, help="random item embeddings to index")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    log_file = args.work / "gpu_check.log"
    logging.basicConfig(level=logging.INFO, filename=log_file, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The device each trainer process chose, as it logged it, on the terminal too.
    echo = logging.StreamHandler(sys.stdout)
    echo.addFilter(lambda record: "recsys.device" in record.getMessage())
    logging.getLogger("recsys.trainer_env").addHandler(echo)
    python = get_settings().trainer_python
    print(f"trainer environment {python}; log {log_file}", flush=True)

    data = RunLayout(args.work / "data")
    started = time.perf_counter()
    run_pipeline(args.landing, data, CONFIG, until="validate")
    data_seconds = time.perf_counter() - started
    faiss_items = args.work / "faiss_items"
    write_random_embeddings(faiss_items, args.faiss_items)

    seconds: dict[str, dict[str, float]] = {}
    faiss_metrics: dict[str, dict] = {}
    for device in args.devices:
        os.environ[DEVICE_VARIABLE] = device  # run_trainer_step passes the environment on
        print(f"\n== {DEVICE_VARIABLE}={device}", flush=True)
        layout = RunLayout(args.work / device)
        layout.root.mkdir()
        layout.resplit.symlink_to(data.resplit.absolute())
        result = run_pipeline(None, layout, CONFIG, start=DEVICE_STEPS[0], until=DEVICE_STEPS[-1])
        seconds[device] = dict(result.seconds)
        started = time.perf_counter()
        faiss_metrics[device] = run_trainer_step(python, "build-faiss-index", [
            "--input", str(faiss_items), "--output", str(args.work / f"faiss_{device}")])  # fmt: skip
        seconds[device]["faiss_step"] = time.perf_counter() - started

    print(f"\nthe data stage (csv_to_parquet to validate, platform environment, once): {data_seconds:.1f} s")
    print(f"\n{'seconds':<44}" + "".join(f"{device:>12}" for device in args.devices))
    for step in DEVICE_STEPS:
        _row(step, [seconds[device][step] for device in args.devices])
    _row(f"Faiss step, {args.faiss_items:,} random items", [seconds[device]["faiss_step"] for device in args.devices])
    _row("  of which the index build", [faiss_metrics[device]["build_seconds"] for device in args.devices], 2)
    kind = faiss_metrics[args.devices[0]]["kind"]
    _row(f"  {kind} recall@100 against exact (not seconds)",
        [faiss_metrics[device]["recall_at_100_vs_exact"] for device in args.devices], 3)
    print("\nTraining seconds include each process's start (TensorFlow's import; on a GPU newer than sm_80, the\n"
          "driver's compilation of TensorFlow's PTX the first time a kernel is used, cached for the next run).")
    return 0


if __name__ == "__main__":
    sys.exit(main())

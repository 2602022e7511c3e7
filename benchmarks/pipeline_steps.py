"""The pipeline's steps as the DAG runs them, for the quality benchmarks (`quality.py`, `movielens.py`).

The data stage runs in this environment, the rest through the `recsys` CLI in the trainer environment; both
models stop early on the run's validation split. `resume` keeps every step whose output already exists.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TRAINER_PYTHON = PROJECT_ROOT / ".venv-trainer" / "bin" / "python"


@dataclasses.dataclass
class StepTimes:
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    kept: list[str] = dataclasses.field(default_factory=list)  # steps whose output an earlier run left

    def run(self, name: str, output: Path, action: Callable[[], object], *, resume: bool) -> None:
        if resume and output.exists():
            print(f"{name}: kept {output}", flush=True)
            self.kept.append(name)
            return
        started = time.perf_counter()
        action()
        self.seconds[name] = time.perf_counter() - started
        print(f"{name}: {self.seconds[name]:.0f} s", flush=True)


def run_steps(raw: Path, run: Path, spec_path: Path | None, times: StepTimes, *, two_tower_epochs: int,
              ranker_epochs: int, ranker_model: str, resplit_fraction: float | None = None,
              resume: bool = False, extra_arguments: Mapping[str, Sequence[str]] | None = None) -> None:  # fmt: skip
    """csv_to_parquet -> clean_null_rows -> resplit -> nvtabular_fit_transform -> train_two_tower, train_ranker
    -> build_faiss_index -> batch_score, from the raw CSV in `raw` into `run` (the DAG's folder layout).

    `extra_arguments` adds CLI arguments to the trainer steps named (e.g. "batch-score": weights to keep)."""
    from recsys.spec import load_spec
    from recsys.trainer_env import run_trainer_step
    from tasks.clean_null_rows import clean_null_rows
    from tasks.csv_to_parquet import csv_to_parquet
    from tasks.resplit import DEFAULT_FRACTION, resplit

    spec = load_spec(spec_path)
    spec_arguments = ["--spec", str(spec_path)] if spec_path else []
    run.mkdir(parents=True, exist_ok=True)

    def trainer(command: str, arguments: list[str]) -> Callable[[], object]:
        extra = list((extra_arguments or {}).get(command, ()))
        return lambda: run_trainer_step(TRAINER_PYTHON, command, [*arguments, *spec_arguments, *extra])

    fraction = DEFAULT_FRACTION if resplit_fraction is None else resplit_fraction
    times.run("csv_to_parquet", run / "parquet", lambda: csv_to_parquet(raw, run / "parquet", spec), resume=resume)
    times.run("clean_null_rows", run / "clean", lambda: clean_null_rows(run / "parquet", run / "clean", spec),
              resume=resume)  # fmt: skip
    times.run("resplit", run / "resplit", lambda: resplit(run / "clean", run / "resplit", spec, fraction),
              resume=resume)  # fmt: skip
    times.run("nvtabular_fit_transform", run / "nvtabular",
              trainer("nvtabular-fit-transform", ["--input", str(run / "resplit"), "--output", str(run / "nvtabular")]),
              resume=resume)  # fmt: skip
    times.run("train_two_tower", run / "two_tower",
              trainer("train-two-tower", ["--input", str(run / "nvtabular"), "--output", str(run / "two_tower"),
                                          "--epochs", str(two_tower_epochs)]), resume=resume)  # fmt: skip
    times.run("train_ranker", run / "ranker",
              trainer("train-ranker", ["--input", str(run / "nvtabular"), "--output", str(run / "ranker"),
                                       "--epochs", str(ranker_epochs), "--model", ranker_model]),
              resume=resume)  # fmt: skip
    times.run("build_faiss_index", run / "faiss_index",
              trainer("build-faiss-index", ["--input", str(run / "two_tower"), "--output", str(run / "faiss_index"),
                                            "--nvtabular", str(run / "nvtabular")]), resume=resume)  # fmt: skip
    times.run("batch_score", run / "batch_score",
              trainer("batch-score", ["--input", str(run), "--output", str(run / "batch_score")]),
              resume=resume)  # fmt: skip

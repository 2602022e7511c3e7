"""The pipeline's steps as the DAG runs them (tasks/pipeline.py), for the quality benchmarks (`quality.py`,
`movielens.py`), with the time each step took.

The data stage runs in this environment, the rest through the `recsys` CLI in the trainer environment; both
models stop early on the run's validation split. `resume` keeps every step whose output already exists.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path


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
    -> build_faiss_index -> batch_score, from the raw CSV in `raw` into `run`: the DAG's steps and folders
    (tasks/pipeline.py), without validation (the benchmarks measure models, on data the generator or the importer
    wrote).

    `extra_arguments` adds CLI arguments to the trainer steps named (e.g. "batch-score": weights to keep)."""
    from recsys.run_layout import RunLayout
    from tasks.pipeline import PipelineConfig, run_pipeline
    from tasks.resplit import DEFAULT_FRACTION

    config = PipelineConfig(spec=str(spec_path) if spec_path else None, two_tower_epochs=two_tower_epochs,
                            ranker_epochs=ranker_epochs, ranker_model=ranker_model,
                            resplit_fraction=DEFAULT_FRACTION if resplit_fraction is None else resplit_fraction,
                            trainer_arguments=dict(extra_arguments or {}))  # fmt: skip

    def heard(name: str, seconds: float | None) -> None:
        if seconds is None:
            print(f"{name}: kept {run}", flush=True)
            times.kept.append(name)
        else:
            times.seconds[name] = seconds
            print(f"{name}: {seconds:.0f} s", flush=True)

    run_pipeline(raw, RunLayout(run), config, until="batch_score", skip=("validate",), resume=resume, on_step=heard)

"""The nightly pipeline's steps, in order, each run the way the DAG runs it; and `run_pipeline`, the same steps in
plain Python for the tests' trained runs and the benchmarks.

`PipelineConfig` holds what a run may set (the DAG's Params; their defaults are the steps' own config defaults),
`RunLayout` where each step writes. The data stage and the export run in this (the platform) environment; the
NVTabular step, training, the index, batch scoring and the demo data in the trainer environment, through the
`recsys` CLI. MLflow tracking, the quality gate and publishing stay in the DAG: they act on shared stores.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from recsys.list_defaults import TOP_K, TOP_N
from recsys.run_layout import RunLayout
from recsys.spec import DatasetSpec, load_spec
from tasks.clean_null_rows import DEFAULT_MAX_NULL_FEATURES
from tasks.csv_to_parquet import CsvToParquetConfig
from tasks.resplit import DEFAULT_FRACTION
from tasks.train_ranker import RankerConfig
from tasks.train_two_tower import TwoTowerConfig

log = logging.getLogger(__name__)

# The steps `run_pipeline` runs, in the DAG's order (the DAG runs the two trainings side by side), and the
# RunLayout folder each writes.
STEP_OUTPUTS = {
    "csv_to_parquet": "parquet", "clean_null_rows": "clean", "resplit": "resplit", "validate": "validate",
    "nvtabular_fit_transform": "nvtabular", "train_two_tower": "two_tower", "train_ranker": "ranker",
    "build_faiss_index": "faiss_index", "batch_score": "batch_score", "demo_data": "demo",
    "export_triton_ensemble": "triton_repository",
}  # fmt: skip
STEPS = tuple(STEP_OUTPUTS)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """What one run may set: the DAG's Params, defaults from the steps' configs."""

    spec: str | None = None  # dataset spec YAML; None: AliCCP's (specs/aliccp.yaml)
    max_bad_row_fraction: float = CsvToParquetConfig.max_bad_row_fraction
    sample_fraction: float = CsvToParquetConfig.sample_fraction
    max_null_features: int = DEFAULT_MAX_NULL_FEATURES
    resplit_fraction: float = DEFAULT_FRACTION
    ranker_model: str = RankerConfig.model
    ranker_epochs: int = RankerConfig.epochs
    two_tower_epochs: int = TwoTowerConfig.epochs
    two_tower_l2_normalize: bool = TwoTowerConfig.l2_normalize
    two_tower_temperature: float = TwoTowerConfig.logits_temperature
    top_k: int = TOP_K
    top_n: int = TOP_N
    retrieval_weight: float | None = None  # None: chosen on validation by batch scoring, taken by the export
    item_to_item_weight: float | None = None
    unavailable_items: str | None = None  # CSV with an item id column: items never recommended
    triton_instances: int = 1  # instances of each Triton stage model (TritonEnsembleConfig.instances)
    # Extra CLI arguments of trainer steps, by command (a benchmark's own settings, e.g. "batch-score": weights).
    trainer_arguments: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> PipelineConfig:
        """The config of a DAG run: its Params named like the fields (others are the DAG's own)."""
        names = {field.name for field in dataclasses.fields(cls)} - {"trainer_arguments"}
        return cls(**{name: params[name] for name in names if name in params})

    def dataset_spec(self) -> DatasetSpec:
        return load_spec(self.spec)


# The Celery queue of the DAG tasks whose step runs in the trainer environment (`make airflow-celery`): a worker on a
# machine with a GPU can take only those (`airflow celery worker --queues trainer`). The LocalExecutor ignores it.
TRAINER_QUEUE = "trainer"


def _trainer(command: str, config: PipelineConfig, arguments: list[str]) -> dict:
    from recsys.settings import get_settings
    from recsys.trainer_env import run_trainer_step

    spec = ["--spec", config.spec] if config.spec else []
    extra = list(config.trainer_arguments.get(command, ()))
    return run_trainer_step(get_settings().trainer_python, command, [*arguments, *spec, *extra])


def run_step(name: str, layout: RunLayout, config: PipelineConfig, *, input_dir: Path | None = None,
             forgotten_users: Sequence[int] = (), model_versions: Mapping[str, str] | None = None) -> dict:  # fmt: skip
    """Run one step of the run in `layout`; returns its metrics. `input_dir` (the raw CSV folder) and
    `forgotten_users` (the customers forgotten on request, whose rows every input loses) are csv_to_parquet's;
    `model_versions` (the registered versions scored with) batch scoring's and the export's."""
    if name == "csv_to_parquet":
        from tasks.csv_to_parquet import csv_to_parquet

        if input_dir is None:
            raise ValueError("csv_to_parquet needs the raw input folder")
        step_config = CsvToParquetConfig(max_bad_row_fraction=config.max_bad_row_fraction,
                                         sample_fraction=config.sample_fraction)  # fmt: skip
        return csv_to_parquet(input_dir, layout.parquet, config.dataset_spec(), step_config,
                              forgotten_users=forgotten_users)  # fmt: skip
    if name == "clean_null_rows":
        from tasks.clean_null_rows import clean_null_rows

        return clean_null_rows(layout.parquet, layout.clean, config.dataset_spec(), config.max_null_features)
    if name == "resplit":
        from tasks.resplit import resplit

        return resplit(layout.clean, layout.resplit, config.dataset_spec(), config.resplit_fraction)
    if name == "validate":
        from tasks.validate import validate

        return validate(layout.resplit, layout.validate, config.dataset_spec())
    if name == "nvtabular_fit_transform":
        return _trainer("nvtabular-fit-transform", config, ["--input", str(layout.resplit),
                                                            "--output", str(layout.nvtabular)])  # fmt: skip
    if name == "train_two_tower":
        return _trainer("train-two-tower", config, ["--input", str(layout.nvtabular), "--output", str(layout.two_tower),
                                                    "--epochs", str(config.two_tower_epochs),
                                                    "--l2-normalize" if config.two_tower_l2_normalize
                                                    else "--no-l2-normalize",
                                                    "--temperature", str(config.two_tower_temperature)])  # fmt: skip
    if name == "train_ranker":
        return _trainer("train-ranker", config, ["--input", str(layout.nvtabular), "--output", str(layout.ranker),
                                                 "--model", config.ranker_model,
                                                 "--epochs", str(config.ranker_epochs)])  # fmt: skip
    if name == "build_faiss_index":
        # With the NVTabular output: the IVF index's recall on user queries, and the item-to-item source.
        return _trainer("build-faiss-index", config, ["--input", str(layout.two_tower),
                                                      "--output", str(layout.faiss_index),
                                                      "--nvtabular", str(layout.nvtabular)])  # fmt: skip
    if name == "batch_score":
        arguments = ["--input", str(layout.root), "--output", str(layout.batch_score), "--top-k", str(config.top_k),
                     "--top-n", str(config.top_n), *_batch_score_rules(config)]  # fmt: skip
        if model_versions:
            arguments += ["--model-versions", json.dumps(dict(model_versions))]
        return _trainer("batch-score", config, arguments)
    if name == "demo_data":
        return _trainer("demo-data", config, ["--input", str(layout.root), "--output", str(layout.demo)])
    if name == "export_triton_ensemble":
        from tasks.export_triton_ensemble import TritonEnsembleConfig, export_triton_ensemble

        unavailable = Path(config.unavailable_items) if config.unavailable_items else None
        export = TritonEnsembleConfig(top_k=config.top_k, top_n=config.top_n, unavailable_items=unavailable,
                                      retrieval_weight=config.retrieval_weight,
                                      item_to_item_weight=config.item_to_item_weight,
                                      instances=config.triton_instances)  # fmt: skip
        # After batch scoring: the blend weights it chose are the export's, so online and offline lists agree.
        return export_triton_ensemble(layout.root, layout.triton_repository, config.dataset_spec(), export,
                                      model_versions=dict(model_versions) if model_versions else None,
                                      batch_score_dir=layout.batch_score)  # fmt: skip
    raise ValueError(f"unknown step {name!r}; the steps are {', '.join(STEPS)}")


def _batch_score_rules(config: PipelineConfig) -> list[str]:
    arguments = []
    for name in ("retrieval_weight", "item_to_item_weight"):
        if getattr(config, name) is not None:
            arguments += [f"--{name.replace('_', '-')}", str(getattr(config, name))]
    if config.unavailable_items:
        arguments += ["--unavailable-items", config.unavailable_items]
    return arguments


@dataclasses.dataclass
class PipelineResult:
    metrics: dict[str, dict] = dataclasses.field(default_factory=dict)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    kept: list[str] = dataclasses.field(default_factory=list)  # steps whose output an earlier run left (resume)


def run_pipeline(input_dir: Path | None, layout: RunLayout, config: PipelineConfig = PipelineConfig(), *,
                 start: str = STEPS[0], until: str = "batch_score", skip: Sequence[str] = (), resume: bool = False,
                 on_step: Callable[[str, float | None], None] | None = None) -> PipelineResult:  # fmt: skip
    """The steps from `start` up to `until` (both included), but those in `skip`, from the raw CSV folder
    `input_dir` (csv_to_parquet's) into `layout`. With `resume`, a step whose output folder exists is kept, not
    rerun. `on_step` hears each step's name and seconds (None: kept)."""
    if {start, until, *skip} - set(STEPS):
        raise ValueError(f"unknown step in start={start!r}, until={until!r} or skip={list(skip)}; the steps are "
                         f"{', '.join(STEPS)}")  # fmt: skip
    layout.root.mkdir(parents=True, exist_ok=True)
    result = PipelineResult()
    for name in STEPS[STEPS.index(start) : STEPS.index(until) + 1]:
        if name in skip:
            continue
        if resume and getattr(layout, STEP_OUTPUTS[name]).exists():
            result.kept.append(name)
            if on_step:
                on_step(name, None)
            continue
        started = time.perf_counter()
        result.metrics[name] = run_step(name, layout, config, input_dir=input_dir)
        result.seconds[name] = time.perf_counter() - started
        log.info("%s: %.1f s", name, result.seconds[name])
        if on_step:
            on_step(name, result.seconds[name])
    return result

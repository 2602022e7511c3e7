from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from recsys.datagen import GeneratorConfig, generate_dataset
from recsys.parquet_io import nvtabular_part_files
from recsys.settings import get_settings
from recsys.spec import DatasetSpec, load_spec
from recsys.trainer_env import run_trainer_step
from tasks.clean_null_rows import clean_null_rows
from tasks.csv_to_parquet import csv_to_parquet
from tasks.resplit import resplit

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def spec() -> DatasetSpec:
    return load_spec()


@pytest.fixture(scope="session")
def small_raw(tmp_path_factory: pytest.TempPathFactory, spec: DatasetSpec) -> Path:
    """10k generated AliCCP-format rows (train.csv, test.csv, oracle file)."""
    out = tmp_path_factory.mktemp("raw") / "small"
    generate_dataset(GeneratorConfig(rows=10_000, seed=7), out, spec, progress=False)
    return out


# Test-data choice: at 50k rows the default click-through rate (~9%) leaves about 3k training
# positives, too few for the two-tower model to learn more than item popularity; a higher base rate
# (about 24% clicks, 8k positives) lets the end-to-end test check that retrieval beats popularity.
MEDIUM_BASE_LOGIT = -3.7
MEDIUM_CLICK_THROUGH_RATE = 0.24


@pytest.fixture(scope="session")
def medium_raw(tmp_path_factory: pytest.TempPathFactory, spec: DatasetSpec) -> Path:
    """50k generated rows, the size the end-to-end tests run on."""
    out = tmp_path_factory.mktemp("raw") / "medium"
    generate_dataset(GeneratorConfig(rows=50_000, seed=11, base_logit=MEDIUM_BASE_LOGIT), out, spec, progress=False)
    return out


@pytest.fixture(scope="session")
def nvtabular_output(medium_raw: Path, tmp_path_factory: pytest.TempPathFactory, spec) -> tuple[Path, Path, dict]:
    """The data stage on the 50k rows, NVTabular run as the DAG runs it: (resplit dir, output dir, metrics)."""
    base = tmp_path_factory.mktemp("nvt")
    csv_to_parquet(medium_raw, base / "parquet", spec)
    clean_null_rows(base / "parquet", base / "clean", spec)
    resplit(base / "clean", base / "resplit", spec)
    metrics = run_trainer_step(
        get_settings().trainer_python, "nvtabular-fit-transform",
        ["--input", str(base / "resplit"), "--output", str(base / "nvtabular")],
    )  # fmt: skip
    return base / "resplit", base / "nvtabular", metrics


def read_nvtabular_output(directory: Path) -> pd.DataFrame:
    """NVTabular writes part_<n>.parquet next to schema and metadata files."""
    return pd.concat([pd.read_parquet(path) for path in nvtabular_part_files(directory)], ignore_index=True)

from __future__ import annotations

from pathlib import Path

import pytest

from recsys.datagen import GeneratorConfig, generate_dataset
from recsys.spec import DatasetSpec, load_spec

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


@pytest.fixture(scope="session")
def medium_raw(tmp_path_factory: pytest.TempPathFactory, spec: DatasetSpec) -> Path:
    """50k generated rows, the size the end-to-end tests run on."""
    out = tmp_path_factory.mktemp("raw") / "medium"
    generate_dataset(GeneratorConfig(rows=50_000, seed=11), out, spec, progress=False)
    return out

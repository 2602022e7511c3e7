from __future__ import annotations

import contextlib
import os
import uuid

# Before any test imports Feast: Feast sets PROMETHEUS_MULTIPROC_DIR at import, and prometheus_client picks
# file-backed values for good if that is set when it is first imported, which would give the gateway apps the
# tests build (in this one process) metrics that their own registries do not report. The gateway never imports
# Feast; its multiprocess mode is serving.run's (serving/api/metrics.py).
import prometheus_client  # noqa: F401  isort: skip
from collections.abc import Iterator
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


@pytest.fixture(scope="session", autouse=True)
def gateways_outside_the_project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every gateway a test starts appends served lists to RECSYS_IMPRESSIONS_DIR (default under var/data): the
    session's own folder instead, unless a test names one. And none reads or writes the user's Feast store
    (default registry under var/feast): gateways run without Feast on the online path unless a test turns it
    on with a store of its own (tests/test_recommendations_api.py), and a stray one finds an empty registry."""
    with environment({"RECSYS_IMPRESSIONS_DIR": str(tmp_path_factory.mktemp("impressions")),
                      "RECSYS_LIVE_FEATURES": "false",
                      "RECSYS_FEAST_REGISTRY_PATH": str(tmp_path_factory.mktemp("feast") / "registry.db")}):
        yield


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """These environment variables set (settings read them) until the block ends, then as they were."""
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    get_settings.cache_clear()
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        get_settings.cache_clear()


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


@pytest.fixture(scope="session")
def trained_run(nvtabular_output: tuple[Path, Path, dict], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """<run>/nvtabular, two_tower, ranker, faiss_index as the DAG lays them out, trained for real (briefly)."""
    resplit, nvtabular, _ = nvtabular_output
    run = tmp_path_factory.mktemp("trained") / "run"
    run.mkdir()
    (run / "nvtabular").symlink_to(nvtabular)
    (run / "resplit").symlink_to(resplit)
    python = get_settings().trainer_python
    steps = [
        ("train-two-tower", ["--input", str(nvtabular), "--output", str(run / "two_tower"), "--epochs", "2"]),
        ("train-ranker", ["--input", str(nvtabular), "--output", str(run / "ranker"), "--epochs", "1"]),
        ("build-faiss-index", ["--input", str(run / "two_tower"), "--output", str(run / "faiss_index"),
                               "--nvtabular", str(nvtabular)]),  # with the item-to-item source
    ]
    for command, arguments in steps:
        run_trainer_step(python, command, arguments)
    return run


def latest_raw_features(run: Path, spec: DatasetSpec, kind: str) -> dict[int, dict[str, int]]:
    """Each user's (or item's) raw features as their latest event in the run's resplit data carries them (the row
    nvtabular_fit_transform's feature table encodes), as the API takes them: JSON integers, missing values left
    out. For the integer-typed default spec."""
    id_column, features = (spec.user_id, spec.user_features) if kind == "user" else (spec.item_id, spec.item_features)
    frames = [pd.read_parquet(run / "resplit" / split) for split in ("train", "valid")]
    rows = pd.concat(frames, ignore_index=True).sort_values([id_column, spec.timestamp], kind="stable")
    latest = rows.groupby(id_column, sort=True).tail(1)
    return {int(row[id_column]): {name: int(row[name]) for name in features if pd.notna(row[name])}
            for row in latest.to_dict("records")}  # fmt: skip


def read_nvtabular_output(directory: Path) -> pd.DataFrame:
    """NVTabular writes part_<n>.parquet next to schema and metadata files."""
    return pd.concat([pd.read_parquet(path) for path in nvtabular_part_files(directory)], ignore_index=True)


# The gateway's main database (serving/api/): every test that takes `database_url` runs on a fresh SQLite
# file and on a throw-away PostgreSQL database (dropped afterwards). PostgreSQL is expected on this machine
# at 127.0.0.1:5432, user postgres, trust authentication; RECSYS_TEST_POSTGRES_URL names another server
# (a database the user may CREATE DATABASE from). Without one, the PostgreSQL half is skipped, saying why.
POSTGRES_ADMIN_URL = os.environ.get("RECSYS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database (no tables: tests create them with the migrations)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'gateway.db'}"
        return
    from sqlalchemy import create_engine
    from sqlalchemy.exc import OperationalError

    from recsys.database import database_url as driver_url

    admin_url = driver_url(POSTGRES_ADMIN_URL)
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
    name = f"recsys_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(f"CREATE DATABASE {name}")
    except OperationalError as error:
        admin.dispose()
        pytest.skip(f"PostgreSQL not reachable at {admin_url.render_as_string()}: {error.orig}")
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()


@pytest.fixture
def migrated_database_url(database_url: str) -> str:
    """`database_url` with the gateway's tables, made by the migrations as `make migrate` makes them."""
    from serving.api.migrate import upgrade

    upgrade(database_url)
    return database_url

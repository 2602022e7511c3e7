from __future__ import annotations

import contextlib
import fcntl
import os
import pickle
import shutil
import uuid

# Before any test imports Feast: Feast sets PROMETHEUS_MULTIPROC_DIR at import, and prometheus_client picks
# file-backed values for good if that is set when it is first imported, which would give the gateway apps the
# tests build (in this one process) metrics that their own registries do not report. The gateway never imports
# Feast; its multiprocess mode is serving.run's (serving/api/metrics.py).
import prometheus_client  # noqa: F401  isort: skip
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
import pytest

from recsys.datagen import SMALL_DATA_BASE_LOGIT, GeneratorConfig, generate_dataset
from recsys.parquet_io import nvtabular_part_files
from recsys.run_layout import RunLayout
from recsys.settings import get_settings
from recsys.spec import DatasetSpec, load_spec
from tasks.pipeline import PipelineConfig, run_pipeline

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Fixtures that run the trainer environment (trained runs, its interpreter): a test that asks for one is in the
# trainer tier.
TRAINER_FIXTURES = {"nvtabular_output", "trained_pipeline", "trained_run", "trainer_python"}


# `make test` runs on two pytest-xdist workers, a module's tests all on one (its module-scoped fixtures, its Redis
# prefix). Modules that flush a Redis database another module uses go to the same worker too: the end-to-end runs'
# DBs 11 and 12, Feast's DB 13, the publish tests' DB 14 (the cluster test compares with it). The session's generated
# data and trained runs are built once for all workers (built_once); its databases once per worker that asks.
WORKER_GROUPS = {
    "test_e2e_nightly": "e2e_databases", "test_airflow_scheduler": "e2e_databases",
    "test_demo_command": "e2e_databases",
    "test_feast_features": "feast_database", "test_feature_kinds": "feast_database",
    "test_publish_recommendations": "publish_database", "test_redis_cluster_store": "publish_database",
}  # fmt: skip


# The groups that take minutes on one worker (docs/testing.md), handed out first, longest first, so that no run
# ends waiting on one of them started late; the rest follow in xdist's order (most tests first).
LONGEST_GROUPS = ("e2e_databases", "test_model_versions", "test_recommendations_api", "test_airflow_celery",
                  "test_train_ranker", "test_outputs")  # fmt: skip


def worker_group(nodeid: str) -> str:
    """The group of a test: its module's name, or the shared group in WORKER_GROUPS."""
    module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")
    return WORKER_GROUPS.get(module, module)


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: `make test` passes -n
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """xdist's scope scheduling with `worker_group` as the scope, LONGEST_GROUPS first. Not its `loadgroup` with
    xdist_group markers: xdist 3.8 marks a group by rewriting `item._nodeid`, which pytest 9.2's nodes no longer
    read, so every test was scheduled alone (a module's fixtures set up on both workers at once, each deleting the
    other's keys)."""
    from xdist.scheduler import LoadScopeScheduling

    class ByWorkerGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return worker_group(nodeid)

        def _assign_work_unit(self, node: Any) -> None:  # xdist hands out the queue's first group
            for group in reversed(LONGEST_GROUPS):
                if group in self.workqueue:
                    self.workqueue.move_to_end(group, last=False)
            super()._assign_work_unit(node)

    return ByWorkerGroup(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """One tier per test (pyproject.toml's markers): `e2e` and `trainer` where a module or test is marked so,
    `trainer` also for a test that uses a trained-run fixture, `unit` for the rest (`make test-fast`)."""
    for item in items:
        if item.get_closest_marker("e2e") or item.get_closest_marker("trainer"):
            continue
        trains = TRAINER_FIXTURES & set(getattr(item, "fixturenames", ()))
        item.add_marker(pytest.mark.trainer if trains else pytest.mark.unit)


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


T = TypeVar("T")


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], T]) -> T:
    """`build(folder)`'s result, built once for the whole session: under pytest-xdist the first worker to ask builds
    into a folder of the session's temporary root while holding a lock, and the others wait and read its result
    (pickled), so two workers never train the same run. A build that fails leaves no result: the next asker tries
    again. Tests treat what is built as read-only, or write only into subfolders of their own."""
    if "PYTEST_XDIST_WORKER" not in os.environ:  # one process: its own temporary folder
        return build(tmp_path_factory.mktemp(name))
    shared = tmp_path_factory.getbasetemp().parent / "built_once"  # the session's root, above each worker's
    shared.mkdir(exist_ok=True)
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this worker dies
        result_file = shared / f"{name}.pickle"
        if result_file.exists():
            return pickle.loads(result_file.read_bytes())
        folder = shared / name
        shutil.rmtree(folder, ignore_errors=True)  # a failed build's leftovers
        folder.mkdir()
        result = build(folder)
        result_file.write_bytes(pickle.dumps(result))
        return result


@pytest.fixture(scope="session")
def small_raw(tmp_path_factory: pytest.TempPathFactory, spec: DatasetSpec) -> Path:
    """10k generated AliCCP-format rows (train.csv, test.csv, oracle file)."""

    def build(folder: Path) -> Path:
        generate_dataset(GeneratorConfig(rows=10_000, seed=7), folder / "small", spec, progress=False)
        return folder / "small"

    return built_once(tmp_path_factory, "small_raw", build)


@pytest.fixture(scope="session")
def medium_raw(tmp_path_factory: pytest.TempPathFactory, spec: DatasetSpec) -> Path:
    """50k generated rows, the size the end-to-end tests run on."""

    def build(folder: Path) -> Path:
        config = GeneratorConfig(rows=50_000, seed=11, base_logit=SMALL_DATA_BASE_LOGIT)
        generate_dataset(config, folder / "medium", spec, progress=False)
        return folder / "medium"

    return built_once(tmp_path_factory, "medium_raw", build)


# The tests' trained runs: as the DAG runs the steps (tasks/pipeline.py), briefly trained.
TEST_PIPELINE = PipelineConfig(two_tower_epochs=2, ranker_epochs=1)


@pytest.fixture(scope="session")
def nvtabular_output(medium_raw: Path, tmp_path_factory: pytest.TempPathFactory, spec) -> tuple[Path, Path, dict]:
    """The data stage on the 50k rows, NVTabular run as the DAG runs it: (resplit dir, output dir, metrics)."""

    def build(folder: Path) -> tuple[Path, Path, dict]:
        layout = RunLayout(folder)
        result = run_pipeline(medium_raw, layout, TEST_PIPELINE, until="nvtabular_fit_transform", skip=("validate",))
        return layout.resplit, layout.nvtabular, result.metrics["nvtabular_fit_transform"]

    return built_once(tmp_path_factory, "nvtabular_output", build)


@pytest.fixture(scope="session")
def trained_pipeline(nvtabular_output: tuple[Path, Path, dict], tmp_path_factory: pytest.TempPathFactory
                     ) -> tuple[Path, dict[str, dict]]:  # fmt: skip
    """<run>/nvtabular, two_tower, ranker, faiss_index as the DAG lays them out, trained for real (briefly); the
    Faiss index with the item-to-item source. With what each training step returned: (run folder, {step: metrics})."""

    def build(folder: Path) -> tuple[Path, dict[str, dict]]:
        resplit, nvtabular, _ = nvtabular_output
        layout = RunLayout(folder / "run")
        layout.root.mkdir()
        layout.nvtabular.symlink_to(nvtabular)
        layout.resplit.symlink_to(resplit)
        result = run_pipeline(None, layout, TEST_PIPELINE, start="train_two_tower", until="build_faiss_index")
        return layout.root, result.metrics

    return built_once(tmp_path_factory, "trained_pipeline", build)


@pytest.fixture(scope="session")
def trained_run(trained_pipeline: tuple[Path, dict[str, dict]]) -> Path:
    """The trained run's folder (trained_pipeline)."""
    return trained_pipeline[0]


@pytest.fixture(scope="session")
def batch_scored(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained run's batch scoring with the default options, as `recsys batch-score` writes it: a folder
    outside the run (an export finds no batch scoring in the run unless a test names one). Read-only for tests."""
    from recsys.trainer_env import run_trainer_step

    def build(folder: Path) -> Path:
        run_trainer_step(get_settings().trainer_python, "batch-score",
                         ["--input", str(trained_run), "--output", str(folder / "batch_score")])  # fmt: skip
        return folder / "batch_score"

    return built_once(tmp_path_factory, "batch_scored", build)


@pytest.fixture(scope="session")
def compared_rankers(nvtabular_output: tuple[Path, Path, dict], tmp_path_factory: pytest.TempPathFactory
                     ) -> dict[str, Path]:  # fmt: skip
    """The four rankers of the comparison (DLRM, DCN-v2, MLP, NCF) trained one epoch each by the trainer step on
    the 50k rows, as the DAG's comparison task trains them: {model: its output folder}. Read-only for tests."""
    from tasks.compare_rankers import train_rankers_for_comparison

    def build(folder: Path) -> dict[str, Path]:
        _, nvtabular, _ = nvtabular_output
        return train_rankers_for_comparison(nvtabular, folder, trainer_python=get_settings().trainer_python, epochs=1)

    return built_once(tmp_path_factory, "compared_rankers", build)


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
# (a database the user may CREATE DATABASE from). Without one the PostgreSQL halves fail, saying why: `make setup`
# installs and starts a server (scripts/postgres.sh), and a test that silently skipped would hide half the suite.
POSTGRES_ADMIN_URL = os.environ.get("RECSYS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


class PostgresServer:
    """Databases of the tests' own on the PostgreSQL server at RECSYS_TEST_POSTGRES_URL, dropped afterwards."""

    def __init__(self) -> None:
        from sqlalchemy import create_engine

        from recsys.database import database_url as driver_url

        self.admin_url = driver_url(POSTGRES_ADMIN_URL)
        self.admin = create_engine(self.admin_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})

    def create(self, template: str | None = None) -> str:
        """A new database (a copy of `template`, else empty); its name."""
        from sqlalchemy.exc import OperationalError

        name = f"recsys_test_{uuid.uuid4().hex[:12]}"
        try:
            with self.admin.connect() as connection:
                connection.exec_driver_sql(f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else ""))
        except OperationalError as error:
            pytest.fail(f"PostgreSQL not reachable at {self.admin_url.render_as_string()} ({error.orig}): run "
                        "`make setup` (scripts/postgres.sh starts one), or name a server in RECSYS_TEST_POSTGRES_URL")
        return name

    def url(self, name: str) -> str:
        return self.admin_url.set(database=name).render_as_string(hide_password=False)

    def drop(self, name: str) -> None:
        with self.admin.connect() as connection:
            connection.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    yield server
    server.admin.dispose()


@pytest.fixture(scope="session")
def migrated_databases(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One database of each kind made by the migrations, as `make migrate` makes them, once a session; each test's
    migrated database is a copy of the SQLite file, or the PostgreSQL one emptied (a CREATE DATABASE costs about
    half a second of a test's setup, the migrations as much again)."""
    from serving.api.migrate import upgrade

    sqlite_file = tmp_path_factory.mktemp("migrated") / "gateway.db"
    upgrade(f"sqlite:///{sqlite_file}")
    databases = {"sqlite": str(sqlite_file)}
    server = PostgresServer()
    try:
        name = server.create()
    except pytest.fail.Exception as error:  # no server: the PostgreSQL halves fail, saying why; SQLite's run
        databases["postgresql_unreachable"] = str(error)
        name = None
    try:
        if name is not None:
            databases["postgresql"] = server.url(name)
            upgrade(databases["postgresql"])
        yield databases
        if name is not None:
            server.drop(name)
    finally:
        server.admin.dispose()


def empty_tables(url: str) -> None:
    """Every table of the gateway's schema emptied, identities restarted; the migrations' version kept."""
    from sqlalchemy import create_engine

    from recsys.database import database_url as driver_url

    engine = create_engine(driver_url(url))
    try:
        with engine.begin() as connection:
            tables = [row[0] for row in connection.exec_driver_sql(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'alembic_version'")]
            connection.exec_driver_sql(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")
    finally:
        engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database (no tables: tests create them with the migrations)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'gateway.db'}"
        return
    server = request.getfixturevalue("postgres_server")
    name = server.create()
    try:
        yield server.url(name)
    finally:
        server.drop(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def migrated_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a database with the gateway's tables, made by the migrations, and no rows."""
    databases = request.getfixturevalue("migrated_databases")
    if request.param == "sqlite":
        shutil.copyfile(databases["sqlite"], tmp_path / "gateway.db")
        return f"sqlite:///{tmp_path / 'gateway.db'}"
    if "postgresql" not in databases:
        pytest.fail(databases["postgresql_unreachable"])
    empty_tables(databases["postgresql"])
    return databases["postgresql"]


@pytest.fixture(scope="session")
def empty_mlflow_database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SQLite MLflow database with MLflow's tables (made by its migrations, two seconds) and nothing else."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_tracking_uri(empty_mlflow_database: Path, tmp_path: Path) -> str:
    """A tracking URI of this test's own: a copy of the empty MLflow database in `tmp_path/mlflow.db`."""
    shutil.copyfile(empty_mlflow_database, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"

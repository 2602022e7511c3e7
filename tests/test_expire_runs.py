"""Old runs' folders go, and every folder something still reads stays: the versions Redis may serve (published for
real), the quality gate's champion and challenger (registered in a real MLflow and judged by the gate), the run
Feast's registry reads (applied for real), the newest runs and any recent one. The nightly DAG's task that calls
it runs in every end-to-end DAG test (`tests/test_e2e_nightly.py`, `tests/test_airflow_scheduler.py`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import mlflow
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis

from feature_repo.config import FeastStoreConfig
from feature_repo.tables import EVENT_TIMESTAMP, entity_tables
from recsys.recommendation_store import read_recommendations
from recsys.run_layout import RunLayout, runs_dir
from recsys.spec import load_spec
from tasks.expire_runs import EXPIRING_FOLDER, RunFolder, expire_runs, remove_runs, runs_to_remove
from tasks.feast_features import feast_apply
from tasks.publish_recommendations import publish_recommendations
from tasks.quality_gate import CHALLENGER, CHAMPION
from tests.redis_databases import delete_keys_under, redis_url
from tests.test_publish_recommendations import write_batch
from tests.test_quality_gate import aliases, gate, train

REDIS_URL = redis_url("quality_gate")  # shared by prefix
PREFIX = "expire-runs-test:"
FEAST_REDIS_URL = redis_url("feast")  # applying a registry writes nothing there
NOW = datetime(2026, 12, 5, 14, tzinfo=UTC)
SPEC = load_spec(None)


@pytest.fixture
def tracking_uri(mlflow_tracking_uri: str) -> Iterator[str]:
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(mlflow_tracking_uri)
    yield mlflow_tracking_uri
    mlflow.set_tracking_uri(previous)


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    delete_keys_under(client, PREFIX)
    yield client
    delete_keys_under(client, PREFIX)
    client.close()


def changed(data_root: Path, run: str, days_ago: float) -> None:
    """Date the run's folder and its steps' folders `days_ago` before NOW."""
    moment = (NOW - timedelta(days=days_ago)).timestamp()
    root = runs_dir(data_root) / run
    for folder in (root, *(entry for entry in root.iterdir() if entry.is_dir())):
        os.utime(folder, (moment, moment))


def feature_tables(nvtabular_dir: Path) -> Path:
    """Two rows of each feature table, as the NVTabular step writes them for Feast."""
    nvtabular_dir.mkdir(parents=True)
    for table in entity_tables(SPEC):
        columns = {name: pa.array([1, 2], pa.int64()) for name in (table.join_key, *table.features)}
        times = pa.array([NOW, NOW], pa.timestamp("us", tz="UTC"))
        pq.write_table(pa.table({**columns, EVENT_TIMESTAMP: times}), table.path(nvtabular_dir))
    return nvtabular_dir


def test_the_rules_keep_the_newest_the_recent_and_those_in_use():
    runs = [RunFolder(f"r{number}", NOW - timedelta(days=10 - number)) for number in range(10)]  # r9 the newest
    assert runs_to_remove(runs, in_use={"r1", "gone"}, keep_runs=3, now=NOW) == ["r0", "r2", "r3", "r4", "r5", "r6"]
    # r7 to r9 changed within 4 days; r6 exactly 4 days ago is no longer recent.
    assert runs_to_remove(runs, in_use=(), keep_runs=1, now=NOW, recent=timedelta(days=4)) == [
        "r0", "r1", "r2", "r3", "r4", "r5", "r6"]  # fmt: skip
    assert runs_to_remove(runs, in_use=(), keep_runs=10, now=NOW) == []


def test_old_runs_go_and_what_redis_the_gate_and_feast_read_stays(tmp_path: Path, tracking_uri: str,
                                                                   client: redis.Redis):  # fmt: skip
    # tmp_path is the data root: the quality gate's test helpers write runs/<run>/batch_score under it.
    # The quality gate's champion (night01) and the challenger it held (night02), with their batch scores.
    first = train(tracking_uri, tmp_path, "night01", auc=0.70, recall=0.40)
    assert gate(tracking_uri, first).outcome == "publish"
    second = train(tracking_uri, tmp_path, "night02", auc=0.60, recall=0.40)
    assert gate(tracking_uri, second).outcome == "hold"
    assert aliases(tracking_uri, CHAMPION) == first["versions"]
    assert aliases(tracking_uri, CHALLENGER) == second["versions"]
    # Redis serves night04 and keeps night03 for a rollback.
    for run, seed in (("night03", 3), ("night04", 4)):
        publish_recommendations(write_batch(runs_dir(tmp_path) / run / "batch_score", seed=seed), redis_url=REDIS_URL,
                                version=run, key_prefix=PREFIX, progress=False)  # fmt: skip
    # Feast's sources are night05's tables (applied after the gate held, say).
    feast = FeastStoreConfig(FEAST_REDIS_URL, tmp_path / "feast" / "registry.db")
    feast_apply(feature_tables(RunLayout(runs_dir(tmp_path) / "night05").nvtabular), SPEC, feast)
    for number in range(6, 13):
        (runs_dir(tmp_path) / f"night{number:02d}" / "resplit").mkdir(parents=True)
        (runs_dir(tmp_path) / f"night{number:02d}" / "resplit" / "part-0.parquet").write_bytes(b"x" * 1000)
    for number in range(1, 13):
        changed(tmp_path, f"night{number:02d}", days_ago=13 - number)  # night12 a day ago, night01 twelve days ago
    # A removal cut short left a run half deleted.
    leftover = tmp_path / EXPIRING_FOLDER / "night00.0123456789ab"
    leftover.mkdir(parents=True)
    (leftover / "model.bin").write_bytes(b"y" * 500)

    def expire() -> dict:
        return expire_runs(tmp_path, redis_url=REDIS_URL, redis_type="redis", key_prefix=PREFIX,
                           tracking_uri=tracking_uri, keep_runs=3, feast_config=feast, now=NOW)  # fmt: skip

    report = expire()
    assert report["runs_removed"] == ["night06", "night07", "night08", "night09"]  # oldest first
    assert report["runs_kept"] == ["night01", "night02", "night03", "night04", "night05", "night10", "night11",
                                   "night12"]  # fmt: skip
    assert report["in_use"] == ["night01", "night02", "night03", "night04", "night05"]
    assert report["bytes_freed"] == 4 * 1000 + 500
    assert sorted(path.name for path in runs_dir(tmp_path).iterdir()) == report["runs_kept"]
    assert list((tmp_path / EXPIRING_FOLDER).iterdir()) == []
    # What they keep still works: Redis' lists, the gate's batch scores to republish.
    assert read_recommendations(client, PREFIX, "user", 1).version == "night04"
    assert (Path(first["batch_dir"]) / "_metrics.json").exists() and (Path(second["batch_dir"]) / "users").is_dir()

    again = expire()  # idempotent
    assert again["runs_removed"] == [] and again["bytes_freed"] == 0


def test_a_newest_run_is_always_kept(tmp_path: Path):
    with pytest.raises(ValueError, match="keep_runs is 1 at least"):
        remove_runs(tmp_path, in_use=(), keep_runs=0)

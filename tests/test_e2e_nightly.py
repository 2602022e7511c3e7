"""End to end: `airflow dags test recsys_nightly` on generated data, in an Airflow home of its own."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
import redis

from recsys.parquet_io import count_rows
from recsys.recommendation_store import RecommendationKeys
from tests.redis_databases import redis_url

PROJECT_ROOT = Path(__file__).resolve().parent.parent
E2E_REDIS_URL = redis_url("e2e")
E2E_FEAST_REDIS_URL = redis_url("e2e_feast")
pytestmark = pytest.mark.e2e

LOAD_REGISTERED_MODEL = """
import json, sys
import mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
example = pd.read_json(sys.argv[1] + "/input_example.json", orient="split")
print(json.dumps([float(score) for score in model.predict(example)]))
"""


@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The project's airflow.cfg with a throw-away metadata DB, log folder and data root."""
    config = PROJECT_ROOT / "airflow.cfg"
    assert config.exists(), "airflow.cfg is missing: run the README's setup command (make setup)"
    home = tmp_path_factory.mktemp("airflow")
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW_CONFIG": str(config),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
        "RECSYS_MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db",
        "RECSYS_MLFLOW_ARTIFACT_ROOT": str(home / "mlartifacts"),
        # Redis DBs of the tests' own (flushed here), never the user's DB 0.
        "RECSYS_REDIS_URL": E2E_REDIS_URL,
        "RECSYS_FEAST_REDIS_URL": E2E_FEAST_REDIS_URL,
        "RECSYS_FEAST_REGISTRY_PATH": str(home / "feast" / "registry.db"),
        # The gateway's database, where customers forgotten on request leave their tombstones.
        "RECSYS_DATABASE_URL": f"sqlite:///{home}/gateway.db",
    }
    for url in (E2E_REDIS_URL, E2E_FEAST_REDIS_URL):
        redis.Redis.from_url(url).flushdb()
    subprocess.run([str(PROJECT_ROOT / ".venv/bin/airflow"), "db", "migrate"], env=env, check=True,
                   capture_output=True, timeout=300)  # fmt: skip
    from serving.api.migrate import upgrade

    upgrade(env["RECSYS_DATABASE_URL"])
    return env


def forget_first_user(env: dict[str, str], raw: Path, data_root: Path) -> int:
    """Forget the raw data's first user as an operator would before the nightly run (serving/forget.py)."""
    from recsys.settings import Settings
    from serving.forget import forget_customers

    user = int(pa_csv.read_csv(raw / "train.csv").column("user_id")[0].as_py())
    settings = Settings(database_url=env["RECSYS_DATABASE_URL"], redis_url=E2E_REDIS_URL, redis_key_prefix="e2e:",
                        data_root=data_root, feast_redis_url=E2E_FEAST_REDIS_URL,
                        feast_registry_path=Path(env["RECSYS_FEAST_REGISTRY_PATH"]))  # fmt: skip
    forget_customers(settings, [user])
    return user


def run_dag(env: dict[str, str], data_root: Path, conf: dict,
            key_prefix: str = "e2e:") -> tuple[subprocess.CompletedProcess, Path | None]:  # fmt: skip
    """Run one DagRun; return the process and the run's output folder (the newest under data_root)."""
    process = subprocess.run(
        [str(PROJECT_ROOT / ".venv/bin/airflow"), "dags", "test", "recsys_nightly", "-c", json.dumps(conf)],
        env={**env, "RECSYS_DATA_ROOT": str(data_root), "RECSYS_REDIS_KEY_PREFIX": key_prefix},
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    runs = sorted((data_root / "runs").glob("*")) if (data_root / "runs").exists() else []
    return process, (runs[-1] if runs else None)


def _failed_tasks(output: str) -> list[str]:
    return [line for line in output.splitlines() if "new_state=failed" in line or "Task failed" in line]


def test_data_stage_end_to_end(airflow_env, medium_raw: Path, tmp_path: Path, spec):
    forgotten = forget_first_user(airflow_env, medium_raw, tmp_path / "data")
    process, run = run_dag(airflow_env, tmp_path / "data", {"input_dir": str(medium_raw)})
    output = process.stdout + process.stderr
    assert process.returncode == 0, output[-3000:]
    assert run is not None and not _failed_tasks(output), output[-3000:]

    # The forgotten customer's rows never got past the first step: the DAG read the tombstone.
    parquet = json.loads((run / "parquet" / "_metrics.json").read_text())
    assert parquet["rows_in"] == 50_000 and parquet["rows_forgotten"] > 0
    assert parquet["rows_out"] == 50_000 - parquet["rows_forgotten"]
    assert forgotten not in set(pq.read_table(run / "parquet", columns=["user_id"]).column("user_id").to_pylist())
    cleaned = json.loads((run / "clean" / "_metrics.json").read_text())
    assert sum(cleaned["rows_after"].values()) < 0.85 * 50_000
    resplit = json.loads((run / "resplit" / "_metrics.json").read_text())
    assert f"| Train | {parquet['rows_out_by_split']['train']:,} |" in resplit["table"]
    assert "Data After Resplitting" in output  # Table 5.2 is in the run's log
    assert "Result: PASSED" in (run / "validate" / "report.md").read_text()
    nvtabular = json.loads((run / "nvtabular" / "_metrics.json").read_text())
    assert nvtabular["train_rows"] == count_rows(run / "resplit" / "train")
    users = pd.read_parquet(run / "nvtabular" / "user_features.parquet")
    assert len(users) == nvtabular["users"] > 300
    assert (run / "nvtabular" / "workflow" / "workflow.pkl").exists()

    # the ranker: trained, logged and registered in MLflow, with its AUC next to the oracle's
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=airflow_env["RECSYS_MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("recsys_ranker")
    [ranker_run] = client.search_runs([experiment.experiment_id])
    metrics = ranker_run.data.metrics
    print(f"ranker validation AUC {metrics['best_valid_auc']:.3f}, oracle AUC {metrics['oracle_auc']:.3f}")
    assert 0.6 < metrics["best_valid_auc"] < metrics["oracle_auc"]
    epochs_logged = len(client.get_metric_history(ranker_run.info.run_id, "valid_auc"))  # one point per epoch
    assert metrics["best_epoch"] <= epochs_logged <= int(ranker_run.data.params["epochs"])
    artifacts = {item.path for item in client.list_artifacts(ranker_run.info.run_id, "plots")}
    assert {"plots/auc_per_epoch.png", "plots/loss_per_epoch.png", "plots/roc.png"} <= artifacts
    [version] = client.search_model_versions("name='ranker'")
    assert version.run_id == ranker_run.info.run_id
    # the registered version loads and scores in the trainer environment, where it is meant to run
    from urllib.parse import urlparse

    [logged_model] = client.search_logged_models([experiment.experiment_id])
    local_model = urlparse(logged_model.artifact_location).path
    scored = subprocess.run(
        [str(PROJECT_ROOT / ".venv-trainer/bin/python"), "-c", LOAD_REGISTERED_MODEL, local_model],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,  # MLflow may create ./mlruns
    )  # fmt: skip
    assert scored.returncode == 0, scored.stderr[-2000:]
    scores = json.loads(scored.stdout.strip().splitlines()[-1])
    assert len(scores) == 5 and all(0.0 < score < 1.0 for score in scores)

    # the two-tower model: whole-catalog recall per epoch, a popularity baseline, a registered query tower
    [two_tower_run] = client.search_runs([client.get_experiment_by_name("recsys_two_tower").experiment_id])
    retrieval = two_tower_run.data.metrics
    print(f"two-tower recall@100 {retrieval['best_recall_at_100']:.3f}, "
          f"popularity {retrieval['popularity_recall_at_100']:.3f}")  # fmt: skip
    assert retrieval["best_recall_at_500"] > 500 / int(two_tower_run.data.params["catalog_items"])  # beats random
    assert len(client.get_metric_history(two_tower_run.info.run_id, "recall_at_100")) >= retrieval["best_epoch"]
    plots = {item.path for item in client.list_artifacts(two_tower_run.info.run_id, "plots")}
    assert {"plots/loss_per_epoch.png", "plots/recall_per_epoch.png"} <= plots
    [two_tower_version] = client.search_model_versions("name='two_tower'")
    assert two_tower_version.run_id == two_tower_run.info.run_id
    assert retrieval["best_recall_at_100"] > retrieval["popularity_recall_at_100"]  # see conftest's test data

    # the Faiss index: exact for a catalog this small, its recall logged on the two-tower run
    faiss_metrics = json.loads((run / "faiss_index" / "_metrics.json").read_text())
    assert faiss_metrics["kind"] == "flat" and faiss_metrics["items"] == int(two_tower_run.data.params["catalog_items"])
    assert retrieval["faiss_recall_at_100_vs_exact"] == 1.0

    # Feast: the online store serves every sampled user's encoded features as the run's table holds them
    from feature_repo.config import FeastStoreConfig
    from feature_repo.store import online_user_features, open_feature_store

    feast_config = FeastStoreConfig(E2E_FEAST_REDIS_URL, Path(airflow_env["RECSYS_FEAST_REGISTRY_PATH"]))
    store = open_feature_store(spec, feast_config)
    sample = users.sample(20, random_state=0)
    online = online_user_features(store, spec, sample[spec.user_id].tolist())
    for feature in (f"{spec.user_id}_encoded", *spec.user_features):
        assert online[feature] == sample[feature].tolist(), feature

    # Redis: every validation user has a full list under the published version, bought items excluded
    version = check_published_recommendations(run, spec, key_prefix="e2e:")
    batch = json.loads((run / "batch_score" / "_metrics.json").read_text())
    assert batch["model_versions"] == {"two_tower": str(two_tower_version.version),
                                       "ranker": str(version_of_ranker(client))}  # fmt: skip
    print(f"published version {version}: {batch['users']} users at {batch['users_per_second']:.0f} users/s")

    # The quality gate let the first models through (no champion yet, both beat their baselines).
    for model_run in (client.get_run(ranker_run.info.run_id), client.get_run(two_tower_run.info.run_id)):
        assert model_run.data.tags["gate_decision"] == "publish", model_run.data.tags.get("gate_reason")
    assert str(client.get_model_version_by_alias("ranker", "champion").version) == str(version_of_ranker(client))
    assert json.loads((run / "demo" / "_metrics.json").read_text())["users"] > 0  # the demo page's data
    evaluation = json.loads((run / "evaluate" / "metrics.json").read_text())
    assert evaluation["checks"]["ranker_share_of_oracle_auc"] > 0  # reported next to the baselines
    assert "evaluation" in {item.path for item in client.list_artifacts(ranker_run.info.run_id)}

    # Triton: the exported repository loads in a real server and answers as batch scoring did.
    from serving.triton_server import TritonServer
    from tests.test_triton_ensemble import infer, recommend

    sample_users = users[spec.user_id].to_numpy()[:5]
    with TritonServer(run / "triton_repository") as server:
        online = recommend(server, sample_users, temperature=np.array([0.0], np.float32))
        similar = infer(server, "similar_products", {"item_id_raw": np.array([item_in_catalog(run, spec)])},
                        ("item_ids", "scores"))  # fmt: skip
    redis_client = redis.Redis.from_url(E2E_REDIS_URL)
    for user, items, scores in zip(sample_users, online["item_ids"], online["scores"], strict=True):
        published = read_recommendations_of_version(redis_client, "e2e:", version, int(user))
        assert items.tolist() == published[0] and scores.tolist() == pytest.approx(published[1], rel=1e-4), user
    published_similar = read_recommendations_of_version(redis_client, "e2e:", version, item_in_catalog(run, spec),
                                                         kind="similar")  # fmt: skip
    assert similar["item_ids"][0].tolist() == published_similar[0]
    mlflow_files = {item.path for item in client.list_artifacts(ranker_run.info.run_id, "triton_repository")}
    assert "triton_repository/recommend" in mlflow_files

    # A rerun on the same input gives the same lists under a new version; staged (`stage_publish`, an A/B
    # experiment's challenger), it is complete and kept while readers stay on the first run's version.
    process, rerun = run_dag(airflow_env, tmp_path / "data", {"input_dir": str(medium_raw), "stage_publish": True})
    assert process.returncode == 0 and rerun is not None and rerun != run, (process.stdout + process.stderr)[-3000:]
    redis_client = redis.Redis.from_url(E2E_REDIS_URL)
    assert redis_client.get(RecommendationKeys("e2e:").current).decode() == version
    assert redis_client.hget(RecommendationKeys("e2e:").meta(rerun.name), "status") == b"complete"
    assert rerun.name in {value.decode() for value in redis_client.lrange(RecommendationKeys("e2e:").versions, 0, -1)}
    for user in users[spec.user_id]:
        before = read_recommendations_of_version(redis_client, "e2e:", version, int(user))
        after = read_recommendations_of_version(redis_client, "e2e:", rerun.name, int(user))
        assert before[0] == after[0] and before[1] == pytest.approx(after[1], abs=1e-5), user


def read_recommendations_of_version(client: redis.Redis, key_prefix: str, version: str, key: int,
                                    kind: str = "user") -> tuple:  # fmt: skip
    from recsys.recommendation_store import decode_recommendations

    return decode_recommendations(client.get(f"{key_prefix}recs:{version}:{kind}:{key}"))


def item_in_catalog(run: Path, spec) -> int:  # type: ignore[no-untyped-def]
    """The raw id of the first item the two-tower model embedded (every such item has a similar list)."""
    first = pd.read_parquet(run / "two_tower" / "item_embeddings.parquet").iloc[0, 0]
    items = pd.read_parquet(run / "nvtabular" / "item_features.parquet").set_index(f"{spec.item_id}_encoded")
    return int(items.loc[first, spec.item_id])


def version_of_ranker(client) -> str:  # type: ignore[no-untyped-def]
    [version] = client.search_model_versions("name='ranker'")
    return version.version


def check_published_recommendations(run: Path, spec, key_prefix: str) -> str:  # type: ignore[no-untyped-def]
    """Assert what the web tier reads from Redis after `run`; return the published version."""
    from recsys.recommendation_store import read_recommendations

    client = redis.Redis.from_url(E2E_REDIS_URL)
    version = client.get(RecommendationKeys(key_prefix).current).decode()
    assert version == run.name  # the run's own version is the one readers see
    valid = pq.read_table(run / "resplit" / "valid").to_pandas()
    train = pq.read_table(run / "resplit" / "train").to_pandas()
    rows = pd.concat([train, valid])
    seen = rows[rows[list(spec.seen_targets)].eq(1).any(axis=1)] if spec.seen_targets else rows.iloc[:0]
    bought = seen.groupby(spec.user_id)[spec.item_id].agg(set)  # what the spec's exclude_seen excludes
    for user in valid[spec.user_id].unique():
        recommendations = read_recommendations(client, key_prefix, "user", int(user))
        assert recommendations is not None and recommendations.version == version, user
        assert len(recommendations.item_ids) == 100 and len(set(recommendations.item_ids)) == 100
        assert recommendations.scores == sorted(recommendations.scores, reverse=True)
        assert not set(recommendations.item_ids) & bought.get(user, set()), user
    segment = valid.iloc[0][list(spec.segment_features)].tolist()
    for key in ("*", ":".join(str(value) for value in segment)):
        generic = read_recommendations(client, key_prefix, "segment", key)
        assert generic is not None and generic.item_ids, key
    item = int(valid.iloc[0][spec.item_id])
    similar = read_recommendations(client, key_prefix, "similar", item)
    assert similar is not None and item not in similar.item_ids and len(similar.item_ids) == 50
    return version


def test_failed_validation_stops_the_run_before_nvtabular(airflow_env, small_raw: Path, tmp_path: Path, spec):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("train.csv", "test.csv"):
        table = pa_csv.read_csv(small_raw / name)
        clicks = [2 if index % 10 == 0 else value for index, value in enumerate(table["click"].to_pylist())]
        table = table.set_column(table.schema.get_field_index("click"), "click", pa.array(clicks, pa.int8()))
        pa_csv.write_csv(table, raw / name)
    process, run = run_dag(airflow_env, tmp_path / "data", {"input_dir": str(raw)})
    output = process.stdout + process.stderr
    assert run is not None
    assert "expect_column_values_to_be_in_set" in output  # the readable report is in the task log
    report = (run / "validate" / "report.md").read_text()
    assert "Result: FAILED" in report and "column click" in report
    assert not (run / "nvtabular").exists()  # nothing downstream ran
    assert process.returncode != 0  # airflow dags test exits non-zero when the DagRun failed
    assert "AirflowFailException" in output  # bad data fails at once, without the retries meant for outages


# A second, differently named dataset (tests/data/shop_events.yaml): the whole DAG runs with only its spec changed
# (tests/test_airflow_scheduler.py triggers it from the API, as the UI's form does).
SHOP_EVENTS_SPEC = PROJECT_ROOT / "tests" / "data" / "shop_events.yaml"
SHOP_EVENTS_COLUMNS = {
    "user_id": "customer", "item_id": "sku", "item_category": "sku_category", "item_brand": "sku_brand",
    "user_group": "customer_segment", "user_geography": "customer_region", "position": "slot", "device": "channel",
    "event_timestamp": "ts", "click": "clicked",
}  # fmt: skip


def write_shop_events(generated: Path, out: Path) -> Path:
    """The generated AliCCP-format CSVs in `generated` renamed to shop_events' files and columns, in `out`."""
    out.mkdir(parents=True)
    for source, target in (("train.csv", "events_train_2024.csv"), ("test.csv", "events_holdout_2024.csv")):
        table = pa_csv.read_csv(generated / source).select(list(SHOP_EVENTS_COLUMNS))
        pa_csv.write_csv(table.rename_columns(list(SHOP_EVENTS_COLUMNS.values())), out / target)
    return out


def check_shop_events_run(run: Path) -> None:
    """What the data stage made of shop_events: its own column names throughout, its resplit fraction."""
    users = pd.read_parquet(run / "nvtabular" / "user_features.parquet")
    expected = {"customer", "customer_encoded", "customer_segment", "customer_region", "event_timestamp"}
    assert expected <= set(users.columns)
    items = pd.read_parquet(run / "nvtabular" / "item_features.parquet")
    assert {"sku", "sku_category", "sku_brand"} <= set(items.columns)
    resplit = json.loads((run / "resplit" / "_metrics.json").read_text())
    assert resplit["fraction"] == 0.5

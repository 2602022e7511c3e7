"""A/B experiments by model version (recsys/experiments.py, tasks/experiment.py): stable buckets, the intervals,
the monitoring step declaring the winner of injected clicks, and start/stop/promote recorded in MLflow against a
real Redis. The gateway serving each bucket its version is `tests/test_recommendations_api.py`'s
`test_an_ab_experiment_serves_each_bucket_its_version_and_logs_it`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from recsys.experiments import CHALLENGER, CONTROL, bucket_of, compare_buckets, mean_interval, wilson_interval
from recsys.recommendation_store import RecommendationKeys
from tasks.experiment import (
    AB_TESTS_EXPERIMENT,
    ExperimentError,
    current_experiment,
    experiment_totals,
    promote_challenger,
    start_experiment,
    stop_experiment,
)
from tasks.monitor import MonitoringConfig, monitor
from tests.redis_databases import delete_keys_under, redis_url
from tests.test_monitor import HOUR, WINDOW, at, database, impression, write_impressions

REDIS_URL = redis_url("api")  # shared with other in-process gateways: keys under PREFIX only
PREFIX = "ab-test:"


def test_buckets_are_stable_follow_the_share_and_change_with_the_salt():
    buckets = [bucket_of(customer, "salt-1", 0.2) for customer in range(1, 20_001)]
    assert buckets == [bucket_of(customer, "salt-1", 0.2) for customer in range(1, 20_001)]  # stable
    share = buckets.count(CHALLENGER) / len(buckets)
    assert 0.19 < share < 0.21
    other = [bucket_of(customer, "salt-2", 0.2) for customer in range(1, 20_001)]
    agree = sum(a == b for a, b in zip(buckets, other, strict=True)) / len(buckets)
    assert agree < 0.75  # independent draws agree on 0.8² + 0.2² = 68% of customers
    assert {bucket_of(customer, "s", 0.0) for customer in range(100)} == {CONTROL}


def test_the_intervals_and_the_decision_line():
    low, high = wilson_interval(10, 100)
    assert low == pytest.approx(0.0552, abs=1e-4) and high == pytest.approx(0.1744, abs=1e-4)  # textbook values
    assert wilson_interval(0, 50)[0] == pytest.approx(0.0, abs=1e-12) and wilson_interval(0, 0) == (0.0, 1.0)
    assert mean_interval([0.0, 1.0, 0.0, 1.0]) == pytest.approx((0.5 - 1.96 * 0.57735 / 2, 0.5 + 1.96 * 0.57735 / 2),
                                                                abs=1e-3)  # fmt: skip
    assert compare_buckets((100, 1000), (150, 1000))["decision"] == "challenger wins"
    assert compare_buckets((150, 1000), (100, 1000))["decision"] == "control wins"
    assert compare_buckets((100, 1000), (105, 1000))["decision"] == "no decision yet"
    assert compare_buckets((10, 100), (50, 100))["decision"] == "too few impressions"


@pytest.mark.parametrize("favoured", [CHALLENGER, CONTROL])
def test_injected_clicks_that_favour_one_bucket_make_it_the_declared_winner(tmp_path: Path, favoured: str,
                                                                            mlflow_tracking_uri: str):  # fmt: skip
    """Customers split by the experiment's hash; each bucket's lists get clicks at its own rate (the favoured
    one 30%, the other 10%): the hour's report declares the favoured bucket the winner, with intervals that
    hold the true rates, and logs it to MLflow."""
    from mlflow.tracking import MlflowClient

    rates = {bucket: 0.3 if bucket == favoured else 0.1 for bucket in (CONTROL, CHALLENGER)}
    records, events = [], []
    seen = {CONTROL: 0, CHALLENGER: 0}
    for customer in range(1, 2_001):
        bucket = bucket_of(customer, "exp-salt", 0.5)
        record = impression(f"r{customer}", customer % 60, customer, [100 + customer % 7, 200 + customer % 11],
                            version="v2" if bucket == CHALLENGER else "v1")  # fmt: skip
        records.append(record | {"experiment": "spring", "bucket": bucket})
        seen[bucket] += 1
        if seen[bucket] % 10 < rates[bucket] * 10:  # exactly the bucket's rate of its lists get a click
            events.append((customer, record["items"][0]["product_id"], "click", at(customer % 60, 30), f"r{customer}"))
    url = database(tmp_path / "gateway.db", events)
    write_impressions(tmp_path / "impressions", records)
    report = monitor(HOUR, impressions_dir=tmp_path / "impressions", database_url=url, runs_dir=tmp_path / "runs",
                     tracking_uri=mlflow_tracking_uri, artifact_root=str(tmp_path / "artifacts"),
                     config=MonitoringConfig(attribution_window=WINDOW, k=2))  # fmt: skip
    result = report["experiments"]["spring"]
    assert result["decision"] == f"{favoured} wins"
    for bucket, values in result["buckets"].items():
        assert values["impressions_served"] > 800 and values["versions"] == ["v2" if bucket == CHALLENGER else "v1"]
        assert values["ctr_low"] < rates[bucket] < values["ctr_high"]
        assert values["precision_at_2_low"] <= values["precision_at_2"] <= values["precision_at_2_high"]
    assert (result["ctr_difference"] > 0) == (favoured == CHALLENGER)

    client = MlflowClient(mlflow_tracking_uri)
    experiment = client.get_experiment_by_name(AB_TESTS_EXPERIMENT)
    [run] = client.search_runs([experiment.experiment_id], filter_string="tags.ab_experiment = 'spring'")
    assert run.data.tags["decision"] == f"{favoured} wins"
    assert run.data.tags["monitoring_hour"] == "2026-11-26T10:00:00Z"
    assert run.data.metrics["challenger_ctr"] == pytest.approx(result["buckets"][CHALLENGER]["ctr"])
    # `recsys experiment status` sums the hours: one hour here, so the same decision.
    totals = experiment_totals(mlflow_tracking_uri, "spring")
    assert totals["hours"] == 1 and totals["decision"] == result["decision"]
    assert totals["challenger_served"] == result["buckets"][CHALLENGER]["impressions_served"]


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    delete_keys_under(client, PREFIX)  # an experiment an interrupted earlier run left would be "running"
    yield client
    delete_keys_under(client, PREFIX)
    client.close()


def publish_version(client: redis.Redis, version: str, *, current: bool) -> None:
    """A complete version as the publisher leaves it (what the experiment commands check)."""
    client.hset(RecommendationKeys(PREFIX).meta(version), mapping={"status": "complete", "fingerprint": version})
    client.lpush(RecommendationKeys(PREFIX).versions, version)
    if current:
        client.set(RecommendationKeys(PREFIX).current, version)


def test_start_stop_and_promote_are_checked_and_recorded_in_mlflow(client: redis.Redis, mlflow_tracking_uri: str,
                                                                   tmp_path: Path):  # fmt: skip
    from mlflow.tracking import MlflowClient

    publish_version(client, "v1", current=True)
    publish_version(client, "v2", current=False)
    arguments = {"tracking_uri": mlflow_tracking_uri, "artifact_root": str(tmp_path / "artifacts")}
    with pytest.raises(ExperimentError, match="v3 is not published"):
        start_experiment(REDIS_URL, PREFIX, "spring", "v3", 0.1, **arguments)
    with pytest.raises(ExperimentError, match="current version already"):
        start_experiment(REDIS_URL, PREFIX, "spring", "v1", 0.1, **arguments)
    with pytest.raises(ExperimentError, match="share"):
        start_experiment(REDIS_URL, PREFIX, "spring", "v2", 1.0, **arguments)
    started = start_experiment(REDIS_URL, PREFIX, "spring", "v2", 0.1, salt="s1", **arguments)
    assert current_experiment(client, PREFIX) == started and started.control == "v1"
    with pytest.raises(ExperimentError, match="spring is running"):
        start_experiment(REDIS_URL, PREFIX, "autumn", "v2", 0.1, **arguments)
    mlflow = MlflowClient(mlflow_tracking_uri)
    run = mlflow.get_run(started.mlflow_run_id)
    assert run.data.params == {"control_version": "v1", "challenger_version": "v2", "share": "0.1", "salt": "s1"}
    assert run.data.tags["status"] == "running"

    stop_experiment(REDIS_URL, PREFIX, tracking_uri=mlflow_tracking_uri)
    assert current_experiment(client, PREFIX) is None and client.get(RecommendationKeys(PREFIX).current) == b"v1"
    assert mlflow.get_run(started.mlflow_run_id).data.tags["status"] == "stopped"
    with pytest.raises(ExperimentError, match="no experiment"):
        stop_experiment(REDIS_URL, PREFIX, tracking_uri=mlflow_tracking_uri)

    again = start_experiment(REDIS_URL, PREFIX, "autumn", "v2", 0.5, **arguments)
    promote_challenger(REDIS_URL, PREFIX, tracking_uri=mlflow_tracking_uri)
    keys = RecommendationKeys(PREFIX)
    assert client.get(keys.current) == b"v2" and client.get(keys.previous) == b"v1"
    assert current_experiment(client, PREFIX) is None
    assert mlflow.get_run(again.mlflow_run_id).data.tags["status"] == "promoted"
    assert mlflow.get_run(again.mlflow_run_id).info.status == "FINISHED"


def test_the_cli_reports_status_and_refuses_a_bad_start_by_name(client: redis.Redis, mlflow_tracking_uri: str,
                                                                 capsys: pytest.CaptureFixture):  # fmt: skip
    import json

    from tasks.cli import main

    common = ["--redis-url", REDIS_URL, "--key-prefix", PREFIX]
    assert main(["experiment", "status", *common]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"running": False}
    assert main(["experiment", "start", "spring", "--challenger", "v9", "--share", "0.1", *common]) == 2
    assert "version v9 is not published" in capsys.readouterr().err

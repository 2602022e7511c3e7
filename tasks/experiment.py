"""Start, stop and promote an A/B experiment between the current version and a challenger (recsys/experiments.py).

    recsys publish-recommendations --input <run>/batch_score --version V2 --stage   # the challenger, not switched to
    recsys experiment start spring-test --challenger V2 --share 0.1
    recsys experiment status
    recsys experiment stop                    # everyone back on the current version
    recsys experiment promote                 # the challenger becomes current (rollback undoes it), then stop

Each is recorded in MLflow (experiment `recsys-ab-tests`): `start` opens a run named after the experiment with
the control and challenger versions, the share and the salt as parameters; `stop` and `promote` end it, tagged
with the outcome (`stopped`, `promoted`). The gateway's next read sees a change: its Redis read draws the bucket.
"""

from __future__ import annotations

import dataclasses
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import redis

from recsys.experiments import Experiment
from recsys.recommendation_store import RecommendationKeys, as_text
from recsys.redis_connection import redis_client

AB_TESTS_EXPERIMENT = "recsys-ab-tests"


class ExperimentError(RuntimeError):
    """An experiment operation that cannot be done as asked (none running, one running, an unknown version)."""


def current_experiment(client: redis.Redis, key_prefix: str) -> Experiment | None:
    return Experiment.from_hash(cast(dict[Any, Any], client.hgetall(RecommendationKeys(key_prefix).experiment)))


def running_experiment(redis_url: str, key_prefix: str, redis_type: str = "redis") -> Experiment | None:
    """The running experiment, read with a client of its own."""
    client = redis_client(redis_url, redis_type)
    try:
        return current_experiment(client, key_prefix)
    finally:
        client.close()


def start_experiment(redis_url: str, key_prefix: str, name: str, challenger: str, share: float, *,
                     tracking_uri: str, artifact_root: str | Path, salt: str | None = None, redis_type: str = "redis"
                     ) -> Experiment:  # fmt: skip
    """Serve `challenger` to `share` of customers (by a stable hash of their id and the salt) from now on."""
    if not 0 < share < 1:
        raise ExperimentError(f"share must be between 0 and 1 (exclusive), got {share}")
    keys = RecommendationKeys(key_prefix)
    client = redis_client(redis_url, redis_type)
    try:
        running = current_experiment(client, key_prefix)
        if running is not None:
            raise ExperimentError(f"experiment {running.name} is running (challenger {running.challenger}); "
                                  "stop or promote it first")  # fmt: skip
        status = as_text(client.hget(keys.meta(challenger), "status") or b"")
        if status != "complete":
            raise ExperimentError(f"version {challenger} is {status or 'not published'}, not complete: publish it "
                                  "first (publish-recommendations --stage keeps readers on the current version)")
        control = client.get(keys.current)
        if control is None:
            raise ExperimentError("no version is current: nothing to compare the challenger with")
        if as_text(control) == challenger:
            raise ExperimentError(f"version {challenger} is the current version already")
        experiment = Experiment(name=name, challenger=challenger, control=as_text(control), share=share,
                                salt=salt or secrets.token_hex(8),
                                started_at=datetime.now(UTC).isoformat())  # fmt: skip
        run_id = _record_start(experiment, tracking_uri, artifact_root)
        experiment = dataclasses.replace(experiment, mlflow_run_id=run_id)
        client.hset(keys.experiment, mapping=experiment.as_hash())  # one command: readers see all of it or none
    finally:
        client.close()
    return experiment


def stop_experiment(redis_url: str, key_prefix: str, *, tracking_uri: str, outcome: str = "stopped",
                    redis_type: str = "redis") -> Experiment:  # fmt: skip
    """End the running experiment: everyone is served the current version again."""
    keys = RecommendationKeys(key_prefix)
    client = redis_client(redis_url, redis_type)
    try:
        experiment = current_experiment(client, key_prefix)
        if experiment is None:
            raise ExperimentError("no experiment is running")
        client.delete(keys.experiment)
    finally:
        client.close()
    _record_end(experiment, tracking_uri, outcome)
    return experiment


def promote_challenger(redis_url: str, key_prefix: str, *, tracking_uri: str, redis_type: str = "redis"
                       ) -> Experiment:  # fmt: skip
    """Make the running experiment's challenger the current version (the old one becomes previous), then stop."""
    from tasks.publish_recommendations import make_current

    experiment = running_experiment(redis_url, key_prefix, redis_type)
    if experiment is None:
        raise ExperimentError("no experiment is running")
    make_current(redis_url, experiment.challenger, key_prefix, redis_type)
    return stop_experiment(redis_url, key_prefix, tracking_uri=tracking_uri, outcome="promoted", redis_type=redis_type)


def experiment_totals(tracking_uri: str, name: str) -> dict[str, Any]:
    """The experiment's hours so far summed (the monitoring DAG's runs in MLflow): each bucket's clicked and
    served lists, and the decision line on the totals (`compare_buckets`)."""
    from mlflow.tracking import MlflowClient

    from recsys.experiments import BUCKETS, CHALLENGER, CONTROL, compare_buckets

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(AB_TESTS_EXPERIMENT)
    runs = [] if experiment is None else client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.ab_experiment = '{name}' and tags.monitoring_hour != ''")
    totals: dict[str, tuple[int, int]] = {}
    for bucket in BUCKETS:
        totals[bucket] = (sum(int(run.data.metrics.get(f"{bucket}_clicked", 0)) for run in runs),
                          sum(int(run.data.metrics.get(f"{bucket}_impressions_served", 0)) for run in runs))
    return {"hours": len(runs), **{f"{bucket}_clicked": totals[bucket][0] for bucket in BUCKETS},
            **{f"{bucket}_served": totals[bucket][1] for bucket in BUCKETS},
            **compare_buckets(totals[CONTROL], totals[CHALLENGER])}  # fmt: skip


def _record_start(experiment: Experiment, tracking_uri: str, artifact_root: str | Path) -> str:
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    from tasks.track_training import configure_mlflow

    experiment_id = configure_mlflow(tracking_uri, artifact_root, AB_TESTS_EXPERIMENT)
    client = MlflowClient(tracking_uri)
    run = client.create_run(experiment_id, run_name=experiment.name,
                            tags={"ab_experiment": experiment.name, "status": "running"})  # fmt: skip
    params = {"control_version": experiment.control, "challenger_version": experiment.challenger,
              "share": str(experiment.share), "salt": experiment.salt}  # fmt: skip
    client.log_batch(run.info.run_id, params=[Param(key, value) for key, value in params.items()])
    return str(run.info.run_id)


def _record_end(experiment: Experiment, tracking_uri: str, outcome: str) -> None:
    from mlflow.tracking import MlflowClient

    if not experiment.mlflow_run_id:
        return
    client = MlflowClient(tracking_uri)
    client.set_tag(experiment.mlflow_run_id, "status", outcome)
    client.set_terminated(experiment.mlflow_run_id)

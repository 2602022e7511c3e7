"""The quality gate against a real MLflow registry (SQLite in tmp_path): its outcomes and the alias moves.

Model versions are real registered pyfunc models whose runs carry the metrics and validation fingerprint the
training runs log; what is published is checked in a real Redis (DB 15, a key prefix of this test's own).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import redis
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

from recsys.recommendation_store import RecommendationKeys, version_metadata
from tasks.publish_recommendations import publish_recommendations
from tasks.quality_gate import (
    BATCH_SCORE_DIR_TAG,
    CHALLENGER,
    CHAMPION,
    DECISION_ARTIFACT,
    FORCED,
    HOLD,
    PUBLISH,
    QualityGateError,
    champion_versions,
    promote_models,
    published_model_versions,
    quality_gate,
)
from tasks.track_training import VALIDATION_FINGERPRINT_TAG, configure_mlflow
from tests.redis_databases import delete_keys_under, redis_url
from tests.test_publish_recommendations import write_batch

REDIS_URL = redis_url("quality_gate")


class ConstantModel(PythonModel):
    # The hints models/pyfunc.py's model has: MLflow accepts them without inferring a signature (and warns
    # about a predict without any).
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        return np.full(len(model_input), 0.5)


@pytest.fixture
def tracking_uri(mlflow_tracking_uri: str) -> Iterator[str]:
    previous = mlflow.get_tracking_uri()
    uri = mlflow_tracking_uri
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(previous)


@pytest.fixture
def key_prefix() -> Iterator[str]:
    prefix = f"gate-test-{uuid.uuid4().hex[:8]}:"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    delete_keys_under(client, prefix)
    client.close()


def train(tracking_uri: str, tmp_path: Path, run: str, *, auc: float, recall: float, popularity: float = 0.30,
          fingerprint: str = "valid-A", unseen: tuple[float, float] | None = None) -> dict[str, Any]:  # fmt: skip
    """One nightly run's pair, registered as `ranker` and `two_tower`, and its batch scores under runs/<run>/.

    Returns what the DAG hands the gate: the training tasks' dicts and the batch_score folder. `unseen`: the
    two-tower's and popularity's recall@100 of the items the served lists may hold (absent by default, as in runs
    whose validation has no such positive and runs from before the metric).
    """
    candidate: dict[str, Any] = {}
    retrieval = {"best_recall_at_100": recall, "popularity_recall_at_100": popularity}
    if unseen is not None:
        retrieval |= {"best_unseen_recall_at_100": unseen[0], "popularity_unseen_recall_at_100": unseen[1]}
    for model, metrics in (("ranker", {"best_valid_auc": auc}), ("two_tower", retrieval)):
        experiment = configure_mlflow(tracking_uri, tmp_path / "artifacts", f"recsys_{model}")
        with mlflow.start_run(experiment_id=experiment, run_name=f"{model} {run}") as mlflow_run:
            mlflow.log_metrics(metrics)
            mlflow.set_tags({VALIDATION_FINGERPRINT_TAG: fingerprint})
            info = mlflow.pyfunc.log_model(name="model", python_model=ConstantModel(), registered_model_name=model,
                                           pip_requirements=["mlflow"])  # fmt: skip
        candidate[model] = {"run_id": mlflow_run.info.run_id, "model_version": str(info.registered_model_version)}
    versions = {model: entry["model_version"] for model, entry in candidate.items()}
    seed = len(list((tmp_path / "runs").glob("*"))) if (tmp_path / "runs").exists() else 0
    batch = write_batch(tmp_path / "runs" / run / "batch_score", seed=seed, model_versions=versions)
    return {**candidate, "batch_dir": batch, "versions": versions}


def gate(tracking_uri: str, run: dict, **options: Any):  # type: ignore[no-untyped-def]
    return quality_gate({"ranker": run["ranker"], "two_tower": run["two_tower"]}, tracking_uri=tracking_uri,
                        batch_dir=run["batch_dir"], **options)  # fmt: skip


def aliases(tracking_uri: str, alias: str) -> dict[str, str | None]:
    client = MlflowClient(tracking_uri)
    found: dict[str, str | None] = {}
    for model in ("ranker", "two_tower"):
        try:
            found[model] = str(client.get_model_version_by_alias(model, alias).version)
        except MlflowException:
            found[model] = None
    return found


def test_first_run_publishes_when_it_beats_popularity_and_logs_the_decision(tracking_uri, tmp_path):
    first = train(tracking_uri, tmp_path, "night1", auc=0.70, recall=0.40, popularity=0.30)
    decision = gate(tracking_uri, first)
    assert decision.outcome == PUBLISH and decision.publishes_candidate
    assert "no champion yet" in decision.reason
    assert decision.champion_versions == champion_versions(tracking_uri) == first["versions"] == {"ranker": "1",
                                                                                                  "two_tower": "1"}
    assert decision.publish_batch_dir == str(first["batch_dir"]) and decision.publish_version == "night1"
    client = MlflowClient(tracking_uri)
    for model in ("ranker", "two_tower"):
        run = client.get_run(first[model]["run_id"])
        assert run.data.tags["gate_decision"] == PUBLISH and run.data.tags["gate_mode"] == "gate"
        assert run.data.tags["gate_reason"] == decision.reason
        logged = json.loads(Path(mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path=DECISION_ARTIFACT, dst_path=str(tmp_path / model))).read_text())
        assert logged == json.loads(json.dumps(decision.to_dict()))
        version = client.get_model_version(model, "1")
        assert version.tags["gate_decision"] == PUBLISH
        assert version.tags[BATCH_SCORE_DIR_TAG] == str(first["batch_dir"])


def test_first_run_that_does_not_beat_popularity_is_held(tracking_uri, tmp_path):
    first = train(tracking_uri, tmp_path, "night1", auc=0.70, recall=0.25, popularity=0.30)
    decision = gate(tracking_uri, first, published_versions={})
    assert decision.outcome == HOLD and not decision.publishes_candidate
    assert "two_tower best_recall_at_100 0.2500 does not beat popularity 0.3000" in decision.reason
    assert decision.publish_batch_dir is None and "no champion pair yet" in decision.reason
    assert aliases(tracking_uri, CHAMPION) == {"ranker": None, "two_tower": None}
    assert aliases(tracking_uri, CHALLENGER) == first["versions"]


def test_better_model_is_published_and_worse_one_kept_as_challenger(tracking_uri, tmp_path):
    gate(tracking_uri, train(tracking_uri, tmp_path, "night1", auc=0.70, recall=0.40))
    better = train(tracking_uri, tmp_path, "night2", auc=0.72, recall=0.41)
    decision = gate(tracking_uri, better, published_versions={"ranker": "1", "two_tower": "1"})
    assert decision.outcome == PUBLISH
    assert decision.previous_champion_versions == {"ranker": "1", "two_tower": "1"}
    assert champion_versions(tracking_uri) == {"ranker": "2", "two_tower": "2"}
    assert all(check.same_validation_data for check in decision.checks)
    assert "champion v1 0.7000 on the same validation data: within tolerance" in decision.reason

    worse = train(tracking_uri, tmp_path, "night3", auc=0.69, recall=0.42)  # ranker 0.03 below the champion
    decision = gate(tracking_uri, worse, published_versions={"ranker": "2", "two_tower": "2"})
    assert decision.outcome == HOLD
    assert "ranker best_valid_auc 0.6900" in decision.reason and "below tolerance 0.005" in decision.reason
    assert "two_tower" not in decision.reason  # only the failure is named
    assert champion_versions(tracking_uri) == {"ranker": "2", "two_tower": "2"}  # the champion stays
    assert aliases(tracking_uri, CHALLENGER) == {"ranker": "3", "two_tower": "3"}
    assert decision.publish_batch_dir is None and "readers keep the champion's lists" in decision.reason
    assert MlflowClient(tracking_uri).get_run(worse["ranker"]["run_id"]).data.tags["gate_decision"] == HOLD


def test_retrieval_is_judged_on_what_the_served_lists_may_hold_where_both_runs_measured_it(tracking_uri, tmp_path):
    # A champion from before the unseen metric: the plain recall decides, the unseen one of the candidate unused.
    old = train(tracking_uri, tmp_path, "night1", auc=0.70, recall=0.40)
    assert gate(tracking_uri, old).outcome == PUBLISH
    worse_in_plain = train(tracking_uri, tmp_path, "night2", auc=0.70, recall=0.30, unseen=(0.50, 0.10))
    decision = gate(tracking_uri, worse_in_plain)
    assert decision.outcome == HOLD and "two_tower best_recall_at_100 0.3000" in decision.reason
    # Once the champion has it, the unseen recall decides (and its own popularity baseline).
    promote_models(tracking_uri)  # a reviewer promotes the held challenger pair
    better_unseen = train(tracking_uri, tmp_path, "night3", auc=0.70, recall=0.20, unseen=(0.52, 0.10))
    decision = gate(tracking_uri, better_unseen)
    assert decision.outcome == PUBLISH, decision.reason
    assert "two_tower best_unseen_recall_at_100 0.5200 beats popularity 0.1000" in decision.reason
    assert "champion v2 0.5000" in decision.reason


def test_forced_and_skipped_gates_publish_and_say_so(tracking_uri, tmp_path):
    gate(tracking_uri, train(tracking_uri, tmp_path, "night1", auc=0.75, recall=0.40))
    worse = train(tracking_uri, tmp_path, "night2", auc=0.60, recall=0.20)  # fails everything
    decision = gate(tracking_uri, worse, mode="force")
    assert decision.outcome == FORCED and decision.publishes_candidate
    assert "the gate would have held" in decision.reason and "does not beat popularity" in decision.reason
    assert champion_versions(tracking_uri) == {"ranker": "2", "two_tower": "2"}
    assert decision.publish_batch_dir == str(worse["batch_dir"])
    assert len(decision.checks) == 2  # the comparison is still on record

    skipped = train(tracking_uri, tmp_path, "night3", auc=0.55, recall=0.10)
    decision = gate(tracking_uri, skipped, mode="skip")
    assert decision.outcome == FORCED and decision.checks == () and "gate skipped" in decision.reason
    assert champion_versions(tracking_uri) == {"ranker": "3", "two_tower": "3"}
    tags = MlflowClient(tracking_uri).get_run(skipped["two_tower"]["run_id"]).data.tags
    assert (tags["gate_decision"], tags["gate_mode"]) == (FORCED, "skip")


@pytest.mark.parametrize(("auc", "outcome"), [(0.695, PUBLISH), (0.6949, HOLD)])
def test_tolerance_edge(tracking_uri, tmp_path, auc, outcome):
    gate(tracking_uri, train(tracking_uri, tmp_path, "night1", auc=0.70, recall=0.40))
    decision = gate(tracking_uri, train(tracking_uri, tmp_path, "night2", auc=auc, recall=0.40), tolerance=0.005)
    assert decision.outcome == outcome, decision.reason


def test_champion_measured_on_other_validation_data_is_compared_by_its_recorded_metrics(tracking_uri, tmp_path):
    gate(tracking_uri, train(tracking_uri, tmp_path, "night1", auc=0.70, recall=0.40, fingerprint="valid-A"))
    decision = gate(tracking_uri, train(tracking_uri, tmp_path, "night2", auc=0.71, recall=0.40,
                                        fingerprint="valid-B"))  # fmt: skip
    assert decision.outcome == PUBLISH
    assert [check.same_validation_data for check in decision.checks] == [False, False]
    assert "different validation data, compared with its recorded metric" in decision.reason


def test_a_reviewers_promotion_is_honoured_by_the_next_gate_and_publish(tracking_uri, tmp_path, key_prefix):
    def publish(decision) -> None:  # type: ignore[no-untyped-def]  # the DAG's publish task
        if decision.publish_batch_dir is not None:
            publish_recommendations(Path(decision.publish_batch_dir), redis_url=REDIS_URL, key_prefix=key_prefix,
                                    version=decision.publish_version, progress=False)  # fmt: skip

    def live() -> dict[str, str]:
        return published_model_versions(REDIS_URL, key_prefix)

    assert live() == {}
    publish(gate(tracking_uri, train(tracking_uri, tmp_path, "night1", auc=0.72, recall=0.40), published_versions={}))
    assert live() == {"ranker": "1", "two_tower": "1"}
    held = train(tracking_uri, tmp_path, "night2", auc=0.70, recall=0.45)  # better recall, worse AUC: held
    publish(gate(tracking_uri, held, published_versions=live()))
    assert live() == {"ranker": "1", "two_tower": "1"}  # nothing of night2 published

    # A reviewer judges night2 better after all and promotes the challenger pair (as in the MLflow UI).
    assert promote_models(tracking_uri) == {"ranker": "2", "two_tower": "2"}
    assert aliases(tracking_uri, CHALLENGER) == {"ranker": None, "two_tower": None}
    assert champion_versions(tracking_uri) == {"ranker": "2", "two_tower": "2"}

    # Night 3 is worse than the reviewer's champion: held, and the champion's own lists are published.
    night3 = train(tracking_uri, tmp_path, "night3", auc=0.60, recall=0.45)
    decision = gate(tracking_uri, night3, published_versions=live())
    assert decision.outcome == HOLD
    assert [check.champion_version for check in decision.checks] == ["2", "2"]  # judged against the promoted pair
    assert decision.publish_batch_dir == str(held["batch_dir"]) and decision.publish_version == "night2"
    assert "republishing its batch scores" in decision.reason
    publish(decision)
    assert live() == {"ranker": "2", "two_tower": "2"}
    client = redis.Redis.from_url(REDIS_URL)
    # serving.run picks night2's Triton repository
    assert client.get(RecommendationKeys(key_prefix).current) == b"night2"
    assert json.loads(version_metadata(client, key_prefix, "night2")["model_versions"]) == held["versions"]
    client.close()

    # Held again the next night: readers already see the champion, nothing is republished.
    decision = gate(tracking_uri, train(tracking_uri, tmp_path, "night4", auc=0.60, recall=0.45),
                    published_versions=live())  # fmt: skip
    assert decision.outcome == HOLD and decision.publish_batch_dir is None

    # A reviewer moves only the ranker's alias back to v1: a pair never scored together is not published.
    MlflowClient(tracking_uri).set_registered_model_alias("ranker", CHAMPION, "1")
    decision = gate(tracking_uri, train(tracking_uri, tmp_path, "night5", auc=0.60, recall=0.45),
                    published_versions=live())  # fmt: skip
    assert decision.outcome == HOLD and decision.publish_batch_dir is None
    assert "never scored together" in decision.reason


def test_the_commands_gate_and_promote(tracking_uri, tmp_path, monkeypatch, capsys):
    from recsys.settings import get_settings
    from tasks.cli import main

    night1 = train(tracking_uri, tmp_path, "night1", auc=0.70, recall=0.20)  # below popularity
    monkeypatch.setenv("RECSYS_MLFLOW_TRACKING_URI", tracking_uri)
    get_settings.cache_clear()
    try:
        assert main(["quality-gate", "--ranker-version", "1", "--two-tower-version", "1",
                     "--batch-score", str(night1["batch_dir"])]) == 0  # fmt: skip
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["outcome"] == HOLD
        with pytest.raises(ValueError, match="a version of each"):
            main(["promote-models", "--ranker-version", "1"])
        assert main(["promote-models"]) == 0  # the challenger pair, as a reviewer would
    finally:
        get_settings.cache_clear()
    assert champion_versions(tracking_uri) == {"ranker": "1", "two_tower": "1"}


def test_gate_refuses_what_it_cannot_judge(tracking_uri, tmp_path):
    night1 = train(tracking_uri, tmp_path, "night1", auc=0.70, recall=0.40)
    with pytest.raises(ValueError, match="mode"):
        gate(tracking_uri, night1, mode="maybe")
    with pytest.raises(QualityGateError, match="version 9"):
        quality_gate({"ranker": "9", "two_tower": "1"}, tracking_uri=tracking_uri)
    night2 = train(tracking_uri, tmp_path, "night2", auc=0.70, recall=0.40)
    with pytest.raises(QualityGateError, match="not with the candidate versions"):  # batch scores of other models
        quality_gate({"ranker": night1["ranker"], "two_tower": night1["two_tower"]}, tracking_uri=tracking_uri,
                     batch_dir=night2["batch_dir"])  # fmt: skip
    with pytest.raises(QualityGateError, match="no challenger"):
        promote_models(tracking_uri)
    assert aliases(tracking_uri, CHAMPION) == {"ranker": None, "two_tower": None}  # nothing moved


def test_validation_fingerprint_names_rows_and_labels_not_file_layout_or_encoding(tmp_path, spec):
    import pandas as pd

    from tasks.track_training import validation_fingerprint

    rows = pd.DataFrame({"user_id_raw": [5, 6, 7, 8], "item_id_raw": [50, 60, 70, 80],
                         spec.timestamp: [100, 101, 102, 103], **{target: [1, 0, 0, 1] for target in spec.targets},
                         "item_category": [3, 4, 5, 6]})  # an encoded feature  # fmt: skip

    def fingerprint(frame: pd.DataFrame, name: str, cuts: tuple[int, ...] = (4,)) -> str:
        folder = tmp_path / name
        folder.mkdir()
        start = 0
        for number, end in enumerate(cuts):
            frame.iloc[start:end].to_parquet(folder / f"part_{number}.parquet", index=False)
            start = end
        return validation_fingerprint(folder, spec)[VALIDATION_FINGERPRINT_TAG]

    reference = fingerprint(rows, "one_file")
    assert fingerprint(rows, "two_files", cuts=(1, 4)) == reference
    assert fingerprint(rows.assign(item_category=[9, 9, 9, 9]), "re_encoded") == reference
    assert fingerprint(rows.assign(**{spec.primary_target: [0, 0, 0, 1]}), "other_labels") != reference
    assert fingerprint(rows.iloc[:3], "fewer_rows") != reference
    assert validation_fingerprint(tmp_path / "one_file", spec)["validation_rows"] == "4"

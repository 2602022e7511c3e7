"""The quality gate before publishing, and the model review it leaves to people (platform environment).

A nightly run trains a new ranker and a new two-tower model and registers both (`tasks/track_training.py`).
Before its recommendations replace the served ones, `quality_gate` compares the new versions with the
versions the MLflow registry's `champion` alias points at, read afresh on every run, and with the baselines:

- **publish**: every gate metric is at least the champion's minus `tolerance` and beats its baseline (the
  two-tower's recall@100 beats the popularity baseline measured on the same users; the ranker's validation
  AUC beats 0.5, random ordering). `champion` moves to both new versions and the run's batch scores are
  published. A first run, with no champion yet, only has to beat the baselines.
- **hold**: anything else. Both new versions get the `challenger` alias, the champion keeps its alias and
  nothing of the run is published: the serving tier keeps the champion's lists. The reason names each failure.
- **forced**: the run's Param said `force` (the comparison is still made and logged, with what the gate would
  have done) or `skip` (no comparison at all): the new versions become champion and are published.

"The same validation data": every training run carries a fingerprint of its validation split (rows, spec,
content; `validation_fingerprint` in track_training). Matching fingerprints mean both metrics were measured
on the same rows. Different ones mean the champion was measured on other data; re-evaluating it would need
its models and the trainer environment, out of reach here, so the gate compares with the champion's
recorded metrics within the tolerance all the same, and says so in the reason.

A reviewer overrides the gate by moving the alias in MLflow (the UI, `MlflowClient.set_registered_model_alias`
or `recsys promote-models`). The next run's gate reads the alias afresh, so the new models are judged against
the reviewer's champion; and when that run holds its models while what readers see is not the champion pair,
the decision names the champion's own batch scores (each version carries the `batch_score_dir` it was scored
into) for the publish step to publish under the champion's run version, so Redis, and the Triton repository
`serving.run` picks for that version, serve the reviewer's champion.

Every decision is logged as `quality_gate/decision.json` and tags `gate_decision`, `gate_reason`, `gate_mode`
on both new runs (and `gate_decision` on both model versions).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from recsys.run_layout import safe_run_id
from tasks.track_training import RANKER_MODEL_NAME, TWO_TOWER_MODEL_NAME, VALIDATION_FINGERPRINT_TAG

log = logging.getLogger(__name__)

MODELS = (RANKER_MODEL_NAME, TWO_TOWER_MODEL_NAME)
CHAMPION = "champion"
CHALLENGER = "challenger"
GATE_MODES = ("gate", "force", "skip")
PUBLISH, HOLD, FORCED = "publish", "hold", "forced"
DEFAULT_TOLERANCE = 0.005  # absolute, on AUC and recall alike: below the epoch-to-epoch noise on the test data
BATCH_SCORE_DIR_TAG = "batch_score_dir"  # model version tag: where the version's batch scores were written
DECISION_ARTIFACT = "quality_gate/decision.json"
# Floating-point slack, so that a metric exactly `tolerance` below the champion's passes as documented.
_EPSILON = 1e-9
_MAX_TAG_CHARS = 5000  # MLflow keeps tag values up to 8,000 characters


class QualityGateError(RuntimeError):
    """The gate cannot judge: a candidate version or its run is missing."""


@dataclasses.dataclass(frozen=True)
class GateMetric:
    """One metric the gate compares: higher is better; `baseline_metric` (same run) or `baseline_value` to beat.

    `fallback` (metric, baseline metric) is compared instead where the candidate's run lacks `metric`, or the
    champion's does (a champion registered before the metric existed)."""

    model: str
    metric: str
    baseline_name: str
    baseline_metric: str | None = None
    baseline_value: float | None = None
    fallback: tuple[str, str] | None = None


GATE_METRICS = (
    GateMetric(RANKER_MODEL_NAME, "best_valid_auc", "random ordering (AUC 0.5)", baseline_value=0.5),
    # Recall of what the served lists may hold (the spec's exclude_seen items left out, tasks/train_two_tower.py's
    # "unseen" metrics, on which the epoch is chosen); all validation positives where a run has no such metric.
    GateMetric(TWO_TOWER_MODEL_NAME, "best_unseen_recall_at_100", "popularity",
               baseline_metric="popularity_unseen_recall_at_100",
               fallback=("best_recall_at_100", "popularity_recall_at_100")),
)


@dataclasses.dataclass(frozen=True)
class GateCheck:
    """One metric of one model: the candidate against its baseline and against the champion."""

    model: str
    metric: str
    candidate: float | None
    baseline_name: str
    baseline: float | None
    champion_version: str | None
    champion: float | None
    same_validation_data: bool | None  # None: no champion to compare with
    beats_baseline: bool
    as_good_as_champion: bool | None  # None: no champion (a first run)

    @property
    def passed(self) -> bool:
        return self.beats_baseline and self.as_good_as_champion is not False

    def describe(self, tolerance: float) -> str:
        if self.candidate is None:
            return f"{self.model} {self.metric}: missing from the candidate's run"
        text = f"{self.model} {self.metric} {self.candidate:.4f}"
        if self.baseline is None:
            text += f" (no {self.baseline_name} baseline in its run)"
        else:
            text += f" {'beats' if self.beats_baseline else 'does not beat'} {self.baseline_name} {self.baseline:.4f}"
        if self.champion_version is None:
            return text + "; no champion yet"
        if self.champion is None:
            return text + f"; champion v{self.champion_version}'s run has no {self.metric}"
        verdict = "within" if self.as_good_as_champion else "below"
        data = ("on the same validation data" if self.same_validation_data else
                "on different validation data, compared with its recorded metric (re-evaluating the champion "
                "needs the trainer environment)")  # fmt: skip
        return text + f"; champion v{self.champion_version} {self.champion:.4f} {data}: {verdict} tolerance {tolerance}"


@dataclasses.dataclass(frozen=True)
class GateDecision:
    """What the gate decided and what the publish step does with it (`to_dict` is JSON, for XCom)."""

    outcome: str  # publish | hold | forced
    mode: str
    reason: str
    tolerance: float
    candidate_versions: dict[str, str]
    previous_champion_versions: dict[str, str | None]
    champion_versions: dict[str, str | None]  # after the decision: the versions that should be served
    # Batch scores to publish now, and the Redis version to publish them as (None: publish nothing).
    publish_batch_dir: str | None
    publish_version: str | None
    checks: tuple[GateCheck, ...] = ()

    @property
    def publishes_candidate(self) -> bool:
        return self.outcome in (PUBLISH, FORCED)

    def to_dict(self) -> dict[str, Any]:
        result = dataclasses.asdict(self)
        result["checks"] = [dataclasses.asdict(check) for check in self.checks]
        return result


def champion_versions(tracking_uri: str) -> dict[str, str | None]:
    """The version each registered model's `champion` alias points at now (None: no champion)."""
    from mlflow.tracking import MlflowClient

    return _versions_by_alias(MlflowClient(tracking_uri), CHAMPION)


def _versions_by_alias(client: Any, alias: str) -> dict[str, str | None]:
    from mlflow.exceptions import MlflowException

    versions: dict[str, str | None] = {}
    for model in MODELS:
        # The registered model's alias table, not get_model_version_by_alias: a missing alias is a 400 there.
        try:
            version = client.get_registered_model(model).aliases.get(alias)
        except MlflowException as error:  # no such registered model yet
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            version = None
        versions[model] = None if version is None else str(version)
    return versions


def batch_dirs_the_gate_may_publish(tracking_uri: str) -> set[Path]:
    """The batch scores of the `champion` and `challenger` model versions (their `batch_score_dir` tags): what a
    later run's gate republishes when a reviewer promotes or keeps them."""
    from mlflow.tracking import MlflowClient

    client, found = MlflowClient(tracking_uri), set()
    for alias in (CHAMPION, CHALLENGER):
        for model, version in _versions_by_alias(client, alias).items():
            if version is not None:
                tag = client.get_model_version(model, version).tags.get(BATCH_SCORE_DIR_TAG)
                if tag:
                    found.add(Path(tag))
    return found


def published_model_versions(redis_url: str, key_prefix: str, redis_type: str = "redis") -> dict[str, str]:
    """The model versions of the recommendations readers see now ({} when nothing is published)."""
    from recsys.recommendation_store import RecommendationKeys, version_metadata
    from recsys.redis_connection import redis_client

    client = redis_client(redis_url, redis_type)
    try:
        current = client.get(RecommendationKeys(key_prefix).current)
        if current is None:
            return {}
        meta = version_metadata(client, key_prefix, current.decode() if isinstance(current, bytes) else str(current))
    finally:
        client.close()
    return {str(name): str(version) for name, version in json.loads(meta.get("model_versions") or "{}").items()}


def quality_gate(
    candidate: Mapping[str, Any],
    *,
    tracking_uri: str,
    tolerance: float = DEFAULT_TOLERANCE,
    mode: str = "gate",
    batch_dir: Path | str | None = None,
    published_versions: Mapping[str, str] | None = None,
) -> GateDecision:
    """Judge the new versions in `candidate`, move the aliases, log the decision on both runs; return it.

    `candidate` maps each registered model ('ranker', 'two_tower') to its new version: the dicts the training
    tasks return (`model_version`, and `run_id`, checked against the registry) or the version itself. Metrics are
    read from the versions' runs, the candidate's and the champion's alike. `batch_dir` is the run's
    batch_score output: tagged on both new versions, and published when they pass. `published_versions` are
    the model versions readers see now (`published_model_versions`; {} if none): when the run is held and
    they are not the champion's, the champion's own batch scores are named for publishing; None skips that.
    """
    from mlflow.tracking import MlflowClient

    if mode not in GATE_MODES:
        raise ValueError(f"mode must be one of {', '.join(GATE_MODES)}, got {mode!r}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be 0 or more, got {tolerance}")
    client = MlflowClient(tracking_uri)
    versions = {model: _candidate_version(candidate, model) for model in MODELS}
    runs = {model: _run_of_version(client, model, version, candidate.get(model)) for model, version in versions.items()}
    previous = _versions_by_alias(client, CHAMPION)
    if batch_dir is not None:
        _check_batch_scored_with(Path(batch_dir), versions)

    checks: tuple[GateCheck, ...] = ()
    if mode == "skip":
        outcome, reason = FORCED, "gate skipped by the run's Param (mode 'skip'): published without a comparison"
    else:
        checks = tuple(_check(client, metric, runs[metric.model], previous[metric.model], tolerance)
                       for metric in GATE_METRICS)  # fmt: skip
        failures = [check.describe(tolerance) for check in checks if not check.passed]
        passes = [check.describe(tolerance) for check in checks if check.passed]
        if not failures:
            outcome, reason = PUBLISH, "passed: " + "; ".join(passes)
        elif mode == "force":
            outcome, reason = FORCED, "forced by the run's Param (mode 'force'); the gate would have held: " + \
                "; ".join(failures)  # fmt: skip
        else:
            outcome, reason = HOLD, "held as challenger: " + "; ".join(failures)
    if mode == "force" and outcome == PUBLISH:
        outcome, reason = FORCED, f"forced by the run's Param (mode 'force'); the gate would have published: {reason}"

    if batch_dir is not None:  # so that a reviewer's later promotion finds this pair's lists
        for model, version in versions.items():
            client.set_model_version_tag(model, version, BATCH_SCORE_DIR_TAG, str(batch_dir))
    alias = CHAMPION if outcome in (PUBLISH, FORCED) else CHALLENGER
    for model, version in versions.items():
        client.set_registered_model_alias(model, alias, version)
    champions: dict[str, str | None] = dict(versions) if alias == CHAMPION else dict(previous)

    publish_dir: str | None = None
    if alias == CHAMPION:
        publish_dir = None if batch_dir is None else str(batch_dir)
        if batch_dir is None:
            reason += "; no batch scores given: nothing to publish"
    elif published_versions is not None:
        publish_dir, note = _champion_batch_to_republish(client, champions, published_versions)
        reason += f"; {note}"
    elif any(version is None for version in champions.values()):
        reason += "; nothing published: there is no champion pair yet"
    else:
        reason += "; nothing published: readers keep the champion's lists"
    decision = GateDecision(
        outcome=outcome, mode=mode, reason=reason, tolerance=tolerance, candidate_versions=versions,
        previous_champion_versions=previous, champion_versions=champions, publish_batch_dir=publish_dir,
        publish_version=None if publish_dir is None else safe_run_id(Path(publish_dir).parent.name), checks=checks,
    )  # fmt: skip
    _log_decision(client, decision, runs)
    log.info("quality gate: %s (%s)", outcome, reason)
    return decision


def promote_models(tracking_uri: str, versions: Mapping[str, str] | None = None) -> dict[str, str]:
    """A reviewer's promotion: move `champion` to `versions`, by default to the current challenger pair.

    The same as moving the alias in MLflow's UI (model page, version, Aliases); the next run's gate and publish
    honour it. A promoted challenger loses its `challenger` alias.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    if versions is None:
        challengers = _versions_by_alias(client, CHALLENGER)
        missing = [model for model, version in challengers.items() if version is None]
        if missing:
            raise QualityGateError(f"no challenger version of {', '.join(missing)} to promote")
        versions = {model: str(version) for model, version in challengers.items()}
    if set(versions) != set(MODELS) or not all(versions.values()):
        raise ValueError(f"promote a version of each of {', '.join(MODELS)} (one pair, scored together), "
                         f"got {dict(versions)}")  # fmt: skip
    challengers = _versions_by_alias(client, CHALLENGER)
    for model, version in versions.items():
        client.get_model_version(model, str(version))  # fails for a version that does not exist
        client.set_registered_model_alias(model, CHAMPION, str(version))
        if challengers[model] == str(version):
            client.delete_registered_model_alias(model, CHALLENGER)
        client.set_model_version_tag(model, str(version), "promoted_by_review", "true")
    log.info("champion moved to %s", versions)
    return {model: str(version) for model, version in versions.items()}


def _candidate_version(candidate: Mapping[str, Any], model: str) -> str:
    if model not in candidate:
        raise QualityGateError(f"candidate names no version of '{model}'")
    entry = candidate[model]
    return str(entry["model_version"] if isinstance(entry, Mapping) else entry)


def _run_of_version(client: Any, model: str, version: str, entry: Any) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        model_version = client.get_model_version(model, version)
        run = client.get_run(model_version.run_id)
    except MlflowException as error:
        raise QualityGateError(f"{model} version {version}: {error.message}") from error
    if isinstance(entry, Mapping) and entry.get("run_id") not in (None, model_version.run_id):
        raise QualityGateError(f"{model} version {version} comes from run {model_version.run_id}, "
                               f"not from the candidate's run {entry['run_id']}")  # fmt: skip
    return run


def _check_batch_scored_with(batch_dir: Path, versions: Mapping[str, str]) -> None:
    """Refuse batch scores that say they came from other versions: what is published must be what was judged."""
    metrics_file = batch_dir / "_metrics.json"
    if not metrics_file.is_file():
        raise QualityGateError(f"{batch_dir}: no _metrics.json, not a batch_score output")
    scored = json.loads(metrics_file.read_text()).get("model_versions") or {}
    if scored and {str(model): str(version) for model, version in scored.items()} != dict(versions):
        raise QualityGateError(f"{batch_dir} was scored with {scored}, not with the candidate versions "
                               f"{dict(versions)}")  # fmt: skip


def _check(client: Any, metric: GateMetric, run: Any, champion_version: str | None, tolerance: float) -> GateCheck:
    champion_run = (None if champion_version is None
                    else client.get_run(client.get_model_version(metric.model, champion_version).run_id))  # fmt: skip
    name, baseline_metric = metric.metric, metric.baseline_metric
    if metric.fallback is not None and (name not in run.data.metrics or (
            champion_run is not None and name not in champion_run.data.metrics)):  # fmt: skip
        name, baseline_metric = metric.fallback
    value = run.data.metrics.get(name)
    baseline = metric.baseline_value if baseline_metric is None else run.data.metrics.get(baseline_metric)
    champion_value, same_data, as_good = None, None, None
    if champion_run is not None:
        champion_value = champion_run.data.metrics.get(name)
        ours, theirs = run.data.tags.get(VALIDATION_FINGERPRINT_TAG), champion_run.data.tags.get(
            VALIDATION_FINGERPRINT_TAG)  # fmt: skip
        same_data = ours is not None and ours == theirs
        # A champion without the metric cannot be beaten or matched: only a person decides then.
        as_good = value is not None and champion_value is not None and value >= champion_value - tolerance - _EPSILON
    return GateCheck(
        model=metric.model, metric=name, candidate=value, baseline_name=metric.baseline_name,
        baseline=baseline, champion_version=champion_version, champion=champion_value,
        same_validation_data=same_data, beats_baseline=value is not None and baseline is not None and value > baseline,
        as_good_as_champion=as_good,
    )  # fmt: skip


def _champion_batch_to_republish(client: Any, champions: Mapping[str, str | None],
                                 published: Mapping[str, str]) -> tuple[str | None, str]:  # fmt: skip
    """On hold: the champion's batch scores when readers see another pair (a reviewer moved the alias)."""
    if any(version is None for version in champions.values()):
        return None, "nothing published: there is no champion pair yet"
    if dict(published) == dict(champions):
        return None, "nothing published: readers keep the champion's lists"
    ranker = client.get_model_version(RANKER_MODEL_NAME, str(champions[RANKER_MODEL_NAME]))
    batch_dir = ranker.tags.get(BATCH_SCORE_DIR_TAG)
    pair = ", ".join(f"{model} v{version}" for model, version in champions.items())
    live = ", ".join(f"{model} v{version}" for model, version in published.items()) or "nothing"
    if batch_dir is None:
        return None, f"readers see {live}, not the champion pair ({pair}), whose batch scores are not recorded: " \
            "nothing published"  # fmt: skip
    metrics_file = Path(batch_dir) / "_metrics.json"
    scored = json.loads(metrics_file.read_text()).get("model_versions") if metrics_file.is_file() else None
    if scored is None:
        return None, f"readers see {live}, not the champion pair ({pair}), and its batch scores {batch_dir} " \
            "are gone: nothing published"  # fmt: skip
    if {str(model): str(version) for model, version in scored.items()} != dict(champions):
        return None, f"readers see {live}; the champion pair ({pair}) was never scored together ({batch_dir} holds " \
            f"{scored}): move both aliases to versions of one run; nothing published"  # fmt: skip
    return str(batch_dir), f"readers see {live}, not the champion pair ({pair}) a reviewer chose: republishing " \
        f"its batch scores from {batch_dir}"  # fmt: skip


def _log_decision(client: Any, decision: GateDecision, runs: Mapping[str, Any]) -> None:
    record = decision.to_dict()
    for model, run in runs.items():
        run_id = run.info.run_id
        client.log_dict(run_id, record, DECISION_ARTIFACT)
        client.set_tag(run_id, "gate_decision", decision.outcome)
        client.set_tag(run_id, "gate_mode", decision.mode)
        client.set_tag(run_id, "gate_reason", decision.reason[:_MAX_TAG_CHARS])
        client.set_model_version_tag(model, decision.candidate_versions[model], "gate_decision", decision.outcome)

"""Live monitoring of served recommendations, one hour at a time (the `recsys_monitoring` DAG; by hand
`recsys monitor-hour --hour 2026-11-26T10:00Z`).

For the hour [H, H + 1 h) (UTC), `monitor_hour` reads the gateway's impressions of that hour
(`serving/api/impressions.py`) and its interactions (RECSYS_DATABASE_URL) and computes, per model version
(the published version that served a list; `none` when nothing was published):

- `impressions` (answers), `impressions_served` (answers with at least one item), `degraded_impressions`
  (answers with a non-empty `degraded` list);
- `ctr`: served impressions with at least one attributed click / served impressions. A click is an
  interaction of type click, add_to_cart or purchase (what the nightly extract labels a click) on a product
  the impression showed, within `attribution_window` after it was shown;
- `precision_at_<k>`: the mean over served impressions of (distinct clicked products among the first k
  shown) / k; a list shorter than k counts its empty places as misses, as `tasks/evaluate.py` does offline;
- `clicks_by_request_id` and `clicks_by_customer_product`: attributed click events, by how they were matched;
- drift, `psi_<column>` (`psi_location`, `psi_device`, `psi_item_category`, ... in the default spec): the population
  stability index of the hour's interactions against the version's training data (below).

**Attribution.** An interaction that carries a `request_id` belongs to the impression of that request when
it shows the product, from 5 minutes before it was shown (client clocks may run behind the gateway's; the id
already says which list the click followed) to the end of the window. An interaction without one is matched
(`match_without_request_id`) to the latest impression that showed that product to that customer within
[shown, shown + window], impressions of the following window included as candidates, so a click goes to the
latest list that showed it and is never counted twice. That is an approximation (the customer may have found
the product elsewhere), reported apart as `clicks_by_customer_product`; similar-products answers name no
customer, so only request ids attribute their clicks. Clicks arriving after the run are not counted: the DAG
monitors an hour once all its windows have closed (`hour_to_monitor`).

**Drift.** PSI = sum over bins of (p - q) ln(p / q), p the hour's shares and q the reference's, each floored at
1e-4. Features (`drift_columns`), named by their spec columns: the context columns that `IngestionColumns` maps
(location and device: the event's, else the customer's, as the nightly extract fills them) and the spec's item
features (the product's attributes of those names), compared with the same columns of the reference. Bins: the
reference's `max_bins` most frequent values, the rest pooled, a missing value a bin of its own (thousands of rare
categories would otherwise make every hour look drifted). Reference: the training split of the model version,
`<data_root>/runs/<version>/resplit/train` (the nightly DAG publishes run R as version R); when a version has none
(not made by the DAG, or its run folder deleted), the previous 24 hours of interactions, and the tag
`drift_reference` says which. Not computed for an hour with fewer than `min_drift_interactions` interactions. A
PSI above 0.25 is the customary sign of a significant shift.

`log_monitoring_metrics` writes them to MLflow (experiment `recsys-monitoring`): one run per (hour, model
version), tagged `monitoring_hour` and `model_version`, each metric at step = the hour's epoch seconds (and
that timestamp), so `mlflow.search_runs(experiment_names=["recsys-monitoring"], filter_string="tags.model_version
= 'V'")` is the version's hourly time series. A rerun of an hour with the same results writes nothing; with
different ones (late interactions) it deletes that hour's runs and logs new ones: never two runs of an hour.
**Off-policy.** Sampled lists served with `RECSYS_IMPRESSIONS_CANDIDATE_SCORES` carry their propensity data
(recsys/impression_log.py): the first item's logged probability p, the order scores of the candidates it was
drawn from and its index among them. For each of `ope_temperatures`, the target probability q of that first
item is softmax(scores / T) at its index (T = 0: 1 for the best, else 0), the reward is a click on it, and
`ope_ips_t<T>` and `ope_snips_t<T>` (recsys/off_policy.py, with their 95% intervals and effective samples)
estimate the top slot's click-through had the lists been drawn at T, next to `ope_top_slot_ctr`, the logged
one. Another model version's estimate would need its scores of the same candidates, which the log has not.

**A/B experiments.** Impressions served while an experiment ran carry its name and the customer's bucket
(recsys/experiments.py): `experiments` reports, per experiment, each bucket's served impressions, the versions
that served it, CTR with its Wilson 95% interval and precision@k with a normal 95% interval, and the decision
on CTR: the challenger's CTR minus the control's with a 95% interval, `challenger wins` or `control wins` when
the interval excludes 0, `no decision yet` otherwise, `too few impressions` below `min_ab_impressions` served
lists in a bucket. One hour at a time: `recsys experiment status` sums the hours' runs in MLflow and decides
on the totals (tasks/experiment.py).
`log_experiment_metrics` logs them to the MLflow experiment `recsys-ab-tests`, one run per (hour, experiment).

`find_alerts` compares the metrics with `AlertThresholds`; `send_alerts` logs each as a JSON WARNING line and
POSTs them to a webhook; `monitor` does all of it and raises `MonitoringAlertError` when asked to.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import urllib.error
import urllib.request
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from recsys.impression_log import read_impressions, remove_hours_before
from recsys.interactions import ENGAGED_TYPES, IngestionColumns
from recsys.run_layout import RunLayout, safe_run_id
from recsys.spec import DatasetSpec, load_spec

log = logging.getLogger(__name__)

MONITORING_EXPERIMENT = "recsys-monitoring"
HOUR = timedelta(hours=1)
CLOCK_SKEW = timedelta(minutes=5)  # how far a client's event time may run behind the gateway's, for request ids
PSI_FLOOR = 1e-4
OTHER, MISSING = "__other__", "__missing__"
NO_VERSION = "none"
PREVIOUS_24_HOURS = "previous_24h_interactions"


@dataclasses.dataclass(frozen=True)
class MonitoringConfig:
    attribution_window: timedelta = timedelta(minutes=60)
    k: int = 10
    match_without_request_id: bool = True
    max_bins: int = 20
    min_drift_interactions: int = 100
    min_ab_impressions: int = 200  # served lists a bucket needs before an A/B decision is made
    # Temperatures whose top-slot click-through is estimated off-policy from sampled lists, and the weight clip.
    ope_temperatures: tuple[float, ...] = (0.0, 0.5, 1.0)
    ope_clip: float | None = None


@dataclasses.dataclass(frozen=True)
class AlertThresholds:
    """None: that alert is off. CTR and precision are judged only on hours with `min_impressions` served."""

    min_ctr: float | None = 0.01
    min_precision_at_k: float | None = None
    max_psi: float | None = 0.25
    min_impressions: int = 200


class MonitoringAlertError(RuntimeError):
    """A monitored metric crossed its threshold (raised when `fail_on_alert`)."""


@dataclasses.dataclass
class _Shown:
    request_id: str
    time: datetime
    customer_id: int | None
    model_version: str
    degraded: bool
    items: list[int]
    item_set: frozenset[int]
    clicked: set[int] = dataclasses.field(default_factory=set)
    experiment: str | None = None  # the A/B experiment and bucket the list was served in
    bucket: str | None = None
    # A sampled list's propensity data (module doc, "Off-policy"): the first item's logged probability, the
    # candidates' order scores it was drawn from and its index among them.
    top_probability: float | None = None
    candidate_scores: list[float] | None = None
    top_candidate: int | None = None


def floor_hour(moment: datetime) -> datetime:
    moment = moment.astimezone(UTC)
    return moment.replace(minute=0, second=0, microsecond=0)


def hour_to_monitor(interval_end: datetime, attribution_window: timedelta) -> datetime:
    """The latest hour whose attribution windows have all closed by `interval_end` (the DAG run's time)."""
    return floor_hour(interval_end - attribution_window) - HOUR


def hour_label(hour: datetime) -> str:
    return hour.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- reading -------------------------------------------------------------------------------------------------


def _impressions(impressions_dir: Path, hour: datetime, until: datetime) -> tuple[list[_Shown], int]:
    """Impressions shown in [hour, until), from every hourly folder that range touches."""
    shown, malformed = [], 0
    start = hour
    while start < until:
        records, bad = read_impressions(impressions_dir, start)
        malformed += bad
        for record in records:
            if not hour <= record["time"] < until:
                continue
            ranked = sorted(record["items"], key=lambda item: item["position"])
            items = [item["product_id"] for item in ranked]
            shown.append(_Shown(record["request_id"], record["time"], record.get("customer_id"),
                                record.get("model_version") or NO_VERSION, bool(record.get("degraded")), items,
                                frozenset(items), experiment=record.get("experiment"), bucket=record.get("bucket"),
                                top_probability=ranked[0].get("probability") if ranked else None,
                                candidate_scores=record.get("candidate_scores"),
                                top_candidate=record.get("top_candidate")))  # fmt: skip
        start += HOUR
    shown.sort(key=lambda impression: impression.time)
    return shown, malformed


def _clicks(connection: Any, start: datetime, end: datetime) -> list[tuple[int, int, datetime, str | None]]:
    """(customer, product, time, request id) of the click events in [start, end), in time order."""
    from sqlalchemy import select

    from recsys.database import Interaction

    query = (select(Interaction.customer_id, Interaction.product_id, Interaction.timestamp, Interaction.request_id)
             .where(Interaction.timestamp >= start, Interaction.timestamp < end,
                    Interaction.type.in_(sorted(ENGAGED_TYPES)))
             .order_by(Interaction.timestamp, Interaction.id))  # fmt: skip
    return [tuple(row) for row in connection.execute(query)]  # type: ignore[misc]


def drift_columns(spec: DatasetSpec) -> tuple[str, ...]:
    """The spec columns whose drift is measured: the context columns the gateway fills, then the item features."""
    mapping = IngestionColumns.matching(spec)
    context = tuple(column for column in (mapping.location, mapping.device) if column is not None)
    return context + tuple(spec.item_features)


def _interaction_features(connection: Any, start: datetime, end: datetime,
                          spec: DatasetSpec) -> tuple[int, dict[str, collections.Counter[str]]]:  # fmt: skip
    """The number of interactions in [start, end) and the counts of each drift column's values over them."""
    from sqlalchemy import func, select

    from recsys.database import Customer, Interaction, Product

    mapping = IngestionColumns.matching(spec)
    query = (select(func.coalesce(Interaction.location, Customer.location),
                    func.coalesce(Interaction.device, Customer.device), Product.attributes)
             .join(Customer, Customer.id == Interaction.customer_id)
             .join(Product, Product.id == Interaction.product_id)
             .where(Interaction.timestamp >= start, Interaction.timestamp < end))  # fmt: skip
    counts: dict[str, collections.Counter[str]] = {name: collections.Counter() for name in drift_columns(spec)}
    rows = 0
    for location, device, attributes in connection.execute(query):
        values = {mapping.location: location, mapping.device: device, **(attributes or {})}
        for name, counter in counts.items():
            counter[_bin_value(values.get(name))] += 1
        rows += 1
    return rows, counts


def _bin_value(value: Any) -> str:
    return MISSING if value is None or value == "" else str(value)


def training_distribution(train_dir: Path, spec: DatasetSpec) -> dict[str, collections.Counter[str]] | None:
    """Counts of each drift feature's values in a training split (its spec columns), or None without one."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from recsys.parquet_io import part_files

    files = part_files(train_dir) if train_dir.is_dir() else []
    if not files:
        return None
    counts: dict[str, collections.Counter[str]] = {name: collections.Counter() for name in drift_columns(spec)}
    for path in files:
        split = pq.ParquetFile(path)
        columns = [name for name in counts if name in split.schema_arrow.names]  # a column it lacks: no reference
        # Batch by batch: a training split of tens of millions of rows never sits in memory.
        for batch in split.iter_batches(columns=columns, batch_size=1_000_000):
            for name in columns:
                for entry in pc.value_counts(batch.column(name)).to_pylist():
                    counts[name][_bin_value(entry["values"])] += entry["counts"]
    return counts


# -- metrics -------------------------------------------------------------------------------------------------


def population_stability_index(reference: collections.Counter[str], current: collections.Counter[str], *,
                               max_bins: int) -> float:  # fmt: skip
    """PSI of `current` against `reference` over the reference's `max_bins` most frequent values plus the rest."""
    kept = [value for value, _ in sorted(reference.items(), key=lambda pair: (-pair[1], pair[0]))[:max_bins]]
    bins = set(kept)

    def shares(counts: collections.Counter[str]) -> dict[str, float]:
        total = sum(counts.values())
        pooled: collections.Counter[str] = collections.Counter()
        for value, count in counts.items():
            pooled[value if value in bins else OTHER] += count
        return {value: max(pooled[value] / total, PSI_FLOOR) for value in [*kept, OTHER]}

    p, q = shares(current), shares(reference)
    return float(sum((p[value] - q[value]) * math.log(p[value] / q[value]) for value in p))


def _match_clicks(shown: list[_Shown], clicks: Iterable[tuple[int, int, datetime, str | None]],
                  config: MonitoringConfig, until: datetime) -> dict[str, collections.Counter[str]]:  # fmt: skip
    """Mark each impression's clicked products (module doc, "Attribution"); the click events matched to
    impressions shown before `until`, per model version and by how they were matched."""
    window = config.attribution_window
    clicks = list(clicks)
    by_request: dict[str, list[_Shown]] = collections.defaultdict(list)
    by_customer_product: dict[tuple[int, int], list[_Shown]] = collections.defaultdict(list)
    # Only the lists of customers who clicked without a request id are indexed by product: far fewer than all.
    clicking = {customer for customer, _, _, request_id in clicks if request_id is None}
    for impression in shown:  # in time order, so each list's last candidate is the latest
        by_request[impression.request_id].append(impression)
        if config.match_without_request_id and impression.customer_id in clicking:
            for item in impression.item_set:
                by_customer_product[(impression.customer_id, item)].append(impression)  # type: ignore[index]
    counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for customer, product, moment, request_id in clicks:
        if request_id is not None:
            how, candidates = "request_id", [
                impression for impression in by_request.get(request_id, ())
                if product in impression.item_set and impression.time - CLOCK_SKEW <= moment <= impression.time + window
            ]  # fmt: skip
        elif config.match_without_request_id:
            how, candidates = "customer_product", [
                impression for impression in by_customer_product.get((customer, product), ())
                if impression.time <= moment <= impression.time + window
            ]  # fmt: skip
        else:
            continue
        if candidates:
            impression = candidates[-1]
            impression.clicked.add(product)
            if impression.time < until:
                counts[impression.model_version][how] += 1
    return counts


def monitor_hour(hour: datetime, *, impressions_dir: Path, database_url: str, runs_dir: Path,
                 spec: DatasetSpec | None = None, config: MonitoringConfig | None = None
                 ) -> dict[str, Any]:  # fmt: skip
    """The hour's metrics per model version (module doc), as a JSON-ready dict."""
    from recsys.database import create_database_engine

    config = config or MonitoringConfig()
    spec = spec or load_spec()
    if hour.tzinfo is None or floor_hour(hour) != hour:
        raise ValueError(f"{hour} is not the start of an hour with a time zone (e.g. 2026-11-26T10:00Z)")
    hour = floor_hour(hour)
    hour_end, window = hour + HOUR, config.attribution_window
    shown, malformed = _impressions(impressions_dir, hour, hour_end + window)
    engine = create_database_engine(database_url, timeout_ms=None)  # a batch job: no request budget
    try:
        with engine.connect() as connection:
            clicks = _clicks(connection, hour - CLOCK_SKEW, hour_end + window)
            interactions, current = _interaction_features(connection, hour, hour_end, spec)
            previous: dict[str, collections.Counter[str]] | None = None
            references: dict[str, tuple[str, dict[str, collections.Counter[str]] | None]] = {}
            versions = sorted({impression.model_version for impression in shown if impression.time < hour_end})
            for version in versions:
                run = None if version == NO_VERSION else RunLayout(runs_dir / safe_run_id(version))
                train_dir = run.resplit / "train" if run is not None else None
                reference = training_distribution(train_dir, spec) if train_dir is not None else None
                if reference is not None:
                    references[version] = (str(train_dir), reference)
                    continue
                if previous is None:
                    previous = _interaction_features(connection, hour - timedelta(hours=24), hour, spec)[1]
                references[version] = (PREVIOUS_24_HOURS, previous)
    finally:
        engine.dispose()

    matched = _match_clicks(shown, clicks, config, until=hour_end)
    report_versions: dict[str, dict[str, Any]] = {}
    for version in versions:
        in_hour = [impression for impression in shown if impression.model_version == version and
                   impression.time < hour_end]  # fmt: skip
        served = [impression for impression in in_hour if impression.items]
        metrics: dict[str, Any] = {
            "impressions": len(in_hour),
            "impressions_served": len(served),
            "degraded_impressions": sum(impression.degraded for impression in in_hour),
            "clicks_by_request_id": matched[version]["request_id"],
            "clicks_by_customer_product": matched[version]["customer_product"],
        }
        if served:
            metrics["ctr"] = sum(bool(impression.clicked) for impression in served) / len(served)
            metrics[f"precision_at_{config.k}"] = sum(_precision_at(impression, config.k)
                                                       for impression in served) / len(served)  # fmt: skip
        metrics.update(_off_policy(served, config))
        source, reference = references[version]
        metrics["drift_reference"] = source
        if reference is not None and interactions >= config.min_drift_interactions:
            for name, counts in reference.items():
                if sum(counts.values()):
                    metrics[f"psi_{name}"] = population_stability_index(counts, current[name],
                                                                        max_bins=config.max_bins)  # fmt: skip
        report_versions[version] = metrics
    report = {
        "hour": hour_label(hour),
        "step": int(hour.timestamp()),
        "attribution_window_minutes": window.total_seconds() / 60,
        "k": config.k,
        "interactions": interactions,
        "impression_lines_malformed": malformed,
        "versions": report_versions,
    }
    experiments = _experiments(shown, hour_end, config)
    if experiments:
        report["experiments"] = experiments
    return report


def _off_policy(served: list[_Shown], config: MonitoringConfig) -> dict[str, float]:
    """Off-policy estimates of the top slot's click-through at each of `ope_temperatures`, from the served
    lists that carry their propensity data (module doc, "Off-policy"); {} without any."""
    import numpy as np

    from recsys.off_policy import ips, snips, softmax_propensities

    logged = [impression for impression in served if impression.candidate_scores and impression.top_probability
              and impression.top_candidate is not None]  # fmt: skip
    if not logged:
        return {}
    rewards = np.array([impression.items[0] in impression.clicked for impression in logged], dtype=np.float64)
    propensities = np.array([impression.top_probability for impression in logged], dtype=np.float64)
    metrics = {"ope_sampled_impressions": float(len(logged)), "ope_top_slot_ctr": float(rewards.mean())}
    for temperature in config.ope_temperatures:
        target = np.array([softmax_propensities(np.array([impression.candidate_scores]), temperature)
                           [0, impression.top_candidate] for impression in logged])  # fmt: skip
        for name, estimator in (("ips", ips), ("snips", snips)):
            try:
                estimate = estimator(rewards, propensities, target, clip=config.ope_clip)
            except ValueError:  # the target never shows what was logged first: nothing to estimate from
                continue
            key = f"ope_{name}_t{temperature:g}"
            metrics.update({key: estimate.value, f"{key}_low": estimate.low, f"{key}_high": estimate.high,
                            f"{key}_effective_samples": estimate.effective_samples})  # fmt: skip
    return metrics


def _precision_at(impression: _Shown, k: int) -> float:
    """Distinct clicked products among the first k shown, over k (a shorter list's empty places are misses)."""
    return len(impression.clicked & set(impression.items[:k])) / k


def _experiments(shown: list[_Shown], hour_end: datetime, config: MonitoringConfig) -> dict[str, dict[str, Any]]:
    """Per A/B experiment served in the hour: each bucket's click-through and precision@k with 95% intervals
    (Wilson's for the CTR), the versions that served it, and the decision on CTR (`compare_buckets`)."""
    from recsys.experiments import BUCKETS, CHALLENGER, CONTROL, compare_buckets, mean_interval, wilson_interval

    report: dict[str, dict[str, Any]] = {}
    for name in sorted({impression.experiment for impression in shown if impression.experiment is not None}):
        buckets: dict[str, dict[str, Any]] = {}
        counts: dict[str, tuple[int, int]] = {}
        for bucket in BUCKETS:
            served = [impression for impression in shown if impression.experiment == name and
                      impression.bucket == bucket and impression.time < hour_end and impression.items]  # fmt: skip
            clicked = sum(bool(impression.clicked) for impression in served)
            precisions = [_precision_at(impression, config.k) for impression in served]
            ctr_low, ctr_high = wilson_interval(clicked, len(served))
            precision_low, precision_high = mean_interval(precisions)
            buckets[bucket] = {
                "impressions_served": len(served),
                "clicked": clicked,  # served lists with a click
                "versions": sorted({impression.model_version for impression in served}),
                "ctr": clicked / len(served) if served else None, "ctr_low": ctr_low, "ctr_high": ctr_high,
                f"precision_at_{config.k}": sum(precisions) / len(precisions) if precisions else None,
                f"precision_at_{config.k}_low": precision_low, f"precision_at_{config.k}_high": precision_high,
            }  # fmt: skip
            counts[bucket] = (clicked, len(served))
        comparison = compare_buckets(counts[CONTROL], counts[CHALLENGER], min_impressions=config.min_ab_impressions)
        report[name] = {"buckets": buckets, **comparison}
        log.info("A/B experiment %s: %s (CTR control %s, challenger %s)", name, comparison["decision"],
                 buckets[CONTROL]["ctr"], buckets[CHALLENGER]["ctr"])  # fmt: skip
    return report


# -- MLflow, alerts ------------------------------------------------------------------------------------------


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {key: float(value) for key, value in metrics.items()
            if isinstance(value, int | float) and not isinstance(value, bool)}  # fmt: skip


def log_monitoring_metrics(report: dict[str, Any], *, tracking_uri: str, artifact_root: str | Path,
                           experiment: str = MONITORING_EXPERIMENT) -> dict[str, str]:  # fmt: skip
    """One MLflow run per (hour, model version) with the report's metrics at step = the hour's epoch seconds;
    idempotent (module doc). Returns model version -> run id."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from tasks.track_training import configure_mlflow

    experiment_id = configure_mlflow(tracking_uri, artifact_root, experiment)
    client = MlflowClient(tracking_uri)
    hour, step = report["hour"], report["step"]
    timestamp_ms = step * 1000
    wanted = {version: _numeric(metrics) for version, metrics in report["versions"].items()}
    existing = client.search_runs([experiment_id], filter_string=f"tags.monitoring_hour = '{hour}'")
    logged = {run.data.tags.get("model_version"): run for run in existing}
    if len(existing) == len(logged) and logged.keys() == wanted.keys() and all(
        logged[version].data.metrics == metrics for version, metrics in wanted.items()
    ):  # fmt: skip
        log.info("monitoring %s: the same metrics are logged already", hour)
        return {version: run.info.run_id for version, run in logged.items()}  # type: ignore[misc]
    for run in existing:  # an earlier result of this hour (fewer interactions then): replaced, not added to
        client.delete_run(run.info.run_id)
    run_ids = {}
    for version, metrics in wanted.items():
        tags = {"monitoring_hour": hour, "model_version": version,
                "drift_reference": str(report["versions"][version].get("drift_reference"))}  # fmt: skip
        run = client.create_run(experiment_id, start_time=timestamp_ms, tags=tags, run_name=f"{version} {hour}")
        params = [Param("attribution_window_minutes", str(report["attribution_window_minutes"])),
                  Param("k", str(report["k"]))]  # fmt: skip
        client.log_batch(run.info.run_id, params=params,
                         metrics=[Metric(key, value, timestamp_ms, step) for key, value in sorted(metrics.items())])
        client.set_terminated(run.info.run_id, end_time=timestamp_ms)
        run_ids[version] = run.info.run_id
    return run_ids


def log_experiment_metrics(report: dict[str, Any], *, tracking_uri: str, artifact_root: str | Path) -> dict[str, str]:
    """One MLflow run per (hour, A/B experiment) in the `recsys-ab-tests` experiment, next to the runs that
    `recsys experiment start` opens: each bucket's metrics prefixed by its name, the CTR difference with its
    interval, and the decision as a tag. A rerun of the hour replaces its runs. Returns experiment -> run id."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from tasks.experiment import AB_TESTS_EXPERIMENT
    from tasks.track_training import configure_mlflow

    experiments = report.get("experiments") or {}
    if not experiments:
        return {}
    experiment_id = configure_mlflow(tracking_uri, artifact_root, AB_TESTS_EXPERIMENT)
    client = MlflowClient(tracking_uri)
    hour, step = report["hour"], report["step"]
    timestamp_ms = step * 1000
    for run in client.search_runs([experiment_id], filter_string=f"tags.monitoring_hour = '{hour}'"):
        client.delete_run(run.info.run_id)
    run_ids = {}
    for name, result in experiments.items():
        metrics = {f"{bucket}_{key}": value for bucket, values in result["buckets"].items()
                   for key, value in _numeric(values).items()}  # fmt: skip
        metrics.update(_numeric({key: value for key, value in result.items() if key != "buckets"}))
        run = client.create_run(experiment_id, start_time=timestamp_ms, run_name=f"{name} {hour}",
                                tags={"ab_experiment": name, "monitoring_hour": hour,
                                      "decision": result["decision"]})  # fmt: skip
        client.log_batch(run.info.run_id, metrics=[Metric(key, value, timestamp_ms, step)
                                                   for key, value in sorted(metrics.items())])  # fmt: skip
        client.set_terminated(run.info.run_id, end_time=timestamp_ms)
        run_ids[name] = run.info.run_id
    return run_ids


def find_alerts(report: dict[str, Any], thresholds: AlertThresholds) -> list[dict[str, Any]]:
    """Every metric of the report on the wrong side of its threshold."""
    alerts = []

    def alert(version: str, metric: str, value: float, threshold: float, condition: str) -> None:
        alerts.append({"hour": report["hour"], "model_version": version, "metric": metric, "value": value,
                       "threshold": threshold, "condition": condition})  # fmt: skip

    precision = f"precision_at_{report['k']}"
    for version, metrics in report["versions"].items():
        if metrics["impressions_served"] >= thresholds.min_impressions:
            if thresholds.min_ctr is not None and metrics.get("ctr", math.inf) < thresholds.min_ctr:
                alert(version, "ctr", metrics["ctr"], thresholds.min_ctr, "below")
            minimum = thresholds.min_precision_at_k
            if minimum is not None and metrics.get(precision, math.inf) < minimum:
                alert(version, precision, metrics[precision], minimum, "below")
        if thresholds.max_psi is not None:
            for name, value in metrics.items():
                if name.startswith("psi_") and value > thresholds.max_psi:
                    alert(version, name, value, thresholds.max_psi, "above")
    return alerts


def send_alerts(alerts: list[dict[str, Any]], *, webhook_url: str | None, timeout_s: float = 5.0) -> bool:
    """Log each alert as a JSON WARNING line, then POST them all to the webhook (if any) as
    `{"source": "recsys-monitoring", "alerts": [...]}`. Returns whether the webhook took them; a failing
    webhook is logged as an error and never hides the alerts."""
    for alert in alerts:
        log.warning(json.dumps({"event": "monitoring_alert", **alert}, separators=(",", ":")))
    if not alerts or not webhook_url:
        return False
    body = json.dumps({"source": MONITORING_EXPERIMENT, "alerts": alerts}).encode()
    request = urllib.request.Request(webhook_url, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            response.read()
    except (urllib.error.URLError, OSError, ValueError) as error:
        log.error(json.dumps({"event": "monitoring_webhook_failed", "url": webhook_url, "error": str(error)}))
        return False
    return True


def monitor(hour: datetime, *, impressions_dir: Path, database_url: str, runs_dir: Path, tracking_uri: str,
            artifact_root: str | Path, spec: DatasetSpec | None = None, config: MonitoringConfig | None = None,
            thresholds: AlertThresholds | None = None, webhook_url: str | None = None,
            fail_on_alert: bool = False) -> dict[str, Any]:  # fmt: skip
    """`monitor_hour`, logged to MLflow, alerts sent; raises MonitoringAlertError on an alert if `fail_on_alert`.
    Returns the report with the MLflow run ids and the alerts."""
    report = monitor_hour(hour, impressions_dir=impressions_dir, database_url=database_url, runs_dir=runs_dir,
                          spec=spec, config=config)  # fmt: skip
    report["mlflow_run_ids"] = log_monitoring_metrics(report, tracking_uri=tracking_uri, artifact_root=artifact_root)
    report["experiment_run_ids"] = log_experiment_metrics(report, tracking_uri=tracking_uri,
                                                          artifact_root=artifact_root)  # fmt: skip
    alerts = find_alerts(report, thresholds or AlertThresholds())
    report["alerts"] = alerts
    report["webhook_delivered"] = send_alerts(alerts, webhook_url=webhook_url)
    log.info("monitoring %s: %s", report["hour"], json.dumps(report["versions"], sort_keys=True))
    if alerts and fail_on_alert:
        summary = "; ".join(f"{alert['model_version']} {alert['metric']} {alert['value']:.4g} {alert['condition']} "
                            f"{alert['threshold']}" for alert in alerts)  # fmt: skip
        raise MonitoringAlertError(f"monitoring {report['hour']}: {summary}")
    return report


def remove_expired_impressions(impressions_dir: Path, *, now: datetime, retention_days: int) -> dict[str, Any]:
    """Remove the impression hours that ended `retention_days` or more before `now` (the monitoring DAG's second
    task); idempotent."""
    if retention_days < 1:
        raise ValueError(f"impressions are kept a day at least (the writer appends to the current hour), got "
                         f"retention_days={retention_days}")  # fmt: skip
    cutoff = now.astimezone(UTC) - timedelta(days=retention_days)
    hours, files = remove_hours_before(impressions_dir, cutoff)
    report = {"removed_before": hour_label(cutoff), "hours_removed": hours, "files_removed": files}
    log.info("impressions: %s", json.dumps(report))
    return report

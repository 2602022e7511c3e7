"""A/B experiments by model version: which customers see the challenger's lists, and the numbers that decide.

While an experiment runs, Redis holds it (`recsys.recommendation_store`'s key layout):

    {<prefix>recs}:experiment hash: name, challenger, control (the version current at the start), share, salt,
                             started_at, mlflow_run_id

A customer is in the challenger bucket when a stable hash of the experiment's salt and their id falls below the
share (`bucket_of`): the same customer stays in the same bucket on every worker and host, for the whole
experiment, and a new salt (a new experiment) draws buckets afresh. The control bucket is served by whatever
version is current; the challenger bucket by the challenger version, its precomputed lists and its models
online. Impressions record the experiment and the bucket (recsys/impression_log.py); the monitoring DAG reports
click-through and precision@k per bucket with confidence intervals and a decision line (`compare_buckets`).
Starting, stopping and promoting are `recsys experiment ...` (tasks/experiment.py), each recorded in MLflow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any

CONTROL = "control"
CHALLENGER = "challenger"
BUCKETS = (CONTROL, CHALLENGER)
Z_95 = 1.959963984540054  # the normal quantile of a two-sided 95% interval


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    challenger: str  # the version the challenger bucket is served
    control: str  # the version current when it started (the control bucket follows `current`)
    share: float  # of customers in the challenger bucket, in (0, 1)
    salt: str
    started_at: str
    mlflow_run_id: str = ""

    def as_hash(self) -> dict[str, str]:
        return {field.name: str(getattr(self, field.name)) for field in dataclasses.fields(self)}

    @classmethod
    def from_hash(cls, values: dict[Any, Any]) -> Experiment | None:
        """The experiment a Redis hash holds (bytes or text), or None for an empty one."""
        if not values:
            return None
        text = {_text(key): _text(value) for key, value in values.items()}
        return cls(name=text["name"], challenger=text["challenger"], control=text.get("control", ""),
                   share=float(text["share"]), salt=text["salt"], started_at=text.get("started_at", ""),
                   mlflow_run_id=text.get("mlflow_run_id", ""))  # fmt: skip


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def bucket_of(customer_id: int, salt: str, share: float) -> str:
    """The customer's bucket: challenger when the hash of (salt, id), as a number in [0, 1), is below `share`.
    SHA-1's first 32 bits: stable across processes and hosts, and what the gateway's Redis read computes in Lua
    (`redis.sha1hex`, serving/list_reader.py), so the bucket is drawn in the read's own round trip."""
    digest = hashlib.sha1(f"{salt}:{customer_id}".encode(), usedforsecurity=False).hexdigest()
    return CHALLENGER if int(digest[:8], 16) / 2**32 < share else CONTROL


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (good at small counts and near 0, where click rates live)."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(values: list[float], z: float = Z_95) -> tuple[float, float]:
    """A normal interval of a mean (precision@k: a mean over many impressions)."""
    if not values:
        return 0.0, 0.0
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, mean
    variance = sum((value - mean) ** 2 for value in values) / (len(values) - 1)
    half = z * math.sqrt(variance / len(values))
    return mean - half, mean + half


def compare_buckets(control: tuple[int, int], challenger: tuple[int, int], *, min_impressions: int = 200,
                    z: float = Z_95) -> dict[str, Any]:  # fmt: skip
    """The decision on click-through: (clicked, served impressions) of each bucket -> the difference in CTR
    (challenger - control), its 95% interval (normal approximation of two proportions) and a decision line:
    `challenger wins` or `control wins` when the interval excludes 0, else `no decision yet`; with fewer than
    `min_impressions` in a bucket, `too few impressions`."""
    (clicks_a, shown_a), (clicks_b, shown_b) = control, challenger
    if min(shown_a, shown_b) < min_impressions:
        return {"decision": "too few impressions", "ctr_difference": None, "ctr_difference_low": None,
                "ctr_difference_high": None}  # fmt: skip
    rate_a, rate_b = clicks_a / shown_a, clicks_b / shown_b
    difference = rate_b - rate_a
    half = z * math.sqrt(rate_a * (1 - rate_a) / shown_a + rate_b * (1 - rate_b) / shown_b)
    low, high = difference - half, difference + half
    decision = "challenger wins" if low > 0 else "control wins" if high < 0 else "no decision yet"
    return {"decision": decision, "ctr_difference": difference, "ctr_difference_low": low,
            "ctr_difference_high": high}  # fmt: skip

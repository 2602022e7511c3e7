"""Off-policy estimates: the click-through a policy would have had, from logs another policy made.

Each logged impression holds the action the logging policy took, the probability it took it with (its
propensity, which the gateway logs with every sampled list: `probability`), and the reward seen (a click). For a
target policy that would have taken the same action with probability `target`, importance sampling reweights
every reward by w = target / logged:

- **IPS** (inverse propensity scoring): mean(w x reward). Unbiased when every action the target takes has a
  logged propensity above 0; its variance grows with the weights.
- **SNIPS** (self-normalized IPS): sum(w x reward) / sum(w). Slightly biased, much less variable: the weights'
  own mean (1 in expectation) normalizes the estimate.

Both take `clip`: weights above it are cut to it (biased towards the logging policy, bounded variance; None: no
clipping). Confidence intervals are normal ones, from the standard error of the mean for IPS and by the delta
method for SNIPS (Owen, "Monte Carlo theory", ch. 9; Swaminathan and Joachims, 2015).
"""

from __future__ import annotations

import dataclasses
import math
from statistics import NormalDist

import numpy as np


@dataclasses.dataclass(frozen=True)
class Estimate:
    value: float
    low: float  # the confidence interval's bounds
    high: float
    samples: int
    clipped: int  # weights cut to `clip`
    effective_samples: float  # (sum w)^2 / sum w^2: how many unweighted samples the estimate is worth

    def covers(self, truth: float) -> bool:
        return self.low <= truth <= self.high


def importance_weights(target: np.ndarray, logged: np.ndarray, clip: float | None = None) -> tuple[np.ndarray, int]:
    """target / logged propensities, cut to `clip`; (weights, how many were cut)."""
    target, logged = np.asarray(target, dtype=np.float64), np.asarray(logged, dtype=np.float64)
    if target.shape != logged.shape:
        raise ValueError(f"{target.shape[0] if target.ndim else 0} target propensities for "
                         f"{logged.shape[0] if logged.ndim else 0} logged ones")  # fmt: skip
    if np.any(~np.isfinite(logged)) or np.any(logged <= 0) or np.any(logged > 1):
        raise ValueError("logged propensities must be in (0, 1]: an action logged with probability 0 cannot be "
                         "reweighted")  # fmt: skip
    if np.any(~np.isfinite(target)) or np.any(target < 0) or np.any(target > 1):
        raise ValueError("target propensities must be in [0, 1]")
    if clip is not None and clip <= 0:
        raise ValueError(f"clip must be above 0, got {clip}")
    weights = target / logged
    if clip is None:
        return weights, 0
    return np.minimum(weights, clip), int(np.count_nonzero(weights > clip))


def _checked_rewards(rewards: np.ndarray, weights: np.ndarray) -> np.ndarray:
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.shape != weights.shape or not len(rewards):
        raise ValueError(f"{len(rewards)} rewards for {len(weights)} weights (at least one of each)")
    return rewards


def _effective(weights: np.ndarray) -> float:
    squares = float(np.sum(weights**2))
    return float(np.sum(weights)) ** 2 / squares if squares else 0.0


def ips(rewards: np.ndarray, logged: np.ndarray, target: np.ndarray, *, clip: float | None = None,
        confidence: float = 0.95) -> Estimate:  # fmt: skip
    """Inverse propensity scoring of the target policy's mean reward."""
    weights, clipped = importance_weights(target, logged, clip)
    terms = weights * _checked_rewards(rewards, weights)
    value = float(np.mean(terms))
    error = float(np.std(terms, ddof=1) / math.sqrt(len(terms))) if len(terms) > 1 else math.inf
    half = NormalDist().inv_cdf(0.5 + confidence / 2) * error
    return Estimate(value, value - half, value + half, len(terms), clipped, _effective(weights))


def snips(rewards: np.ndarray, logged: np.ndarray, target: np.ndarray, *, clip: float | None = None,
          confidence: float = 0.95) -> Estimate:  # fmt: skip
    """Self-normalized inverse propensity scoring of the target policy's mean reward."""
    weights, clipped = importance_weights(target, logged, clip)
    rewards = _checked_rewards(rewards, weights)
    total = float(np.sum(weights))
    if total <= 0:
        raise ValueError("the target policy gives none of the logged actions any probability: nothing to estimate")
    value = float(np.sum(weights * rewards)) / total
    # Delta method for a ratio of means: var = mean(w^2 (r - value)^2) / (n mean(w)^2).
    n = len(weights)
    mean_weight = total / n
    variance = float(np.mean(weights**2 * (rewards - value) ** 2)) / (n * mean_weight**2) if n > 1 else math.inf
    half = NormalDist().inv_cdf(0.5 + confidence / 2) * math.sqrt(variance)
    return Estimate(value, value - half, value + half, n, clipped, _effective(weights))


def softmax_propensities(scores: np.ndarray, temperature: float) -> np.ndarray:
    """Each candidate's probability of being drawn first from softmax(score / T), rows of candidates (NaN:
    absent); T = 0 is the ranked order (probability 1 for the best, ties to the first)."""
    scores = np.asarray(scores, dtype=np.float64)
    present = np.isfinite(scores)
    if temperature == 0:
        best = np.argmax(np.where(present, scores, -np.inf), axis=1)
        probabilities = np.zeros_like(scores)
        probabilities[np.arange(len(scores)), best] = 1.0
        return np.where(present, probabilities, 0.0)
    logits = np.where(present, scores / temperature, -np.inf)
    weights = np.exp(logits - np.max(logits, axis=1, keepdims=True))
    return weights / weights.sum(axis=1, keepdims=True)

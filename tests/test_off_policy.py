"""Off-policy estimators (`recsys/off_policy.py`): hand-computed cases, their refusals, and simulated logs whose
truth is known from the data generator's click probabilities."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recsys.datagen import GeneratorConfig, click_logit, make_entities
from recsys.off_policy import importance_weights, ips, snips, softmax_propensities


def test_ips_and_snips_reweight_each_reward_by_target_over_logged():
    rewards = np.array([1.0, 0.0, 1.0, 0.0])
    logged = np.array([0.5, 0.5, 0.25, 0.25])
    target = np.array([1.0, 0.0, 0.5, 0.5])  # weights 2, 0, 2, 2
    by_ips = ips(rewards, logged, target)
    assert by_ips.value == pytest.approx((2 + 0 + 2 + 0) / 4)
    terms = np.array([2.0, 0.0, 2.0, 0.0])
    half = 1.959964 * terms.std(ddof=1) / 2
    assert (by_ips.low, by_ips.high) == (pytest.approx(1.0 - half, rel=1e-5), pytest.approx(1.0 + half, rel=1e-5))
    assert snips(rewards, logged, target).value == pytest.approx(4 / 6)  # sum(w r) / sum(w)
    assert by_ips.effective_samples == pytest.approx(36 / 12)  # (sum w)^2 / sum w^2
    # The logging policy evaluated on its own logs: both are the plain mean.
    assert ips(rewards, logged, logged).value == snips(rewards, logged, logged).value == 0.5


def test_clipping_cuts_the_largest_weights_and_counts_them():
    weights, clipped = importance_weights(np.array([0.9, 0.5]), np.array([0.01, 0.5]), clip=10.0)
    assert weights.tolist() == [10.0, 1.0] and clipped == 1
    estimate = ips(np.array([1.0, 1.0]), np.array([0.01, 0.5]), np.array([0.9, 0.5]), clip=10.0)
    assert estimate.value == pytest.approx(5.5) and estimate.clipped == 1


@pytest.mark.parametrize(("logged", "target", "message"), [
    ([0.0, 0.5], [0.5, 0.5], "logged propensities must be in"),
    ([0.5, 1.5], [0.5, 0.5], "logged propensities must be in"),
    ([0.5, 0.5], [0.5, math.nan], "target propensities must be in"),
    ([0.5, 0.5], [0.5], "1 target propensities for 2 logged ones"),
])  # fmt: skip
def test_propensities_that_cannot_be_reweighted_are_refused(logged, target, message):
    with pytest.raises(ValueError, match=message):
        ips(np.ones(len(logged)), np.array(logged), np.array(target))


def test_snips_refuses_a_target_that_gives_no_logged_action_any_probability():
    with pytest.raises(ValueError, match="nothing to estimate"):
        snips(np.array([1.0]), np.array([0.5]), np.array([0.0]))


def test_softmax_propensities_are_the_gateways_first_draw_probabilities():
    scores = np.array([[0.2, 0.9, np.nan], [0.5, 0.5, 0.1]])
    ranked = softmax_propensities(scores, 0.0)
    assert ranked.tolist() == [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]  # ties: the first
    sampled = softmax_propensities(scores, 0.5)
    assert sampled[0].tolist() == pytest.approx([1 / (1 + math.e**1.4), 1 / (1 + math.e**-1.4), 0.0])
    assert sampled.sum(axis=1) == pytest.approx([1.0, 1.0])


def test_estimates_cover_the_true_click_through_of_other_temperatures_on_simulated_logs():
    """Logs of the top item drawn at one temperature, clicks drawn with the generator's true probabilities; the
    other temperatures' true click-through is exact (the expectation over the same candidates)."""
    config = GeneratorConfig(rows=20_000, seed=4)
    entities = make_entities(config)
    rng = np.random.default_rng(4)
    impressions, candidates = 20_000, 20
    users = rng.integers(0, config.n_users, impressions)
    items = rng.integers(0, config.n_items, (impressions, candidates))
    logits = click_logit(entities, config, np.repeat(users, candidates), items.ravel(),
                         np.ones(impressions * candidates, dtype=np.int64))  # fmt: skip
    truth = (1 / (1 + np.exp(-logits))).reshape(impressions, candidates)
    scores = truth * rng.lognormal(0.0, 0.5, truth.shape)
    logging = softmax_propensities(scores, 0.05)
    shown = (logging.cumsum(axis=1) > rng.random((impressions, 1))).argmax(axis=1)
    rows = np.arange(impressions)
    clicks = (rng.random(impressions) < truth[rows, shown]).astype(float)
    for temperature in (0.0, 0.02, 0.1):
        target = softmax_propensities(scores, temperature)
        expected = float(np.mean(np.sum(target * truth, axis=1)))
        for estimator in (ips, snips):
            estimate = estimator(clicks, logging[rows, shown], target[rows, shown])
            assert estimate.covers(expected), (temperature, estimator.__name__, expected, estimate)
            assert estimate.high - estimate.low < 0.03  # informative, not merely wide
    # And the estimate tells the temperatures apart: the ranked order's click-through is the highest.
    assert ips(clicks, logging[rows, shown], softmax_propensities(scores, 0.0)[rows, shown]).value > \
        ips(clicks, logging[rows, shown], softmax_propensities(scores, 0.1)[rows, shown]).value  # fmt: skip

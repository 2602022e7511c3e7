"""The ordering score of retrieved candidates: the ranker's P(click | shown) blended with what retrieval knows.

Every candidate comes with the ranker's probability, its two-tower inner product, its item-to-item score and the
sources that retrieved it (`models.online_pipeline.multi_source_candidates`). The order is

    score = P(click | shown) * exp(w . terms)

with every term at most 0, so the score stays on the ranker's probability scale (the promotion threshold and
the softmax temperature of `order` still apply to it):

- the inner product's gap to the user's best candidate (the softmax P(item | user) of the two-tower, up to the
  user's normalizer: `retrieval_weight`);
- the item-to-item score as a share of the user's best, minus 1 (`item_to_item_weight`);
- one indicator per source (two-tower, item-to-item, most clicked), shifted so that it is at most 0
  (`source_weights`; may be negative: a source whose items are clicked less than their scores say).

Batch scoring chooses the weights on validation users (`tasks/batch_score.py`): a grid over the first two, or
`fit_blend_weights`, which learns all five from what retrieval returned to those users: each user's candidates
are a softmax over the scores above, the user's validation positives among them the targets, every retrieved
candidate they did not interact with a negative (a listwise loss, as ListNet and sampled-softmax retrieval
use; convex in the weights, with the ranker's log-probability as a fixed offset).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Weight of the retrieval's log P(item | user) next to the ranker's log P(click | shown) in the final order.
# Chosen by benchmarks/retrieval_weight.py on the validation users of generator seed 6 (1M rows), not seed 5 that
# the README reports: the smallest weight whose NDCG@10 is within one standard error of the best (1.5: 0.1000; best
# 0.1008 at 4-6; the ranker alone 0.017, retrieval's order 0.100).
DEFAULT_RETRIEVAL_WEIGHT = 1.5
# Weight of the item-to-item source's score (a share of the user's best) in the final order. 0 leaves the order as
# it was before the source; batch scoring chooses the weights on the run's validation split unless told.
DEFAULT_ITEM_TO_ITEM_WEIGHT = 0.0
# The sources of `multi_source_candidates`, one bit each in its `sources` output, in this order.
SOURCES = ("two_tower", "item_to_item", "popular")
NO_SOURCE_WEIGHTS = (0.0, 0.0, 0.0)
TERMS = 2 + len(SOURCES)  # the inner product's gap, the item-to-item share, one indicator per source
# How batch scoring chooses the weights on validation (`tasks.batch_score.choose_blend_weights`).
BLEND_METHODS = ("choose", "grid", "learned")
SMALLEST_PROBABILITY = 1e-12  # a ranker probability of 0 would make its log -inf


def source_indicators(sources: np.ndarray) -> np.ndarray:
    """[..., len(SOURCES)] 0/1: which sources retrieved each candidate (`sources` holds one bit per source)."""
    bits = np.asarray(sources, dtype=np.int64)[..., None] >> np.arange(len(SOURCES))
    return (bits & 1).astype(np.float64)


def blend_terms(candidates: np.ndarray, retrieval_scores: np.ndarray, item_to_item_scores: np.ndarray | None,
                sources: np.ndarray | None) -> np.ndarray:  # fmt: skip
    """[users, candidates, TERMS]: each candidate's inner product gap to the user's best, item-to-item share of the
    user's best minus 1 (0 for a user whose best is not positive: no history), and source indicators (raw 0/1; the
    shift that keeps their term at most 0 is `blend_scores`'s). 0 at MISSING candidates."""
    valid = np.asarray(candidates) >= 0
    terms = np.zeros((*valid.shape, TERMS))
    terms[..., 0] = _gap_to_best(valid, np.asarray(retrieval_scores, dtype=np.float64))
    if item_to_item_scores is not None:
        scores = np.where(valid, np.nan_to_num(np.asarray(item_to_item_scores, dtype=np.float64)), 0.0)
        best = np.max(np.where(valid, scores, -np.inf), axis=1, keepdims=True)
        terms[..., 1] = np.where(valid & (best > 0), scores / np.where(best > 0, best, 1.0) - 1.0, 0.0)
    if sources is not None:
        terms[..., 2:] = np.where(valid[..., None], source_indicators(sources), 0.0)
    return terms


def blend_scores(candidates: np.ndarray, ranker_scores: np.ndarray, retrieval_scores: np.ndarray,
                 weight: float, item_to_item_scores: np.ndarray | None = None,
                 item_to_item_weight: float = 0.0, *, sources: np.ndarray | None = None,
                 source_weights: Sequence[float] = NO_SOURCE_WEIGHTS) -> np.ndarray:  # fmt: skip
    """The ordering score of each candidate: P(click | shown) * P(item | user)^weight * ..., scaled per user.

    P(click | shown) is the ranker's probability; P(item | user) the softmax of the two-tower inner
    products (`retrieval_scores`, aligned with `candidates`) over the user's remaining candidates. In
    logs: log P(click | shown) + weight * log P(item | user). The softmax's normalizer is the same for
    all of a user's candidates, so it is replaced by the user's best inner product: the result is
    ranker_score * exp(weight * (inner product - best inner product)), which orders each user's
    candidates exactly as the product does, and stays a probability-scale number (the user's most
    likely candidate keeps its ranker score, the others are discounted), so the promotion threshold and
    the softmax temperature of `order` (and of the gateway, which reorders published scores with
    `order`) still apply to it. weight 0: the ranker's scores alone. NaN where the candidate is MISSING.

    The item-to-item source's scores (`models/item_to_item.py`, EASE sums over the user's history) join the
    same way, as a share of the user's best: times exp(item_to_item_weight * (score / best - 1)). A user whose
    best is not positive (no history) keeps the other terms alone. Each source's indicator (`sources`, bits in
    `SOURCES` order) joins with its weight w as exp(w * indicator - max(w, 0)), at most 1 either way.
    """
    if weight < 0 or item_to_item_weight < 0:
        raise ValueError(f"blend weights must not be negative, got {weight} and {item_to_item_weight}")
    if len(source_weights) != len(SOURCES):
        raise ValueError(f"source_weights needs one weight per source ({', '.join(SOURCES)}), got {source_weights}")
    valid = np.asarray(candidates) >= 0
    weights = np.array([weight, item_to_item_weight, *source_weights], dtype=np.float64)
    logit = blend_terms(candidates, retrieval_scores, item_to_item_scores, sources) @ weights  # absent terms: 0
    if sources is not None:
        logit -= float(np.maximum(weights[2:], 0.0).sum())  # each source's term at most 0
    ranker = np.asarray(ranker_scores, dtype=np.float64)
    return np.where(valid, ranker * np.exp(np.where(valid, logit, 0.0)), np.nan)


def fit_blend_weights(candidates: np.ndarray, ranker_scores: np.ndarray, retrieval_scores: np.ndarray,
                      item_to_item_scores: np.ndarray, sources: np.ndarray, relevant: Sequence[np.ndarray], *,
                      regularization: float = 1e-3) -> dict[str, float | list[float]]:  # fmt: skip
    """The blend weights that best explain which retrieved candidates each user went on to interact with.

    For each user with a relevant item among their candidates, the candidates' blend scores (log P(click |
    shown) + w . terms) make a softmax, and the loss is the mean negative log-probability of the relevant ones
    (every other retrieved candidate is a negative), plus `regularization` * |w|^2. The retrieval and
    item-to-item weights are kept at 0 or more (as `blend_scores` requires). Returns the weights as
    `blend_scores` takes them, and the users and positives the fit saw.
    """
    from scipy.optimize import minimize

    from recsys.ranking_metrics import hit_matrix

    candidates = np.asarray(candidates, dtype=np.int64)
    positive = hit_matrix(candidates, relevant)
    rows = positive.any(axis=1)
    candidates, positive = candidates[rows], positive[rows]
    terms = blend_terms(candidates, np.asarray(retrieval_scores)[rows], np.asarray(item_to_item_scores)[rows],
                        np.asarray(sources)[rows])  # fmt: skip
    valid = candidates >= 0
    offset = np.where(valid, np.log(np.clip(np.nan_to_num(np.asarray(ranker_scores, dtype=np.float64)[rows]),
                                            SMALLEST_PROBABILITY, 1.0)), -np.inf)  # fmt: skip
    per_user = positive.sum(axis=1).astype(np.float64)
    total = max(per_user.sum(), 1.0)
    positive_terms = terms[positive].sum(axis=0)

    def loss_and_gradient(weights: np.ndarray) -> tuple[float, np.ndarray]:
        logits = offset + terms @ weights
        best = logits.max(axis=1, keepdims=True)
        exponentials = np.exp(logits - best)
        normalizer = exponentials.sum(axis=1, keepdims=True)
        log_normalizer = (best + np.log(normalizer))[:, 0]
        softmax = exponentials / normalizer
        loss = (per_user @ log_normalizer - logits[positive].sum()) / total + regularization * weights @ weights
        expected = np.einsum("u,uc,uct->t", per_user, softmax, terms)
        return float(loss), (expected - positive_terms) / total + 2 * regularization * weights

    bounds = [(0.0, None), (0.0, None)] + [(None, None)] * len(SOURCES)
    found = minimize(loss_and_gradient, np.zeros(TERMS), jac=True, method="L-BFGS-B", bounds=bounds)
    weights = [float(value) for value in found.x]
    return {"retrieval_weight": weights[0], "item_to_item_weight": weights[1], "source_weights": weights[2:],
            "fit_users": int(rows.sum()), "fit_positives": int(per_user.sum()), "fit_loss": float(found.fun)}


def _gap_to_best(valid: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Each candidate's score minus its row's best: at most 0 for candidates, 0 elsewhere (a filtered item may
    have scored higher)."""
    best = np.max(np.where(valid, scores, -np.inf), axis=1, keepdims=True)
    return np.where(valid, scores - np.where(np.isfinite(best), best, 0.0), 0.0)

"""The final order's blend (models/blend.py): the source terms, and weights learned from retrieved candidates."""

from __future__ import annotations

import numpy as np
import pytest

from models.blend import SOURCES, blend_scores, blend_terms, fit_blend_weights, source_indicators
from models.online_pipeline import MISSING, order
from recsys.ranking_metrics import list_metrics


def planted(users: int = 400, width: int = 40, seed: int = 0) -> dict:
    """Candidates whose ranker scores and inner products say nothing, while the users' positives are the candidates
    the item-to-item source found, the higher its score the likelier; the popular source's never are."""
    rng = np.random.default_rng(seed)
    candidates = np.arange(users * width).reshape(users, width) % 997
    candidates[:, -3:] = MISSING
    sources = rng.integers(1, 8, size=(users, width)).astype(np.int32)
    from_item_to_item = (sources & 2) > 0
    item_to_item = np.where(from_item_to_item, rng.uniform(0.2, 1.0, size=(users, width)), 0.0)
    liking = np.where(from_item_to_item & ((sources & 4) == 0), item_to_item, 0.0) + rng.gumbel(size=(users, width)) / 8
    liking[:, -3:] = -np.inf
    relevant = [row[np.argsort(-score)[:2]] for row, score in zip(candidates, liking, strict=True)]
    relevant[0] = np.array([10**6])  # a user whose positive retrieval missed: nothing to learn from
    return {"candidates": candidates, "ranker_scores": rng.uniform(0.05, 0.5, size=(users, width)),
            "retrieval_scores": rng.normal(size=(users, width)), "item_to_item_scores": item_to_item,
            "sources": np.where(candidates >= 0, sources, 0), "relevant": relevant}  # fmt: skip


def ndcg(data: dict, weights: dict) -> float:
    scores = blend_scores(data["candidates"], data["ranker_scores"], data["retrieval_scores"],
                          weights["retrieval_weight"], data["item_to_item_scores"], weights["item_to_item_weight"],
                          sources=data["sources"], source_weights=weights["source_weights"])  # fmt: skip
    top, *_ = order(data["candidates"], scores, 10)
    return list_metrics(top[1:], data["relevant"][1:], 10)["ndcg_at_10"]


def test_learned_weights_find_the_sources_and_scores_that_explain_the_positives():
    data = planted()
    fitted = fit_blend_weights(data["candidates"], data["ranker_scores"], data["retrieval_scores"],
                               data["item_to_item_scores"], data["sources"], data["relevant"])  # fmt: skip

    assert fitted["fit_users"] == 399  # the user whose positive was not retrieved taught nothing
    assert fitted["fit_positives"] == 2 * 399
    # The item-to-item score (only the source's candidates have one) and the popular source's penalty carry it.
    two_tower, _, popular = fitted["source_weights"]
    assert fitted["item_to_item_weight"] > 2.0 and popular < -2.0
    assert abs(two_tower) < 0.5 and 0.0 <= fitted["retrieval_weight"] < 0.5  # noise; at 0 or more as required
    ranker_alone = {"retrieval_weight": 0.0, "item_to_item_weight": 0.0, "source_weights": (0.0, 0.0, 0.0)}
    assert ndcg(data, fitted) > ndcg(data, ranker_alone) + 0.2


def test_source_terms_keep_the_blend_on_the_rankers_probability_scale():
    data = planted(users=20)
    weights = (2.0, -3.0, 0.5)

    blended = blend_scores(data["candidates"], data["ranker_scores"], data["retrieval_scores"], 0.0,
                           sources=data["sources"], source_weights=weights)  # fmt: skip

    valid = data["candidates"] >= 0
    indicators = source_indicators(data["sources"])
    expected = data["ranker_scores"] * np.exp(indicators @ np.array(weights) - 2.5)  # minus the positive weights
    np.testing.assert_allclose(blended[valid], expected[valid], rtol=1e-9)
    assert (blended[valid] <= data["ranker_scores"][valid]).all() and np.isnan(blended[~valid]).all()
    terms = blend_terms(data["candidates"], data["retrieval_scores"], None, data["sources"])
    assert terms.shape == (20, 40, 2 + len(SOURCES)) and (terms[~valid] == 0).all()
    with pytest.raises(ValueError, match="one weight per source"):
        blend_scores(data["candidates"], data["ranker_scores"], data["retrieval_scores"], 0.0,
                     sources=data["sources"], source_weights=(1.0,))  # fmt: skip

"""The item-to-item source and the union of retrieval's sources, on hand-made arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.blend import blend_scores
from models.item_to_item import ItemToItem, ItemToItemConfig
from models.online_pipeline import MISSING, ItemEmbeddings, merge_candidates, multi_source_candidates

# Positive (user, item) pairs over items 1-6 (code 0 is unused, as Categorify's null code): items 1, 2, 3 go
# together, and so do 4 and 5; item 6 is clicked by one user only.
PAIRS = [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (2, 2), (2, 3), (3, 1), (3, 3), (4, 4), (4, 5), (5, 4), (5, 5),
         (6, 4), (6, 5), (6, 6), (7, 1), (7, 2), (7, 3)]  # fmt: skip
USERS = np.array([user for user, _ in PAIRS])
ITEMS = np.array([item for _, item in PAIRS])


def dense_ease(regularization: float, items: tuple[int, ...] = tuple(range(7))) -> np.ndarray:
    """EASE's closed form over the given items (the others' clicks left out), as a 7 x 7 matrix."""
    clicks = np.zeros((USERS.max() + 1, 7))
    clicks[USERS, ITEMS] = 1.0
    clicks[:, [item for item in range(7) if item not in items]] = 0.0
    gram = clicks.T @ clicks + regularization * np.eye(7)
    inverse = np.linalg.inv(gram)
    weights = -inverse / np.diag(inverse)
    np.fill_diagonal(weights, 0.0)
    return weights


def test_ease_neighbours_hold_the_closed_forms_weights_and_never_the_item_itself(tmp_path: Path):
    config = ItemToItemConfig(regularization=2.0, neighbours=10, popular_candidates=2)
    source = ItemToItem.fit(USERS, ITEMS, 7, config)
    expected = dense_ease(2.0)
    expected[0] = expected[:, 0] = 0.0  # code 0 has no click: it takes no part
    np.testing.assert_allclose(source.matrix.toarray(), expected, rtol=1e-5, atol=1e-6)
    assert (source.matrix.diagonal() == 0).all()
    assert source.popular.tolist() == [1, 2]  # items 1, 2 and 3 have 4 clicks each: ties by code
    source.save(tmp_path)
    loaded = ItemToItem.load(tmp_path)
    np.testing.assert_array_equal(loaded.matrix.toarray(), source.matrix.toarray())
    assert loaded.config == config and loaded.popular.tolist() == [1, 2]


def test_only_the_most_clicked_items_and_their_strongest_neighbours_are_kept():
    source = ItemToItem.fit(USERS, ITEMS, 7, ItemToItemConfig(regularization=2.0, neighbours=1, max_items=5))
    rows = source.matrix.toarray()
    assert not rows[6].any() and not rows[:, 6].any()  # item 6 (one click) is not among the 5 most clicked
    assert ((rows != 0).sum(axis=1) <= 1).all()
    full = dense_ease(2.0, items=(1, 2, 3, 4, 5))  # EASE over the kept items only
    for item in range(1, 6):  # the one kept is the largest in size
        (kept,) = np.flatnonzero(rows[item])
        assert abs(rows[item, kept]) == pytest.approx(max(abs(full[item, other]) for other in range(1, 6)
                                                          if other != item), rel=1e-4)  # fmt: skip


def test_a_users_history_scores_the_items_that_go_with_it():
    source = ItemToItem.fit(USERS, ITEMS, 7, ItemToItemConfig(regularization=2.0, history=1))
    scores = source.user_scores([np.array([4, 1]), np.array([], dtype=np.int64), np.array([99, 5])])
    found, values = source.top(scores, 2)
    # history=1 keeps the most recent positive only: item 1 -> items 2 and 3; item 5 -> item 4 (99 is unknown).
    assert set(found[0]) == {2, 3}
    assert found[1].tolist() == [MISSING, MISSING] and np.isnan(values[1]).all()
    assert found[2][0] == 4
    assert (np.diff(values[0]) <= 0).all()
    at = ItemToItem.at(scores, np.array([[2, 4, MISSING], [2, 3, 4], [4, 1, 5]]))
    assert at[0, 0] == pytest.approx(values[0][found[0].tolist().index(2)])
    assert at[0, 1] <= 0 and np.isnan(at[0, 2])
    assert (at[1] == 0).all()  # no history: no score


def test_the_union_keeps_every_source_merges_duplicates_and_pads():
    two_tower = np.array([[5, 3, MISSING], [1, 2, 3]])
    item_to_item = np.array([[3, 7], [MISSING, MISSING]])
    popular = np.array([[9, 5], [9, 5]])

    merged = merge_candidates(two_tower, item_to_item, popular)

    assert merged.shape == (2, 7)  # the sum of the sources' widths
    assert merged[0].tolist() == [5, 3, 7, 9, MISSING, MISSING, MISSING]  # the first occurrence wins
    assert merged[1].tolist() == [1, 2, 3, 9, 5, MISSING, MISSING]


def test_multi_source_candidates_scores_every_candidate_of_every_source():
    source = ItemToItem.fit(USERS, ITEMS, 7, ItemToItemConfig(regularization=2.0, candidates=2, popular_candidates=1))
    vectors = np.eye(7, 3, dtype=np.float32)  # item i's embedding: unit vector i (0 for items 3-6)
    embeddings = ItemEmbeddings(vectors, np.array([False, True, True, True, True, True, False]))
    queries = np.array([[0.0, 2.0, 1.0], [1.0, 0.0, 0.0]], dtype=np.float32)
    two_tower = np.array([[1], [2]])  # one Faiss candidate each

    candidates, inner, item_to_item, sources = multi_source_candidates(two_tower, queries, embeddings, source,
                                                                       [np.array([4]), np.array([1])])  # fmt: skip

    assert candidates[0, 0] == 1 and candidates[1, 0] == 2  # the two-tower's first
    assert 5 in candidates[0] and {3} <= set(candidates[1])  # item-to-item: 4 -> 5, 1 -> 2 and 3
    assert 1 in candidates[0]  # the most clicked item (code 1), already there: merged
    valid = candidates >= 0
    np.testing.assert_array_equal(np.isnan(inner), ~valid)
    assert inner[0, 0] == pytest.approx(2.0)  # query 0 . embedding of item 1
    assert inner[1, 0] == pytest.approx(0.0)
    expected = ItemToItem.at(source.user_scores([np.array([4]), np.array([1])]), candidates)
    np.testing.assert_array_equal(item_to_item, expected)
    # Each candidate's sources (bits: 1 two-tower, 2 item-to-item, 4 most clicked): item 1 came from the two-tower
    # and is the most clicked; item 5 from user 0's history alone; nothing at the padding.
    row_0 = dict(zip(candidates[0].tolist(), sources[0].tolist(), strict=True))
    assert row_0[1] == 1 | 4 and row_0[5] == 2
    assert (sources[1][candidates[1] == 2] & 1).all() and not (sources[1][candidates[1] == 3] & 1).any()
    assert ((sources > 0) == valid).all()
    # Without the source (a run from before it): the Faiss candidates alone.
    alone, _, zeros, alone_sources = multi_source_candidates(two_tower, queries, embeddings, None, None)
    np.testing.assert_array_equal(alone, two_tower)
    assert (zeros == 0).all() and (alone_sources == 1).all()


def test_the_item_to_item_weight_lifts_what_the_users_history_points_to():
    candidates = np.array([[10, 11, 12, MISSING]])
    ranker = np.array([[0.5, 0.4, 0.3, np.nan]])
    inner = np.array([[1.0, 1.0, 1.0, np.nan]])
    item_to_item = np.array([[0.0, 1.0, 4.0, np.nan]])

    alone = blend_scores(candidates, ranker, inner, 1.0, item_to_item, 0.0)
    lifted = blend_scores(candidates, ranker, inner, 1.0, item_to_item, 2.0)

    np.testing.assert_allclose(alone[0, :3], [0.5, 0.4, 0.3])
    # share of the best: 0, 1/4, 1 -> factors e^-2, e^-1.5, e^0
    np.testing.assert_allclose(lifted[0, :3], [0.5 * np.exp(-2.0), 0.4 * np.exp(-1.5), 0.3], rtol=1e-6)
    assert np.isnan(lifted[0, 3])
    # A user without a positive best (no history) keeps the other terms alone.
    np.testing.assert_allclose(blend_scores(candidates, ranker, inner, 1.0, np.zeros((1, 4)), 2.0)[0, :3],
                               [0.5, 0.4, 0.3])  # fmt: skip
    with pytest.raises(ValueError, match="must not be negative"):
        blend_scores(candidates, ranker, inner, 1.0, item_to_item, -1.0)


def test_newer_history_items_weigh_more_and_a_repeat_counts_at_its_newest():
    source = ItemToItem.fit(USERS, ITEMS, 7, ItemToItemConfig(regularization=2.0, recency=0.5))
    weights = source.matrix.toarray()

    scores = source.user_scores([np.array([1, 4, 1, 5])]).toarray()[0]  # oldest first: 1 is newer than 4

    # ages from the newest: 5 -> 0, 1 -> 1 (its newer occurrence), 4 -> 2
    expected = 1.0 * weights[5] + 0.5 * weights[1] + 0.25 * weights[4]
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-7)
    flat = source.user_scores([np.array([1, 4, 1, 5])], recency=1.0).toarray()[0]
    np.testing.assert_allclose(flat, weights[5] + weights[1] + weights[4], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="recency must be in"):
        ItemToItemConfig(recency=0.0)


def test_the_nightly_index_step_chooses_lambda_and_recency_on_validation(trained_run: Path):
    """build_faiss_index as the DAG runs it (with the NVTabular output): the source is there, its lambda and
    recency the best of the grid it measured on validation users."""
    import json

    from models.item_to_item import RECENCIES, REGULARIZATIONS
    from models.online_pipeline import USER_HISTORY_FILE, ItemsByUser

    metrics = json.loads((trained_run / "faiss_index" / "_metrics.json").read_text())
    grid = metrics["item_to_item_validation_ndcg_at_10"]
    assert len(grid) == len(REGULARIZATIONS) * len(RECENCIES)
    best = max(grid, key=lambda key: grid[key])
    source = ItemToItem.load(trained_run / "faiss_index")
    assert best == f"{source.config.regularization:g}/{source.config.recency:g}"
    assert metrics["item_to_item_weights"] == source.matrix.nnz > 0
    histories = ItemsByUser.load(trained_run / "faiss_index" / USER_HISTORY_FILE)
    assert len(histories.user_ids) == metrics["users_with_history"] > 0

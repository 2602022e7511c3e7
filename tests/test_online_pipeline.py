"""The pipeline's pure stages (filtering, ordering) and the Faiss index step, on hand-made arrays."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from models.blend import blend_scores
from models.online_pipeline import (
    MISSING,
    FreshItems,
    ItemCatalog,
    PipelineColumns,
    UserFeatureTable,
    add_fresh_candidates,
    filter_candidates,
    nearest_other_items,
    order,
    padded_rows,
    ranked_order,
)
from models.retrieval_index import load_index, read_item_embeddings
from recsys.recommendation_store import decode_fresh_items, encode_fresh_item
from tasks.build_faiss_index import FaissIndexConfig, build_faiss_index, build_index

CANDIDATES = np.array([[10, 11, 12, 13], [20, 21, MISSING, MISSING]])
SCORES = np.array([[0.2, 0.9, 0.5, 0.7], [0.1, 0.3, np.nan, np.nan]], dtype=np.float32)


def test_filter_removes_bought_and_unavailable_items_and_keeps_faiss_padding():
    unavailable = np.zeros(30, dtype=bool)
    unavailable[12] = True
    kept = filter_candidates(CANDIDATES, excluded=[np.array([11]), np.array([], dtype=np.int64)],
                             unavailable=unavailable)  # fmt: skip
    assert kept.tolist() == [[10, MISSING, MISSING, 13], [20, 21, MISSING, MISSING]]
    assert CANDIDATES[0, 1] == 11  # the input is not changed


def test_zero_temperature_is_the_ranked_order_and_short_rows_are_padded():
    items, scores, probabilities, clicks = order(CANDIDATES, SCORES, 3)
    assert items.tolist() == [[11, 13, 12], [21, 20, MISSING]]
    assert np.array_equal(clicks, scores, equal_nan=True)  # no P(click) given: the scores are the ranker's
    assert scores[0].tolist() == pytest.approx([0.9, 0.7, 0.5])
    assert np.isnan(scores[1, 2])
    assert probabilities[:, 0].tolist() == [1.0, 1.0]


def test_softmax_sampling_is_reproducible_with_a_seed_and_follows_score_over_temperature():
    def sample(seed: int, temperature: float) -> list:
        return order(CANDIDATES, SCORES, 4, temperature=temperature, rng=np.random.default_rng(seed))[0].tolist()

    assert sample(1, 0.5) == sample(1, 0.5)
    assert len({str(sample(seed, 5.0)) for seed in range(30)}) > 3  # high temperature: diverse orders
    assert all(sample(seed, 1e-4) == [[11, 13, 12, 10], [21, 20, MISSING, MISSING]] for seed in range(10))
    # softmax(score / T): the first item is drawn with the softmax probability (report formula 2.2)
    firsts = [sample(seed, 0.2)[0][0] for seed in range(2000)]
    expected = np.exp(SCORES[0] / 0.2) / np.exp(SCORES[0] / 0.2).sum()
    assert np.mean(np.array(firsts) == 11) == pytest.approx(expected[1], abs=0.04)
    _, _, probabilities, _ = order(CANDIDATES, SCORES, 4, temperature=0.2, rng=np.random.default_rng(0))
    assert sorted(probabilities[0].tolist(), reverse=True) == pytest.approx(sorted(expected, reverse=True), abs=1e-6)


def test_promotion_rule_lifts_promoted_items_above_the_threshold_only():
    promoted = np.zeros(30, dtype=bool)
    promoted[[10, 12]] = True  # 10 scores 0.2 (below the threshold), 12 scores 0.5
    items, scores, _, _ = order(CANDIDATES, SCORES, 4, promoted=promoted, promotion_threshold=0.4)
    assert items[0].tolist() == [12, 11, 13, 10]
    assert scores[0, 0] == 1.0


def test_promotion_compares_the_threshold_with_p_click_not_with_the_order_score():
    """Issue 19's decision: the blend (order score) never exceeds P(click); the rule reads P(click)."""
    clicks = np.array([[0.6, 0.95, 0.3, 0.8], [0.2, 0.4, np.nan, np.nan]], dtype=np.float32)
    promoted = np.zeros(30, dtype=bool)
    promoted[[10, 12]] = True  # 10: order score 0.2 but P(click) 0.6; 12: order score 0.5, P(click) 0.3
    items, scores, _, chosen_clicks = order(CANDIDATES, SCORES, 4, promoted=promoted, promotion_threshold=0.4,
                                            click_probabilities=clicks)  # fmt: skip
    assert items[0].tolist() == [10, 11, 13, 12]
    assert scores[0].tolist() == pytest.approx([1.0, 0.9, 0.7, 0.5])
    assert chosen_clicks[0].tolist() == pytest.approx([0.6, 0.95, 0.8, 0.3])  # each item's own, in the new order
    assert ranked_order(SCORES[0].tolist(), promoted[10:14].tolist(), 4, promotion_threshold=0.4,
                        click_probabilities=clicks[0].tolist()) == ([0, 1, 3, 2], pytest.approx([1.0, 0.9, 0.7, 0.5]))
    # A list without P(click) (similar products: NaN) is never promoted.
    nan = [float("nan")] * 4
    assert ranked_order(SCORES[0].tolist(), [True] * 4, 4, promotion_threshold=0.0, click_probabilities=nan)[0] == \
        [1, 3, 2, 0]  # fmt: skip


def test_the_gateways_ranked_order_equals_order_at_temperature_zero():
    rng = np.random.default_rng(3)
    for case in range(300):
        length = int(rng.integers(1, 40))
        # Few distinct values: many ties; scores around the threshold; some promoted.
        scores = rng.choice(np.array([0.1, 0.3, 0.5, 0.5, 0.7, 0.9], dtype=np.float32), length)
        promoted = rng.random(length) < 0.3
        top_n = int(rng.integers(0, length + 2))
        threshold = float(rng.choice([0.0, 0.5, 0.6, 1.0]))
        clicks = np.minimum(scores + rng.choice(np.array([0.0, 0.2, np.nan], dtype=np.float32), length), 1.0)
        positions = np.arange(length, dtype=np.int64)[None, :]
        chosen, chosen_scores, _, _ = order(positions, scores[None, :], min(top_n, length), promoted=promoted,
                                            promotion_threshold=threshold, click_probabilities=clicks[None, :])
        picked, picked_scores = ranked_order(scores.tolist(), promoted.tolist(), top_n, promotion_threshold=threshold,
                                             click_probabilities=clicks.tolist())  # fmt: skip
        assert picked == chosen[0].tolist(), case
        assert picked_scores == chosen_scores[0].tolist(), case
    assert ranked_order([], [], 5) == ([], [])


# One user's candidates: item 13 was filtered out (bought) although retrieval liked it best.
BLEND_CANDIDATES = np.array([[10, 11, 12, MISSING], [MISSING] * 4])
RANKER = np.array([[0.2, 0.1, 0.4, np.nan], [np.nan] * 4], dtype=np.float32)
INNER_PRODUCTS = np.array([[3.0, 2.0, 1.0, 9.0], [1.0, 2.0, 3.0, 4.0]], dtype=np.float32)


@pytest.mark.parametrize(
    ("weight", "expected", "ranked"),
    [
        # weight 0: the ranker alone
        (0.0, [0.2, 0.1, 0.4], [12, 10, 11]),
        # 0.2 * e^0, 0.1 * e^-0.5, 0.4 * e^-1: the best remaining candidate (3.0) is the reference, not item 13
        (0.5, [0.2, 0.0606531, 0.1471518], [10, 12, 11]),
        (1.0, [0.2, 0.0367879, 0.0541341], [10, 12, 11]),
        # a large weight: the retrieval's order
        (4.0, [0.2, 0.00183156, 0.000134185], [10, 11, 12]),
    ],
)
def test_blend_discounts_the_ranker_probability_by_the_retrieval_probability(weight, expected, ranked):
    blended = blend_scores(BLEND_CANDIDATES, RANKER, INNER_PRODUCTS, weight)

    assert blended[0, :3].tolist() == pytest.approx(expected, rel=1e-5)
    assert np.isnan(blended[0, 3]) and np.isnan(blended[1]).all()  # MISSING candidates, an empty row
    items, scores, *_ = order(BLEND_CANDIDATES, blended, 3)
    assert items[0].tolist() == ranked
    assert scores[0].tolist() == pytest.approx(sorted(expected, reverse=True), rel=1e-5)


def test_blend_orders_as_ranker_probability_times_softmax_of_inner_products_to_the_weight():
    rng = np.random.default_rng(0)
    candidates = np.arange(40).reshape(2, 20)
    candidates[0, [3, 7]] = MISSING
    ranker = rng.uniform(0.01, 0.6, size=(2, 20))
    inner = rng.normal(scale=3.0, size=(2, 20))
    weight = 0.7
    blended = blend_scores(candidates, ranker, inner, weight)
    for row in range(2):
        valid = candidates[row] >= 0
        softmax = np.exp(inner[row, valid]) / np.exp(inner[row, valid]).sum()  # P(item | user) over the candidates
        product = ranker[row, valid] * softmax**weight
        ratio = blended[row, valid] / product
        assert ratio == pytest.approx(np.full(valid.sum(), ratio[0]))  # the same up to one factor per user
        assert blended[row, valid].max() <= ranker[row, valid].max()  # still on the probability scale


def test_blend_refuses_a_negative_weight():
    with pytest.raises(ValueError, match="must not be negative"):
        blend_scores(BLEND_CANDIDATES, RANKER, INNER_PRODUCTS, -1.0)


@pytest.fixture
def item_embeddings(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    ids = rng.permutation(5_000)[:2_000] + 3  # encoded ids are not positions
    frame = pd.DataFrame(rng.normal(size=(2_000, 16)).astype(np.float32), columns=[str(i) for i in range(16)])
    frame.insert(0, "item_id", ids)
    two_tower = tmp_path / "two_tower"
    two_tower.mkdir()
    frame.to_parquet(two_tower / "item_embeddings.parquet", index=False)
    return two_tower


def test_small_catalog_gets_an_exact_index_with_encoded_ids(item_embeddings: Path, tmp_path: Path):
    metrics = build_faiss_index(item_embeddings, tmp_path / "index")
    assert metrics["kind"] == "flat" and metrics["items"] == 2_000 and metrics["recall_at_100_vs_exact"] == 1.0
    frame = pd.read_parquet(item_embeddings / "item_embeddings.parquet")
    query = frame.iloc[:3, 1:].to_numpy(dtype=np.float32)
    distances, ids = load_index(tmp_path / "index").search(query, 5)
    products = query @ frame.iloc[:, 1:].to_numpy(dtype=np.float32).T
    expected = np.argsort(-products, axis=1)[:, :5]
    assert ids.tolist() == frame["item_id"].to_numpy()[expected].tolist()  # inner product, kept distances
    assert distances[:, 0] == pytest.approx(products.max(axis=1), rel=1e-5)


def test_large_catalog_gets_ivf_with_its_recall_against_exact_measured(item_embeddings: Path, tmp_path: Path):
    config = FaissIndexConfig(exact_max_items=1_000, nprobe=4)
    metrics = build_faiss_index(item_embeddings, tmp_path / "index", config)
    assert metrics["kind"] == "ivf_flat" and metrics["nprobe"] == 4
    assert 0.1 < metrics["recall_at_100_vs_exact"] < 1.0  # approximate, and the loss is measured
    more = build_index(*_read(item_embeddings), FaissIndexConfig(exact_max_items=1_000, nprobe=1_000))[1]
    assert more["nprobe"] == more["nlist"]  # nprobe is capped at the cell count
    assert json.loads((tmp_path / "index" / "_metrics.json").read_text()) == metrics


def _read(two_tower: Path) -> tuple[np.ndarray, np.ndarray]:
    return read_item_embeddings(two_tower)


KINDS = PipelineColumns(
    user_id="user", item_id="item", user_features=("age", "tags"), item_features=("genre", "price"),
    context_features=(), query_columns=("user", "age", "tags"), ranker_columns=("user", "item", "age", "genre"),
    null_codes={"user": 1, "item": 1, "tags": 1, "genre": 1}, item_cardinality=5,
    continuous=("age", "price"), list_widths={"tags": 2, "genre": 3},
)  # fmt: skip


def test_packed_user_features_come_back_exactly_whatever_their_kind():
    features = {"user": np.array([3, 4]), "age": np.array([-0.125, 1e-7], dtype=np.float32),
                "tags": np.array([[5, 2], [0, 0]])}  # fmt: skip

    packed = KINDS.pack(features, KINDS.user_columns)
    unpacked = KINDS.unpack(packed, KINDS.user_columns)

    assert packed.dtype == np.int64 and packed.shape == (2, 4)  # user, age, two tags
    assert unpacked["age"].dtype == np.float32 and unpacked["tags"].shape == (2, 2)
    for column, values in features.items():
        np.testing.assert_array_equal(unpacked[column], values)
    with pytest.raises(ValueError, match="has 4 columns"):
        KINDS.unpack(packed[:, :3], KINDS.user_columns)


def test_missing_values_are_what_training_saw_for_each_kind():
    assert KINDS.missing("user", 2).tolist() == [1, 1]  # Categorify's null code
    assert KINDS.missing("genre", 2).tolist() == [[0, 0, 0], [0, 0, 0]]  # all padding
    assert KINDS.missing("age", 2).dtype == np.float32 and KINDS.missing("age", 2).tolist() == [0.0, 0.0]
    # Per-row lists (as Parquet gives them) become one [rows, width] array.
    assert KINDS.values("genre", pd.Series([np.array([4, 0, 0]), np.array([2, 3, 0])])).shape == (2, 3)
    assert KINDS.values("genre", []).shape == (0, 3)


def test_the_catalog_and_user_table_hold_lists_and_numbers(tmp_path: Path):
    pd.DataFrame({"item": [10, 11], "item_encoded": [3, 4], "genre": [np.array([2, 0, 0]), np.array([3, 2, 0])],
                  "price": np.array([0.5, -1.0], dtype=np.float32)}).to_parquet(tmp_path / "items.parquet")
    pd.DataFrame({"user": [7, 8], "user_encoded": [2, 3], "age": np.array([0.25, -0.5], dtype=np.float32),
                  "tags": [np.array([1, 0]), np.array([4, 5])]}).to_parquet(tmp_path / "users.parquet")

    catalog = ItemCatalog.read(tmp_path / "items.parquet", KINDS)
    users = UserFeatureTable.read(tmp_path / "users.parquet", KINDS)
    found, known = users.lookup([8, 99, 7])

    assert catalog.columns["genre"].tolist() == [[0, 0, 0]] * 3 + [[2, 0, 0], [3, 2, 0]]  # codes 0-2: no item
    assert catalog.columns["price"].dtype == np.float32 and catalog.columns["price"][4] == -1.0
    assert known.tolist() == [True, False, True]
    assert found["user"].tolist() == [3, 2] and found["tags"].tolist() == [[4, 5], [1, 0]]
    assert found["age"].dtype == np.float32 and found["age"].tolist() == [-0.5, 0.25]


def fresh_items() -> FreshItems:
    """Two products added since the run (codes 5 and 6, after KINDS' five), embeddings along the two axes."""
    features = {"item": np.array([2, 2]), "genre": np.array([[4, 0, 0], [3, 3, 0]]),
                "price": np.array([1.5, -0.25], dtype=np.float32)}  # fmt: skip
    packed = KINDS.pack(features, KINDS.item_columns)
    return FreshItems.from_tensors(KINDS, np.array([900, 901]), packed, np.array([[1.0, 0.0], [0.0, 1.0]]))


def test_fresh_items_are_retrieved_where_faiss_would_have_found_them():
    fresh = fresh_items()
    assert fresh.codes.tolist() == [5, 6] and fresh.features["price"].dtype == np.float32
    # User 0: two-tower candidates 3 and 4 (inner products 2.0, 0.5) and item-to-item's 1; its query (1, 1) reaches
    # 1.0 with both fresh items, above the lowest two-tower score: both added. User 1: query (0, 3) gives 0.0 and
    # 3.0, its lowest two-tower score 1.0: only the second. User 2: Faiss found fewer than top_k: both.
    candidates = np.array([[3, 4, 1], [3, 4, MISSING], [3, MISSING, MISSING]])
    inner = np.array([[2.0, 0.5, 0.1], [4.0, 1.0, np.nan], [1.0, np.nan, np.nan]], dtype=np.float32)
    item_to_item = np.where(candidates >= 0, 0.3, np.nan).astype(np.float32)
    sources = np.array([[1, 1, 2], [1, 1, 0], [1, 0, 0]], dtype=np.int32)
    queries = np.array([[1.0, 1.0], [0.0, 3.0], [-1.0, -1.0]], dtype=np.float32)

    added, scores, neighbours, bits = add_fresh_candidates(candidates, inner, item_to_item, sources, queries, fresh,
                                                           top_k=2)  # fmt: skip
    assert added[:, 3:].tolist() == [[5, 6], [MISSING, 6], [5, 6]]
    assert added[:, :3].tolist() == candidates.tolist()
    assert scores[0, 3:].tolist() == [1.0, 1.0] and scores[1, 4] == 3.0 and np.isnan(scores[1, 3])
    assert neighbours[0, 3:].tolist() == [0.0, 0.0] and bits[:, 3:].tolist() == [[1, 1], [0, 1], [1, 1]]
    assert add_fresh_candidates(candidates, inner, item_to_item, sources, queries, None, top_k=2)[0] is candidates


def test_fresh_items_are_named_by_their_raw_ids_and_keep_their_columns(tmp_path: Path):
    pd.DataFrame({"item": [10, 11], "item_encoded": [3, 4], "genre": [np.array([2, 0, 0]), np.array([3, 2, 0])],
                  "price": np.array([0.5, -1.0], dtype=np.float32)}).to_parquet(tmp_path / "items.parquet")
    catalog = ItemCatalog.read(tmp_path / "items.parquet", KINDS)
    fresh = fresh_items()
    assert fresh.raw(catalog, np.array([[4, 6, MISSING, 5]])).tolist() == [[11, 901, MISSING, 900]]
    with pytest.raises(ValueError, match="one id, one packed feature row and one embedding each"):
        FreshItems.from_tensors(KINDS, np.array([900]), KINDS.pack(fresh.features, KINDS.item_columns),
                                fresh.embeddings)  # fmt: skip


def test_a_fresh_items_similar_products_are_searched_with_its_own_code_and_embedding():
    """Raw ids 11 (indexed, code 4), 901 (added since the run) and 77 (unknown): only 901's row changes, to its
    fresh code and embedding, and a fresh item's neighbours are all kept (its code is no indexed item's)."""
    fresh = fresh_items()
    codes, queries, known = np.array([4, MISSING, MISSING]), np.zeros((3, 2), dtype=np.float32), np.array([1, 0, 0]) > 0
    queries[0] = [0.5, 0.5]
    codes, queries, known = fresh.item_queries(np.array([11, 901, 77]), codes, queries, known)
    assert codes.tolist() == [4, 6, MISSING] and known.tolist() == [True, True, False]
    assert queries.tolist() == [[0.5, 0.5], [0.0, 1.0], [0.0, 0.0]]
    ids, _ = nearest_other_items(codes, np.array([[4, 3, 0], [4, 3, 0], [4, 3, 0]]), np.ones((3, 3)), 2)
    assert ids.tolist() == [[3, 0], [4, 3], [MISSING, MISSING]]


def test_the_fresh_items_hash_round_trips_their_columns_and_embeddings():
    fresh = fresh_items()
    packed = KINDS.pack(fresh.features, KINDS.item_columns)
    stored = {b"901": encode_fresh_item(packed[1], fresh.embeddings[1]),
              b"900": encode_fresh_item(packed[0], fresh.embeddings[0])}  # fmt: skip
    ids, features, embeddings = decode_fresh_items(stored)
    assert ids.tolist() == [900, 901]  # in id order, whatever the hash's
    np.testing.assert_array_equal(features, packed)
    np.testing.assert_array_equal(embeddings, fresh.embeddings)
    assert decode_fresh_items({})[0].shape == (0,)


def test_ranker_calls_are_padded_to_few_sizes_and_at_most_an_eighth_more_rows():
    """Every new input shape costs the ranker a compilation (54 ms against 2.7 ms): calls are padded to a few sizes."""
    sizes = {padded_rows(rows) for rows in range(1, 4097)}
    assert min(sizes) == 64 and len(sizes) == 1 + 8 * 6  # 64, then eight sizes in each doubling up to 4096
    for rows in range(65, 300_000, 37):
        assert rows <= padded_rows(rows) <= rows * 9 / 8
    assert padded_rows(100) == 104 and padded_rows(1_100) == 1_152 and padded_rows(16_383) == 16_384
    assert padded_rows(16_385) == 16_385 and padded_rows(262_143) == 262_143  # batch scoring's large calls: as they are

"""Unit tests of the pipeline pieces the Triton stages add, and of a stage model's request handling without a
server (`tests/test_triton_ensemble.py` runs them all in a real `tritonserver`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from models.online_pipeline import (
    ITEM_FEATURES_FILE,
    MISSING,
    ItemsByUser,
    PipelineColumns,
    filter_candidates,
    nearest_other_items,
)
from serving.triton_models.ordering.model import TritonPythonModel as OrderingModel
from serving.triton_models.stage import RequestError

COLUMNS = PipelineColumns(
    user_id="user", item_id="item", user_features=("age",), item_features=("shop",), context_features=("device",),
    query_columns=("user", "age"), ranker_columns=("user", "item", "age", "shop", "device"),
    null_codes={"user": 1, "item": 1, "age": 1, "shop": 1, "device": 1}, item_cardinality=6,
)  # fmt: skip


def test_nearest_other_items_skips_the_item_itself_padding_and_unavailable():
    codes = np.array([2, 3, MISSING])
    found = np.array([[2, 4, 5, 1], [5, 3, -1, -1], [1, 2, 3, 4]])
    distances = np.array([[1.0, 0.9, 0.8, 0.7], [0.6, 0.5, 0.0, 0.0], [0.4, 0.3, 0.2, 0.1]], dtype=np.float32)
    unavailable = np.zeros(6, dtype=bool)
    unavailable[5] = True

    ids, similarity = nearest_other_items(codes, found, distances, 3, unavailable=unavailable)

    np.testing.assert_array_equal(ids, [[4, 1, MISSING], [MISSING] * 3, [MISSING] * 3])
    np.testing.assert_allclose(similarity[0, :2], [0.9, 0.7])
    assert np.isnan(similarity[0, 2]) and np.isnan(similarity[1:]).all()


def test_filter_candidates_empties_rows_of_unknown_users():
    candidates = np.array([[1, 2, 3], [1, 2, 3]])

    kept = filter_candidates(candidates, excluded=[np.array([2]), np.array([], dtype=np.int64)],
                             known=np.array([True, False]))  # fmt: skip

    np.testing.assert_array_equal(kept, [[1, MISSING, 3], [MISSING] * 3])


def test_seen_items_round_trip(tmp_path: Path):
    seen_items = ItemsByUser.from_mapping({30: np.array([4, 5]), 10: np.array([1])})
    seen_items.save(tmp_path / "seen_items.npz")

    loaded = ItemsByUser.load(tmp_path / "seen_items.npz")

    assert [items.tolist() for items in loaded.of_users([10, 20, 30, 99])] == [[1], [], [4, 5], []]
    assert [items.tolist() for items in ItemsByUser.from_mapping({}).of_users([10])] == [[]]


def test_pipeline_columns_round_trip(tmp_path: Path):
    COLUMNS.write(tmp_path)

    assert PipelineColumns.read(tmp_path) == COLUMNS


@pytest.fixture
def ordering(tmp_path: Path) -> OrderingModel:
    """The `ordering` stage loaded from a version folder written by hand, as Triton would load it."""
    version = tmp_path / "ordering" / "1"
    version.mkdir(parents=True)
    COLUMNS.write(version)
    items = pd.DataFrame({"item": [100, 101, 102, 103], "item_encoded": [2, 3, 4, 5], "shop": [1, 2, 3, 4]})
    items.to_parquet(version / ITEM_FEATURES_FILE, index=False)
    config = {"parameters": {"top_n": {"string_value": "2"}, "temperature": {"string_value": "0.0"},
                             "retrieval_weight": {"string_value": "1.0"},
                             "item_to_item_weight": {"string_value": "2.0"},
                             "source_weights": {"string_value": "[0.0, 0.5, -1.0]"}}}  # fmt: skip
    model = OrderingModel()
    model.initialize({"model_repository": str(tmp_path / "ordering"), "model_version": "1",
                      "model_config": json.dumps(config)})  # fmt: skip
    return model


def test_ordering_stage_applies_defaults_and_returns_raw_ids(ordering: OrderingModel):
    # Equal inner products and no item-to-item score: only the sources' weights move the ranker's scores.
    inputs = {"candidates": np.array([[2, 3, 4, MISSING]]), "ranker_scores": np.array([[0.1, 0.9, 0.5, np.nan]]),
              "retrieval_scores": np.array([[1.0, 1.0, 1.0, 5.0]]),
              "item_to_item_scores": np.array([[0.0, 0.0, 0.0, np.nan]]),
              "sources": np.array([[1, 3, 4, 0]], dtype=np.int32)}  # fmt: skip

    outputs = ordering.run(inputs)

    # Source weights (0, 0.5, -1): the two-tower's alone e^-0.5, with the item-to-item source e^0, popular e^-1.5.
    np.testing.assert_array_equal(outputs["item_ids"], [[101, 102]])
    np.testing.assert_allclose(outputs["scores"], [[0.9, 0.5 * np.exp(-1.5)]], rtol=1e-6)
    np.testing.assert_array_equal(outputs["probabilities"], [[1.0, 0.0]])
    sampled = ordering.run({**inputs, "top_n": np.array([4], np.int32), "temperature": np.array([1.0], np.float32),
                            "seed": np.array([3])})  # fmt: skip
    assert sorted(sampled["item_ids"][0][:3]) == [100, 101, 102] and sampled["item_ids"][0][3] == MISSING


def test_ordering_stage_blends_ranker_scores_with_retrieval_inner_products(ordering: OrderingModel):
    inputs = {"candidates": np.array([[2, 3, 4]]), "ranker_scores": np.array([[0.1, 0.9, 0.5]]),
              "retrieval_scores": np.array([[2.0, 0.0, 1.0]]), "item_to_item_scores": np.zeros((1, 3)),
              "sources": np.full((1, 3), 3, dtype=np.int32)}  # fmt: skip  # the same sources: no effect

    outputs = ordering.run(inputs)

    # weight 1: 0.1 * e^0 = 0.1, 0.9 * e^-2 = 0.1218, 0.5 * e^-1 = 0.1839
    np.testing.assert_array_equal(outputs["item_ids"], [[102, 101]])
    np.testing.assert_allclose(outputs["scores"], [[0.5 * np.exp(-1.0), 0.9 * np.exp(-2.0)]], rtol=1e-6)

    # The item-to-item score as a share of the user's best, weight 2: item 3 (code 2) lifted by e^0 against e^-2.
    outputs = ordering.run({**inputs, "item_to_item_scores": np.array([[4.0, 0.0, 0.0]])})
    np.testing.assert_array_equal(outputs["item_ids"], [[100, 102]])
    np.testing.assert_allclose(outputs["scores"], [[0.1, 0.5 * np.exp(-1.0) * np.exp(-2.0)]], rtol=1e-6)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"top_n": np.array([0], np.int32)}, "top_n must be at least 1"),
        ({"temperature": np.array([-0.5], np.float32)}, "temperature must not be negative"),
        ({"temperature": np.array([np.inf], np.float32)}, "must be finite"),
        ({"top_n": np.array([1, 2], np.int32)}, "must hold one value"),
        ({"retrieval_scores": np.array([[1.0, 2.0, 3.0]])}, "must have the same shape"),
        ({"item_to_item_scores": np.array([[1.0]])}, "must have the same shape"),
        ({"sources": np.array([[1]], dtype=np.int32)}, "must have the same shape"),
    ],
)
def test_ordering_stage_refuses_bad_parameters(ordering: OrderingModel, extra: dict, message: str):
    inputs = {"candidates": np.array([[2, 3]]), "ranker_scores": np.array([[0.1, 0.9]]),
              "retrieval_scores": np.array([[1.0, 2.0]]), "item_to_item_scores": np.array([[1.0, 2.0]]),
              "sources": np.array([[1, 3]], dtype=np.int32), **extra}  # fmt: skip

    with pytest.raises(RequestError, match=message):
        ordering.run(inputs)


def test_ordering_stage_requires_candidates_and_both_scores(ordering: OrderingModel):
    with pytest.raises(RequestError, match="input 'candidates' is required"):
        ordering.run({"ranker_scores": np.array([[0.1]]), "retrieval_scores": np.array([[0.1]])})
    with pytest.raises(RequestError, match="input 'retrieval_scores' is required"):
        ordering.run({"candidates": np.array([[2]]), "ranker_scores": np.array([[0.1]])})
    with pytest.raises(RequestError, match="input 'item_to_item_scores' is required"):
        ordering.run({"candidates": np.array([[2]]), "ranker_scores": np.array([[0.1]]),
                      "retrieval_scores": np.array([[0.1]])})  # fmt: skip


@pytest.fixture
def candidate_sources(tmp_path: Path):
    """The `candidate_sources` stage loaded from a version folder written by hand: embeddings of items 1-5 (unit
    vectors), an item-to-item source where items 1 and 2 go together, user 10's history [1]."""
    from models.item_to_item import ItemToItem, ItemToItemConfig
    from models.online_pipeline import USER_HISTORY_FILE
    from serving.triton_models.candidate_sources.model import TritonPythonModel as CandidateSourcesModel

    version = tmp_path / "candidate_sources" / "1"
    version.mkdir(parents=True)
    COLUMNS.write(version)
    vectors = np.eye(3, dtype=np.float32)[[0, 1, 2, 0, 1]]  # item 3's is the third axis
    pd.DataFrame({"item": [1, 2, 3, 4, 5], **{f"e{i}": vectors[:, i] for i in range(3)}}).to_parquet(
        version / "item_embeddings.parquet", index=False)  # fmt: skip
    users = np.array([0, 0, 1, 1, 2, 3])
    items = np.array([1, 2, 1, 2, 3, 4])
    config = ItemToItemConfig(regularization=1.0, recency=1.0, popular_candidates=1)
    ItemToItem.fit(users, items, 6, config).save(version)
    ItemsByUser.from_mapping({10: np.array([1])}).save(version / USER_HISTORY_FILE)
    model = CandidateSourcesModel()
    model.initialize({"model_repository": str(tmp_path / "candidate_sources"), "model_version": "1",
                      "model_config": json.dumps({"parameters": {}})})  # fmt: skip
    return model


def test_candidate_sources_stage_adds_the_item_to_item_and_popular_items(candidate_sources):
    queries = np.array([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    outputs = candidate_sources.run({"raw_user_ids": np.array([10, 99]), "query_embeddings": queries,
                                     "candidates": np.array([[3], [3]])})  # fmt: skip

    merged = outputs["merged_candidates"]
    assert merged[0].tolist()[:2] == [3, 2] and 1 not in merged[0][:2]  # Faiss's, then item 1's neighbour 2
    assert set(merged[0][merged[0] >= 0]) == {3, 2, 1}  # and the most clicked item, 1
    assert set(merged[1][merged[1] >= 0]) == {3, 1}  # an unknown user: no history, popularity still adds
    assert outputs["retrieval_scores"][0, 0] == pytest.approx(1.0)  # query . embedding of item 3
    assert outputs["item_to_item_scores"][0, 1] > 0 and (np.nan_to_num(outputs["item_to_item_scores"][1]) == 0).all()
    with pytest.raises(RequestError, match="one row per user"):
        candidate_sources.run({"raw_user_ids": np.array([10]), "query_embeddings": queries,
                               "candidates": np.array([[3], [3]])})  # fmt: skip

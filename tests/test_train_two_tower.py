"""The two-tower step in the trainer environment, and its whole-catalog metrics on hand-made cases."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks.train_two_tower import TwoTowerConfig, exact_top_k, ranking_metrics, training_pairs  # no TensorFlow


def test_whole_catalog_metrics_on_a_hand_computed_case():
    # user 0 finds its one relevant item at rank 1, user 1 finds one of two at rank 2
    top = np.array([[7, 1, 2], [3, 5, 9]])
    metrics = ranking_metrics(top, [{7}, {5, 8}], cutoffs=(1, 3))
    assert metrics["recall_at_1"] == pytest.approx(0.5)
    assert metrics["recall_at_3"] == pytest.approx((1 + 0.5) / 2)
    ndcg_user1 = (1 / np.log2(3)) / (1 + 1 / np.log2(3))
    assert metrics["ndcg_at_3"] == pytest.approx((1 + ndcg_user1) / 2)
    queries = np.array([[1.0, 0.0], [0.0, 1.0]])
    items = np.array([[0.9, 0.1], [0.1, 0.9], [0.5, 0.5]])
    assert exact_top_k(queries, items, 2).tolist() == [[0, 2], [1, 2]]


def test_the_towers_learn_from_the_clicked_rows_or_from_every_shown_row():
    rows = pd.DataFrame({"user_id": [1, 1, 2, 3], "item_id": [10, 11, 10, 12], "click": [1, 0, 0, 1], "position": 1})
    clicked = training_pairs(rows, "click", ["user_id", "item_id"], "clicked")
    assert clicked.to_dict("list") == {"user_id": [1, 3], "item_id": [10, 12]}
    shown = training_pairs(rows, "click", ["user_id", "item_id"], "shown")
    assert shown.to_dict("list") == {"user_id": [1, 1, 2, 3], "item_id": [10, 11, 10, 12]}
    assert TwoTowerConfig().positives == "clicked"
    with pytest.raises(ValueError, match="positives must be one of clicked, shown, got 'viewed'"):
        TwoTowerConfig(positives="viewed")


def test_tuning_options_are_checked_and_reach_the_step_from_the_cli():
    from tasks.cli import build_parser

    with pytest.raises(ValueError, match="logits_temperature must be positive, got 0"):
        TwoTowerConfig(logits_temperature=0)
    with pytest.raises(ValueError, match="tower_layers must be positive layer widths"):
        TwoTowerConfig(tower_layers=())
    parser = build_parser()
    args = parser.parse_args(["train-two-tower", "--input", "in", "--output", "out", "--l2-normalize",
                              "--temperature", "0.1", "--tower-layers", "256,128"])  # fmt: skip
    assert (args.l2_normalize, args.temperature, args.tower_layers) == (True, 0.1, (256, 128))
    defaults = parser.parse_args(["train-two-tower", "--input", "in", "--output", "out"])
    config = TwoTowerConfig()
    assert (defaults.l2_normalize, defaults.temperature, defaults.tower_layers) == (
        config.l2_normalize, config.logits_temperature, config.tower_layers)  # fmt: skip
    with pytest.raises(SystemExit):
        parser.parse_args(["train-two-tower", "--input", "in", "--output", "out", "--tower-layers", "128,x"])


@pytest.fixture(scope="module")
def two_tower_run(trained_pipeline: tuple[Path, dict[str, dict]]) -> tuple[Path, dict]:
    """The trained run's two-tower step (conftest: two epochs on the 50k rows) and the metrics it returned."""
    run, metrics = trained_pipeline
    return run / "two_tower", metrics["train_two_tower"]


def test_retrieval_beats_random_over_the_whole_catalog(two_tower_run):
    _, metrics = two_tower_run
    best = metrics["best"]
    random_recall_500 = 500 / metrics["catalog_items"]  # expected recall of 500 random items
    print(f"two-tower {best}, popularity {metrics['popularity_baseline']}")
    assert best["recall_at_500"] > 1.3 * random_recall_500
    assert metrics["config"]["logq_sampling_correction"] is True  # the default
    assert best["recall_at_10"] <= best["recall_at_20"] <= best["recall_at_100"] <= best["recall_at_500"]
    assert metrics["best_epoch"] == 1 + int(np.argmax([row["recall_at_100"] for row in metrics["history"]]))


def test_saves_the_query_tower_and_one_embedding_per_catalog_item(two_tower_run):
    out, metrics = two_tower_run
    assert (out / "query_tower" / "saved_model.pb").exists()
    embeddings = pd.read_parquet(out / "item_embeddings.parquet")
    assert len(embeddings) == metrics["catalog_items"]
    assert embeddings["item_id"].is_unique
    assert embeddings.shape[1] == 1 + 64  # id + the tower's output dimension
    assert json.loads((out / "history.json").read_text())["best_epoch"] == metrics["best_epoch"]

"""The two-tower step in the trainer environment, and its whole-catalog metrics on hand-made cases."""

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recsys.spec import load_spec
from tasks.train_two_tower import (  # no TensorFlow
    TwoTowerConfig,
    exact_top_k,
    ranking_metrics,
    seen_in,
    training_pairs,
    without_seen,
)


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


def test_retrieval_is_also_measured_without_the_items_the_served_lists_exclude(tmp_path: Path):
    rows = pd.DataFrame({"customer": [1, 1, 2, 2, 2], "sku": [5, 6, 5, 5, 7], "clicked": [1, 0, 0, 1, 0]})
    spec_text = (Path(__file__).parent / "data" / "shop_events.yaml").read_text()
    every = load_spec(_spec_with(tmp_path, spec_text, "exclude_seen: all"))
    assert {user: items.tolist() for user, items in seen_in(rows, every).items()} == {1: [5, 6], 2: [5, 7]}
    clicks = load_spec(_spec_with(tmp_path, spec_text, "exclude_seen: [clicked]"))
    assert {user: items.tolist() for user, items in seen_in(rows, clicks).items()} == {1: [5], 2: [5]}
    assert seen_in(rows, load_spec(_spec_with(tmp_path, spec_text, ""))) == {}  # the default: purchases, none here
    top = np.array([[5, 8, 6, 9], [7, 5, 1, 2]])
    assert without_seen(top, [np.array([5, 6]), np.array([5, 7])], 3).tolist() == [[8, 9, -1], [1, 2, -1]]


def _spec_with(folder: Path, spec_text: str, rule: str) -> Path:
    """shop_events' spec (no purchase target: nothing excluded by default) with an `exclude_seen` rule added."""
    path = folder / f"spec-{len(list(folder.iterdir()))}.yaml"
    path.write_text(f"{spec_text}\n{rule}\n")
    return path


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
    # The epoch is chosen on the recall of what the served lists may hold (the default spec excludes purchases).
    assert metrics["best_epoch"] == 1 + int(np.argmax([row["unseen_recall_at_100"] for row in metrics["history"]]))
    assert 0 < metrics["validation_users_with_unseen_positives"] <= metrics["validation_users"]
    assert metrics["selection_metric"] == "unseen_recall_at_100"
    assert set(metrics["popularity_baseline"]) >= {"recall_at_100", "unseen_recall_at_100"}


def test_saves_the_query_tower_and_one_embedding_per_catalog_item(two_tower_run):
    out, metrics = two_tower_run
    assert (out / "query_tower" / "saved_model.pb").exists()
    embeddings = pd.read_parquet(out / "item_embeddings.parquet")
    assert len(embeddings) == metrics["catalog_items"]
    assert embeddings["item_id"].is_unique
    assert embeddings.shape[1] == 1 + 64  # id + the tower's output dimension
    assert json.loads((out / "history.json").read_text())["best_epoch"] == metrics["best_epoch"]


def test_normalized_towers_with_a_temperature_save_a_query_tower_that_carries_it(trained_run: Path, tmp_path: Path):
    """`--l2-normalize --temperature 0.1`: unit item embeddings, and query embeddings of norm 1 / 0.1 from the saved
    query tower as batch scoring and Triton load it, so their inner products are the logits the model trained on."""
    from recsys.settings import get_settings
    from recsys.trainer_env import run_trainer_step

    out = tmp_path / "two_tower"
    metrics = run_trainer_step(get_settings().trainer_python, "train-two-tower",
                               ["--input", str(trained_run / "nvtabular"), "--output", str(out), "--epochs", "1",
                                "--l2-normalize", "--temperature", "0.1"])  # fmt: skip
    assert (metrics["config"]["l2_normalize"], metrics["config"]["logits_temperature"]) == (True, 0.1)
    script = f"""
import json, numpy as np, pandas as pd
from recsys.parquet_io import nvtabular_part_files
import tensorflow as tf
columns = {metrics["query_columns"]!r}
users = pd.read_parquet(nvtabular_part_files({str(trained_run / "nvtabular" / "valid")!r})[0], columns=columns).head(50)
tower = tf.keras.models.load_model({str(out / "query_tower")!r})
queries = tower({{column: tf.constant(users[column].to_numpy()) for column in columns}})
items = pd.read_parquet({str(out / "item_embeddings.parquet")!r}).drop(columns="item_id").to_numpy()
print(json.dumps({{"queries": np.linalg.norm(queries.numpy(), axis=1).tolist(),
                  "items": np.linalg.norm(items, axis=1).tolist()}}))
"""
    process = subprocess.run([str(get_settings().trainer_python), "-c", script], capture_output=True, text=True,
                             timeout=300, cwd=Path(__file__).resolve().parent.parent)  # fmt: skip
    assert process.returncode == 0, process.stderr[-4000:]
    norms = json.loads(process.stdout.strip().splitlines()[-1])
    assert np.allclose(norms["items"], 1.0, atol=1e-4)
    assert np.allclose(norms["queries"], 10.0, atol=1e-3)

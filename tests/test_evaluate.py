"""The evaluation step: metrics and baselines on hand-computed cases, then one run on a trained pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import ndcg_score

from recsys.ranking_metrics import (
    MISSING,
    auc_and_logloss,
    catalog_coverage,
    intra_list_diversity,
    list_metrics,
    popularity_bias,
)
from recsys.recommendation_store import ALL_SEGMENTS
from recsys.settings import get_settings
from recsys.spec import DatasetSpec, parse_spec
from recsys.trainer_env import run_trainer_step
from tasks.baselines import (
    first_allowed,
    item_knn_lists,
    popularity_lists,
    prepare,
    random_lists,
    segment_popularity_lists,
    true_click_rates,
)
from tasks.batch_score import BLEND_USERS_FILE
from tasks.evaluate import BASELINES, EvaluationConfig, evaluate, flat_metrics

# -- metrics ------------------------------------------------------------------------------------------------


def test_list_metrics_on_a_hand_computed_case():
    # user 0: its one relevant item at rank 1; user 1: one of its two relevant items at rank 2
    top = np.array([[7, 1, 2], [3, 5, 9]])
    metrics = list_metrics(top, [{7}, {5, 8}], k=3)
    assert metrics["precision_at_3"] == pytest.approx((1 / 3 + 1 / 3) / 2)
    assert metrics["recall_at_3"] == pytest.approx((1 + 0.5) / 2)
    ndcg_user1 = (1 / np.log2(3)) / (1 + 1 / np.log2(3))  # ideal: both relevant items in front
    assert metrics["ndcg_at_3"] == pytest.approx((1 + ndcg_user1) / 2)
    # AP@3: user 0 = 1 / min(1, 3); user 1 = precision@2 (1/2) / min(2, 3)
    assert metrics["map_at_3"] == pytest.approx((1 + 0.25) / 2)


def test_list_metrics_cut_at_k_and_count_empty_places_as_misses():
    top = np.array([[4, 2, MISSING, MISSING], [6, 1, 2, 3]])
    relevant = [np.array([2, 3, 4]), np.array([3])]
    at_2 = list_metrics(top, relevant, k=2)
    assert at_2["precision_at_2"] == pytest.approx((1.0 + 0.0) / 2)
    assert at_2["recall_at_2"] == pytest.approx((2 / 3 + 0) / 2)
    assert at_2["ndcg_at_2"] == pytest.approx((1.0 + 0.0) / 2)  # two hits in the two places: perfect
    assert at_2["map_at_2"] == pytest.approx((1.0 + 0.0) / 2)
    at_4 = list_metrics(top, relevant, k=4)
    assert at_4["precision_at_4"] == pytest.approx((2 / 4 + 1 / 4) / 2)
    # user 1's only relevant item at rank 4: AP = (1/4) / 1; user 0: (1 + 1) / 3
    assert at_4["map_at_4"] == pytest.approx((2 / 3 + 1 / 4) / 2)
    # k beyond the lists' width: the missing places are misses, not errors
    assert list_metrics(top, relevant, k=6)["precision_at_6"] == pytest.approx((2 / 6 + 1 / 6) / 2)


def test_a_user_without_relevant_items_is_refused():
    with pytest.raises(ValueError, match="relevant"):
        list_metrics(np.array([[1, 2]]), [set()], k=2)


@pytest.mark.parametrize("k", [1, 3, 5, 8])
def test_ndcg_agrees_with_scikit_learn_for_binary_relevance_at_k(k: int):
    rng = np.random.default_rng(k)
    catalog, users = 12, 30
    scores = rng.random((users, catalog))
    truth = (rng.random((users, catalog)) < 0.25).astype(int)
    truth[truth.sum(axis=1) == 0, 0] = 1  # every user has a relevant item
    top = np.argsort(-scores, axis=1)
    relevant = [np.flatnonzero(row) for row in truth]
    assert list_metrics(top, relevant, k)[f"ndcg_at_{k}"] == pytest.approx(ndcg_score(truth, scores, k=k))


def test_coverage_diversity_and_popularity_bias_on_hand_cases():
    top = np.array([[1, 2, 3], [1, 4, MISSING]])
    assert catalog_coverage(top, catalog_size=8) == pytest.approx(4 / 8)
    categories = pd.Series({1: "a", 2: "a", 3: "b", 4: "a"})
    # list 0: pairs (1,2) same, (1,3) and (2,3) differ: 2/3; list 1: (1,4) same: 0
    assert intra_list_diversity(top, categories) == pytest.approx((2 / 3 + 0) / 2)
    # an item of unknown category is left out of the pairs
    assert intra_list_diversity(np.array([[1, 3, 99]]), categories) == pytest.approx(1.0)
    assert intra_list_diversity(np.array([[1, MISSING]]), categories) is None
    popularity = pd.Series({1: 10, 2: 0, 3: 2, 4: 4, 5: 0, 6: 0, 7: 0, 8: 0})  # catalog mean 2
    # recommended slots: 1, 2, 3, 1, 4 -> mean (10 + 0 + 2 + 10 + 4) / 5 = 5.2
    assert popularity_bias(top, popularity) == pytest.approx(5.2 / 2)
    assert popularity_bias(np.array([[99]]), popularity) == 0.0  # outside the catalog: never clicked


def test_auc_and_logloss_are_scikit_learns():
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.1, 0.6, 0.4, 0.9])
    result = auc_and_logloss(labels, scores)
    assert result["auc"] == pytest.approx(0.75)  # 3 of the 4 (positive, negative) pairs in order
    expected = -np.mean([np.log(0.9), np.log(0.4), np.log(0.4), np.log(0.9)])
    assert result["logloss"] == pytest.approx(expected)
    assert auc_and_logloss(np.array([1, 1]), np.array([0.5, 0.7]))["auc"] is None


def test_flat_metrics_names_every_number():
    flat = flat_metrics({"final": {"pipeline": {"ndcg_at_10": 0.5, "diversity_at_10": None}}, "run": "x",
                         "checks": {"pipeline_beats_every_baseline": True}})  # fmt: skip
    assert flat == {"evaluation.final.pipeline.ndcg_at_10": 0.5, "evaluation.checks.pipeline_beats_every_baseline": 1.0}


def test_log_evaluation_puts_every_number_and_the_report_on_the_mlflow_run(tmp_path: Path, mlflow_tracking_uri: str):
    from mlflow import MlflowClient

    from tasks.evaluate import log_evaluation

    client = MlflowClient(mlflow_tracking_uri)
    experiment = client.create_experiment("evaluation", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    report = tmp_path / "report"
    report.mkdir()
    (report / "metrics.json").write_text("{}")
    (report / "report.md").write_text("# report")
    metrics = {"final": {"pipeline": {"ndcg_at_10": 0.25}, "random": {"ndcg_at_10": 0.01}},
               "ranking": {"ranker_share_of_oracle_auc": 0.93}}  # fmt: skip
    logged = log_evaluation(metrics, tracking_uri=client.tracking_uri, run_id=run_id, report_dir=report)
    assert client.get_run(run_id).data.metrics == logged == {
        "evaluation.final.pipeline.ndcg_at_10": 0.25, "evaluation.final.random.ndcg_at_10": 0.01,
        "evaluation.ranking.ranker_share_of_oracle_auc": 0.93}  # fmt: skip
    assert sorted(item.path for item in client.list_artifacts(run_id, "evaluation")) == \
        ["evaluation/metrics.json", "evaluation/report.md"]  # fmt: skip


# -- baselines on a tiny hand-made dataset ------------------------------------------------------------------

TINY_SPEC = parse_spec({
    "name": "tiny",
    "splits": {"train": "train*.csv", "test": "test*.csv"},
    "columns": {"user": "int64", "item": "int64", "category": "int32", "location": "string", "device": "string",
                "ts": "int64", "click": "int8", "buy": "int8"},
    "roles": {"user_id": "user", "item_id": "item", "timestamp": "ts", "item_features": ["category"],
              "context_features": ["location", "device"], "targets": ["click", "buy"],
              "segment_features": ["location", "device"], "purchase_target": "buy"},
})  # fmt: skip


def frame(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["user", "item", "category", "location", "device", "click", "buy"])


@pytest.fixture
def tiny() -> tuple[pd.DataFrame, pd.DataFrame]:
    # Items 1..6; item 1 is clicked 3 times, 2 twice, 3 and 4 once; 5 and 6 are shown, never clicked.
    # Users 10 and 11 both clicked 1 and 2 (they co-occur); user 12 clicked 3 and 4; user 13 clicked 1.
    train = frame([
        (10, 1, 100, "DE", "app", 1, 0), (10, 2, 100, "DE", "app", 1, 0),
        (11, 1, 100, "DE", "app", 1, 0), (11, 2, 100, "DE", "app", 1, 0),
        (12, 3, 200, "FR", "web", 1, 0), (12, 4, 200, "FR", "web", 1, 0),
        (13, 1, 100, "FR", "web", 1, 1), (13, 5, 300, "FR", "web", 0, 0), (12, 6, 300, "FR", "web", 0, 0),
    ])  # fmt: skip
    valid = frame([
        (13, 2, 100, "DE", "app", 1, 0),  # 13 clicks 2 (co-clicked with 1, their history); visits from DE/app
        (13, 6, 300, "DE", "app", 1, 1),  # and buys 6: never recommended to 13, not relevant in final lists
        (12, 1, 100, "FR", "web", 1, 0),
        (14, 7, 400, None, None, 1, 0),  # a new user, segment unknown, clicks an item unseen in train
        (11, 3, 200, "DE", "app", 0, 0),  # no click: user 11 is not evaluated
    ])  # fmt: skip
    return train, valid


def test_prepare_reads_catalog_popularity_relevance_and_rules(tiny):
    data = prepare(*tiny, TINY_SPEC, unavailable={4})
    assert data.catalog.tolist() == [1, 2, 3, 4, 5, 6]
    assert data.popularity.to_dict() == {1: 3, 2: 2, 3: 1, 4: 1, 5: 0, 6: 0}
    assert data.ranked_by_popularity.tolist() == [1, 2, 3, 4, 5, 6]  # ties by id
    assert data.segment_rankings["DE:app"].tolist() == [1, 2]
    assert data.segment_rankings["FR:web"].tolist() == [1, 3, 4]
    assert data.users.tolist() == [12, 13, 14]
    assert [items.tolist() for items in data.relevant] == [[1], [2, 6], [7]]
    assert [items.tolist() for items in data.excluded] == [[4], [1, 4, 6], [4]]  # 13 bought 1 and 6
    assert data.user_segments == ["FR:web", "DE:app", ALL_SEGMENTS]
    assert data.categories.to_dict() == {1: 100, 2: 100, 3: 200, 4: 200, 5: 300, 6: 300, 7: 400}


def test_prepare_excludes_as_the_specs_exclude_seen_says_with_validation_clicks_left_to_judge(tiny):
    import dataclasses

    every = prepare(*tiny, dataclasses.replace(TINY_SPEC, exclude_seen="all"), unavailable={4})
    # every training row, and purchases in validation too (13 bought 6)
    assert [items.tolist() for items in every.excluded] == [[3, 4, 6], [1, 4, 5, 6], [4]]
    clicks = prepare(*tiny, dataclasses.replace(TINY_SPEC, exclude_seen=("click",)))
    assert [items.tolist() for items in clicks.excluded] == [[3, 4], [1], []]  # training clicks, not validation's
    nothing = prepare(*tiny, dataclasses.replace(TINY_SPEC, exclude_seen=()))
    assert [items.tolist() for items in nothing.excluded] == [[], [], []]


def test_popularity_baselines_follow_the_counts_and_the_rules(tiny):
    data = prepare(*tiny, TINY_SPEC)
    assert popularity_lists(data, 3).tolist() == [[1, 2, 3]] * 3
    assert popularity_lists(data, 3, excluded=data.excluded).tolist() == [[1, 2, 3], [2, 3, 4], [1, 2, 3]]
    # 12 gets FR:web's list, 13 DE:app's (two items, then global popularity fills), 14 the list over all
    assert segment_popularity_lists(data, 3).tolist() == [[1, 3, 4], [1, 2, 3], [1, 2, 3]]
    assert segment_popularity_lists(data, 3, excluded=data.excluded).tolist() == [[1, 3, 4], [2, 3, 4], [1, 2, 3]]


def test_random_baseline_is_seeded_distinct_and_obeys_the_rules(tiny):
    data = prepare(*tiny, TINY_SPEC)
    first = random_lists(data, 5, seed=3, excluded=data.excluded)
    assert np.array_equal(first, random_lists(data, 5, seed=3, excluded=data.excluded))
    for row, blocked in zip(first, data.excluded, strict=True):
        items = row[row >= 0]
        assert len(set(items)) == len(items) and not set(items) & set(blocked) and set(items) <= set(data.catalog)
    assert (first[1] == MISSING).sum() == 1  # user 13: six items, two bought: four left for five places
    whole = random_lists(data, 6, seed=0)
    assert sorted(whole[0].tolist()) == [1, 2, 3, 4, 5, 6]


def test_item_knn_recommends_what_co_occurs_with_the_history(tiny):
    data = prepare(*tiny, TINY_SPEC)
    lists = item_knn_lists(data, 3, neighbours=5)
    # 12 clicked 3 and 4 (each other's only neighbour); then popularity fills: 1
    assert lists[0].tolist() == [3, 4, 1]
    # 13 clicked 1: its neighbour is 2 (cosine over users 10, 11, 13: 2/sqrt(6)); then 1 and 3 by popularity
    assert lists[1].tolist() == [2, 1, 3]
    # 14 has no training clicks: popularity
    assert lists[2].tolist() == [1, 2, 3]
    assert item_knn_lists(data, 3, neighbours=5, excluded=data.excluded)[1].tolist() == [2, 3, 4]
    assert first_allowed(np.array([5, 2]), np.array([1, 2, 3]), np.array([1]), 3).tolist() == [5, 2, 3]


def test_true_click_rates_and_the_oracle_lists_follow_the_generators_probabilities(tiny):
    data = prepare(*tiny, TINY_SPEC)  # users 12, 13, 14; 13 bought 1 and 6

    def truth(users: np.ndarray, items: np.ndarray) -> np.ndarray:  # item i is clicked with probability i / 10
        return np.tile(items / 10, (len(users), 1))

    method = np.array([[1, MISSING], [2, 3], [7, 1]])  # 7 is not in the catalog: no click, as an empty place
    rates, oracle = true_click_rates({"method": method}, data, 2, truth)
    assert oracle.tolist() == [[6, 5], [5, 4], [6, 5]]  # the best allowed items: 13 may not get 6
    assert rates["oracle"] == pytest.approx((0.6 + 0.5 + 0.5 + 0.4 + 0.6 + 0.5) / 6)
    assert rates["method"] == pytest.approx((0.1 + 0.0 + 0.2 + 0.3 + 0.0 + 0.1) / 6)


def test_the_generators_probabilities_are_its_click_logit():
    from recsys.datagen import GeneratorConfig, click_logit, make_entities, true_click_probabilities

    config = GeneratorConfig(rows=5_000, seed=3)
    entities = make_entities(config)
    users, items = np.array([1, 5, 9]), np.array([2, 3, 4, 40])
    matrix = true_click_probabilities(entities, config, users, items, position=2)
    pairs = click_logit(entities, config, np.repeat(users - 1, 4), np.tile(items - 1, 3), np.full(12, 2))
    assert matrix.reshape(-1) == pytest.approx(1 / (1 + np.exp(-pairs)), rel=1e-5)


def test_boosted_trees_learn_from_categories_and_codes_and_not_from_validation(tmp_path: Path):
    """Clicks follow a low-cardinality category and a high-cardinality id; a category unseen in training is
    the missing one, not an error."""
    from tasks.baselines import boosted_trees_scores

    spec = parse_spec({"name": "t", "splits": {"train": "a", "test": "b"},
                       "columns": {"u": "int64", "i": "int64", "colour": "string", "t": "int64", "c": "int8"},
                       "roles": {"user_id": "u", "item_id": "i", "timestamp": "t", "item_features": ["colour"],
                                 "targets": ["c"]}})  # fmt: skip
    generator = np.random.default_rng(0)
    splits = {}
    for split, rows in (("train", 20_000), ("valid", 4_000)):
        items = generator.integers(0, 1_000, rows)  # more values than the trees' categories: integer codes
        colours = generator.choice(["red", "blue", "green"], rows)
        logit = np.where(colours == "red", 1.5, -1.5) + np.where(items < 100, 1.0, -1.0)
        clicks = (generator.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int8)
        if split == "valid":
            colours[:10] = "purple"
        splits[split] = pd.DataFrame({"u": generator.integers(0, 50, rows), "i": items, "colour": colours,
                                      "t": np.arange(rows), "c": clicks})  # fmt: skip
    labels, scores = boosted_trees_scores(splits["train"], splits["valid"], spec)
    assert len(labels) == len(scores) == 4_000 and np.isfinite(scores).all()
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(labels, scores) > 0.75  # both signals learned (one alone gives about 0.7)


# -- one run on a trained pipeline --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def evaluated(trained_run: Path, medium_raw: Path, spec: DatasetSpec, tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[Path, dict]:  # fmt: skip
    batch_dir = trained_run / "batch_score_evaluate"
    run_trainer_step(get_settings().trainer_python, "batch-score",
                     ["--input", str(trained_run), "--output", str(batch_dir), "--top-k", "100"])  # fmt: skip
    output = tmp_path_factory.mktemp("evaluate") / "evaluate"
    metrics = evaluate(trained_run, output, spec, EvaluationConfig(), raw_input_dir=medium_raw,
                       batch_score_dir=batch_dir)  # fmt: skip
    return output, metrics


def test_evaluation_of_a_trained_run_writes_the_report_with_values_in_range(evaluated, trained_run: Path):
    output, metrics = evaluated
    assert json.loads((output / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    report = (output / "report.md").read_text()
    for heading in ("### Final lists", "### Retrieval", "### Ranking"):
        assert heading in report
    final = metrics["final"]
    assert final["users"] > 50 and final["users_without_a_pipeline_list"] == 0
    assert final["pipeline_lists_exclude_validation_clicks"] is False  # the default spec excludes purchases only
    # Batch scoring chose its blend weights on validation users; they are recorded, and those users left out.
    blend = json.loads((trained_run / "batch_score_evaluate" / "_metrics.json").read_text())["blend"]
    assert final["pipeline_retrieval_weight"] == blend["retrieval_weight"]
    assert final["pipeline_item_to_item_weight"] == blend["item_to_item_weight"]
    assert f"retrieval weight {blend['retrieval_weight']:g}" in report
    # The grid and the weights learned from the retrieved candidates were both measured on held-out users, and the
    # better one kept (models.blend; the grid on a tie).
    held_out = blend["held_out_ndcg_at_10"]
    assert set(held_out) == {"grid", "learned"} and blend["method"] == max(held_out, key=held_out.__getitem__)
    assert final["pipeline_blend_method"] == blend["method"] and len(final["pipeline_source_weights"]) == 3
    tuned = np.load(trained_run / "batch_score_evaluate" / BLEND_USERS_FILE)
    assert blend["validation_users"] == len(tuned) > 0
    # (a tuned user whose validation clicks the evaluation's rules all remove was not among them anyway)
    left_out = final["users_left_out_blend_weights_chosen_on"]
    assert 0.9 * len(tuned) <= left_out <= len(tuned)
    assert f"{left_out:,} validation users are left out" in report
    for name in ("pipeline", *BASELINES):
        values = final[name]
        for key in ("precision_at_10", "recall_at_10", "ndcg_at_10", "map_at_10", "coverage_at_10", "diversity_at_10"):
            assert 0.0 <= values[key] <= 1.0, (name, key)
        assert values["popularity_bias_at_10"] > 0
        assert f"| {name} |" in report
    # popularity recommends the same items to everyone: the least coverage, the most popularity bias
    assert final["popularity"]["coverage_at_10"] < final["random"]["coverage_at_10"]
    assert final["popularity"]["popularity_bias_at_10"] > final["random"]["popularity_bias_at_10"]
    retrieval = metrics["retrieval"]
    for name in ("two_tower", *BASELINES):
        recalls = [retrieval[name][f"recall_at_{k}"] for k in (10, 20, 100, 500)]
        assert recalls == sorted(recalls) and recalls[0] >= 0 and recalls[-1] <= 1
    ranking = metrics["ranking"]
    assert 0.5 < ranking["ranker"]["auc"] < ranking["oracle"]["auc"] <= 1.0
    assert ranking["prior"]["auc"] == pytest.approx(0.5)
    assert 0 < ranking["ranker_share_of_oracle_auc"] < 1
    assert metrics["checks"]["ranker_share_of_oracle_auc"] == ranking["ranker_share_of_oracle_auc"]
    # the ranker's bar: boosted trees on the same columns and rows, and the comparison in the checks
    assert 0.5 < ranking["boosted_trees"]["auc"] < ranking["oracle"]["auc"]
    checks = metrics["checks"]
    assert checks["ranker_auc_minus_boosted_trees_auc"] == pytest.approx(ranking["ranker"]["auc"]
                                                                         - ranking["boosted_trees"]["auc"])
    assert checks["ranker_auc_at_least_boosted_trees"] == (checks["ranker_auc_minus_boosted_trees_auc"] >= 0)
    assert "| boosted_trees |" in report
    # generated data: every list is also judged by the clicks it would really get; no list beats the oracle's
    true_rates = {name: final[name]["true_click_rate_at_10"] for name in ("pipeline", *BASELINES, "oracle")}
    assert all(0 <= rate <= true_rates["oracle"] <= 1 for rate in true_rates.values())
    assert true_rates["random"] < true_rates["pipeline"]
    print((output / "report.md").read_text())

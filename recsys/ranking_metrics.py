"""Ranking metrics on lists of item ids, as the evaluation, batch scoring's and the index's choices on validation,
and the benchmarks compute them: precision, recall, NDCG and MAP at k, catalog coverage, intra-list diversity,
popularity bias, AUC and log loss, and an AUC's share of the way to the oracle's. Definitions: the module
docstring of `tasks/evaluate.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

MISSING = -1  # an empty place in a list


def padded(lists: Sequence[Sequence[int] | np.ndarray], width: int) -> np.ndarray:
    """Lists of item ids as one (lists x width) int64 array, cut to `width`, MISSING in empty places."""
    matrix = np.full((len(lists), width), MISSING, dtype=np.int64)
    for row, items in enumerate(lists):
        items = np.asarray(items, dtype=np.int64)[:width]
        matrix[row, : len(items)] = items
    return matrix


def hit_matrix(top: np.ndarray, relevant: Sequence[np.ndarray | set[int] | Sequence[int]]) -> np.ndarray:
    """hits[u, r]: the item at rank r + 1 of user u's list is one of u's relevant items."""
    rows = np.repeat(np.arange(len(relevant)), [len(items) for items in relevant])
    wanted = np.fromiter((item for items in relevant for item in items), dtype=np.int64, count=len(rows))
    # One int per (user, item) pair: membership of every list place in one vectorized lookup.
    offset = int(max(top.max(initial=0), wanted.max(initial=0))) + 1
    keys = np.arange(len(top))[:, None] * offset + top
    return np.isin(keys, rows * offset + wanted) & (top >= 0)


def list_metrics(top: np.ndarray, relevant: Sequence[np.ndarray | set[int] | Sequence[int]], k: int
                 ) -> dict[str, float]:  # fmt: skip
    """Mean precision@k, recall@k, NDCG@k and MAP@k (binary relevance) over users with relevant items.

    `top`: one ranked list per user (MISSING in empty places), `relevant`: each user's relevant items
    (not empty). NDCG agrees with scikit-learn's `ndcg_score` (tests check it); that function needs dense
    (users x catalog) score matrices, several GB at a million rows, so the hits are counted here instead.
    """
    return {name: float(np.mean(values)) for name, values in user_list_metrics(top, relevant, k).items()}


def user_list_metrics(top: np.ndarray, relevant: Sequence[np.ndarray | set[int] | Sequence[int]], k: int
                      ) -> dict[str, np.ndarray]:  # fmt: skip
    """`list_metrics` of each user (one value per row of `top`), e.g. for standard errors."""
    n_relevant = np.array([len(items) for items in relevant], dtype=np.float64)
    if not len(n_relevant) or (n_relevant == 0).any():
        raise ValueError("every evaluated user needs at least one relevant item")
    top = np.asarray(top, dtype=np.int64)[:, :k]
    if top.shape[1] < k:
        top = np.pad(top, ((0, 0), (0, k - top.shape[1])), constant_values=MISSING)
    hits = hit_matrix(top, relevant)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    ideal = np.cumsum(discounts)[np.minimum(n_relevant, k).astype(int) - 1]
    precision_at_rank = np.cumsum(hits, axis=1) / np.arange(1, k + 1)
    return {
        f"precision_at_{k}": hits.sum(axis=1) / k,
        f"recall_at_{k}": hits.sum(axis=1) / n_relevant,
        f"ndcg_at_{k}": (hits * discounts).sum(axis=1) / ideal,
        f"map_at_{k}": (precision_at_rank * hits).sum(axis=1) / np.minimum(n_relevant, k),
    }


def catalog_coverage(top: np.ndarray, catalog_size: int) -> float:
    """Distinct items in all lists / items in the catalog."""
    items = np.unique(top)
    return float(len(items[items >= 0]) / catalog_size) if catalog_size else 0.0


def intra_list_diversity(top: np.ndarray, categories: pd.Series) -> float | None:
    """Mean over lists of the share of item pairs in different categories.

    `categories`: item id -> category. Items of unknown category are left out of the pairs; lists with
    fewer than two known items are left out of the mean (None when no list has two).
    """
    codes = pd.Series(pd.factorize(categories)[0], index=categories.index)
    known = codes.reindex(top.reshape(-1)).to_numpy().reshape(top.shape)  # NaN: unknown item or MISSING
    shares = []
    for row in known:
        values = row[~np.isnan(row)]
        if len(values) < 2:
            continue
        _, counts = np.unique(values, return_counts=True)
        pairs = len(values) * (len(values) - 1) / 2
        shares.append(1.0 - float((counts * (counts - 1) / 2).sum()) / pairs)
    return float(np.mean(shares)) if shares else None


def popularity_bias(top: np.ndarray, popularity: pd.Series) -> float | None:
    """Mean popularity of the recommended items / mean popularity of a catalog item.

    `popularity`: catalog item -> training clicks (zero for items never clicked); a recommended item
    outside the catalog counts as zero. None without any recommendation or any click.
    """
    items = top[top >= 0]
    catalog_mean = float(popularity.mean()) if len(popularity) else 0.0
    if not len(items) or catalog_mean == 0.0:
        return None
    return float(popularity.reindex(items).fillna(0.0).mean() / catalog_mean)


def final_list_metrics(top: np.ndarray, relevant: Sequence[np.ndarray], k: int, *, catalog_size: int,
                       categories: pd.Series, popularity: pd.Series) -> dict[str, float | None]:  # fmt: skip
    """Every final-list metric of the top k of each list (see the module's docstring for definitions)."""
    top = padded(list(top), k)
    return {
        **list_metrics(top, relevant, k),
        f"coverage_at_{k}": catalog_coverage(top, catalog_size),
        f"diversity_at_{k}": intra_list_diversity(top, categories),
        f"popularity_bias_at_{k}": popularity_bias(top, popularity),
    }


# The ranker goal: an AUC this share of the way from chance (0.5) to the oracle's on the same rows.
RANKER_GOAL_SHARE = 0.9


def share_of_the_way(auc: float, oracle_auc: float) -> float:
    """How far an AUC went from chance (0.5) towards the best any model could reach on the same rows."""
    return (auc - 0.5) / (oracle_auc - 0.5)


def auc_shares(aucs: dict[str, float], oracle_auc: float) -> dict[str, Any]:
    """Named AUCs with each one's share of the way to the oracle's, and the goal's AUC (the ranker benchmarks)."""
    return {"auc": aucs, "share_of_the_way_to_the_oracle": {name: share_of_the_way(value, oracle_auc)
                                                             for name, value in aucs.items()},
            "goal_auc": 0.5 + RANKER_GOAL_SHARE * (oracle_auc - 0.5)}  # fmt: skip


def auc_shares_table(shares: dict[str, Any], heading: str) -> str:
    """`auc_shares` as aligned text lines, the goal last."""
    width = max(len(heading), *map(len, shares["auc"]))
    lines = [f"{heading:{width}s} {'AUC':>7s} {'share of the way to the oracle':>31s}"]
    lines += [f"{name:{width}s} {value:7.4f} {shares['share_of_the_way_to_the_oracle'][name]:31.2f}"
              for name, value in shares["auc"].items()]  # fmt: skip
    lines.append(f"goal ({RANKER_GOAL_SHARE:.0%} of the way): AUC {shares['goal_auc']:.4f}")
    return "\n".join(lines)


def auc_and_logloss(labels: np.ndarray, scores: np.ndarray) -> dict[str, float | None]:
    """scikit-learn's ROC AUC and log loss; AUC is None when the labels hold a single class."""
    from sklearn.metrics import log_loss, roc_auc_score

    labels = np.asarray(labels).astype(int)
    scores = np.clip(np.asarray(scores, dtype=np.float64), 1e-7, 1 - 1e-7)
    auc = float(roc_auc_score(labels, scores)) if len(np.unique(labels)) == 2 else None
    return {"auc": auc, "logloss": float(log_loss(labels, scores, labels=[0, 1]))}

"""The item-to-item retrieval source: EASE weights between items, each item's strongest neighbours kept.

Why EASE (Steck, 2019): on MovieLens-1M it was the strongest of the simple baselines (docs/evaluation.md, "Results
on MovieLens-1M"), and a user's score for an item is a sum over the items they clicked of one learned weight each,
so it works as a candidate source (the items with the highest sums) and as a score the final order can blend in.

Its closed form inverts the items x items Gram matrix, so only the `max_items` most clicked items of the
train split take part (dense float64: 10,000 items need 800 MB and a minute on 2 cores); the other items
are still found by the two-tower retrieval. Each item keeps its `neighbours` largest weights in size, a sparse
matrix that scores a batch of users with one sparse product. A user's query is their `history` most recent
positives (by timestamp), the newer ones weighing more (`recency`: on a temporal split a user's latest
positives say most about their next ones).

Built by `tasks/build_faiss_index.py` from the run's train split (encoded item ids, as Faiss's), written
next to the Faiss index and loaded by `models/online_pipeline.py` for batch scoring and Triton alike.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

NEIGHBOURS_FILE = "item_to_item.npz"
# The lambdas `tasks/build_faiss_index.py` tries on the validation split when the config names none (ML-1M's
# EASE baseline chose 1000 among 50-5000 on its validation split; lambda grows with the clicks per item).
REGULARIZATIONS = (250.0, 500.0, 1000.0, 2000.0)
# The recencies tried with each lambda: on ML-1M's validation split 0.8 lifted the source's NDCG@10 from 0.128
# (1.0) to 0.177; a user's latest positives say most about their next ones.
RECENCIES = (1.0, 0.95, 0.9, 0.8, 0.7, 0.5)
CONFIG_FILE = "item_to_item.json"


@dataclasses.dataclass(frozen=True)
class ItemToItemConfig:
    regularization: float | None = None  # EASE's lambda; None: chosen on the validation split (REGULARIZATIONS)
    max_items: int = 10_000  # the most clicked items get neighbours (the inverse is dense)
    neighbours: int = 500  # weights kept per item
    history: int = 500  # most recent positives per user that make up their query
    # Weight of a history item: recency ** (positives since it), 1 for the newest. None: chosen on the validation
    # split with the lambda (RECENCIES); 1.0 weighs all alike, as EASE's own lists do.
    recency: float | None = None
    candidates: int = 200  # items this source adds to a user's retrieved candidates
    popular_candidates: int = 50  # the most clicked items, added to every user's candidates

    def __post_init__(self) -> None:
        for name in ("max_items", "neighbours", "history"):
            if getattr(self, name) < 1:
                raise ValueError(f"item-to-item {name} must be at least 1, got {getattr(self, name)}")
        for name in ("candidates", "popular_candidates"):
            if getattr(self, name) < 0:
                raise ValueError(f"item-to-item {name} must not be negative, got {getattr(self, name)}")
        if self.recency is not None and not 0 < self.recency <= 1:
            raise ValueError(f"item-to-item recency must be in (0, 1], got {self.recency}")
        if self.regularization is not None and self.regularization <= 0:
            raise ValueError(f"item-to-item regularization must be positive, got {self.regularization}")


def ease_neighbours(user_codes: np.ndarray, item_codes: np.ndarray, catalog_size: int,
                    config: ItemToItemConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """(indptr, neighbour codes, weights): a CSR matrix over source item codes of EASE's largest weights.

    `user_codes`/`item_codes` are the positive (user, item) pairs; repeats count once.
    """
    from scipy import sparse

    users = np.unique(user_codes, return_inverse=True)[1]
    items, counts = np.unique(item_codes, return_counts=True)
    # The most clicked items, ties by code so the choice is reproducible.
    chosen = items[np.lexsort((items, -counts))[: config.max_items]]
    column = np.full(max(catalog_size, int(items.max()) + 1 if len(items) else 0), -1, dtype=np.int64)
    column[chosen] = np.arange(len(chosen))
    keep = column[item_codes] >= 0
    clicks = sparse.csr_matrix((np.ones(int(keep.sum()), dtype=np.float64), (users[keep], column[item_codes[keep]])),
                               shape=(int(users.max()) + 1 if len(users) else 0, len(chosen)))  # fmt: skip
    clicks.data[:] = 1.0  # repeated pairs were summed
    gram = (clicks.T @ clicks).toarray()
    if config.regularization is None:
        raise ValueError("ease_neighbours needs a regularization (build_item_to_item chooses one on validation)")
    gram[np.diag_indices_from(gram)] += config.regularization
    inverse = np.linalg.inv(gram)
    weights = -inverse / np.diag(inverse)
    weights[np.diag_indices_from(weights)] = -np.inf  # never its own neighbour
    width = min(config.neighbours, max(len(chosen) - 1, 0))
    # The largest weights in size: a negative one says "less likely" and counts in the scores too.
    strength = np.where(np.isfinite(weights), np.abs(weights), -1.0)
    best = np.argpartition(-strength, width - 1, axis=1)[:, :width] if width else np.empty((len(chosen), 0), int)
    best_weights = np.take_along_axis(weights, best, axis=1)
    positive = np.isfinite(best_weights) & (best_weights != 0)
    indptr = np.zeros(len(column) + 1, dtype=np.int64)
    indptr[chosen + 1] = positive.sum(axis=1)
    indptr = np.cumsum(indptr)
    # Rows in code order: sort the chosen items by code, each row's neighbours by decreasing size.
    by_code = np.argsort(chosen)
    neighbour_codes, neighbour_weights = [], []
    for row in by_code:
        kept = positive[row]
        row_order = np.argsort(-np.abs(best_weights[row][kept]), kind="stable")
        neighbour_codes.append(chosen[best[row][kept][row_order]])
        neighbour_weights.append(best_weights[row][kept][row_order])
    codes = np.concatenate(neighbour_codes) if neighbour_codes else np.empty(0, dtype=np.int64)
    values = np.concatenate(neighbour_weights) if neighbour_weights else np.empty(0)
    return indptr, codes.astype(np.int64), values.astype(np.float32)


class ItemToItem:
    """EASE's sparse neighbour weights, the most clicked items, and the scores they give users' histories."""

    def __init__(self, indptr: np.ndarray, codes: np.ndarray, weights: np.ndarray, popular: np.ndarray,
                 config: ItemToItemConfig) -> None:  # fmt: skip
        from scipy import sparse

        size = len(indptr) - 1
        self.matrix = sparse.csr_matrix((weights, codes, indptr), shape=(size, size))
        self.popular = popular  # encoded ids, most clicked first
        self.config = config

    @property
    def catalog_size(self) -> int:
        return int(self.matrix.shape[0])

    def user_scores(self, histories: Sequence[np.ndarray], recency: float | None = None):  # csr [users, catalog]
        """Each user's neighbour weights summed over their history items (oldest first), each weighted by
        recency ** (positives since it); an item seen twice counts at its newest. Codes outside the catalog are
        ignored. `recency` overrides the config's (to choose it)."""
        from scipy import sparse

        decay = float(recency if recency is not None else self.config.recency or 1.0)
        lists = [np.asarray(items, dtype=np.int64)[-self.config.history :] for items in histories]
        ages = [np.arange(len(items))[::-1] for items in lists]  # 0 for the newest
        kept = [(items >= 0) & (items < self.catalog_size) for items in lists]
        lists = [items[keep] for items, keep in zip(lists, kept, strict=True)]
        ages = [age[keep] for age, keep in zip(ages, kept, strict=True)]
        rows = np.concatenate([np.full(len(items), row) for row, items in enumerate(lists)] or [np.empty(0, int)])
        indices = np.concatenate(lists) if lists else np.empty(0, dtype=np.int64)
        age = np.concatenate(ages) if ages else np.empty(0, dtype=np.int64)
        # The newest occurrence of each (user, item): the smallest age.
        order = np.lexsort((age, indices, rows))
        first = np.ones(len(order), dtype=bool)
        first[1:] = (np.diff(rows[order]) != 0) | (np.diff(indices[order]) != 0)
        chosen = order[first]
        query = sparse.csr_matrix((np.power(decay, age[chosen]).astype(np.float32), (rows[chosen], indices[chosen])),
                                  shape=(len(lists), self.catalog_size))  # fmt: skip
        return (query @ self.matrix).tocsr()

    def top(self, scores, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Each row's k items of highest positive score: (codes, scores), -1 and NaN padding."""
        rows = scores.shape[0]
        ids = np.full((rows, k), -1, dtype=np.int64)
        values = np.full((rows, k), np.nan, dtype=np.float32)
        for row in range(rows):
            start, end = scores.indptr[row], scores.indptr[row + 1]
            data, columns = scores.data[start:end], scores.indices[start:end]
            positive = data > 0
            data, columns = data[positive], columns[positive]
            if len(data) > k:
                best = np.argpartition(-data, k - 1)[:k]
                data, columns = data[best], columns[best]
            row_order = np.lexsort((columns, -data))  # ties by code: reproducible
            ids[row, : len(row_order)] = columns[row_order]
            values[row, : len(row_order)] = data[row_order]
        return ids, values

    @staticmethod
    def at(scores, candidates: np.ndarray) -> np.ndarray:
        """The scores of the given candidates ([users, width], -1 for none): 0 where no neighbour weight, NaN at -1."""
        candidates = np.asarray(candidates, dtype=np.int64)
        valid = (candidates >= 0) & (candidates < scores.shape[1])
        rows = np.broadcast_to(np.arange(len(candidates))[:, None], candidates.shape)
        found = np.full(candidates.shape, np.nan, dtype=np.float32)
        if valid.any():
            found[valid] = np.asarray(scores[rows[valid], candidates[valid]]).reshape(-1)
        return found

    def save(self, directory: Path) -> None:
        np.savez(Path(directory) / NEIGHBOURS_FILE, indptr=self.matrix.indptr.astype(np.int64),
                 codes=self.matrix.indices.astype(np.int64), weights=self.matrix.data.astype(np.float32),
                 popular=self.popular)  # fmt: skip
        (Path(directory) / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(self.config), indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> ItemToItem:
        config = ItemToItemConfig(**json.loads((Path(directory) / CONFIG_FILE).read_text()))
        with np.load(Path(directory) / NEIGHBOURS_FILE) as arrays:
            return cls(arrays["indptr"], arrays["codes"], arrays["weights"], arrays["popular"], config)

    def with_recency(self, recency: float) -> ItemToItem:
        """The same weights with `recency` in the config (what the pipeline then uses)."""
        return ItemToItem(self.matrix.indptr, self.matrix.indices, self.matrix.data, self.popular,
                          dataclasses.replace(self.config, recency=recency))  # fmt: skip

    @classmethod
    def fit(cls, user_codes: np.ndarray, item_codes: np.ndarray, catalog_size: int,
            config: ItemToItemConfig) -> ItemToItem:  # fmt: skip
        """From the positive (user, item) pairs of the train split."""
        indptr, codes, weights = ease_neighbours(user_codes, item_codes, catalog_size, config)
        items, counts = np.unique(np.asarray(item_codes, dtype=np.int64), return_counts=True)
        popular = items[np.lexsort((items, -counts))[: config.popular_candidates]]
        return cls(indptr, codes, weights, popular.astype(np.int64), config)

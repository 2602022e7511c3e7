"""The baselines the evaluation puts next to the pipeline, fitted on a run's raw training split, and the data they
learn from and are judged on: random, popularity, popularity per segment, item-kNN, the generator's oracle lists
(generated data only), and boosted trees on the ranker's own input columns (the ranker's bar). What each one is:
the module docstring of `tasks/evaluate.py`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recsys.ranking_metrics import MISSING
from recsys.recommendation_store import ALL_SEGMENTS, segment_key
from recsys.spec import DatasetSpec

log = logging.getLogger(__name__)


# -- the data the baselines learn from and the metrics judge -----------------------------------------------


@dataclasses.dataclass(frozen=True)
class EvaluationData:
    """Training facts and validation truth, with raw item ids throughout."""

    catalog: np.ndarray  # every item of the training split (what can be recommended), sorted
    popularity: pd.Series  # catalog item -> training clicks
    ranked_by_popularity: np.ndarray  # catalog items, most clicked first, ties by id
    segment_rankings: dict[str, np.ndarray]  # segment key -> its items, most clicked first, ties by id
    categories: pd.Series  # item -> category (the spec's first non-continuous item feature), train and validation
    clicks_by_user: pd.Series  # training user -> clicked catalog items (item-kNN's input)
    users: np.ndarray  # validation users with at least one click, sorted
    relevant: list[np.ndarray]  # per user: items clicked in validation
    excluded: list[np.ndarray]  # per user: items no list may hold (bought, unavailable)
    user_segments: list[str]  # per user: the segment key of their first validation row, or ALL_SEGMENTS


def _ranked(counts: pd.Series) -> np.ndarray:
    """Items by count, highest first, ties by item id (batch_score's segment lists order them so)."""
    return counts.sort_index(kind="stable").sort_values(ascending=False, kind="stable").index.to_numpy(np.int64)


def prepare(train: pd.DataFrame, valid: pd.DataFrame, spec: DatasetSpec,
            unavailable: set[int] | frozenset[int] = frozenset()) -> EvaluationData:  # fmt: skip
    """Build what the baselines and the metrics need from the raw train and validation rows."""
    user, item, target = spec.user_id, spec.item_id, spec.primary_target
    catalog = np.sort(train[item].unique()).astype(np.int64)
    train_clicks = train[train[target] == 1]
    popularity = train_clicks[item].value_counts().reindex(catalog, fill_value=0).astype(np.int64)
    segment_rankings = {ALL_SEGMENTS: _ranked(popularity[popularity > 0])}
    if spec.segment_features:
        segmented = train_clicks.dropna(subset=list(spec.segment_features))
        for values, group in segmented.groupby(list(spec.segment_features)):
            segment_rankings[segment_key(values)] = _ranked(group[item].value_counts())  # batch_score's keys

    categories = pd.Series(dtype="float64")
    categorical_item_features = [name for name in spec.item_features if name not in spec.continuous]
    if categorical_item_features:
        category = categorical_item_features[0]
        rows = pd.concat([train[[item, category]], valid[[item, category]]]).dropna()
        categories = rows.drop_duplicates(item, keep="last").set_index(item)[category]

    valid_clicks = valid[valid[target] == 1]
    relevant_by_user = valid_clicks.groupby(user)[item].unique()
    users = relevant_by_user.index.to_numpy(np.int64)
    # The spec's `exclude_seen`, as batch scoring applies it, except that rows of the primary target (or every
    # row, with `all`) count from the training split only: the validation clicks are what the lists are judged
    # on. Other targets' positives (purchases) count from both splits, as they always did.
    seen: pd.Series = pd.Series(dtype=object)
    if spec.excludes_every_interaction:
        rows = train[[user, item]]
        if spec.purchase_target is not None:
            rows = pd.concat([rows, valid.loc[valid[spec.purchase_target] == 1, [user, item]]])
        seen = rows.groupby(user)[item].unique()
    elif spec.seen_targets:
        targets = list(spec.seen_targets)
        rows = pd.concat([train[[user, item, *targets]], valid[[user, item, *targets]].assign(**{target: 0})])
        seen = rows[(rows[targets] == 1).any(axis=1)].groupby(user)[item].unique()
    blocked = np.array(sorted(unavailable), dtype=np.int64)
    excluded = [np.union1d(np.asarray(seen.get(int(u), []), dtype=np.int64), blocked) for u in users]

    user_segments = [ALL_SEGMENTS] * len(users)
    if spec.segment_features:
        first = valid.dropna(subset=list(spec.segment_features)).drop_duplicates(user, keep="first")
        first = first.set_index(user)[list(spec.segment_features)]
        keys = {int(u): segment_key(values) for u, values in zip(first.index, first.itertuples(index=False),
                                                                   strict=True)}  # fmt: skip
        user_segments = [keys.get(int(u), ALL_SEGMENTS) for u in users]
    return EvaluationData(
        catalog=catalog,
        popularity=popularity,
        ranked_by_popularity=_ranked(popularity),
        segment_rankings=segment_rankings,
        categories=categories,
        clicks_by_user=train_clicks.groupby(user)[item].unique(),
        users=users,
        relevant=[np.sort(items.astype(np.int64)) for items in relevant_by_user.to_numpy()],
        excluded=excluded,
        user_segments=user_segments,
    )


# -- baselines ------------------------------------------------------------------------------------------


def first_allowed(preferred: np.ndarray, fallback: np.ndarray, excluded: np.ndarray, n: int) -> np.ndarray:
    """The first n distinct items of `preferred` then `fallback` that are not excluded (MISSING-padded)."""
    candidates = np.concatenate([preferred, fallback[: n + len(excluded) + len(preferred)]]).astype(np.int64)
    if len(excluded):
        candidates = candidates[~np.isin(candidates, excluded)]
    chosen = pd.unique(candidates)[:n]
    return np.pad(chosen, (0, n - len(chosen)), constant_values=MISSING)


def random_lists(data: EvaluationData, n: int, *, seed: int, excluded: Sequence[np.ndarray] | None = None
                 ) -> np.ndarray:  # fmt: skip
    """n catalog items drawn uniformly without replacement per user (seeded), excluded items skipped."""
    rng = np.random.default_rng(seed)
    rows = []
    for row in range(len(data.users)):
        blocked = excluded[row] if excluded is not None else np.empty(0, dtype=np.int64)
        draw = min(len(data.catalog), n + len(blocked))
        sample = data.catalog[rng.choice(len(data.catalog), size=draw, replace=False)]
        rows.append(first_allowed(sample, np.empty(0, dtype=np.int64), blocked, n))
    return np.vstack(rows) if rows else np.empty((0, n), dtype=np.int64)


def popularity_lists(data: EvaluationData, n: int, *, excluded: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """The most clicked training items for every user, excluded items skipped."""
    empty = np.empty(0, dtype=np.int64)
    rows = [first_allowed(data.ranked_by_popularity, empty, excluded[row] if excluded is not None else empty, n)
            for row in range(len(data.users))]  # fmt: skip
    return np.vstack(rows) if rows else np.empty((0, n), dtype=np.int64)


def segment_popularity_lists(data: EvaluationData, n: int, *, excluded: Sequence[np.ndarray] | None = None
                             ) -> np.ndarray:  # fmt: skip
    """The most clicked items of each user's segment, then of all segments when the segment has too few."""
    empty = np.empty(0, dtype=np.int64)
    rows = []
    for row, segment in enumerate(data.user_segments):
        preferred = data.segment_rankings.get(segment, data.segment_rankings[ALL_SEGMENTS])
        blocked = excluded[row] if excluded is not None else empty
        rows.append(first_allowed(preferred, data.ranked_by_popularity, blocked, n))
    return np.vstack(rows) if rows else np.empty((0, n), dtype=np.int64)


def item_similarities(data: EvaluationData, neighbours: int) -> Any:
    """Sparse (catalog x catalog) matrix: row j holds the cosine similarities of j's nearest items.

    Items are vectors over the training users who clicked them; scikit-learn's exact (brute-force)
    `NearestNeighbors` with the cosine metric finds each clicked item's neighbours (the item itself left out).
    """
    from scipy import sparse
    from sklearn.neighbors import NearestNeighbors

    size = len(data.catalog)
    users = np.repeat(np.arange(len(data.clicks_by_user)), [len(items) for items in data.clicks_by_user])
    items = np.searchsorted(data.catalog, np.concatenate([*data.clicks_by_user.to_numpy(), np.empty(0, np.int64)]))
    clicked = np.unique(items)
    if len(clicked) < 2:
        return sparse.csr_matrix((size, size))
    item_vectors = sparse.csr_matrix((np.ones(len(items)), (items, users)), shape=(size, len(data.clicks_by_user)))
    item_vectors = item_vectors[clicked]
    item_vectors.data[:] = 1.0  # a user who clicked an item twice counts once
    count = min(neighbours + 1, len(clicked))
    model = NearestNeighbors(n_neighbors=count, metric="cosine", algorithm="brute").fit(item_vectors)
    distances, positions = model.kneighbors(item_vectors)
    rows = np.repeat(clicked, count)
    columns = clicked[positions.reshape(-1)]
    similarity = 1.0 - distances.reshape(-1)
    keep = (rows != columns) & (similarity > 0)
    return sparse.csr_matrix((similarity[keep], (rows[keep], columns[keep])), shape=(size, size))


def item_knn_lists(data: EvaluationData, n: int, *, neighbours: int, excluded: Sequence[np.ndarray] | None = None,
                   similarities: Any = None) -> np.ndarray:  # fmt: skip
    """Per user, catalog items by the summed similarity to the items they clicked in training; popularity fills.

    Ties (and users without training clicks) fall back on global popularity's order.
    """
    from scipy import sparse

    similarities = item_similarities(data, neighbours) if similarities is None else similarities
    size = len(data.catalog)
    history = [data.clicks_by_user.get(int(user), np.empty(0, dtype=np.int64)) for user in data.users]
    rows = np.repeat(np.arange(len(history)), [len(items) for items in history])
    columns = np.searchsorted(data.catalog, np.concatenate([*history, np.empty(0, np.int64)]))
    clicked = sparse.csr_matrix((np.ones(len(rows)), (rows, columns)), shape=(len(history), size))
    scores = (clicked @ similarities).tocsr()
    popularity_rank = np.empty(size, dtype=np.int64)
    popularity_rank[np.searchsorted(data.catalog, data.ranked_by_popularity)] = np.arange(size)
    empty = np.empty(0, dtype=np.int64)
    lists = []
    for row in range(len(history)):
        start, end = scores.indptr[row], scores.indptr[row + 1]
        found, values = scores.indices[start:end], scores.data[start:end]
        best = found[np.lexsort((popularity_rank[found], -values))]
        blocked = excluded[row] if excluded is not None else empty
        lists.append(first_allowed(data.catalog[best], data.ranked_by_popularity, blocked, n))
    return np.vstack(lists) if lists else np.empty((0, n), dtype=np.int64)


def baseline_lists(data: EvaluationData, n: int, *, knn_neighbours: int, seed: int,
                   excluded: Sequence[np.ndarray] | None = None,
                   similarities: Any = None) -> dict[str, np.ndarray]:  # fmt: skip
    """Every baseline's n items per user of `data`, best first."""
    knn = item_knn_lists(data, n, neighbours=knn_neighbours, excluded=excluded, similarities=similarities)
    return {
        "random": random_lists(data, n, seed=seed, excluded=excluded),
        "popularity": popularity_lists(data, n, excluded=excluded),
        "segment_popularity": segment_popularity_lists(data, n, excluded=excluded),
        "item_knn": knn,
    }


# -- the generator's truth (generated data only) ----------------------------------------------------------

ClickProbabilities = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (user ids, item ids) -> users x items


def generator_truth(raw_input_dir: Path, data: EvaluationData) -> ClickProbabilities | None:
    """The generator's true click probabilities (shown at position 1) when the input folder came from it.

    Logged clicks only judge the items that happened to be shown: an item the user would click but was
    never shown counts as a miss. On generated data every list can also be judged by the clicks it
    would really get, and the best possible list is known.
    """
    from recsys.datagen import load_generation, true_click_probabilities

    generation = load_generation(raw_input_dir)
    if generation is None:
        return None
    config, entities = generation
    if data.users.max(initial=0) > config.n_users or data.catalog.max(initial=0) > config.n_items:
        log.warning("%s: the data's ids are not the generator's: no true click rates", raw_input_dir)
        return None
    return lambda users, items: true_click_probabilities(entities, config, users, items)


def true_click_rates(methods: dict[str, np.ndarray], data: EvaluationData, k: int, truth: ClickProbabilities,
                     users_per_block: int = 256) -> tuple[dict[str, float], np.ndarray]:  # fmt: skip
    """Mean true click probability of each method's top-k places (an empty place counts 0), plus the oracle.

    The oracle's list holds each user's k allowed catalog items of highest true click probability: the
    most clicks any list obeying the rules could get. Returns (rates by method and "oracle", oracle lists).
    """
    totals = dict.fromkeys([*methods, "oracle"], 0.0)
    oracle = np.full((len(data.users), k), MISSING, dtype=np.int64)
    for start in range(0, len(data.users), users_per_block):
        rows = np.arange(start, min(start + users_per_block, len(data.users)))
        probability = truth(data.users[rows], data.catalog)  # users x catalog
        for name, lists in methods.items():
            top = lists[rows, :k]
            positions = np.searchsorted(data.catalog, top).clip(0, len(data.catalog) - 1)
            found = (top >= 0) & (data.catalog[positions] == top)
            totals[name] += float(np.where(found, np.take_along_axis(probability, positions, axis=1), 0.0).sum())
        for offset, row in enumerate(rows):
            blocked = data.excluded[row][np.isin(data.excluded[row], data.catalog)]
            probability[offset, np.searchsorted(data.catalog, blocked)] = -1.0
        if k < probability.shape[1]:
            best = np.argpartition(-probability, k - 1, axis=1)[:, :k]
            ranks = np.argsort(-np.take_along_axis(probability, best, axis=1), axis=1, kind="stable")
            best = np.take_along_axis(best, ranks, axis=1)
        else:
            best = np.argsort(-probability, axis=1, kind="stable")
        allowed = np.take_along_axis(probability, best, axis=1) >= 0
        oracle[rows, : best.shape[1]] = np.where(allowed, data.catalog[best], MISSING)
        totals["oracle"] += float(np.where(allowed, np.take_along_axis(probability, best, axis=1), 0.0).sum())
    places = max(len(data.users) * k, 1)
    return {name: total / places for name, total in totals.items()}, oracle


def final_list_data(data: EvaluationData) -> tuple[EvaluationData, np.ndarray]:
    """The users the final lists are judged on: relevant items the business rules block removed, users left
    without any dropped; (their data, the mask of `data.users` kept)."""
    relevant = [np.setdiff1d(items, blocked) for items, blocked in zip(data.relevant, data.excluded, strict=True)]
    keep = np.array([len(items) > 0 for items in relevant], dtype=bool)
    return users_subset(dataclasses.replace(data, relevant=relevant), keep), keep


def users_subset(data: EvaluationData, mask: np.ndarray) -> EvaluationData:
    """`data` restricted to the users where `mask` (aligned with `data.users`) is True."""
    return dataclasses.replace(
        data, users=data.users[mask], relevant=[items for items, ok in zip(data.relevant, mask, strict=True) if ok],
        excluded=[items for items, ok in zip(data.excluded, mask, strict=True) if ok],
        user_segments=[segment for segment, ok in zip(data.user_segments, mask, strict=True) if ok],
    )  # fmt: skip


BOOSTED_TREES_MAX_CATEGORIES = 255
BOOSTED_TREES_MAX_ROWS = 1_000_000


def boosted_trees_scores(train: pd.DataFrame, valid: pd.DataFrame, spec: DatasetSpec, *,
                         max_rows: int = BOOSTED_TREES_MAX_ROWS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    # At most `max_rows` training rows (a uniform sample): its cost stays bounded on a full-size catalog's run.
    """(labels, P(click)) on the validation rows of gradient-boosted trees trained on the training rows with the
    ranker's own input columns (ids, user, item, user-item and context features): the ranker's bar. The rows
    are a run's raw splits (`read_splits`).

    scikit-learn's HistGradientBoostingClassifier with native categorical support, early stopping on a tenth
    of the training rows (never the validation rows). Missing values, and values the training rows lack, are
    its missing category.
    """
    from sklearn.ensemble import HistGradientBoostingClassifier

    target = spec.primary_target
    columns = [spec.user_id, spec.item_id, *spec.features]
    if len(train) > max_rows:
        train = train.sample(max_rows, random_state=seed)
    encoded_train, encoded_valid, categorical = [], [], []
    for column in columns:
        if column in spec.continuous:  # a number stays a number
            encoded_train.append(train[column].to_numpy(dtype=np.float64, na_value=np.nan))
            encoded_valid.append(valid[column].to_numpy(dtype=np.float64, na_value=np.nan))
            categorical.append(False)
            continue
        # A multi-valued feature's joined tokens ("Comedy|Romance") are one category here.
        by_frequency = train[column].value_counts().index  # the most frequent value gets code 0
        codes = {value: code for code, value in enumerate(by_frequency)}
        encoded_train.append(train[column].map(codes).to_numpy(dtype=np.float64, na_value=np.nan))
        encoded_valid.append(valid[column].map(codes).to_numpy(dtype=np.float64, na_value=np.nan))
        categorical.append(len(codes) <= BOOSTED_TREES_MAX_CATEGORIES)
    model = HistGradientBoostingClassifier(max_iter=300, early_stopping=True, validation_fraction=0.1,
                                           categorical_features=np.array(categorical), random_state=seed)
    model.fit(np.column_stack(encoded_train), train[target].to_numpy(dtype=int))
    return valid[target].to_numpy(dtype=int), model.predict_proba(np.column_stack(encoded_valid))[:, 1]

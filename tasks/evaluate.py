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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recsys.outputs import atomic_output_dir
from recsys.parquet_io import part_files
from recsys.recommendation_store import ALL_SEGMENTS, segment_key
from recsys.spec import DatasetSpec
from tasks.batch_score import BLEND_USERS_FILE, read_unavailable

log = logging.getLogger(__name__)

RETRIEVAL_CUTOFFS = (10, 20, 100, 500)
FINAL_K = 10
MISSING = -1  # an empty place in a list
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
    # The boosted-trees ranking baseline learns from at most this many training rows (a uniform sample): its
    # cost stays bounded on a full-size catalog's run.
    boosted_trees_max_rows: int = 1_000_000


# -- metrics --------------------------------------------------------------------------------------------


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


def _segment_key(values: Sequence[Any]) -> str:
    return segment_key(list(values))  # the keys batch_score writes its segment lists under


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
            segment_rankings[_segment_key(values)] = _ranked(group[item].value_counts())

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
        keys = {int(u): _segment_key(values) for u, values in zip(first.index, first.itertuples(index=False),
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


def baseline_lists(data: EvaluationData, n: int, config: EvaluationConfig, *,
                   excluded: Sequence[np.ndarray] | None = None,
                   similarities: Any = None) -> dict[str, np.ndarray]:  # fmt: skip
    """Every baseline's n items per user of `data`, best first."""
    knn = item_knn_lists(data, n, neighbours=config.knn_neighbours, excluded=excluded, similarities=similarities)
    return {
        "random": random_lists(data, n, seed=config.seed, excluded=excluded),
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


# -- the step -------------------------------------------------------------------------------------------


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


def read_splits(run_dir: Path, spec: DatasetSpec) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The raw training and validation rows of a run (its resplit output), with the columns the evaluation uses
    (the ranker's input columns among them, for the boosted-trees baseline)."""
    purchase = [spec.purchase_target] if spec.purchase_target else []
    columns = list(dict.fromkeys([spec.user_id, spec.item_id, spec.primary_target, *purchase, *spec.seen_targets,
                                  *spec.features]))  # fmt: skip
    resplit = Path(run_dir) / "resplit"
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
BOOSTED_TREES_MAX_CATEGORIES = 255


def boosted_trees_scores(train: pd.DataFrame, valid: pd.DataFrame, spec: DatasetSpec, config: EvaluationConfig
                         ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
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
    if len(train) > config.boosted_trees_max_rows:
        train = train.sample(config.boosted_trees_max_rows, random_state=config.seed)
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
                                           categorical_features=np.array(categorical), random_state=config.seed)
    model.fit(np.column_stack(encoded_train), train[target].to_numpy(dtype=int))
    return valid[target].to_numpy(dtype=int), model.predict_proba(np.column_stack(encoded_valid))[:, 1]


def _default_raw_input(run: Path) -> Path | None:
    landing = run / "landing"  # where a DAG run fetches its input CSV files
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
    run = Path(run_dir)
    batch_dir = Path(batch_score_dir) if batch_score_dir else run / "batch_score"
    train, valid = read_splits(run, spec)
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
    two_tower_file = run / "two_tower" / "history.json"
    if two_tower_file.exists():
        history = json.loads(two_tower_file.read_text())
        retrieval["two_tower"] = {key: value for key, value in history["best"].items()
                                  if key.startswith(("recall_at_", "ndcg_at_"))}  # fmt: skip
        retrieval["two_tower_own_popularity"] = history["popularity_baseline"]
    for name, lists in baseline_lists(data, max(cutoffs), config, similarities=similarities).items():
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
        # How the lists were ordered (models.online_pipeline.blend_scores); older runs kept it in the config.
        weight = blend.get("retrieval_weight", batch_config.get("retrieval_weight"))
        if weight is not None:
            final["pipeline_retrieval_weight"] = weight
            final["pipeline_item_to_item_weight"] = blend.get("item_to_item_weight", 0.0)
    methods.update(baseline_lists(kept, k, config, excluded=kept.excluded, similarities=similarities))
    raw_input = Path(raw_input_dir) if raw_input_dir else _default_raw_input(run)
    truth = generator_truth(raw_input, data) if raw_input else None
    true_rates: dict[str, float] = {}
    if truth is not None:
        true_rates, methods["oracle"] = true_click_rates(methods, kept, k, truth)
    for name, lists in methods.items():
        final[name] = final_list_metrics(lists, kept.relevant, k, **measure)
        if name in true_rates:
            final[name][f"true_click_rate_at_{k}"] = true_rates[name]

    oracle = oracle_click_probabilities(raw_input, run / "resplit" / "valid", spec) if raw_input else None
    ranking = ranking_stage(run / "ranker", train, valid, spec, config, oracle)
    started_trees = time.perf_counter()
    labels, tree_scores = boosted_trees_scores(train, valid, spec, config)
    ranking["boosted_trees"] = auc_and_logloss(labels, tree_scores) | {"seconds": time.perf_counter() - started_trees}

    unseen = sum(int((~np.isin(items, data.catalog)).sum()) for items in data.relevant)
    metrics: dict[str, Any] = {
        "config": dataclasses.asdict(config),
        "run": str(run),
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
        lines += ["", f"The pipeline's lists are ordered with retrieval weight {final['pipeline_retrieval_weight']:g} "
                  f"and item-to-item weight {final['pipeline_item_to_item_weight']:g} "
                  "(`models.online_pipeline.blend_scores`; 0 and 0: the ranker alone)."]  # fmt: skip
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

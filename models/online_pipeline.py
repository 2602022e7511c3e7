"""The recommendation pipeline of one nightly run: retrieval, filtering, scoring, ordering (trainer env).

One implementation serves both `batch_score` (every user, offline) and the Triton ensemble (one
request online), so the two cannot drift. The stages follow the report's four-stage design:

1. retrieval, a union of sources (`multi_source_candidates`): the query tower embeds the user's features
   and Faiss returns the top-K items by inner product (the score the towers were trained with); the
   item-to-item source (`models/item_to_item.py`: EASE weights summed over the user's recency-weighted
   positives) adds its best items, and the most clicked items are added for everyone; duplicates merged,
   every candidate's inner product, item-to-item score and sources kept;
2. filtering: business rules remove candidates (items the user saw: bought, or any the spec's
   `exclude_seen` names; unavailable items) and
   Faiss's -1 padding when the catalog has fewer than K items;
3. scoring: the user's features are unrolled against every candidate's item features, held in
   memory as arrays indexed by encoded item id (the report fetched them from Feast per candidate,
   which made latency grow with K), and the ranker scores every pair in one call;
4. ordering: the ranker's P(click | shown) blended with the retrieval's P(item | user), the
   item-to-item score and the candidate's sources (`models.blend.blend_scores`; the weights chosen on
   validation by batch scoring, or learned there from what retrieval returned: `models.blend`), then the
   promotion rule (report 4.4.7), then
   softmax sampling with temperature T over `score / T` (report formula 2.2; T -> 0 gives the ranked
   order, unlike NVIDIA's example, which multiplies by T), with the sampling probabilities returned.

Why a blend: logged clicks need the item to be shown first. The ranker, trained on shown items,
predicts P(click | shown); the two-tower model, trained on logged positives with the logQ correction,
learns P(item | user), which carries the exposure too. Reordering the candidates by the ranker alone
threw that away (on the 1M-row benchmark its lists scored NDCG@10 0.0085, the two-tower's own order of
the same candidates 0.097).

Ranker inputs that cannot be known for a new (user, item) pair (user-item crosses, the position an
item will be shown at) get what training rows with nulls had (`PipelineColumns.missing`): Categorify's code
for a missing value, an all-padding list, or a normalized number's mean.

Each stage loads on its own (`UserFeatureTable`, `ItemCatalog`, `ItemEmbeddings`, `Tower` (query and item),
`Ranker`, the Faiss index, `ItemToItem` with the users' histories) from the files a run wrote, so a
Triton model of one stage holds only what that stage needs (`tasks/export_triton_ensemble.py`,
`serving/triton_models/`); `RecommendationPipeline` loads them all for one process.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from models.blend import DEFAULT_ITEM_TO_ITEM_WEIGHT, DEFAULT_RETRIEVAL_WEIGHT, NO_SOURCE_WEIGHTS, blend_scores
from models.item_to_item import NEIGHBOURS_FILE, ItemToItem
from models.retrieval_index import SearchIndex, load_index, read_item_embeddings
from recsys.device import select_tensorflow_device
from recsys.ranking_metrics import hit_matrix
from recsys.run_layout import RunLayout
from recsys.spec import DatasetSpec
from recsys.triton_repository import ITEM_TOWER_DIR

if TYPE_CHECKING:
    import faiss

MISSING = -1  # a filtered or absent candidate
# Categorify's codes below this are padding, null and out-of-vocabulary (NVTabular's PAD_, NULL_ and OOV_OFFSET), never
# one item's own: the run's item table gives the OOV code to every item its fit did not see.
FIRST_OWN_CODE = 3
RANKER_ROWS_PER_CALL = 262_144  # users x candidates scored per ranker call: bounds memory, keeps calls large
SMALLEST_RANKER_CALL = 64  # rows; see padded_rows
LARGEST_PADDED_CALL = 16_384  # rows; larger calls (batch scoring's) cost far more than a compilation: not padded
USER_FEATURES_FILE = "user_features.parquet"  # written by nvtabular_fit_transform
USER_HISTORY_FILE = "user_history.npz"  # written by build_faiss_index next to the item-to-item source (ItemsByUser)
ITEM_FEATURES_FILE = "item_features.parquet"


@dataclasses.dataclass(frozen=True)
class PipelineArtifacts:
    """Where one nightly run keeps what the pipeline loads."""

    nvtabular_dir: Path
    two_tower_dir: Path
    ranker_dir: Path
    faiss_index_dir: Path

    @classmethod
    def of_run(cls, run_dir: Path) -> PipelineArtifacts:
        run = Path(run_dir)
        layout = RunLayout(run)
        return cls(layout.nvtabular, layout.two_tower, layout.ranker, layout.faiss_index)


def filter_candidates(candidates: np.ndarray, *, excluded: Sequence[np.ndarray] | None = None,
                      unavailable: np.ndarray | None = None,
                      known: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """Candidates with filtered items replaced by MISSING (-1, as Faiss pads short results).

    `excluded[i]` holds the encoded item ids removed for row i (items that user saw, `ItemsByUser`);
    `unavailable` is a boolean mask indexed by encoded item id; `known[i]` False empties row i (a user
    the run has no features for: retrieval ran on filler input rows, so nothing it found is theirs).
    """
    kept = candidates.copy()
    if known is not None:
        kept[~np.asarray(known, dtype=bool)] = MISSING
    valid = kept >= 0
    if unavailable is not None and len(unavailable):
        in_range = valid & (kept < len(unavailable))
        blocked = np.zeros_like(valid)
        blocked[in_range] = unavailable[kept[in_range]]
        kept[blocked] = MISSING
    if excluded is not None:
        for row, items in enumerate(excluded):
            if len(items):
                kept[row, np.isin(kept[row], items)] = MISSING
    return kept



class ItemsByUser:
    """Encoded item ids per raw user id, as three flat arrays, kept in the given order.

    Used for the items each user saw (the filter's exclusions, `seen_items.npz`) and for each user's positives
    in time order (the item-to-item source's queries, `user_history.npz`).
    """

    def __init__(self, user_ids: np.ndarray, offsets: np.ndarray, items: np.ndarray) -> None:
        self.user_ids = user_ids  # sorted raw user ids
        self.offsets = offsets  # user i's items are items[offsets[i] : offsets[i + 1]]
        self.items = items

    @classmethod
    def from_mapping(cls, seen: Mapping[int, np.ndarray]) -> ItemsByUser:  # raw user id -> encoded item ids
        user_ids = np.array(sorted(seen), dtype=np.int64)
        lists = [np.asarray(seen[int(user)], dtype=np.int64) for user in user_ids]
        offsets = np.concatenate([[0], np.cumsum([len(items) for items in lists])]).astype(np.int64)
        items = np.concatenate(lists) if lists else np.empty(0, dtype=np.int64)
        return cls(user_ids, offsets, items.astype(np.int64))

    def of_users(self, raw_user_ids: Sequence[int] | np.ndarray) -> list[np.ndarray]:
        """One array per given user, empty for users who saw nothing excluded (or are unknown)."""
        ids = np.asarray(raw_user_ids, dtype=np.int64)
        empty = np.empty(0, dtype=np.int64)
        if not len(self.user_ids):
            return [empty for _ in ids]
        rows = np.searchsorted(self.user_ids, ids)
        found = (rows < len(self.user_ids)) & (self.user_ids[np.minimum(rows, len(self.user_ids) - 1)] == ids)
        return [self.items[self.offsets[row] : self.offsets[row + 1]] if hit else empty
                for row, hit in zip(rows, found, strict=True)]  # fmt: skip

    def save(self, path: Path) -> None:
        np.savez(path, user_ids=self.user_ids, offsets=self.offsets, items=self.items)

    @classmethod
    def load(cls, path: Path) -> ItemsByUser:
        with np.load(path) as arrays:
            return cls(arrays["user_ids"], arrays["offsets"], arrays["items"])


def nearest_other_items(codes: np.ndarray, found: np.ndarray, distances: np.ndarray, n: int, *,
                        unavailable: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The first `n` neighbours of each item among an index search's results (n + 1 or more per row).

    The item itself, Faiss's -1 padding and unavailable items are skipped; rows whose code is MISSING
    (an unknown item) come back empty. (MISSING-padded ids, similarities with NaN padding.)
    """
    codes = np.asarray(codes, dtype=np.int64)
    found = filter_candidates(np.asarray(found, dtype=np.int64), unavailable=unavailable)
    keep = (found >= 0) & (found != codes[:, None]) & (codes[:, None] >= 0)
    # A stable sort of "not kept" moves the kept neighbours to the front in search order.
    positions = np.argsort(~keep, axis=1, kind="stable")[:, :n]
    chosen = np.take_along_axis(keep, positions, axis=1)
    ids = np.where(chosen, np.take_along_axis(found, positions, axis=1), MISSING)
    similarity = np.where(chosen, np.take_along_axis(np.asarray(distances), positions, axis=1), np.nan)
    width = ids.shape[1]
    if width < n:  # fewer search results than asked for
        ids = np.pad(ids, ((0, 0), (0, n - width)), constant_values=MISSING)
        similarity = np.pad(similarity, ((0, 0), (0, n - width)), constant_values=np.nan)
    return ids.astype(np.int64), similarity.astype(np.float32)


def merge_candidates(*sources: np.ndarray) -> np.ndarray:
    """The union of each row's candidates from several sources ([users, k_s] each, -1 for none).

    The first occurrence of an item is kept, in source order then rank order (the two-tower's first), duplicates
    are dropped, and the kept items move to the front: rows are padded with -1 to the sum of the sources' widths.
    """
    merged = np.concatenate([np.asarray(source, dtype=np.int64) for source in sources], axis=1)
    by_item = np.argsort(merged, axis=1, kind="stable")  # equal items in their original order
    sorted_items = np.take_along_axis(merged, by_item, axis=1)
    repeated = np.zeros_like(merged, dtype=bool)
    np.put_along_axis(repeated, by_item[:, 1:], sorted_items[:, 1:] == sorted_items[:, :-1], axis=1)
    merged = np.where(repeated | (merged < 0), MISSING, merged)
    front = np.argsort(merged < 0, axis=1, kind="stable")
    return np.take_along_axis(merged, front, axis=1)


def inner_products(queries: np.ndarray, embeddings: ItemEmbeddings, candidates: np.ndarray) -> np.ndarray:
    """The two-tower score of every candidate (the query's inner product with its item embedding); NaN at -1.

    Items without an embedding (not in the index) get the lowest score of their row's other candidates.
    """
    vectors, known = embeddings.queries(candidates.reshape(-1))
    scores = np.einsum("ukd,ud->uk", vectors.reshape(*candidates.shape, -1), np.asarray(queries, np.float32))
    known = known.reshape(candidates.shape)
    lowest = np.min(np.where(known, scores, np.inf), axis=1, keepdims=True)
    scores = np.where(known, scores, np.where(np.isfinite(lowest), lowest, 0.0))
    return np.where(candidates >= 0, scores, np.nan).astype(np.float32)


def multi_source_candidates(
    two_tower: np.ndarray, queries: np.ndarray, embeddings: ItemEmbeddings, item_to_item: ItemToItem | None,
    histories: Sequence[np.ndarray] | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Retrieval's union of sources: the two-tower's Faiss results (`two_tower`, [users, top_k]), the item-to-item
    source's best items for each user's history, and the most clicked items; duplicates merged (`merge_candidates`).

    Returns (candidates, two-tower inner products, item-to-item scores, sources), aligned; -1 pads, NaN at -1.
    `sources` holds one bit per source that retrieved the candidate (`models.blend.SOURCES` order: 1 two-tower,
    2 item-to-item, 4 most clicked), 0 at -1. Without an item-to-item source (a run from before it) or histories,
    the two-tower's candidates alone, item-to-item 0.
    """
    two_tower = np.asarray(two_tower, dtype=np.int64)
    if item_to_item is None or histories is None:
        zeros = np.where(two_tower >= 0, 0.0, np.nan).astype(np.float32)
        return two_tower, inner_products(queries, embeddings, two_tower), zeros, (two_tower >= 0).astype(np.int32)
    user_scores = item_to_item.user_scores(histories)
    found, _ = item_to_item.top(user_scores, item_to_item.config.candidates)
    popular = np.broadcast_to(item_to_item.popular[None, :], (len(two_tower), len(item_to_item.popular)))
    candidates = merge_candidates(two_tower, found, popular)
    sources = np.zeros(candidates.shape, dtype=np.int32)
    for bit, source in enumerate((two_tower, found, popular)):
        sources |= hit_matrix(candidates, [row[row >= 0] for row in source]).astype(np.int32) << bit
    return (candidates, inner_products(queries, embeddings, candidates), ItemToItem.at(user_scores, candidates),
            sources)


def order(candidates: np.ndarray, scores: np.ndarray, top_n: int, *, temperature: float = 0.0,
          rng: np.random.Generator | None = None, promoted: np.ndarray | None = None,
          promotion_threshold: float = 0.5, click_probabilities: np.ndarray | None = None,
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """The top-n (item ids, order scores, sampling probabilities, click probabilities) per row; MISSING pads
    short rows (scores and click probabilities NaN).

    `scores` are the order scores (the blend); `click_probabilities` the ranker's P(click) of each candidate,
    aligned with them (None: the scores are the ranker's own). Promotion rule (report 4.4.7, decided in issue
    19): a promoted item whose P(click) is at least `promotion_threshold` gets order score 1.0, the top of a
    probability-scale order (a blend never exceeds its P(click)). With temperature T > 0, the order is a sample
    without replacement from softmax(score / T) (drawn with the Gumbel top-k trick, the same distribution as
    sampling one item after another); with T = 0 it is the ranked order and the probabilities are one-hot-like
    (1 for the top item, the softmax limit).
    """
    scores = np.where(candidates >= 0, scores, -np.inf).astype(np.float64)
    clicks = scores if click_probabilities is None else np.asarray(click_probabilities, dtype=np.float64)
    if promoted is not None and len(promoted):
        valid = candidates >= 0
        flagged = np.zeros_like(valid)
        in_range = valid & (candidates < len(promoted))
        flagged[in_range] = promoted[candidates[in_range]]
        scores = np.where(flagged & (clicks >= promotion_threshold), 1.0, scores)
    if temperature > 0:
        logits = scores / temperature
        finite = np.isfinite(logits)
        with np.errstate(invalid="ignore"):  # rows with no candidate: -inf - -inf, masked out just below
            shifted = np.where(finite, logits - np.max(np.where(finite, logits, -np.inf), axis=1, keepdims=True),
                               -np.inf)  # fmt: skip
        weights = np.exp(shifted)
        probabilities = weights / np.maximum(weights.sum(axis=1, keepdims=True), np.finfo(float).tiny)
        generator = rng if rng is not None else np.random.default_rng()
        keys = np.where(finite, logits + generator.gumbel(size=logits.shape), -np.inf)
    else:
        keys = scores
        probabilities = np.zeros_like(scores)
        best = np.argmax(scores, axis=1)
        probabilities[np.arange(len(scores)), best] = np.isfinite(scores[np.arange(len(scores)), best])
    # Stable sort on -key: ties keep retrieval order, so results are reproducible.
    positions = np.argsort(-keys, axis=1, kind="stable")[:, :top_n]
    chosen = np.take_along_axis(candidates, positions, axis=1)
    chosen_scores = np.take_along_axis(scores, positions, axis=1)
    chosen_probabilities = np.take_along_axis(probabilities, positions, axis=1)
    chosen_clicks = np.take_along_axis(clicks, positions, axis=1)
    absent = ~np.isfinite(chosen_scores) | (chosen < 0)
    chosen = np.where(absent, MISSING, chosen)
    return (chosen, np.where(absent, np.nan, chosen_scores).astype(np.float32),
            chosen_probabilities.astype(np.float32), np.where(absent, np.nan, chosen_clicks).astype(np.float32))


def promoted_scores(scores: Sequence[float], promoted: Sequence[bool], *, promotion_threshold: float = 0.5,
                    click_probabilities: Sequence[float] | None = None) -> list[float]:  # fmt: skip
    """One list's order scores after the promotion rule (`order`'s, in plain Python): what is sorted or sampled."""
    clicks = scores if click_probabilities is None else click_probabilities
    return [1.0 if flag and click >= promotion_threshold else score
            for score, flag, click in zip(scores, promoted, clicks, strict=True)]  # fmt: skip


def ranked_order(scores: Sequence[float], promoted: Sequence[bool], top_n: int, *, promotion_threshold: float = 0.5,
                 click_probabilities: Sequence[float] | None = None) -> tuple[list[int], list[float]]:  # fmt: skip
    """`order`'s temperature-0 case for one list, in plain Python: (positions of the top n, their order scores).

    The gateway orders one short list per request, where numpy's per-call costs made `order` take 45 us
    against 10 us here. Same rule, same stable tie order; tests hold the two equal. A NaN P(click) (a list
    without one) never reaches the threshold.
    """
    adjusted = promoted_scores(scores, promoted, promotion_threshold=promotion_threshold,
                               click_probabilities=click_probabilities)  # fmt: skip
    # sorted() is stable with reverse=True too: ties keep the list's order, as order()'s stable argsort does.
    positions = sorted(range(len(adjusted)), key=adjusted.__getitem__, reverse=True)[:top_n]
    return positions, [adjusted[position] for position in positions]


def search(index: SearchIndex | faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(encoded item ids, inner products), best first; -1 where the catalog has fewer than k items."""
    distances, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return ids.astype(np.int64), distances


def model_input(data: Any, *, continuous: bool = False, width: int | None = None) -> np.ndarray:
    """A feature's values (an array, per-row lists, or a pandas column of them) as the models take them: int64
    codes or float32 numbers, one per row, or a multi-valued feature's codes as one [rows, width] array."""
    if width is None:
        return np.asarray(data, dtype=np.float32 if continuous else np.int64).reshape(-1)
    if isinstance(data, np.ndarray) and data.ndim == 2:
        return data.astype(np.int64, copy=False)
    rows = list(data.to_numpy() if isinstance(data, pd.Series) else data)
    if not rows:
        return np.zeros((0, width), dtype=np.int64)
    return np.stack([np.asarray(row, dtype=np.int64) for row in rows]).reshape(len(rows), width)


@dataclasses.dataclass(frozen=True)
class PipelineColumns:
    """What every stage must know about columns: names from the spec and the models, Categorify's null codes.

    A feature's values are int64 codes, one per row (a category); float32 numbers, one per row (a continuous
    feature); or int64 codes, `list_widths[column]` per row (a multi-valued feature, padded to that width).
    Written next to each exported Triton model (`pipeline_columns.json`), so a stage loads without
    the dataset spec or the run's other files.
    """

    user_id: str
    item_id: str
    user_features: tuple[str, ...]
    item_features: tuple[str, ...]
    context_features: tuple[str, ...]
    query_columns: tuple[str, ...]  # the query tower's inputs
    ranker_columns: tuple[str, ...]  # the ranker's inputs
    null_codes: dict[str, int]
    item_cardinality: int  # Categorify's item id codes: the size of the arrays indexed by encoded item id
    continuous: tuple[str, ...] = ()
    list_widths: dict[str, int] = dataclasses.field(default_factory=dict)
    item_tower_columns: tuple[str, ...] = ()  # the item tower's inputs (none in runs from before it was saved)

    FILE = "pipeline_columns.json"

    @property
    def user_columns(self) -> tuple[str, ...]:
        """The user table's columns: the encoded user id (named like the raw one, as the models call it), features."""
        return (self.user_id, *self.user_features)

    @property
    def item_columns(self) -> tuple[str, ...]:
        """An item's encoded columns: its id (the encoded one, named like the raw one) and its features."""
        return (self.item_id, *self.item_features)

    def null_code(self, column: str) -> int:
        return self.null_codes.get(column, 1)

    def width(self, column: str) -> int:
        """Values per row: a multi-valued feature's width, else 1."""
        return self.list_widths.get(column, 1)

    def dtype(self, column: str) -> type[np.generic]:
        return np.float32 if column in self.continuous else np.int64

    def values(self, column: str, data: Any) -> np.ndarray:
        """`data` as the models take `column` (`model_input`)."""
        return model_input(data, continuous=column in self.continuous, width=self.list_widths.get(column))

    def missing(self, column: str, rows: int) -> np.ndarray:
        """What the models saw in training where a value was missing: Categorify's null code, an all-padding
        list, or 0.0 (a normalized number's mean)."""
        if column in self.list_widths:
            return np.zeros((rows, self.list_widths[column]), dtype=np.int64)  # Categorify's padding code
        if column in self.continuous:
            return np.zeros(rows, dtype=np.float32)
        return np.full(rows, self.null_code(column), dtype=np.int64)

    def pack(self, features: Mapping[str, np.ndarray], columns: Sequence[str]) -> np.ndarray:
        """`columns` of `features` as one int64 matrix, the tensor Triton stages pass on: a multi-valued
        feature takes its width in columns, a float32 its bit pattern (exact both ways, see `unpack`)."""
        parts = []
        for column in columns:
            values = np.asarray(features[column])
            if column in self.continuous:
                values = values.astype(np.float32).view(np.int32).astype(np.int64)
            parts.append(values.reshape(len(values), -1).astype(np.int64))
        return np.concatenate(parts, axis=1) if parts else np.zeros((0, 0), dtype=np.int64)

    def unpack(self, matrix: np.ndarray, columns: Sequence[str]) -> dict[str, np.ndarray]:
        matrix = np.asarray(matrix, dtype=np.int64)
        expected = sum(self.width(column) for column in columns)
        if matrix.ndim != 2 or matrix.shape[1] != expected:
            raise ValueError(f"a packed feature matrix of {', '.join(columns)} has {expected} columns, "
                             f"not shape {matrix.shape}")  # fmt: skip
        features, start = {}, 0
        for column in columns:
            block = matrix[:, start : start + self.width(column)]
            start += self.width(column)
            if column in self.continuous:
                features[column] = block[:, 0].astype(np.int32).view(np.float32)
            else:
                features[column] = block if column in self.list_widths else block[:, 0].copy()
        return features

    @classmethod
    def of_run(cls, artifacts: PipelineArtifacts, spec: DatasetSpec) -> PipelineColumns:
        nvtabular = json.loads((artifacts.nvtabular_dir / "_metrics.json").read_text())
        two_tower = json.loads((artifacts.two_tower_dir / "history.json").read_text())
        ranker = json.loads((artifacts.ranker_dir / "history.json").read_text())
        return cls(
            user_id=spec.user_id, item_id=spec.item_id, user_features=tuple(spec.user_features),
            item_features=tuple(spec.item_features), context_features=tuple(spec.context_features),
            query_columns=tuple(two_tower["query_columns"]), ranker_columns=tuple(ranker["input_columns"]),
            null_codes=dict(nvtabular["null_encodings"]),
            item_cardinality=int(nvtabular["cardinalities"][spec.item_id]),
            continuous=tuple(spec.continuous),
            list_widths={column: options.max_tokens for column, options in spec.multi_valued.items()},
            item_tower_columns=tuple(two_tower.get("item_columns", ())),
        )  # fmt: skip

    def write(self, directory: Path) -> Path:
        path = Path(directory) / self.FILE
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, directory: Path) -> PipelineColumns:
        data: dict[str, Any] = json.loads((Path(directory) / cls.FILE).read_text())
        tuples = ("user_features", "item_features", "context_features", "query_columns", "ranker_columns",
                  "continuous", "item_tower_columns")  # fmt: skip
        values: dict[str, Any] = {key: tuple(value) if key in tuples else value for key, value in data.items()}
        return cls(**values)


class UserFeatureTable:
    """Encoded features of every user the run knows, looked up by raw user id (retrieval and ranking inputs)."""

    def __init__(self, raw_user_ids: np.ndarray, features: dict[str, np.ndarray], columns: PipelineColumns) -> None:
        self.positions = pd.Index(np.asarray(raw_user_ids, dtype=np.int64))  # raw user id -> row
        self.features = features  # `columns.user_columns` -> values, one row per user (PipelineColumns.values)
        self.columns = columns

    @classmethod
    def read(cls, path: Path, columns: PipelineColumns) -> UserFeatureTable:
        users = pd.read_parquet(path)
        raw_ids = users[columns.user_id].to_numpy(dtype=np.int64)
        users[columns.user_id] = users.pop(f"{columns.user_id}_encoded")  # the model input named like the id
        return cls(raw_ids, {column: columns.values(column, users[column]) for column in columns.user_columns},
                   columns)  # fmt: skip

    @property
    def raw_user_ids(self) -> np.ndarray:
        return self.positions.to_numpy(dtype=np.int64)

    def lookup(self, raw_user_ids: Sequence[int] | np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Encoded features of the known users among `raw_user_ids` and a mask of which ids are known."""
        rows = self.positions.get_indexer(np.asarray(raw_user_ids, dtype=np.int64))
        mask = rows >= 0
        return {column: values[rows[mask]] for column, values in self.features.items()}, mask


class ItemCatalog:
    """Raw and encoded item ids and the item features, as arrays indexed by encoded item id.

    A candidate's features are one gather away (the report fetched them from Feast per candidate).
    """

    def __init__(self, raw_ids: np.ndarray, code_of_raw: pd.Series, feature_columns: dict[str, np.ndarray]) -> None:
        self.raw_ids = raw_ids  # encoded id -> raw id; MISSING for codes no item has
        self.code_of_raw = code_of_raw  # raw id -> encoded id
        self.columns = feature_columns  # ranker input name -> values indexed by encoded item id

    @classmethod
    def read(cls, path: Path, columns: PipelineColumns) -> ItemCatalog:
        items = pd.read_parquet(path)
        codes = items[f"{columns.item_id}_encoded"].to_numpy(dtype=np.int64)
        size = max(columns.item_cardinality, int(codes.max()) + 1 if len(codes) else 0)
        raw_ids = np.full(size, MISSING, dtype=np.int64)
        raw_ids[codes] = items[columns.item_id].to_numpy(dtype=np.int64)
        code_of_raw = pd.Series(codes, index=items[columns.item_id].to_numpy(dtype=np.int64))
        feature_columns: dict[str, np.ndarray] = {columns.item_id: np.arange(size, dtype=np.int64)}
        for column in columns.item_features:
            values = columns.missing(column, size)
            values[codes] = columns.values(column, items[column])
            feature_columns[column] = values
        return cls(raw_ids, code_of_raw, feature_columns)

    def __len__(self) -> int:
        return len(self.raw_ids)

    def encode(self, raw_item_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Encoded ids of raw item ids; MISSING for items the run does not know."""
        codes = self.code_of_raw.reindex(np.asarray(raw_item_ids, dtype=np.int64))
        return codes.fillna(MISSING).to_numpy(dtype=np.int64)

    def raw(self, codes: np.ndarray) -> np.ndarray:
        """Raw ids of encoded ids; MISSING stays MISSING."""
        codes = np.asarray(codes, dtype=np.int64)
        safe = np.where(codes >= 0, codes, 0)
        return np.where(codes >= 0, self.raw_ids[safe], MISSING)


class ItemEmbeddings:
    """The two-tower item embeddings indexed by encoded item id: the queries of "similar items"."""

    def __init__(self, embeddings: np.ndarray, retrievable: np.ndarray) -> None:
        self.embeddings = embeddings  # float32 [catalog size, dim]; zeros for items without one
        self.retrievable = retrievable  # bool [catalog size]: the item has an embedding (it is in the index)

    @classmethod
    def read(cls, two_tower_dir: Path, catalog_size: int) -> ItemEmbeddings:
        ids, vectors = read_item_embeddings(two_tower_dir)
        size = max(catalog_size, int(ids.max()) + 1 if len(ids) else 0)
        embeddings = np.zeros((size, vectors.shape[1]), dtype=np.float32)
        embeddings[ids] = vectors
        retrievable = np.zeros(size, dtype=bool)
        retrievable[ids] = True
        return cls(embeddings, retrievable)

    def queries(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings, known): zeros and False for MISSING codes and items without an embedding."""
        codes = np.asarray(codes, dtype=np.int64)
        in_range = (codes >= 0) & (codes < len(self.retrievable))
        known = in_range & self.retrievable[np.where(in_range, codes, 0)]
        vectors = np.where(known[:, None], self.embeddings[np.where(known, codes, 0)], 0.0).astype(np.float32)
        return np.ascontiguousarray(vectors), known


@dataclasses.dataclass(frozen=True)
class FreshItems:
    """Products added since the run (its catalog does not know them), sent along with a request: their raw ids,
    encoded columns (`PipelineColumns.item_columns`, the id's code the out-of-vocabulary one) and item-tower
    embeddings, as the gateway wrote them through when the products were created (serving/live_features.py).

    Retrieval takes one where Faiss would have, had it been indexed (`add_fresh_candidates`), the ranker scores it
    on its own features (`Ranker.score`), and ordering names it by raw id (`raw`). Their codes follow the catalog's:
    `offset + j` for the j-th, `offset` being the run's item cardinality, beyond every encoded item id.
    """

    raw_ids: np.ndarray  # int64 [m]
    features: dict[str, np.ndarray]  # item column -> its values, one row per item
    embeddings: np.ndarray  # float32 [m, dim]
    offset: int

    def __len__(self) -> int:
        return len(self.raw_ids)

    @property
    def codes(self) -> np.ndarray:
        return self.offset + np.arange(len(self), dtype=np.int64)

    @classmethod
    def from_tensors(cls, columns: PipelineColumns, raw_ids: np.ndarray, features: np.ndarray,
                     embeddings: np.ndarray) -> FreshItems:  # fmt: skip
        """From the request's tensors: raw ids, the item columns packed (`PipelineColumns.pack`), the embeddings."""
        raw_ids = np.asarray(raw_ids, dtype=np.int64).reshape(-1)
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or len(embeddings) != len(raw_ids) or len(features) != len(raw_ids):
            raise ValueError("fresh items need one id, one packed feature row and one embedding each")
        return cls(raw_ids, columns.unpack(features, columns.item_columns), embeddings, columns.item_cardinality)

    def item_queries(self, raw_ids: np.ndarray, codes: np.ndarray, queries: np.ndarray, known: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
        """The (codes, embeddings, known) of these raw ids that `ItemEmbeddings.queries` gave, with a fresh item's
        own code and embedding where the catalog knows none: what its similar products are searched with (its code
        is no indexed item's, so no neighbour is skipped as itself)."""
        at = pd.Index(self.raw_ids).get_indexer(np.asarray(raw_ids, dtype=np.int64))
        given = ~np.asarray(known, dtype=bool) & (at >= 0)
        if not given.any():
            return codes, queries, known
        codes = np.array(codes, dtype=np.int64, copy=True)
        codes[given] = self.codes[at[given]]
        queries = np.array(queries, dtype=np.float32, copy=True)
        queries[given] = self.embeddings[at[given]]
        return codes, queries, known | given

    def raw(self, catalog: ItemCatalog, codes: np.ndarray) -> np.ndarray:
        """Raw ids of encoded ids, the fresh items' among them; MISSING stays MISSING."""
        codes = np.asarray(codes, dtype=np.int64)
        fresh = codes >= self.offset
        raw = catalog.raw(np.where(fresh, MISSING, codes))
        raw[fresh] = self.raw_ids[codes[fresh] - self.offset]
        return raw


def add_fresh_candidates(
    candidates: np.ndarray, inner: np.ndarray, item_to_item: np.ndarray, sources: np.ndarray, queries: np.ndarray,
    fresh: FreshItems | None, top_k: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`multi_source_candidates`' result with the fresh items each user's two-tower retrieval would have found, had
    they been in the index: those whose inner product with the user's query reaches the lowest of the user's
    two-tower candidates (every one where Faiss found fewer than `top_k`). They come after the others, with their
    inner product, an item-to-item score of 0 (no one's history holds them) and the two-tower's source bit."""
    if fresh is None or not len(fresh):
        return candidates, inner, item_to_item, sources
    scores = np.asarray(queries, dtype=np.float32) @ fresh.embeddings.T  # [users, fresh items]
    two_tower = (np.asarray(sources) & 1) != 0
    lowest = np.min(np.where(two_tower, inner, np.inf), axis=1)
    cutoff = np.where(two_tower.sum(axis=1) < top_k, -np.inf, lowest)
    taken = scores >= cutoff[:, None]
    return (np.concatenate([candidates, np.where(taken, fresh.codes[None, :], MISSING)], axis=1),
            np.concatenate([inner, np.where(taken, scores, np.nan)], axis=1).astype(np.float32),
            np.concatenate([item_to_item, np.where(taken, 0.0, np.nan)], axis=1).astype(np.float32),
            np.concatenate([sources, taken.astype(np.int32)], axis=1).astype(np.int32))  # fmt: skip


class Tower:
    """One tower of the two-tower model: encoded columns in (its `inputs`), embeddings out."""

    def __init__(self, saved_model_dir: Path, columns: PipelineColumns, inputs: Sequence[str]) -> None:
        import tensorflow as tf

        select_tensorflow_device()  # RECSYS_DEVICE, before the model's first op
        self.model = tf.keras.models.load_model(str(saved_model_dir))
        self.columns = columns
        self.inputs = tuple(inputs)

    def embed(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        import tensorflow as tf

        inputs = {column: tf.constant(self.columns.values(column, features[column])) for column in self.inputs}
        return np.ascontiguousarray(self.model(inputs, training=False).numpy(), dtype=np.float32)

    @classmethod
    def query(cls, saved_model_dir: Path, columns: PipelineColumns) -> Tower:
        """The query tower: encoded user features in, user embeddings out."""
        return cls(saved_model_dir, columns, columns.query_columns)

    @classmethod
    def item(cls, saved_model_dir: Path, columns: PipelineColumns) -> Tower:
        """The item tower: encoded item columns in, item embeddings out (those of products added since the run)."""
        return cls(saved_model_dir, columns, columns.item_tower_columns)




def padded_rows(rows: int) -> int:
    """The rows a ranker call of `rows` is padded to: at least `SMALLEST_RANKER_CALL`, then a multiple of a step that
    doubles with each doubling of the rows (eight sizes per doubling), so at most an eighth more rows are scored.

    The restored Keras ranker compiles each new input shape on its first call: 54 ms median against 2.7 ms once
    known, for 100-280 rows on this machine (2026-12-04, a test run's DLRM). The number of valid candidates varies
    with every request (sources overlap, products added since the run), so without padding many online requests
    paid that; with it a few dozen shapes cover every call up to `LARGEST_PADDED_CALL` rows. Above that (batch
    scoring's blocks of up to `RANKER_ROWS_PER_CALL`), an eighth more rows would cost more than the compilation."""
    if rows <= SMALLEST_RANKER_CALL:
        return SMALLEST_RANKER_CALL
    if rows > LARGEST_PADDED_CALL:
        return rows
    step = 1 << (rows.bit_length() - 4)  # rows > 64: 8 or more
    return -(-rows // step) * step


class Ranker:
    """The ranking model, scoring every (user, candidate) pair with the candidates' features from memory."""

    def __init__(self, saved_model_dir: Path, columns: PipelineColumns, catalog: ItemCatalog) -> None:
        import tensorflow as tf

        select_tensorflow_device()  # RECSYS_DEVICE, before the model's first op
        self.model = tf.keras.models.load_model(str(saved_model_dir))
        self.columns = columns
        self.item_columns = catalog.columns

    def score(self, features: Mapping[str, np.ndarray], candidates: np.ndarray,
              context: Mapping[str, np.ndarray] | None = None,
              fresh: FreshItems | None = None) -> np.ndarray:  # fmt: skip
        """Ranker scores of every (user row, candidate) pair; NaN where the candidate is MISSING.

        `features` holds one row per user (user id and features); `context` optionally holds one
        encoded value per user row for context columns (e.g. location, device of the request).
        The user's features are unrolled (repeated) against every candidate's item features, a fresh item's
        (`fresh`) from the request.
        """
        import tensorflow as tf

        users, width = candidates.shape
        scores = np.full(candidates.shape, np.nan, dtype=np.float32)
        rows_per_call = max(1, RANKER_ROWS_PER_CALL // max(width, 1))
        for start in range(0, users, rows_per_call):
            block = candidates[start : start + rows_per_call]
            valid = block >= 0
            user_rows = np.repeat(np.arange(start, start + len(block)), width)[valid.reshape(-1)]
            items = block[valid]
            count = len(items)
            if not count:
                continue
            padding = padded_rows(count) - count  # the first pair again, its scores dropped
            user_rows = np.concatenate([user_rows, np.repeat(user_rows[:1], padding)])
            items = np.concatenate([items, np.repeat(items[:1], padding)])
            inputs = {}
            for column in self.columns.ranker_columns:
                if column in self.item_columns:
                    values = self._item_values(column, items, fresh)
                elif column in features:
                    values = np.asarray(features[column])[user_rows]
                elif context is not None and column in context:
                    values = np.asarray(context[column])[user_rows]
                else:
                    values = self.columns.missing(column, len(items))
                inputs[column] = tf.constant(self.columns.values(column, values))
            predicted = self.model(inputs, training=False).numpy().reshape(-1)[:count]
            block_scores = np.full(block.shape, np.nan, dtype=np.float32)
            block_scores[valid] = predicted
            scores[start : start + len(block)] = block_scores
        return scores

    def _item_values(self, column: str, items: np.ndarray, fresh: FreshItems | None) -> np.ndarray:
        """The column's values of these items: the catalog's, and a fresh item's own."""
        known = self.item_columns[column]
        if fresh is None or not (is_fresh := items >= fresh.offset).any():
            return known[items]
        values = np.empty((len(items), *known.shape[1:]), dtype=known.dtype)
        values[~is_fresh] = known[items[~is_fresh]]
        values[is_fresh] = self.columns.values(column, fresh.features[column])[items[is_fresh] - fresh.offset]
        return values


class RecommendationPipeline:
    """The models, index and feature arrays of one run, loaded once and kept in memory."""

    def __init__(self, artifacts: PipelineArtifacts, spec: DatasetSpec) -> None:
        self.spec = spec
        self.artifacts = artifacts
        self.columns = PipelineColumns.of_run(artifacts, spec)
        self.user_table = UserFeatureTable.read(artifacts.nvtabular_dir / USER_FEATURES_FILE, self.columns)
        self.catalog = ItemCatalog.read(artifacts.nvtabular_dir / ITEM_FEATURES_FILE, self.columns)
        self.item_embeddings = ItemEmbeddings.read(artifacts.two_tower_dir, len(self.catalog))
        self.query_tower = Tower.query(artifacts.two_tower_dir / "query_tower", self.columns)
        item_tower = artifacts.two_tower_dir / ITEM_TOWER_DIR  # absent in runs from before it was saved
        self.item_tower = Tower.item(item_tower, self.columns) if item_tower.exists() else None
        self.ranker = Ranker(artifacts.ranker_dir / "model", self.columns, self.catalog)
        self.index = load_index(artifacts.faiss_index_dir)
        # The item-to-item source and each user's history; absent in runs from before them.
        has_item_to_item = (artifacts.faiss_index_dir / NEIGHBOURS_FILE).exists()
        self.item_to_item = ItemToItem.load(artifacts.faiss_index_dir) if has_item_to_item else None
        self.histories = ItemsByUser.load(artifacts.faiss_index_dir / USER_HISTORY_FILE) if has_item_to_item else None

    @property
    def item_raw_ids(self) -> np.ndarray:
        return self.catalog.raw_ids

    @property
    def retrievable(self) -> np.ndarray:
        return self.item_embeddings.retrievable

    # -- features ---------------------------------------------------------------------------------

    def user_features(self, raw_user_ids: Sequence[int] | np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Encoded features of known users (model input names) and a mask of which ids are known."""
        return self.user_table.lookup(raw_user_ids)

    def encode_items(self, raw_item_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Encoded ids of raw item ids; MISSING for items the run does not know."""
        return self.catalog.encode(raw_item_ids)

    def raw_items(self, codes: np.ndarray, fresh: FreshItems | None = None) -> np.ndarray:
        return fresh.raw(self.catalog, codes) if fresh is not None else self.catalog.raw(codes)

    # -- stages -----------------------------------------------------------------------------------

    def embed_users(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        return self.query_tower.embed(features)

    def embed_items(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        """Item-tower embeddings of encoded item columns (a fresh item's, written through by the gateway)."""
        if self.item_tower is None:
            raise FileNotFoundError(f"{self.artifacts.two_tower_dir} has no item tower (an older run)")
        return self.item_tower.embed(features)

    def retrieve(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(encoded item ids, inner products), best first; -1 where the catalog has fewer than k items."""
        return search(self.index, queries, k)

    def score(self, features: Mapping[str, np.ndarray], candidates: np.ndarray,
              context: Mapping[str, np.ndarray] | None = None, fresh: FreshItems | None = None) -> np.ndarray:
        """Ranker scores of every (user row, candidate) pair; NaN where the candidate is MISSING."""
        return self.ranker.score(features, candidates, context, fresh)

    def similar_items(self, codes: np.ndarray, n: int, *, unavailable: np.ndarray | None = None,
                      fresh: FreshItems | None = None, raw_ids: np.ndarray | None = None,
                      ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Items nearest to each given item in the two-tower embedding space (itself and unavailable items excluded);
        with `fresh` and the items' `raw_ids`, a product added since the run is searched with its own embedding."""
        codes = np.asarray(codes, dtype=np.int64)
        queries, known = self.item_embeddings.queries(codes)
        if fresh is not None and raw_ids is not None:
            codes, queries, known = fresh.item_queries(raw_ids, codes, queries, known)
        ids = np.full((len(codes), n), MISSING, dtype=np.int64)
        similarity = np.full((len(codes), n), np.nan, dtype=np.float32)
        if known.any():
            found, distances = self.retrieve(queries[known], n + 1)  # n + 1: the item itself is usually first
            ids[known], similarity[known] = nearest_other_items(codes[known], found, distances, n,
                                                                unavailable=unavailable)  # fmt: skip
        return ids, similarity

    def candidates(self, features: Mapping[str, np.ndarray], *, top_k: int,
                   histories: Sequence[np.ndarray] | None = None, excluded: Sequence[np.ndarray] | None = None,
                   unavailable: np.ndarray | None = None, context: Mapping[str, np.ndarray] | None = None,
                   fresh: FreshItems | None = None) -> dict[str, np.ndarray]:  # fmt: skip
        """Retrieval (every source), filtering and scoring for a batch of known users: the candidates (MISSING
        pads) with their ranker, two-tower and item-to-item scores, aligned. `histories`: each user's positives
        (the item-to-item source's queries; None leaves that source out); `fresh`: items added since the run."""
        queries = self.embed_users(features)
        found, _ = self.retrieve(queries, top_k)
        candidates, inner, item_to_item, sources = add_fresh_candidates(
            *multi_source_candidates(found, queries, self.item_embeddings, self.item_to_item, histories),
            queries, fresh, top_k)  # fmt: skip
        candidates = filter_candidates(candidates, excluded=excluded, unavailable=unavailable)
        return {"candidates": candidates, "ranker_scores": self.score(features, candidates, context, fresh),
                "retrieval_scores": inner, "item_to_item_scores": item_to_item, "sources": sources}  # fmt: skip

    def recommend(self, features: Mapping[str, np.ndarray], *, top_k: int, top_n: int,
                  histories: Sequence[np.ndarray] | None = None,
                  excluded: Sequence[np.ndarray] | None = None, unavailable: np.ndarray | None = None,
                  context: Mapping[str, np.ndarray] | None = None, temperature: float = 0.0,
                  rng: np.random.Generator | None = None, promoted: np.ndarray | None = None,
                  promotion_threshold: float = 0.5, retrieval_weight: float = DEFAULT_RETRIEVAL_WEIGHT,
                  item_to_item_weight: float = DEFAULT_ITEM_TO_ITEM_WEIGHT,
                  source_weights: Sequence[float] = NO_SOURCE_WEIGHTS,
                  fresh: FreshItems | None = None) -> dict[str, np.ndarray]:  # fmt: skip
        """All four stages for a batch of known users; encoded item ids out (MISSING pads).

        `scores` are `blend_scores`'s (the ranker's alone with every weight 0), `click_probabilities` the
        ranker's P(click) of the same items.
        """
        found = self.candidates(features, top_k=top_k, histories=histories, excluded=excluded,
                                unavailable=unavailable, context=context, fresh=fresh)  # fmt: skip
        candidates = found["candidates"]
        scores = blend_scores(candidates, found["ranker_scores"], found["retrieval_scores"], retrieval_weight,
                              found["item_to_item_scores"], item_to_item_weight, sources=found["sources"],
                              source_weights=source_weights)  # fmt: skip
        items, ordered_scores, probabilities, clicks = order(
            candidates, scores, top_n, temperature=temperature, rng=rng, promoted=promoted,
            promotion_threshold=promotion_threshold, click_probabilities=found["ranker_scores"],
        )  # fmt: skip
        return {"candidates": candidates, "items": items, "scores": ordered_scores, "probabilities": probabilities,
                "click_probabilities": clicks}

"""Synthetic AliCCP-format data with planted, learnable structure.

Merlin's `generate_data("aliccp-raw")` gives AliCCP's columns with random labels (any model scores
AUC 0.5 on it). Here latent user and item factors drive the click probability, the categorical
features are noisy quantizations of those factors (so they carry signal), the position lowers the
click probability (position bias), and every test row's true click probability is written aside so
evaluation can report the best achievable (oracle) AUC.

Rows are generated and written in chunks: memory is bounded by the entity tables (users + items)
and one chunk, from 10k rows up to AliCCP's ~85M rows.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
from tqdm import tqdm

from recsys.outputs import atomic_output_dir
from recsys.spec import DatasetSpec, load_spec

# AliCCP's cardinalities (Merlin's aliccp-raw schema); capped by the number of users/items generated.
USER_FEATURE_CARDINALITY = {
    "user_shops": 116741, "user_profile": 98, "user_group": 14, "user_gender": 3, "user_age": 8,
    "user_consumption_1": 4, "user_consumption_2": 4, "user_is_occupied": 3, "user_geography": 5,
    "user_intentions": 33786, "user_brands": 58015, "user_categories": 6086,
}  # fmt: skip
ITEM_FEATURE_CARDINALITY = {"item_category": 8581, "item_shop": 604498, "item_brand": 208179, "item_intention": 96258}
# Combination features: (user feature, item feature) pairs, as AliCCP's user_item_* columns.
USER_ITEM_FEATURES = {
    "user_item_categories": ("user_categories", "item_category", 7735),
    "user_item_shops": ("user_shops", "item_shop", 384343),
    "user_item_brands": ("user_brands", "item_brand", 142632),
    "user_item_intentions": ("user_intentions", "item_intention", 74317),
}
LOCATIONS = ("DE", "FR", "ES", "IT", "NL", "PL", "SE", "AT", "BE", "CZ", "DK", "FI", "IE", "PT", "RO", "HU")
DEVICES = ("mobile", "desktop", "tablet", "app")
POSITIONS = 4
POSITION_BIAS = np.array([0.0, -0.35, -0.7, -1.05])  # logit penalty of positions 1..4
DAY = 86_400
START_TIMESTAMP = 1_704_067_200  # 2024-01-01T00:00:00Z: fixed so that a seed gives the same file
SPLIT_DAYS = 7  # train rows fall in the first week, test rows in the second (like AliCCP's split)


# At 50k rows the default rate (~9%) leaves about 3k training positives, too few for the two-tower to learn more
# than item popularity (the quality gate then rightly publishes nothing); this base logit gives about 24% clicks
# (8k positives). The end-to-end tests' data and `make demo` use it.
SMALL_DATA_BASE_LOGIT = -3.7
SMALL_DATA_CLICK_THROUGH_RATE = 0.24


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
    rows: int
    seed: int = 42
    users: int | None = None  # default: rows / 138, AliCCP's rows per user
    items: int | None = None  # default: rows / 17, AliCCP's rows per item
    factors: int = 8
    signal_strength: float = 2.0  # weight of the user-item affinity in the click logit
    base_logit: float = -5.5  # with personalized exposure: a click-through rate near 9% (AliCCP: about 4%)
    feature_noise: float = 0.15  # share of feature values replaced by random ones
    null_row_fraction: float = 0.2  # rows with more than five null features (AliCCP lost ~22% to cleaning)
    light_null_fraction: float = 0.1  # rows with one or two nulls, which cleaning keeps
    # AliCCP logs the impressions of a running recommender: a share of each user's impressions come
    # from items matching their taste, the rest from global popularity. Without it, which items a user
    # sees would carry no trace of the user, and retrieval could learn little beyond popularity.
    personalized_exposure: float = 0.5
    exposure_pool: int = 50  # items a user's personalized impressions are drawn from
    test_fraction: float = 0.5  # AliCCP's 1:1 split
    chunk_rows: int = 500_000

    @property
    def n_users(self) -> int:
        return self.users or max(50, self.rows // 138)

    @property
    def n_items(self) -> int:
        return self.items or max(100, self.rows // 17)


def _quantize(projection: np.ndarray, cardinality: int) -> np.ndarray:
    """Map a projection to `cardinality` equally filled buckets (ranks, so any distribution works)."""
    ranks = np.empty(len(projection), dtype=np.int64)
    ranks[np.argsort(projection, kind="stable")] = np.arange(len(projection))
    return ranks * cardinality // len(projection)


def _noisy_feature(rng: np.random.Generator, factors: np.ndarray, cardinality: int, noise: float) -> np.ndarray:
    values = _quantize(factors @ rng.normal(size=factors.shape[1]), cardinality)
    replace = rng.random(len(values)) < noise
    values[replace] = rng.integers(0, cardinality, replace.sum())
    return values + 1  # AliCCP's ids start at 1


def _popularity_cdf(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1) ** exponent
    rng.shuffle(weights)  # which entities are popular is random
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]


@dataclasses.dataclass
class Entities:
    user_factors: np.ndarray
    item_factors: np.ndarray
    user_bias: np.ndarray
    item_bias: np.ndarray
    user_features: dict[str, np.ndarray]
    item_features: dict[str, np.ndarray]
    user_location: np.ndarray
    user_device: np.ndarray
    user_cdf: np.ndarray
    item_cdf: np.ndarray
    exposure_pools: np.ndarray  # users x exposure_pool item indices


def _exposure_pools(config: GeneratorConfig, user_factors: np.ndarray, item_factors: np.ndarray,
                    item_cdf: np.ndarray) -> np.ndarray:  # fmt: skip
    """Per user, the best-matching items among a popularity-drawn sample (what an earlier recommender showed)."""
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 2]))
    n_items = len(item_factors)
    sample = min(n_items, 1000)
    pool = min(config.exposure_pool, sample)
    pools = np.empty((len(user_factors), pool), dtype=np.int64)
    for start in range(0, len(user_factors), 512):  # bounded memory: 512 users x 1000 items at a time
        block = user_factors[start : start + 512]
        candidates = np.searchsorted(item_cdf, rng.random((len(block), sample)), side="right").clip(0, n_items - 1)
        affinity = np.einsum("ud,ucd->uc", block, item_factors[candidates])
        best = np.argpartition(-affinity, pool - 1, axis=1)[:, :pool]
        pools[start : start + len(block)] = np.take_along_axis(candidates, best, axis=1)
    return pools


def make_entities(config: GeneratorConfig) -> Entities:
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 0]))
    n_users, n_items, d = config.n_users, config.n_items, config.factors
    user_factors = rng.normal(size=(n_users, d)).astype(np.float32)
    item_factors = rng.normal(size=(n_items, d)).astype(np.float32)
    user_features = {
        name: _noisy_feature(rng, user_factors, min(cardinality, max(2, n_users // 4)), config.feature_noise)
        for name, cardinality in USER_FEATURE_CARDINALITY.items()
    }
    item_features = {
        name: _noisy_feature(rng, item_factors, min(cardinality, max(2, n_items // 4)), config.feature_noise)
        for name, cardinality in ITEM_FEATURE_CARDINALITY.items()
    }
    item_cdf = _popularity_cdf(rng, n_items, 0.8)
    return Entities(
        user_factors=user_factors,
        item_factors=item_factors,
        user_bias=rng.normal(0, 0.3, n_users).astype(np.float32),
        item_bias=rng.normal(0, 0.5, n_items).astype(np.float32),
        user_features=user_features,
        item_features=item_features,
        user_location=_noisy_feature(rng, user_factors, len(LOCATIONS), config.feature_noise) - 1,
        user_device=rng.integers(0, len(DEVICES), n_users),
        user_cdf=_popularity_cdf(rng, n_users, 0.5),
        item_cdf=item_cdf,
        exposure_pools=_exposure_pools(config, user_factors, item_factors, item_cdf),
    )


def click_logit(entities: Entities, config: GeneratorConfig, users: np.ndarray, items: np.ndarray,
                positions: np.ndarray) -> np.ndarray:  # fmt: skip
    affinity = np.einsum("ij,ij->i", entities.user_factors[users], entities.item_factors[items])
    return (
        config.base_logit
        + config.signal_strength * affinity / np.sqrt(config.factors)
        + entities.user_bias[users]
        + entities.item_bias[items]
        + POSITION_BIAS[positions - 1]
    )


def true_click_probabilities(entities: Entities, config: GeneratorConfig, user_ids: np.ndarray,
                             item_ids: np.ndarray, position: int = 1) -> np.ndarray:  # fmt: skip
    """(users x items) click probabilities of every pair of raw ids shown at `position` (`click_logit`'s).

    Raw ids are the generator's: entity index + 1. Evaluation uses them to judge any list by the
    clicks it would really get, not only by the clicks that were logged for the items shown.
    """
    users, items = np.asarray(user_ids, dtype=np.int64) - 1, np.asarray(item_ids, dtype=np.int64) - 1
    affinity = entities.user_factors[users].astype(np.float64) @ entities.item_factors[items].T.astype(np.float64)
    logit = (
        config.base_logit
        + config.signal_strength * affinity / np.sqrt(config.factors)
        + entities.user_bias[users][:, None]
        + entities.item_bias[items][None, :]
        + POSITION_BIAS[position - 1]
    )
    return 1.0 / (1.0 + np.exp(-logit))


def load_generation(directory: Path) -> tuple[GeneratorConfig, Entities] | None:
    """The generator's configuration and entities of a folder it wrote (None without `generation.json`)."""
    report = Path(directory) / "generation.json"
    if not report.exists():
        return None
    config = GeneratorConfig(**json.loads(report.read_text())["config"])
    return config, make_entities(config)


def _null_mask(rng: np.random.Generator, rows: int, n_features: int, config: GeneratorConfig) -> np.ndarray:
    """Rows x features mask: a share of rows get 6-9 nulls (dropped by cleaning), some get 1-2."""
    draw = rng.random(rows)
    nulls = np.zeros(rows, dtype=np.int64)
    heavy = draw < config.null_row_fraction
    light = (draw >= config.null_row_fraction) & (draw < config.null_row_fraction + config.light_null_fraction)
    nulls[heavy] = rng.integers(6, min(10, n_features + 1), heavy.sum())
    nulls[light] = rng.integers(1, 3, light.sum())
    order = rng.random((rows, n_features)).argsort(axis=1)
    return order < nulls[:, None]


def generate_chunk(entities: Entities, config: GeneratorConfig, spec: DatasetSpec, chunk_index: int, rows: int,
                   split: str) -> tuple[pa.Table, pa.Table]:  # fmt: skip
    """One chunk of rows as (raw table in spec column order, table of true click probabilities)."""
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 1, chunk_index]))
    users = np.searchsorted(entities.user_cdf, rng.random(rows), side="right").clip(0, config.n_users - 1)
    items = np.searchsorted(entities.item_cdf, rng.random(rows), side="right").clip(0, config.n_items - 1)
    personal = rng.random(rows) < config.personalized_exposure
    pool = entities.exposure_pools.shape[1]
    items[personal] = entities.exposure_pools[users[personal], rng.integers(0, pool, personal.sum())]
    positions = rng.integers(1, POSITIONS + 1, rows)
    probability = 1.0 / (1.0 + np.exp(-click_logit(entities, config, users, items, positions)))
    clicks = (rng.random(rows) < probability).astype(np.int8)
    # Conversions happen only after a click, more often for a strong affinity.
    conversions = (clicks == 1) & (rng.random(rows) < 0.5 * probability + 0.05)
    day_offset = 0 if split == "train" else SPLIT_DAYS
    timestamps = START_TIMESTAMP + day_offset * DAY + rng.integers(0, SPLIT_DAYS * DAY, rows)
    location = entities.user_location[users].copy()
    moved = rng.random(rows) < 0.05  # travelling users
    location[moved] = rng.integers(0, len(LOCATIONS), moved.sum())
    device = entities.user_device[users].copy()
    switched = rng.random(rows) < 0.15
    device[switched] = rng.integers(0, len(DEVICES), switched.sum())

    values: dict[str, np.ndarray] = {"user_id": users + 1, "item_id": items + 1}
    values.update({name: feature[users] for name, feature in entities.user_features.items()})
    values.update({name: feature[items] for name, feature in entities.item_features.items()})
    for name, (user_feature, item_feature, cardinality) in USER_ITEM_FEATURES.items():
        cross = values[user_feature].astype(np.int64) * 1_000_003 + values[item_feature]
        values[name] = cross % cardinality + 1
    values.update(position=positions, event_timestamp=timestamps, click=clicks, conversion=conversions.astype(np.int8))
    values["location"] = np.array(LOCATIONS)[location]
    values["device"] = np.array(DEVICES)[device]

    features = list(spec.features)
    nulls = _null_mask(rng, rows, len(features), config)
    null_of = {name: nulls[:, index] for index, name in enumerate(features)}
    arrays = [
        pa.array(values[name], type=pa.type_for_alias(type_name), mask=null_of.get(name))
        for name, type_name in spec.columns.items()
    ]
    raw = pa.Table.from_arrays(arrays, names=list(spec.columns))
    truth = pa.table({
        spec.user_id: values["user_id"], spec.item_id: values["item_id"], spec.timestamp: timestamps,
        "click_probability": probability.astype(np.float32), spec.primary_target: clicks,
    })  # fmt: skip
    return raw, truth


def histogram_auc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """AUC from per-bin counts of positives and negatives over a sorted score grid (bounded memory)."""
    negatives_below = np.cumsum(negatives) - negatives
    pairs = positives.sum() * negatives.sum()
    if pairs == 0:
        return float("nan")
    return float((positives * (negatives_below + 0.5 * negatives)).sum() / pairs)


AUC_BINS = 1_000_000


def generate_chunks(entities: Entities, config: GeneratorConfig, spec: DatasetSpec
                    ) -> Iterator[tuple[str, pa.Table, pa.Table]]:  # fmt: skip
    """(split, raw table, true click probabilities) of every chunk, train then test: what `generate_dataset` writes."""
    test_rows = int(config.rows * config.test_fraction)
    chunk_index = 0
    for split, total in {"train": config.rows - test_rows, "test": test_rows}.items():
        for start in range(0, total, config.chunk_rows):
            rows = min(config.chunk_rows, total - start)
            raw, truth = generate_chunk(entities, config, spec, chunk_index, rows, split)
            chunk_index += 1
            yield split, raw, truth


def generate_dataset(config: GeneratorConfig, out_dir: Path, spec: DatasetSpec | None = None,
                     progress: bool = True) -> dict:  # fmt: skip
    """Write train.csv, test.csv, generation.json and oracle_click_probability.csv into `out_dir`.

    The oracle file holds the true click probability of each test row, in test.csv's order.
    """
    spec = spec or load_spec()
    missing = [name for name in _generated_columns() if name not in spec.columns]
    if missing:
        raise ValueError(f"the generator writes AliCCP's columns; spec {spec.source} lacks {', '.join(missing)}")
    entities = make_entities(config)
    test_rows = int(config.rows * config.test_fraction)
    split_rows = {"train": config.rows - test_rows, "test": test_rows}
    schema = pa.schema([(name, pa.type_for_alias(type_name)) for name, type_name in spec.columns.items()])
    positives = np.zeros(AUC_BINS, dtype=np.int64)
    negatives = np.zeros(AUC_BINS, dtype=np.int64)
    clicks_total = 0
    out_dir = Path(out_dir)
    with (atomic_output_dir(out_dir) as staging, tqdm(total=config.rows, unit="rows", disable=not progress) as bar,
          pa_csv.CSVWriter(staging / "train.csv", schema) as train_writer,
          pa_csv.CSVWriter(staging / "test.csv", schema) as test_writer):  # fmt: skip
        truth_writer = None
        for split, raw, truth in generate_chunks(entities, config, spec):
            (train_writer if split == "train" else test_writer).write_table(raw)
            clicks_total += int(pa.compute.sum(truth[spec.primary_target]).as_py() or 0)
            if split == "test":
                truth_writer = truth_writer or pa_csv.CSVWriter(staging / "oracle_click_probability.csv", truth.schema)
                truth_writer.write_table(truth)
                bins = (truth["click_probability"].to_numpy() * (AUC_BINS - 1)).astype(np.int64)
                labels = truth[spec.primary_target].to_numpy()
                positives += np.bincount(bins[labels == 1], minlength=AUC_BINS)
                negatives += np.bincount(bins[labels == 0], minlength=AUC_BINS)
            bar.update(raw.num_rows)
        if truth_writer is not None:
            truth_writer.close()
        report = {
            "config": dataclasses.asdict(config),
            "users": config.n_users,
            "items": config.n_items,
            "rows": split_rows,
            "click_through_rate": clicks_total / max(config.rows, 1),
            "oracle_auc_test": histogram_auc(positives, negatives),
        }
        (staging / "generation.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _generated_columns() -> list[str]:
    return [
        "user_id", "item_id", *USER_FEATURE_CARDINALITY, *ITEM_FEATURE_CARDINALITY, *USER_ITEM_FEATURES,
        "position", "location", "device", "event_timestamp", "click", "conversion",
    ]  # fmt: skip

"""Train the two-tower retrieval model (trainer environment) and evaluate it against the whole catalog.

Trained on positive interactions only (the rows whose primary target is 1) with in-batch negatives
and, by default, the logQ sampling-bias correction (NVIDIA's multi-stage example builds the
positives filter but never applies it); `positives="shown"` trains on every logged row instead (what
was shown to whom: the exposure, measured by benchmarks/ranker_stacking.py). Evaluation is not the
in-batch metric Keras reports: every validation user's query embedding searches the embeddings of
every item in the catalog (exact inner-product search with Faiss), and recall@k and NDCG@k are
computed for k in 10, 20, 100, 500, with a popularity baseline on the same users; and again as the
served lists use retrieval ("unseen_" metrics): without the user's training items that the spec's
`exclude_seen` rule keeps out of their lists. Unseen recall@100 picks the best epoch.
Saves the query tower, the item embeddings (for the Faiss index) and the per-epoch history.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.retrieval_index import ITEM_EMBEDDINGS_FILE
from recsys.device import merlin_cpu
from recsys.outputs import atomic_output_dir
from recsys.parquet_io import nvtabular_part_files
from recsys.spec import DatasetSpec
from recsys.triton_repository import ITEM_TOWER_DIR

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

log = logging.getLogger(__name__)

CUTOFFS = (10, 20, 100, 500)
# With TwoTowerConfig.selection_cutoff: the metric that picks the best epoch; the plain recall where no validation
# user has an unseen positive (a validation split inside train, as a refit on train and validation has).
SELECTION_METRIC, FALLBACK_SELECTION_METRIC = "unseen_recall_at", "recall_at"
POSITIVES = ("clicked", "shown")  # see TwoTowerConfig.positives


@dataclasses.dataclass(frozen=True)
class TwoTowerConfig:
    tower_layers: tuple[int, ...] = (128, 64)
    epochs: int = 5
    batch_size: int = 512
    learning_rate: float = 3e-3
    # Yi et al.'s sampling-bias correction; measured on the 50k-row test data: recall@100 0.34 with it,
    # 0.18 without (popularity baseline 0.37).
    logq_sampling_correction: bool = True
    patience: int = 2  # epochs without a better validation recall before stopping
    selection_cutoff: int = 100  # the recall@k of unseen items that picks the best epoch (SELECTION_METRIC)
    seed: int = 0
    # The training pairs: "clicked", the rows whose primary target is 1; "shown", every logged row. Evaluation
    # and early stopping use the validation clicks either way.
    positives: str = "clicked"
    # Both towers L2-normalized (their dot product a cosine) and the in-batch softmax's temperature
    # (models.retrieval.build_two_tower). Chosen by benchmarks/two_tower_tuning.py on validation splits: on generated
    # rows (seed 6) unseen recall@100 0.334 against 0.305 for the plain dot product (two seeds each, ranges 0.001 and
    # 0.004); on ML-1M 0.473 for both.
    l2_normalize: bool = True
    logits_temperature: float = 0.1

    def __post_init__(self) -> None:
        if self.positives not in POSITIVES:
            raise ValueError(f"positives must be one of {', '.join(POSITIVES)}, got {self.positives!r}")
        if not self.logits_temperature > 0:
            raise ValueError(f"logits_temperature must be positive, got {self.logits_temperature}")
        if not self.tower_layers or min(self.tower_layers) < 1:
            raise ValueError(f"tower_layers must be positive layer widths, got {self.tower_layers}")


def training_pairs(train_frame: pd.DataFrame, target: str, columns: list[str], positives: str) -> pd.DataFrame:
    """The (user, item) rows the towers learn from, with `columns`: see TwoTowerConfig.positives."""
    rows = train_frame if positives == "shown" else train_frame.loc[train_frame[target] == 1]
    return rows[columns].reset_index(drop=True)


def _read(directory: Path) -> pd.DataFrame:
    import pandas as pd

    return pd.concat([pd.read_parquet(path) for path in nvtabular_part_files(directory)], ignore_index=True)


def ranking_metrics(top_items: np.ndarray, relevant: list[set[int]], cutoffs: tuple[int, ...] = CUTOFFS) -> dict:
    """Mean recall@k and NDCG@k (binary relevance) of ranked item lists, one row per user."""
    import numpy as np

    results: dict[str, float] = {}
    discounts = 1.0 / np.log2(np.arange(2, max(cutoffs) + 2))
    for k in cutoffs:
        recalls, ndcgs = [], []
        for items, truth in zip(top_items[:, :k], relevant, strict=True):
            hits = np.fromiter((item in truth for item in items), dtype=bool, count=len(items))
            recalls.append(hits.sum() / len(truth))
            ideal = discounts[: min(len(truth), k)].sum()
            ndcgs.append((discounts[: len(items)] * hits).sum() / ideal)
        results[f"recall_at_{k}"] = float(np.mean(recalls))
        results[f"ndcg_at_{k}"] = float(np.mean(ndcgs))
    return results


def seen_in(frame: pd.DataFrame, spec: DatasetSpec) -> dict[int, np.ndarray]:
    """Encoded ids of the items each encoded user id may never be recommended again after the rows of `frame`, by
    the spec's `exclude_seen` (every interaction, or the rows positive in its targets; by default purchases)."""
    import numpy as np

    targets = list(spec.seen_targets)
    if spec.excludes_every_interaction:
        rows = frame
    elif targets:
        rows = frame.loc[(frame[targets] == 1).any(axis=1)]
    else:
        return {}
    grouped = rows.groupby(spec.user_id)[spec.item_id]
    return {int(user): np.unique(items.to_numpy(dtype=np.int64)) for user, items in grouped}


def without_seen(top_items: np.ndarray, seen: list[np.ndarray], n: int) -> np.ndarray:
    """Each row's first n items that are not in its `seen` (padded with -1 where too few are left)."""
    import numpy as np

    kept = np.full((len(top_items), n), -1, dtype=np.int64)
    for row, (items, excluded) in enumerate(zip(top_items, seen, strict=True)):
        left = items[~np.isin(items, excluded)][:n]
        kept[row, : len(left)] = left
    return kept


def exact_top_k(queries: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """Row positions of the k items with the highest inner product, per query (Faiss flat index)."""
    import faiss
    import numpy as np

    index = faiss.IndexFlatIP(items.shape[1])
    index.add(np.ascontiguousarray(items, dtype=np.float32))
    _, positions = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, len(items)))
    return positions


def train_two_tower(nvtabular_dir: Path, output_dir: Path, spec: DatasetSpec,
                    config: TwoTowerConfig = TwoTowerConfig()) -> dict:  # fmt: skip
    import merlin.models.tf as mm
    import numpy as np
    import pandas as pd
    import tensorflow as tf
    from merlin.io import Dataset
    from merlin.schema import Tags

    from models.retrieval import build_two_tower, two_tower_schema

    tf.keras.utils.set_random_seed(config.seed)
    source = Path(nvtabular_dir)
    train_frame, valid_frame = _read(source / "train"), _read(source / "valid")
    target = spec.primary_target
    schema = two_tower_schema(Dataset(str(source / "train" / "part_0.parquet"), engine="parquet",
                                      cpu=merlin_cpu()).schema)
    user_columns = schema.select_by_tag(Tags.USER).column_names
    item_columns = schema.select_by_tag(Tags.ITEM).column_names
    positives = training_pairs(train_frame, target, user_columns + item_columns, config.positives)
    train = Dataset(positives, schema=schema, cpu=merlin_cpu())

    probabilities = None
    if config.logq_sampling_correction:
        cardinality = int(schema.select_by_tag(Tags.ITEM_ID).first.int_domain.max) + 1
        counts = np.bincount(positives[spec.item_id].to_numpy(), minlength=cardinality).astype("float64")
        probabilities = np.maximum(counts, 1.0) / counts.sum()  # unseen ids never occur as negatives anyway
    model = build_two_tower(schema, tower_layers=config.tower_layers, item_probabilities=probabilities,
                            logits_temperature=config.logits_temperature, l2_normalize=config.l2_normalize)
    model.compile(optimizer=tf.keras.optimizers.Adam(config.learning_rate))
    loader = mm.Loader(train, batch_size=config.batch_size, shuffle=True)

    # The catalog: every item of the training data with its latest features; ids are NVTabular-encoded.
    catalog = train_frame.drop_duplicates(spec.item_id, keep="last")[item_columns].reset_index(drop=True)
    valid_positives = valid_frame.loc[valid_frame[target] == 1]
    relevant_by_user = valid_positives.groupby(spec.user_id)[spec.item_id].agg(set)
    users = valid_frame.drop_duplicates(spec.user_id, keep="last").set_index(spec.user_id).loc[relevant_by_user.index]
    users = users.reset_index()[user_columns]
    relevant = list(relevant_by_user.to_numpy())

    def embed(encoder: tf.keras.Model, frame: pd.DataFrame, tag: Tags, id_column: str) -> pd.DataFrame:
        """The tower's output for each row of `frame`, indexed by `id_column`, as Merlin's candidate_embeddings and
        query_embeddings compute it (a Loader in order, the encoder called on each batch), without their save and
        reload of the encoder, which cost about 5 s each per epoch."""
        loader = mm.Loader(Dataset(frame, schema=schema.select_by_tag(tag), cpu=merlin_cpu()), batch_size=4096,
                           shuffle=False)
        outputs = np.concatenate([encoder(inputs).numpy() for inputs, _ in loader])
        if len(outputs) != len(frame):
            raise RuntimeError(f"the {tag.value} tower encoded {len(outputs)} of {len(frame)} rows")
        index = pd.Index(frame[id_column].to_numpy(), name=id_column)
        return pd.DataFrame(outputs, index=index, columns=[str(column) for column in range(outputs.shape[1])])

    # The served lists never hold an item the spec's `exclude_seen` rule removes (for ML-1M every rated movie), so
    # retrieval is also measured as they use it ("unseen_" metrics): each validation user's training items of that
    # rule left out of the ranking and of the relevant items (users with none left are not counted). The epoch is
    # chosen on that measure; it equals the plain one where nothing is excluded.
    empty = np.empty(0, dtype=np.int64)
    seen_by_user = seen_in(train_frame, spec)
    seen = [seen_by_user.get(int(user), empty) for user in relevant_by_user.index]
    unseen_relevant = [truth - set(excluded.tolist()) for truth, excluded in zip(relevant, seen, strict=True)]
    counted = np.array([bool(truth) for truth in unseen_relevant], dtype=bool)
    most_seen = max((len(items) for items in seen), default=0)  # how much deeper to search so that k are left

    selection = f"{SELECTION_METRIC if counted.any() else FALLBACK_SELECTION_METRIC}_{config.selection_cutoff}"

    def unseen_metrics(top_items: np.ndarray) -> dict:
        if not counted.any():
            return {}
        top = without_seen(top_items, seen, max(CUTOFFS))[counted]
        kept = [truth for truth, keep in zip(unseen_relevant, counted, strict=True) if keep]
        return {f"unseen_{key}": value for key, value in ranking_metrics(top, kept).items()}

    def evaluate() -> tuple[dict, pd.DataFrame, pd.DataFrame]:
        # Items by id (as Merlin's set_index sorted them); users in the order of `relevant`.
        item_embeddings = embed(model.candidate_encoder, catalog, Tags.ITEM, spec.item_id).sort_index()
        query_embeddings = embed(model.query_encoder, users, Tags.USER, spec.user_id)
        item_ids = item_embeddings.index.to_numpy()
        positions = exact_top_k(query_embeddings.to_numpy(), item_embeddings.to_numpy(), max(CUTOFFS) + most_seen)
        top_items = item_ids[positions]
        return ({**ranking_metrics(top_items[:, : max(CUTOFFS)], relevant), **unseen_metrics(top_items)},
                item_embeddings, query_embeddings)  # fmt: skip

    history = []
    best: dict[str, Any] = {"recall": -1.0}
    started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        epoch_start = time.perf_counter()
        fitted = model.fit(loader, epochs=1, verbose=0)
        seconds = time.perf_counter() - epoch_start
        metrics, item_embeddings, _ = evaluate()
        row = {"epoch": epoch, "train_loss": float(fitted.history["loss"][-1]), "seconds": seconds, **metrics}
        history.append(row)
        log.info("train_two_tower epoch %d: %s", epoch, json.dumps(row))
        # Whole-catalog recall of unseen items, not the training loss, decides: with few positives the towers overfit
        # fast.
        if metrics[selection] > best["recall"]:
            best = {"recall": metrics[selection], "epoch": epoch,
                    "weights": model.get_weights(), "embeddings": item_embeddings}  # fmt: skip
        elif epoch - best["epoch"] >= config.patience:
            log.info("early stopping: no better %s for %d epochs", selection, config.patience)
            break
    model.set_weights(best["weights"])
    item_embeddings = best["embeddings"]

    popular = train_frame.loc[train_frame[target] == 1, spec.item_id].value_counts().index.to_numpy()
    popular = popular[: max(CUTOFFS) + most_seen]
    popular_lists = np.tile(popular, (len(users), 1))
    popularity = {**ranking_metrics(popular_lists, relevant), **unseen_metrics(popular_lists)}
    with atomic_output_dir(Path(output_dir)) as staging:
        model.query_encoder.save(str(staging / "query_tower"))
        # The item tower embeds products added after the run, so the online path can retrieve and rank them.
        model.candidate_encoder.save(str(staging / ITEM_TOWER_DIR))
        embeddings = item_embeddings.reset_index().rename(columns={"index": spec.item_id})
        embeddings.columns = [str(column) for column in embeddings.columns]
        embeddings.to_parquet(staging / ITEM_EMBEDDINGS_FILE, index=False)
        result = {
            "config": dataclasses.asdict(config),
            "positives": len(positives),
            "catalog_items": len(catalog),
            "validation_users": len(users),
            "validation_users_with_unseen_positives": int(counted.sum()),
            "selection_metric": selection,
            "history": history,
            "best_epoch": best["epoch"],
            "best": history[best["epoch"] - 1],
            "popularity_baseline": popularity,
            "query_columns": user_columns,
            "item_columns": item_columns,
            "embedding_dim": int(item_embeddings.shape[1]),
            "train_samples_per_second": len(positives) * len(history) / sum(row["seconds"] for row in history),
            "seconds": time.perf_counter() - started,
        }
        (staging / "history.json").write_text(json.dumps(result, indent=2) + "\n")
    log.info("train_two_tower: best epoch %d by %s, %.4f (popularity %.4f)", best["epoch"], selection,
             history[best["epoch"] - 1][selection], popularity[selection])  # fmt: skip
    return result

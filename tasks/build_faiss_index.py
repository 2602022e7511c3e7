"""Build the retrieval indexes: the Faiss index of the item embeddings the two-tower model wrote, and the
item-to-item source (EASE neighbours, `models/item_to_item.py`) from the train split's positives.

One metric on purpose: inner product, the score the two towers were trained with (NVIDIA's example
builds IVF with inner product while its text says L2). Small catalogs get an exact flat index; above
`exact_max_items` an IVF index, whose recall@k against exact search is measured on a sample of queries
and written next to it, so a reviewer sees what the approximation costs. Ids in the index are the
NVTabular-encoded item ids, so search results feed the ranker directly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.item_to_item import ItemToItem, ItemToItemConfig
from models.retrieval_index import INDEX_FILE, read_item_embeddings
from recsys.device import index_to_cpu, index_to_gpus, select_tensorflow_device
from recsys.outputs import atomic_output_dir
from recsys.spec import DatasetSpec, load_spec

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

@dataclasses.dataclass(frozen=True)
class FaissIndexConfig:
    exact_max_items: int = 100_000  # a flat scan of 100k x 64 floats takes a few ms per query batch
    nlist: int | None = None  # IVF cells; default 4 * sqrt(items), Faiss's rule of thumb
    nprobe: int = 32  # cells visited per query: the speed/recall trade-off, measured below
    recall_k: int = 100
    recall_queries: int = 2_000
    seed: int = 0


def build_index(ids: np.ndarray, embeddings: np.ndarray, config: FaissIndexConfig) -> tuple[Any, dict]:
    """The index of the embeddings, built on the GPUs Faiss has (`recsys.device.index_to_gpus`), else on the CPU;
    `recsys.device.index_to_cpu` gives the CPU index to write."""
    import faiss

    dim = embeddings.shape[1]
    if len(ids) <= config.exact_max_items:
        index = index_to_gpus(faiss.IndexIDMap2(faiss.IndexFlatIP(dim)))
        index.add_with_ids(embeddings, ids)
        return index, {"kind": "flat", "items": len(ids), "dim": dim}
    nlist = config.nlist or max(1, int(4 * math.sqrt(len(ids))))
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.nprobe = min(config.nprobe, nlist)  # copied with the index to and from the GPUs
    ivf.cp.seed = config.seed
    index = index_to_gpus(ivf)  # untrained: k-means and the inverted lists run where the index is
    if index is not ivf and hasattr(index, "cp"):  # one GPU: its own clustering parameters
        index.cp.seed = config.seed
    index.train(embeddings)
    index.add_with_ids(embeddings, ids)
    return index, {"kind": "ivf_flat", "items": len(ids), "dim": dim, "nlist": nlist, "nprobe": ivf.nprobe}


def recall_against_exact(index: Any, ids: np.ndarray, embeddings: np.ndarray, queries: np.ndarray, k: int) -> float:
    """Share of the exact top-k (flat inner-product search) that the index also returns."""
    import faiss
    import numpy as np

    exact = index_to_gpus(faiss.IndexIDMap2(faiss.IndexFlatIP(embeddings.shape[1])))
    exact.add_with_ids(embeddings, ids)
    k = min(k, len(ids))
    _, truth = exact.search(queries, k)
    _, found = index.search(queries, k)
    hits = sum(len(np.intersect1d(row_truth, row_found)) for row_truth, row_found in zip(truth, found, strict=True))
    return hits / truth.size


def build_item_to_item(nvtabular_dir: Path, spec: DatasetSpec, config: ItemToItemConfig,
                       output_dir: Path) -> dict:  # fmt: skip
    """The item-to-item source (`models/item_to_item.py`) from the train split's positives, and every user's
    positives of train and valid in time order (their queries at serving time), written into `output_dir`.

    The lambda and the recency the config leaves open are chosen on validation users: each lambda of
    `REGULARIZATIONS` is fit, and the pair (with each of `RECENCIES`) whose own lists have the best NDCG@10 is
    kept (`choose_item_to_item`)."""
    import numpy as np
    import pyarrow.parquet as pq

    from models.item_to_item import RECENCIES, REGULARIZATIONS, ItemToItem
    from models.online_pipeline import USER_HISTORY_FILE, ItemsByUser
    from tasks.batch_score import positives_by_user

    started = time.perf_counter()
    catalog_size = pq.ParquetFile(Path(nvtabular_dir) / "item_features.parquet").metadata.num_rows
    train = positives_by_user(nvtabular_dir, spec, ("train",))
    empty = np.empty(0, dtype=np.int64)
    users = np.concatenate([np.full(len(items), user, dtype=np.int64) for user, items in train.items()] or [empty])
    items = np.concatenate(list(train.values()) or [empty])
    size = max(catalog_size, int(items.max(initial=0)) + 1)
    lambdas = REGULARIZATIONS if config.regularization is None else (config.regularization,)
    recencies = RECENCIES if config.recency is None else (config.recency,)
    fits = (ItemToItem.fit(users, items, size, dataclasses.replace(config, regularization=value)) for value in lambdas)
    source, chosen_on = choose_item_to_item(fits, recencies, train, nvtabular_dir, spec)
    source.save(output_dir)
    histories = ItemsByUser.from_mapping(positives_by_user(nvtabular_dir, spec))
    histories.save(Path(output_dir) / USER_HISTORY_FILE)
    return {"item_to_item_items": int((np.diff(source.matrix.indptr) > 0).sum()),
            "item_to_item_weights": int(source.matrix.nnz), "users_with_history": len(histories.user_ids),
            "item_to_item_regularization": source.config.regularization,
            "item_to_item_recency": source.config.recency,
            "item_to_item_validation_ndcg_at_10": chosen_on,
            "item_to_item_seconds": time.perf_counter() - started}  # fmt: skip


def choose_item_to_item(
    fits: Iterable[ItemToItem], recencies: Sequence[float], train: dict[int, np.ndarray], nvtabular_dir: Path,
    spec: DatasetSpec, users_at_most: int = 3_000,
) -> tuple[ItemToItem, dict[str, float]]:
    """The fit and recency whose own top 10 has the best NDCG@10 on validation (ties: the first), with the
    recency in its config, and each pair's score ("lambda/recency").

    As the lists are made: each sampled validation user's train positives are the query, what they saw in train
    (the spec's `exclude_seen`) and their train positives are left out, their other validation positives count.
    Without validation positives to choose on, the first lambda and recency.
    """
    import numpy as np

    from recsys.ranking_metrics import list_metrics
    from tasks.batch_score import positives_by_user, seen_items_by_user

    empty = np.empty(0, dtype=np.int64)
    seen = seen_items_by_user(nvtabular_dir, spec, ("train",))
    excluded = {user: np.union1d(seen.get(user, empty), items) for user, items in train.items()}
    relevant = {user: np.setdiff1d(items, excluded.get(user, empty))
                for user, items in positives_by_user(nvtabular_dir, spec, ("valid",)).items()}  # fmt: skip
    users = np.array(sorted(user for user, items in relevant.items() if len(items) and user in train), dtype=np.int64)
    users = np.sort(np.random.default_rng(0).choice(users, size=min(users_at_most, len(users)), replace=False))
    scores: dict[str, float] = {}
    targets = [relevant[int(user)] for user in users]
    best: tuple[float, ItemToItem, float] | None = None  # (score, fit, recency)
    for fit in fits:
        if not len(users):  # nothing to choose on: the first lambda and recency
            return fit.with_recency(recencies[0]), scores
        for recency in recencies:
            score = list_metrics(_own_top(fit, recency, users, train, excluded), targets, 10)["ndcg_at_10"]
            scores[f"{fit.config.regularization:g}/{recency:g}"] = score
            if best is None or score > best[0]:
                best = (score, fit, recency)
    assert best is not None
    _, fit, recency = best
    log.info("build_faiss_index: item-to-item lambda %g, recency %g chosen on %d validation users (NDCG@10 %s)",
             fit.config.regularization, recency, len(users), json.dumps(scores))  # fmt: skip
    return fit.with_recency(recency), scores


def _own_top(fit: ItemToItem, recency: float, users: np.ndarray, train: dict[int, np.ndarray],
             excluded: dict[int, np.ndarray]) -> np.ndarray:  # fmt: skip
    """The source's own top 10 for the users, their excluded items and Categorify's null code left out."""
    import numpy as np

    width = min(10, fit.catalog_size)
    top = np.empty((len(users), width), dtype=np.int64)
    rows = max(1, 2**25 // fit.catalog_size)  # dense rows of the catalog, at most 256 MB at a time
    for start in range(0, len(users), rows):
        block = users[start : start + rows]
        dense = fit.user_scores([train[int(user)] for user in block], recency=recency).toarray()
        for row, user in enumerate(block):
            blocked = excluded[int(user)]
            dense[row, blocked[blocked < dense.shape[1]]] = -np.inf
        dense[:, 0] = -np.inf  # Categorify's null code is no item
        best = np.argpartition(-dense, width - 1, axis=1)[:, :width]  # then only those ten sorted
        ranked = np.argsort(-np.take_along_axis(dense, best, axis=1), axis=1, kind="stable")
        top[start : start + len(block)] = np.take_along_axis(best, ranked, axis=1)
    return top


def build_faiss_index(two_tower_dir: Path, output_dir: Path, config: FaissIndexConfig = FaissIndexConfig(),
                      queries: np.ndarray | None = None, nvtabular_dir: Path | None = None,
                      spec: DatasetSpec | None = None,
                      item_to_item: ItemToItemConfig | None = None) -> dict:  # fmt: skip
    """Index `two_tower_dir/item_embeddings.parquet` into `output_dir/items.faiss` with `_metrics.json`.

    `queries` (user embeddings) measure the recall of an approximate index; without them, a sample of
    the item embeddings stands in as queries. With `nvtabular_dir` (and its spec), the item-to-item source
    is built next to it (`build_item_to_item`), the other retrieval source of the pipeline.
    """
    import faiss
    import numpy as np

    ids, embeddings = read_item_embeddings(two_tower_dir)
    started = time.perf_counter()
    index, metrics = build_index(ids, embeddings, config)
    metrics["build_seconds"] = time.perf_counter() - started
    if metrics["kind"] != "flat":
        if queries is None:
            rng = np.random.default_rng(config.seed)
            queries = embeddings[rng.choice(len(ids), size=min(config.recall_queries, len(ids)), replace=False)]
        sample = np.ascontiguousarray(queries[: config.recall_queries], dtype=np.float32)
        metrics[f"recall_at_{config.recall_k}_vs_exact"] = recall_against_exact(
            index, ids, embeddings, sample, config.recall_k
        )
        metrics["recall_queries"] = len(sample)
    else:
        metrics[f"recall_at_{config.recall_k}_vs_exact"] = 1.0
    with atomic_output_dir(Path(output_dir)) as staging:
        faiss.write_index(index_to_cpu(index), str(staging / INDEX_FILE))  # a GPU index cannot be written
        if nvtabular_dir is not None:
            metrics |= build_item_to_item(nvtabular_dir, spec or load_spec(), item_to_item or ItemToItemConfig(),
                                          staging)  # fmt: skip
        (staging / "_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("build_faiss_index: %s", json.dumps(metrics))
    return metrics


def user_queries(nvtabular_dir: Path, two_tower_dir: Path, spec: DatasetSpec, limit: int) -> np.ndarray:
    """Query-tower embeddings of the first `limit` users of the feature table: realistic recall queries."""
    import numpy as np
    import pandas as pd
    import tensorflow as tf

    from models.online_pipeline import model_input

    select_tensorflow_device()  # RECSYS_DEVICE, before the tower's first op
    history = json.loads((Path(two_tower_dir) / "history.json").read_text())
    users = pd.read_parquet(Path(nvtabular_dir) / "user_features.parquet").head(limit)
    users[spec.user_id] = users[f"{spec.user_id}_encoded"]  # the model's id input is the encoded id
    tower = tf.keras.models.load_model(str(Path(two_tower_dir) / "query_tower"))
    inputs = {column: tf.constant(model_input(users[column], continuous=column in spec.continuous,
                                              width=_list_width(spec, column)))
              for column in history["query_columns"]}  # fmt: skip
    return np.ascontiguousarray(tower(inputs, training=False).numpy(), dtype=np.float32)


def _list_width(spec: DatasetSpec, column: str) -> int | None:
    return spec.multi_valued[column].max_tokens if column in spec.multi_valued else None

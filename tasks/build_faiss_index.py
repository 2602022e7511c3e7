"""Build the Faiss index of the item embeddings the two-tower model wrote.

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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recsys.outputs import atomic_output_dir
from recsys.spec import DatasetSpec

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

INDEX_FILE = "items.faiss"


@dataclasses.dataclass(frozen=True)
class FaissIndexConfig:
    exact_max_items: int = 100_000  # a flat scan of 100k x 64 floats takes a few ms per query batch
    nlist: int | None = None  # IVF cells; default 4 * sqrt(items), Faiss's rule of thumb
    nprobe: int = 32  # cells visited per query: the speed/recall trade-off, measured below
    recall_k: int = 100
    recall_queries: int = 2_000
    seed: int = 0


def read_item_embeddings(two_tower_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(encoded item ids, float32 embeddings) as train_two_tower wrote them."""
    import numpy as np
    import pandas as pd

    frame = pd.read_parquet(Path(two_tower_dir) / "item_embeddings.parquet")
    ids = frame.iloc[:, 0].to_numpy(dtype=np.int64)
    return ids, np.ascontiguousarray(frame.iloc[:, 1:].to_numpy(dtype=np.float32))


def build_index(ids: np.ndarray, embeddings: np.ndarray, config: FaissIndexConfig) -> tuple[Any, dict]:
    import faiss

    dim = embeddings.shape[1]
    if len(ids) <= config.exact_max_items:
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        index.add_with_ids(embeddings, ids)
        return index, {"kind": "flat", "items": len(ids), "dim": dim}
    nlist = config.nlist or max(1, int(4 * math.sqrt(len(ids))))
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.cp.seed = config.seed
    ivf.train(embeddings)
    ivf.add_with_ids(embeddings, ids)
    ivf.nprobe = min(config.nprobe, nlist)
    return ivf, {"kind": "ivf_flat", "items": len(ids), "dim": dim, "nlist": nlist, "nprobe": ivf.nprobe}


def recall_against_exact(index: Any, ids: np.ndarray, embeddings: np.ndarray, queries: np.ndarray, k: int) -> float:
    """Share of the exact top-k (flat inner-product search) that the index also returns."""
    import faiss
    import numpy as np

    exact = faiss.IndexIDMap2(faiss.IndexFlatIP(embeddings.shape[1]))
    exact.add_with_ids(embeddings, ids)
    k = min(k, len(ids))
    _, truth = exact.search(queries, k)
    _, found = index.search(queries, k)
    hits = sum(len(np.intersect1d(row_truth, row_found)) for row_truth, row_found in zip(truth, found, strict=True))
    return hits / truth.size


def build_faiss_index(two_tower_dir: Path, output_dir: Path, config: FaissIndexConfig = FaissIndexConfig(),
                      queries: np.ndarray | None = None) -> dict:  # fmt: skip
    """Index `two_tower_dir/item_embeddings.parquet` into `output_dir/items.faiss` with `_metrics.json`.

    `queries` (user embeddings) measure the recall of an approximate index; without them, a sample of
    the item embeddings stands in as queries.
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
        faiss.write_index(index, str(staging / INDEX_FILE))
        (staging / "_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("build_faiss_index: %s", json.dumps(metrics))
    return metrics


def user_queries(nvtabular_dir: Path, two_tower_dir: Path, spec: DatasetSpec, limit: int) -> np.ndarray:
    """Query-tower embeddings of the first `limit` users of the feature table: realistic recall queries."""
    import numpy as np
    import pandas as pd
    import tensorflow as tf

    history = json.loads((Path(two_tower_dir) / "history.json").read_text())
    users = pd.read_parquet(Path(nvtabular_dir) / "user_features.parquet").head(limit)
    users[spec.user_id] = users[f"{spec.user_id}_encoded"]  # the model's id input is the encoded id
    tower = tf.keras.models.load_model(str(Path(two_tower_dir) / "query_tower"))
    inputs = {column: tf.constant(users[column].to_numpy(dtype=np.int64)) for column in history["query_columns"]}
    return np.ascontiguousarray(tower(inputs, training=False).numpy(), dtype=np.float32)


def load_index(index_dir: Path) -> Any:
    import faiss

    return faiss.read_index(str(Path(index_dir) / INDEX_FILE))

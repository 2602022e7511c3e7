"""The files retrieval is served from, one place for their names and readers: the two-tower's item embeddings
(written by `tasks/train_two_tower.py`) and the Faiss index of them (written by `tasks/build_faiss_index.py`).

Read by batch scoring and the demo data (`models/online_pipeline.py`), the Triton stages and the Triton export.
An index read from disk is searched on the GPUs Faiss has (`recsys.device`, RECSYS_DEVICE), else on the CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from recsys.device import FAISS_GPU_MAX_K, index_to_gpus

if TYPE_CHECKING:
    import numpy as np

ITEM_EMBEDDINGS_FILE = "item_embeddings.parquet"  # encoded item id column, then one float column per dimension
INDEX_FILE = "items.faiss"  # faiss.write_index of an inner-product index whose ids are encoded item ids


def read_item_embeddings(two_tower_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(encoded item ids, float32 embeddings) as train_two_tower wrote them."""
    import numpy as np
    import pandas as pd

    frame = pd.read_parquet(Path(two_tower_dir) / ITEM_EMBEDDINGS_FILE)
    ids = frame.iloc[:, 0].to_numpy(dtype=np.int64)
    return ids, np.ascontiguousarray(frame.iloc[:, 1:].to_numpy(dtype=np.float32))


class SearchIndex:
    """A Faiss index read from disk, with a copy on the GPUs Faiss has (`recsys.device.index_to_gpus`; none on the
    CPU). A search runs on the GPUs, or on the CPU index when there are none or it asks for more neighbours than
    Faiss selects on a GPU (`FAISS_GPU_MAX_K`)."""

    def __init__(self, cpu_index: Any) -> None:
        self.cpu = cpu_index
        on_gpus = index_to_gpus(cpu_index)
        self.gpu = None if on_gpus is cpu_index else on_gpus

    @property
    def d(self) -> int:
        return int(self.cpu.d)

    @property
    def ntotal(self) -> int:
        return int(self.cpu.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Faiss's (distances, ids) of the k nearest of each query row."""
        index = self.gpu if self.gpu is not None and k <= FAISS_GPU_MAX_K else self.cpu
        return index.search(queries, k)


def load_index(index_dir: Path) -> SearchIndex:
    import faiss

    return SearchIndex(faiss.read_index(str(Path(index_dir) / INDEX_FILE)))

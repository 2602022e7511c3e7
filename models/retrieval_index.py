"""The files retrieval is served from, one place for their names and readers: the two-tower's item embeddings
(written by `tasks/train_two_tower.py`) and the Faiss index of them (written by `tasks/build_faiss_index.py`).

Read by batch scoring and the demo data (`models/online_pipeline.py`), the Triton stages and the Triton export.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

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


def load_index(index_dir: Path) -> Any:
    import faiss

    return faiss.read_index(str(Path(index_dir) / INDEX_FILE))

"""Triton model `item_lookup`: raw item ids to encoded ids and their two-tower embeddings (similar products).

Items the run does not know, or that have no embedding, come back with code -1, a zero embedding and
`known_items` False. `search_k` (top_n + 1) tells the index search to fetch one more than asked, as
the item itself is usually its own nearest neighbour.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from models.online_pipeline import ITEM_FEATURES_FILE, MISSING, ItemCatalog, ItemEmbeddings
from serving.triton_models.stage import RequestError, StageModel, ids_vector, scalar


class TritonPythonModel(StageModel):
    def load(self) -> None:
        self.catalog = ItemCatalog.read(self.directory / ITEM_FEATURES_FILE, self.columns)
        self.embeddings = ItemEmbeddings.read(self.directory, len(self.catalog))
        self.default_top_n = int(self.parameters["top_n"])

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        codes = self.catalog.encode(ids_vector(inputs, "raw_item_ids"))
        top_n = scalar(inputs, "top_n", self.default_top_n, int)
        if top_n < 1:
            raise RequestError(f"top_n must be at least 1, got {top_n}")
        queries, known = self.embeddings.queries(codes)
        return {
            "item_codes": np.where(known, codes, MISSING),
            "query_embeddings": queries,
            "search_k": np.array([top_n + 1], dtype=np.int32),
            "known_items": known,
        }

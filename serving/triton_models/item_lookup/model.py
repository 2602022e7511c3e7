"""Triton model `item_lookup`: raw item ids to encoded ids and their two-tower embeddings (similar products).

Items the run does not know, or that have no embedding, come back with code -1, a zero embedding and
`known_items` False, except a product added since the run that the request sends (`fresh_item_*`, as to
`recommend`): it is searched with its own item-tower embedding, under its own code (`FreshItems.item_queries`).
`search_k` (top_n + 1) tells the index search to fetch one more than asked, as
the item itself is usually its own nearest neighbour.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from models.online_pipeline import ITEM_FEATURES_FILE, MISSING, ItemCatalog, ItemEmbeddings
from serving.triton_models.stage import RequestError, StageModel, fresh_items, ids_vector, scalar


class TritonPythonModel(StageModel):
    def load(self) -> None:
        self.catalog = ItemCatalog.read(self.directory / ITEM_FEATURES_FILE, self.columns)
        self.embeddings = ItemEmbeddings.read(self.directory, len(self.catalog))
        self.default_top_n = int(self.parameters["top_n"])

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raw_ids = ids_vector(inputs, "raw_item_ids")
        codes = self.catalog.encode(raw_ids)
        top_n = scalar(inputs, "top_n", self.default_top_n, int)
        if top_n < 1:
            raise RequestError(f"top_n must be at least 1, got {top_n}")
        queries, known = self.embeddings.queries(codes)
        codes = np.where(known, codes, MISSING)  # similar_items leaves an unknown item's row empty
        fresh = fresh_items(inputs, self.columns)
        if fresh is not None:
            codes, queries, known = fresh.item_queries(raw_ids, codes, queries, known)
        return {
            "item_codes": codes,
            "query_embeddings": queries,
            "search_k": np.array([top_n + 1], dtype=np.int32),
            "known_items": known,
        }

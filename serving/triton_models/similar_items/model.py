"""Triton model `similar_items`: each item's nearest other items, raw ids out.

`models.online_pipeline.nearest_other_items` on the index search of the item's embedding: the item
itself, Faiss's padding and unavailable items are skipped, the first top_n kept (the search fetched
top_n + 1); unknown items get an empty list.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from models.online_pipeline import ITEM_FEATURES_FILE, ItemCatalog, nearest_other_items
from recsys.triton_repository import UNAVAILABLE_FILE
from serving.triton_models.stage import RequestError, StageModel, ids_vector, required


class TritonPythonModel(StageModel):
    def load(self) -> None:
        self.catalog = ItemCatalog.read(self.directory / ITEM_FEATURES_FILE, self.columns)
        self.unavailable = np.load(self.directory / UNAVAILABLE_FILE)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        codes = ids_vector(inputs, "item_codes")
        found = np.asarray(required(inputs, "candidates"), dtype=np.int64)
        distances = np.asarray(required(inputs, "candidate_scores"), dtype=np.float32)
        if found.ndim != 2 or len(found) != len(codes) or found.shape[1] < 2:
            raise RequestError("candidates must hold top_n + 1 search results per item")
        items, similarity = nearest_other_items(codes, found, distances, found.shape[1] - 1,
                                                unavailable=self.unavailable)  # fmt: skip
        return {"item_ids": self.catalog.raw(items), "scores": similarity}

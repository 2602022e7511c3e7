"""Triton model `candidate_sources`: retrieval's union of sources, as batch scoring's.

The two-tower's Faiss candidates (from `faiss_retrieval`), the item-to-item source's best items for the user's
history (EASE neighbours, `models/item_to_item.py`; the history is each user's positives of the run, exported
with it) and the most clicked items, merged without duplicates; every candidate's two-tower inner product,
item-to-item score and sources (one bit each) come back aligned with it:
`models.online_pipeline.multi_source_candidates`. A repository from a run without the item-to-item source
passes the two-tower's candidates on alone. Products added since the run, sent with the request
(`fresh_item_ids`, `fresh_item_features`, `fresh_item_embeddings`: `models.online_pipeline.FreshItems`), are
added where the two-tower retrieval would have found them (`add_fresh_candidates`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from models.item_to_item import NEIGHBOURS_FILE, ItemToItem
from models.online_pipeline import (
    USER_HISTORY_FILE,
    ItemEmbeddings,
    ItemsByUser,
    add_fresh_candidates,
    multi_source_candidates,
)
from serving.triton_models.stage import RequestError, StageModel, fresh_items, ids_vector, required


class TritonPythonModel(StageModel):
    def load(self) -> None:
        self.embeddings = ItemEmbeddings.read(self.directory, self.columns.item_cardinality)
        present = (self.directory / NEIGHBOURS_FILE).exists()
        self.item_to_item = ItemToItem.load(self.directory) if present else None
        self.histories = ItemsByUser.load(self.directory / USER_HISTORY_FILE) if present else None

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raw_user_ids = ids_vector(inputs, "raw_user_ids")
        queries = np.asarray(required(inputs, "query_embeddings"), dtype=np.float32)
        candidates = np.asarray(required(inputs, "candidates"), dtype=np.int64)
        if not len(raw_user_ids) == len(queries) == len(candidates):
            raise RequestError("raw_user_ids, query_embeddings and candidates must have one row per user")
        histories = self.histories.of_users(raw_user_ids) if self.histories is not None else None
        merged, inner, item_to_item, sources = add_fresh_candidates(
            *multi_source_candidates(candidates, queries, self.embeddings, self.item_to_item, histories),
            queries, fresh_items(inputs, self.columns), candidates.shape[1])  # fmt: skip
        return {"merged_candidates": merged, "retrieval_scores": inner, "item_to_item_scores": item_to_item,
                "sources": sources}

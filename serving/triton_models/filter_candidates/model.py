"""Triton model `filter_candidates`: the business rules on retrieved candidates.

Removes the items each user saw (the spec's `exclude_seen`) and the unavailable items (both exported with the
run), empties the rows of unknown users, and keeps Faiss's -1 padding as missing:
`models.online_pipeline.filter_candidates`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from models.online_pipeline import ItemsByUser, filter_candidates
from recsys.triton_repository import SEEN_ITEMS_FILE, UNAVAILABLE_FILE
from serving.triton_models.stage import RequestError, StageModel, ids_vector, required


class TritonPythonModel(StageModel):
    def load(self) -> None:
        self.seen_items = ItemsByUser.load(self.directory / SEEN_ITEMS_FILE)
        self.unavailable = np.load(self.directory / UNAVAILABLE_FILE)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raw_user_ids = ids_vector(inputs, "raw_user_ids")
        candidates = np.asarray(required(inputs, "candidates"), dtype=np.int64)
        known = np.asarray(required(inputs, "known_users"), dtype=bool).reshape(-1)
        if not len(raw_user_ids) == len(candidates) == len(known):
            raise RequestError("raw_user_ids, candidates and known_users must have one row per user")
        filtered = filter_candidates(candidates, excluded=self.seen_items.of_users(raw_user_ids),
                                     unavailable=self.unavailable, known=known)  # fmt: skip
        return {"filtered_candidates": filtered}

"""Triton model `faiss_retrieval`: the top-k items of each query embedding by inner product, scores kept.

Serves both ensembles: user embeddings (`recommend`) and item embeddings (`similar_products`). Ids are
encoded item ids, -1 where the catalog has fewer than k items.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from models.online_pipeline import search
from models.retrieval_index import load_index
from serving.triton_models.stage import RequestError, StageModel, required, scalar


class TritonPythonModel(StageModel):
    def load(self) -> None:
        self.index = load_index(self.directory)
        self.default_top_k = int(self.parameters["top_k"])
        self.max_top_k = int(self.parameters["max_top_k"])

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        queries = np.asarray(required(inputs, "query_embeddings"), dtype=np.float32)
        top_k = scalar(inputs, "top_k", self.default_top_k, int)
        if not 1 <= top_k <= self.max_top_k:
            raise RequestError(f"top_k must be between 1 and {self.max_top_k}, got {top_k}")
        if queries.ndim != 2 or queries.shape[1] != self.index.d:
            raise RequestError(f"query_embeddings must have shape [n, {self.index.d}], got {list(queries.shape)}")
        candidates, scores = search(self.index, queries, top_k)
        return {"candidates": candidates, "candidate_scores": scores.astype(np.float32)}

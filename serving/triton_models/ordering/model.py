"""Triton model `ordering`: the final list of each user, raw item ids out.

`models.blend.blend_scores`: the ranker's probabilities blended with the two-tower's inner products, the
item-to-item scores and the candidates' sources (`candidate_sources`; the `retrieval_weight`,
`item_to_item_weight` and `source_weights` of the export, as batch scoring's), the scores returned; then
`models.online_pipeline.order`: softmax sampling over score / temperature (temperature 0: the ranked
order), the top n kept, the sampling probabilities returned with the list. `seed` makes a sampled
order reproducible; without it every request draws afresh. A product added since the run is named by the raw id
the request sent for it (`fresh_item_ids`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np

from models.blend import blend_scores
from models.online_pipeline import ITEM_FEATURES_FILE, ItemCatalog, order
from serving.triton_models.stage import RequestError, StageModel, fresh_items, required, scalar


class TritonPythonModel(StageModel):
    def load(self) -> None:
        self.catalog = ItemCatalog.read(self.directory / ITEM_FEATURES_FILE, self.columns)
        self.default_top_n = int(self.parameters["top_n"])
        self.default_temperature = float(self.parameters["temperature"])
        self.retrieval_weight = float(self.parameters["retrieval_weight"])
        self.item_to_item_weight = float(self.parameters["item_to_item_weight"])
        self.source_weights = json.loads(self.parameters["source_weights"])

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        candidates = np.asarray(required(inputs, "candidates"), dtype=np.int64)
        ranker_scores = np.asarray(required(inputs, "ranker_scores"), dtype=np.float32)
        retrieval_scores = np.asarray(required(inputs, "retrieval_scores"), dtype=np.float32)
        item_to_item_scores = np.asarray(required(inputs, "item_to_item_scores"), dtype=np.float32)
        sources = np.asarray(required(inputs, "sources"), dtype=np.int32)
        top_n = scalar(inputs, "top_n", self.default_top_n, int)
        temperature = scalar(inputs, "temperature", self.default_temperature, float)
        seed = scalar(inputs, "seed", -1, int)
        if top_n < 1:
            raise RequestError(f"top_n must be at least 1, got {top_n}")
        if temperature < 0:
            raise RequestError(f"temperature must not be negative, got {temperature}")
        if not (candidates.shape == ranker_scores.shape == retrieval_scores.shape == item_to_item_scores.shape
                == sources.shape):  # fmt: skip
            raise RequestError("candidates, ranker_scores, retrieval_scores, item_to_item_scores and sources must "
                               "have the same shape")  # fmt: skip
        scores = blend_scores(candidates, ranker_scores, retrieval_scores, self.retrieval_weight,
                              item_to_item_scores, self.item_to_item_weight, sources=sources,
                              source_weights=self.source_weights)  # fmt: skip
        rng = np.random.default_rng(seed if seed >= 0 else None)
        items, ordered_scores, probabilities, clicks = order(candidates, scores, top_n, temperature=temperature,
                                                             rng=rng, click_probabilities=ranker_scores)  # fmt: skip
        fresh = fresh_items(inputs, self.columns)
        raw = fresh.raw(self.catalog, items) if fresh is not None else self.catalog.raw(items)
        return {"item_ids": raw, "scores": ordered_scores, "probabilities": probabilities,
                "click_probabilities": clicks}

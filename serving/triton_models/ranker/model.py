"""Triton model `ranker`: scores every (user, candidate) pair with the ranking model.

The user's features are unrolled against the candidates' item features, which this model holds in
memory as arrays indexed by encoded item id (one gather per request, no feature-store call per
candidate): `models.online_pipeline.Ranker`. Context features (encoded, one value per user or one for
all) are optional inputs; left out, the ranker sees Categorify's missing-value code, as for
user-item crosses, which a new pair cannot have. A product added since the run (`candidate_sources`' codes
beyond the catalog) is scored on the features the request sent for it (`fresh_item_*`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from models.online_pipeline import ITEM_FEATURES_FILE, ItemCatalog, Ranker
from recsys.triton_repository import RANKER_DIR
from serving.triton_models.stage import RequestError, StageModel, fresh_items, required


class TritonPythonModel(StageModel):
    def load(self) -> None:
        catalog = ItemCatalog.read(self.directory / ITEM_FEATURES_FILE, self.columns)
        self.ranker = Ranker(self.directory / RANKER_DIR, self.columns, catalog)
        self.context_columns = [column for column in self.columns.context_features
                                if column in self.columns.ranker_columns]  # fmt: skip

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        candidates = np.asarray(required(inputs, "candidates"), dtype=np.int64)
        matrix = np.asarray(required(inputs, "user_features"), dtype=np.int64)
        user_columns = self.columns.user_columns
        width = sum(self.columns.width(column) for column in user_columns)
        if matrix.shape != (len(candidates), width):
            raise RequestError(f"user_features must have shape [{len(candidates)}, {width}]")
        features = self.columns.unpack(matrix, user_columns)  # packed by query_tower
        context = {}
        for column in self.context_columns:
            if column in inputs:
                values = np.asarray(inputs[column], dtype=self.columns.dtype(column)).reshape(-1)
                if len(values) == 1:
                    values = np.repeat(values, len(candidates))
                if len(values) != len(candidates):
                    raise RequestError(f"context input '{column}' needs one value, or one per user")
                context[column] = values
        fresh = fresh_items(inputs, self.columns)
        return {"ranker_scores": self.ranker.score(features, candidates, context, fresh)}

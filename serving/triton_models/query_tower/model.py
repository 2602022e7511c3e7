"""Triton model `query_tower`: a request's users to query embeddings and the features the ranker needs.

The users' encoded features are the request's own (every query-tower column given, e.g. from Feast) or,
when it gives none, looked up by raw user id in the run's user table held in memory. Users found in
neither come back with `known_users` False (later stages return them an empty list).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from models.online_pipeline import USER_FEATURES_FILE, Tower, UserFeatureTable
from recsys.triton_repository import QUERY_TOWER_DIR
from serving.triton_models.stage import RequestError, StageModel, ids_vector


class TritonPythonModel(StageModel):
    def load(self) -> None:
        self.users = UserFeatureTable.read(self.directory / USER_FEATURES_FILE, self.columns)
        self.tower = Tower.query(self.directory / QUERY_TOWER_DIR, self.columns)

    def user_features(self, inputs: Mapping[str, np.ndarray], raw_user_ids: np.ndarray
                      ) -> tuple[dict[str, np.ndarray], np.ndarray]:  # fmt: skip
        """Encoded user columns (the missing value where unknown) and which users are known."""
        rows, columns = len(raw_user_ids), self.columns
        given = [column for column in columns.query_columns if column in inputs]
        if given:
            missing = [column for column in columns.query_columns if column not in inputs]
            if missing:
                raise RequestError(f"give all query-tower features or none; missing: {', '.join(missing)}")
            features = {}
            for column in columns.user_columns:
                if column in inputs:
                    values = np.asarray(inputs[column], dtype=columns.dtype(column))
                    expected: tuple[int, ...]
                    if column in columns.list_widths:
                        expected = (rows, columns.width(column))
                    else:
                        values, expected = values.reshape(-1), (rows,)
                    if values.shape != expected:
                        raise RequestError(f"input '{column}' has shape {list(np.shape(inputs[column]))}, "
                                           f"not {list(expected)}")  # fmt: skip
                else:  # a user column the query tower does not take: the ranker sees a missing value
                    values = columns.missing(column, rows)
                features[column] = values
            return features, np.ones(rows, dtype=bool)
        found, known = self.users.lookup(raw_user_ids)
        features = {}
        for column in columns.user_columns:
            values = columns.missing(column, rows)
            values[known] = found[column]
            features[column] = values
        return features, known

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raw_user_ids = ids_vector(inputs, "raw_user_ids")
        features, known = self.user_features(inputs, raw_user_ids)
        return {
            "query_embeddings": self.tower.embed(features),
            "user_features": self.columns.pack(features, self.columns.user_columns),
            "known_users": known,
        }

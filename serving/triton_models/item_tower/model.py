"""Triton model `item_tower`: a product's encoded columns -> its item-tower embedding and its packed columns.

A standalone model, like `encode_features`, which the gateway calls right after it: a product the run does not
know, created with features, gets an embedding that lets the recommend ensemble retrieve it and packed columns
that let the ranker score it (`models.online_pipeline.FreshItems`), until a nightly run indexes it.

Input: `rows` (one JSON object per row, `encode_features`' "item" output: column -> code, number or code list).
Outputs: `item_embeddings` [rows, dim], `item_features` [rows, width], the item columns packed as the recommend
ensemble's `fresh_item_features` takes them (`PipelineColumns.pack`), and `known_items`: whether the encoded id
names an item of the run's catalog (a product the run knows is retrieved and ranked from its own arrays).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from models.online_pipeline import FIRST_OWN_CODE, ITEM_FEATURES_FILE, ItemCatalog, Tower
from recsys.triton_repository import ITEM_TOWER_DIR
from serving.triton_models.stage import RequestError, StageModel, json_rows


class TritonPythonModel(StageModel):
    def load(self) -> None:
        self.tower = Tower.item(self.directory / ITEM_TOWER_DIR, self.columns)
        self.catalog = ItemCatalog.read(self.directory / ITEM_FEATURES_FILE, self.columns)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = json_rows(inputs, "rows")
        features = {}
        for column in self.columns.item_columns:
            lacking = [number for number, row in enumerate(rows) if column not in row]
            if lacking:
                raise RequestError(f"row {lacking[0]}: column '{column}' is missing")
            try:
                features[column] = self.columns.values(column, [row[column] for row in rows])
            except (TypeError, ValueError) as error:
                raise RequestError(f"column '{column}': {error}") from error
        codes = features[self.columns.item_id]
        in_range = (codes >= FIRST_OWN_CODE) & (codes < len(self.catalog))
        known = in_range & (self.catalog.raw_ids[np.where(in_range, codes, 0)] >= 0)
        return {"item_embeddings": self.tower.embed(features),
                "item_features": self.columns.pack(features, self.columns.item_columns), "known_items": known}

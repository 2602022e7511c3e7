"""Triton model `encode_features`: raw values as the API receives them -> the run's encoded features.

A standalone model (no ensemble calls it), served beside the ensembles and following the published version as
they do: the gateway sends a customer's profile, a product's features or a request's context, and gets them back
encoded by the run's own fitted NVTabular workflow (`models.feature_encoding.WorkflowEncoder`), the codes the
models were trained on.

Inputs: `kind` ("user", "item" or "context"), `rows` (one JSON object of raw values per row; a column left
out is missing). Outputs: `encoded` (one JSON object per row: column -> code, number or code list, the columns
the models take) and `snapshot_time` (unix seconds of the run's feature snapshot: the event time the gateway
gives rows it writes to Feast, so that the next nightly snapshot, newer, replaces them).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np

from models.feature_encoding import EncodingError, WorkflowEncoder
from recsys.triton_repository import SNAPSHOT_FILE, WORKFLOW_DIR
from serving.triton_models.stage import RequestError, StageModel, json_rows, required


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class TritonPythonModel(StageModel):
    def load(self) -> None:
        self.encoder = WorkflowEncoder(self.directory / WORKFLOW_DIR, self.columns)
        self.snapshot_time = int(json.loads((self.directory / SNAPSHOT_FILE).read_text())["snapshot_time"])

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        kinds = np.asarray(required(inputs, "kind")).reshape(-1)
        if len(kinds) != 1:
            raise RequestError(f"input 'kind' must hold one value, got {len(kinds)}")
        rows = json_rows(inputs, "rows")
        try:
            encoded = self.encoder.encode(_text(kinds[0]), rows)
        except EncodingError as error:
            raise RequestError(str(error)) from error
        out = [json.dumps({name: values[row].tolist() for name, values in encoded.items()}) for row in range(len(rows))]
        return {"encoded": np.array(out, dtype=object),
                "snapshot_time": np.array([self.snapshot_time], dtype=np.int64)}  # fmt: skip

"""What every stage model of the exported ensembles shares: loading from its version folder, request handling.

A stage is a `TritonPythonModel` (Triton's Python backend) whose work is `run(inputs) -> outputs` on
NumPy arrays: the request's tensors in (optional inputs the client left out are absent), the response's
out. `RequestError` (a bad request) becomes the response's error message; the server and the other
requests go on. `triton_python_backend_utils` exists only inside Triton's stub process, so it is
imported where requests are handled, and `run` can be called without a server.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from models.online_pipeline import FreshItems, PipelineColumns

Number = TypeVar("Number", int, float)


class RequestError(ValueError):
    """A request the stage cannot answer; the message is sent back to the client."""


def required(inputs: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    if name not in inputs:
        raise RequestError(f"input '{name}' is required")
    return inputs[name]


def scalar(inputs: Mapping[str, np.ndarray], name: str, default: Number, cast: Callable[[Any], Number]) -> Number:
    """A one-element input as a Python number, `default` when the client left it out."""
    if name not in inputs:
        return default
    values = np.asarray(inputs[name]).reshape(-1)
    if len(values) != 1:
        raise RequestError(f"input '{name}' must hold one value, got {len(values)}")
    value = cast(values[0])
    if isinstance(value, float) and not math.isfinite(value):
        raise RequestError(f"input '{name}' must be finite, got {value}")
    return value


def ids_vector(inputs: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    """A required one-dimensional int64 input (ids, one per row of the request)."""
    return np.asarray(required(inputs, name), dtype=np.int64).reshape(-1)


FRESH_INPUTS = ("fresh_item_ids", "fresh_item_features", "fresh_item_embeddings")


def fresh_items(inputs: Mapping[str, np.ndarray], columns: PipelineColumns) -> FreshItems | None:
    """The products added since the run that the request sent (all three `FRESH_INPUTS`, or none), or None."""
    given = [name for name in FRESH_INPUTS if name in inputs]
    if not given:
        return None
    if len(given) < len(FRESH_INPUTS):
        raise RequestError(f"give all of {', '.join(FRESH_INPUTS)} or none")
    try:
        return FreshItems.from_tensors(columns, *(inputs[name] for name in FRESH_INPUTS))
    except ValueError as error:
        raise RequestError(str(error)) from error


def json_rows(inputs: Mapping[str, np.ndarray], name: str) -> list[dict[str, Any]]:
    """A required input of JSON objects, one per row (bytes or text), parsed."""
    rows = []
    for number, text in enumerate(np.asarray(required(inputs, name)).reshape(-1)):
        try:
            row = json.loads(text.decode() if isinstance(text, bytes) else str(text))
        except json.JSONDecodeError as error:
            raise RequestError(f"row {number}: not JSON ({error})") from error
        if not isinstance(row, dict):
            raise RequestError(f"row {number}: a JSON object is needed")
        rows.append(row)
    return rows


class StageModel:
    """Base of the stage models: `initialize` reads the version folder and calls `load`; `execute` calls `run`."""

    directory: Path  # <repository>/<model>/<version>: the files this stage loads
    columns: PipelineColumns
    parameters: dict[str, str]  # the config's `parameters` (defaults of optional inputs)

    def initialize(self, args: dict[str, str]) -> None:
        self.directory = Path(args["model_repository"]) / args["model_version"]
        config = json.loads(args["model_config"])
        self.parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.columns = PipelineColumns.read(self.directory)
        self.load()

    def load(self) -> None:
        """Load what the stage keeps in memory from `self.directory`."""

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One request's outputs; every stage's model.py defines it (this base class is never served alone)."""
        raise NotImplementedError(f"{type(self).__name__} does not define run()")

    def execute(self, requests: list[Any]) -> list[Any]:
        import triton_python_backend_utils as pb_utils

        responses = []
        for request in requests:
            inputs = {tensor.name(): tensor.as_numpy() for tensor in request.inputs()}
            try:
                outputs = self.run(inputs)
            except RequestError as error:  # the client's mistake: HTTP 400 / gRPC INVALID_ARGUMENT
                invalid = pb_utils.TritonError(str(error), pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=invalid))
                continue
            except Exception as error:  # one failing request must not take the others down
                pb_utils.Logger.log_error(f"{type(self).__module__}: {type(error).__name__}: {error}")
                message = f"{type(error).__name__}: {error}"
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)))
                continue
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(value)) for name, value in outputs.items()]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses

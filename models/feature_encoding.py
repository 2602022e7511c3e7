"""What the API receives, encoded by the run's own fitted NVTabular workflow (trainer environment).

Training encodes every row with the workflow `nvtabular_fit_transform` fitted and saved (`<run>/nvtabular/
workflow`); serving encodes a customer's profile, a product's features and a request's context with that same
saved workflow, so the two cannot drift: its Categorify mappings (a value the fit never saw gets the
out-of-vocabulary code, a missing one the null code), its list splitting and padding, its fill and
normalization. There is no second, hand-written encoding.

The workflow takes every raw column of an interaction row at once; `WorkflowEncoder` cuts it, once per kind of
row, to the inputs of that kind with NVTabular's own `Workflow.remove_inputs` (which drops the outputs that
need the removed inputs, as Merlin Systems does to serve without the targets), and runs it with Merlin's
`LocalExecutor` on a pandas frame of the rows given. About 5 ms of CPU a categorical column a call on this
machine, whatever the number of rows: the gateway calls it on writes and caches the context's codes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from models.online_pipeline import PipelineColumns

KINDS = ("user", "item", "context")


class EncodingError(ValueError):
    """A row the workflow cannot encode; the message names the column and the value."""


def raw_columns(columns: PipelineColumns, kind: str) -> tuple[str, ...]:
    """The raw columns a row of `kind` may carry (the id first), which are also the encoded columns it gets."""
    if kind == "user":
        return (columns.user_id, *columns.user_features)
    if kind == "item":
        return (columns.item_id, *columns.item_features)
    if kind == "context":
        return tuple(columns.context_features)
    raise EncodingError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")


class WorkflowEncoder:
    """The run's saved workflow, cut once per kind of row: `encode(kind, rows)` -> encoded columns."""

    def __init__(self, workflow_dir: Path, columns: PipelineColumns) -> None:
        import nvtabular as nvt
        from merlin.dag.executors import LocalExecutor

        self.columns = columns
        self.executor = LocalExecutor()
        self.workflows = {}
        # The raw types the workflow was fitted on (remove_inputs leaves the cut workflow's input schema untyped).
        fitted = nvt.Workflow.load(str(workflow_dir))
        self.raw_types = {column.name: column.dtype.name for column in fitted.input_schema}
        for kind in KINDS:
            wanted = set(raw_columns(columns, kind))
            if not wanted:
                continue
            # remove_inputs changes the workflow it is called on: a fresh copy per kind.
            workflow = nvt.Workflow.load(str(workflow_dir))
            workflow = workflow.remove_inputs([name for name in workflow.input_schema.column_names
                                               if name not in wanted])  # fmt: skip
            self.workflows[kind] = workflow

    def encode(self, kind: str, rows: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
        """Encoded columns of `rows` (raw values by column name; a column left out is missing), as the models take
        them (`PipelineColumns.values`): int64 codes, float32 numbers or padded int64 code lists, one row each."""
        import pandas as pd

        names = raw_columns(self.columns, kind)
        unknown = sorted({name for row in rows for name in row} - set(names))
        if unknown:
            raise EncodingError(f"{kind} rows carry no column named {', '.join(unknown)} (known: {', '.join(names)})")
        workflow = self.workflows[kind]
        frame, nulls = {}, {}
        for name in names:
            values = [row.get(name) for row in rows]
            # A last row with a value in every column, dropped after: Categorify 23.08 fails on a column without
            # any (`_encode` looks at its first non-null value), which a single row with a missing value is.
            frame[name], nulls[name] = _typed(name, self.raw_types[name], [*values, _FILLER],
                                              continuous=name in self.columns.continuous)  # fmt: skip
        encoded = self.executor.transform(pd.DataFrame(frame), [workflow.output_node]).iloc[: len(rows)]
        result = {name: self.columns.values(name, encoded[name]) for name in names}
        for name, missing in nulls.items():  # an integer column's missing values: Categorify's null code
            if missing is not None:
                result[name][missing[: len(rows)]] = self.columns.null_code(name)
        return result


_FILLER = 0


def _typed(name: str, dtype: str, values: list[Any], *, continuous: bool) -> tuple[Any, np.ndarray | None]:
    """One raw column as the workflow read it from Parquet (text as objects, numbers as float64 or the integer
    type), and where an integer column's values are missing (None for other columns: the workflow sees them)."""
    import pandas as pd

    missing = np.array([value is None for value in values])
    if dtype == "object":
        for value in values:
            if value is not None and not isinstance(value, str | int):
                raise EncodingError(f"column '{name}' takes text, got {value!r}")
        return pd.Series([None if value is None else str(value) for value in values], dtype=object), None
    for value in values:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or (isinstance(value, float) and not math.isfinite(value))):  # fmt: skip
            raise EncodingError(f"column '{name}' takes a number, got {value!r}")
    if dtype.startswith("int") and not continuous:
        # NumPy's integers have no null, and Categorify casts to its table's type: encode a stand-in, then null.
        if any(isinstance(value, float) and not value.is_integer() for value in values):
            raise EncodingError(f"column '{name}' takes an integer, got {values}")
        info = np.iinfo(dtype)
        for value in values:
            if value is not None and not info.min <= value <= info.max:
                raise EncodingError(f"column '{name}' takes {dtype} values, got {value}")
        return pd.Series([_FILLER if value is None else int(value) for value in values], dtype=dtype), missing
    return pd.Series([np.nan if value is None else value for value in values], dtype="float64"), None

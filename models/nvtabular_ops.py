"""Two pieces of the NVTabular workflow that NVTabular 23.08 lacks on the CPU (trainer environment only).

- `SplitTokens`: a string column of joined tokens ("Comedy|Romance") to a list column, a missing value to an
  empty list, for Categorify to encode token by token (NVTabular has no string-split op).
- `PaddedListSlice`: `ListSlice(0, n, pad=True)` whose padding works on the CPU. NVTabular's CPU branch calls
  `numpy.append` and drops its result, so rows stay ragged while the schema says they have n values.
The fixed width is what lets serving hand a list feature to the models as one [rows, n] array.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from merlin.core.dispatch import is_cpu_object
from nvtabular import ops

PAD = 0  # Categorify's padding code: the value a list is padded with


class SplitTokens:
    """For `LambdaOp`: each value split at `separator`, empty tokens dropped; missing values become empty lists.

    A class, not a partial function: LambdaOp passes the frame too to a function of two parameters."""

    def __init__(self, separator: str) -> None:
        self.separator = separator

    def __call__(self, column: Any) -> Any:
        pattern = re.escape(self.separator)
        return column.fillna("").astype(str).str.split(pattern, regex=True).map(lambda parts: [p for p in parts if p])


class PaddedListSlice(ops.ListSlice):  # type: ignore[misc]
    """The first `width` codes of each row, padded with PAD to exactly `width`."""

    def __init__(self, width: int) -> None:
        super().__init__(0, width, pad=True, pad_value=PAD)
        self.width = width

    def transform(self, col_selector: Any, df: Any) -> Any:
        if not is_cpu_object(df):  # cudf's branch pads correctly
            return super().transform(col_selector, df)
        out = type(df)()
        for name in col_selector.names:
            rows = []
            for row in df[name]:
                codes = np.asarray(row[: self.width], dtype=np.int64)
                rows.append(np.pad(codes, (0, self.width - len(codes)), constant_values=PAD))
            out[name] = rows
        return out

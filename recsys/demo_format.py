"""The demo data's format: what `tasks/demo_data.py` writes for the gateway's demo page
(`serving/api/routes/demo.py`), and its reader.

    <directory>/users/part-00000.parquet   user_id, impressions, clicked_item_ids, candidate_item_ids, candidate_scores
    <directory>/_metrics.json              users, top_k, mean retrieval recall@top_k over them, the source run
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from recsys.parquet_io import part_files

METRICS_FILE = "_metrics.json"
LIST_TYPE = pa.list_(pa.int64())
USER_SCHEMA = pa.schema([
    ("user_id", pa.int64()), ("impressions", pa.int64()), ("clicked_item_ids", LIST_TYPE),
    ("candidate_item_ids", LIST_TYPE), ("candidate_scores", pa.list_(pa.float32())),
])  # fmt: skip


@dataclasses.dataclass(frozen=True)
class DemoUser:
    user_id: int
    impressions: int  # validation rows of the user
    clicked: frozenset[int]  # items clicked in validation
    candidates: list[int]  # retrieved, best first
    candidate_scores: list[float]  # inner products


@dataclasses.dataclass(frozen=True)
class DemoData:
    directory: Path
    users: dict[int, DemoUser]  # in the output's order: most validation clicks first
    metrics: dict[str, Any]


def hits(items: Sequence[int], clicked: frozenset[int]) -> int:
    """How many of `items` the user clicked in validation (true positives)."""
    return sum(1 for item in items if item in clicked)


def read_demo_data(directory: Path) -> DemoData:
    """A `demo_data` output, whole (a few hundred users and their lists)."""
    directory = Path(directory)
    metrics = json.loads((directory / METRICS_FILE).read_text())
    users: dict[int, DemoUser] = {}
    for path in part_files(directory / "users"):
        for row in pq.read_table(path, schema=USER_SCHEMA).to_pylist():
            users[row["user_id"]] = DemoUser(
                user_id=row["user_id"], impressions=row["impressions"], clicked=frozenset(row["clicked_item_ids"]),
                candidates=row["candidate_item_ids"], candidate_scores=row["candidate_scores"],
            )  # fmt: skip
    return DemoData(directory, users, metrics)

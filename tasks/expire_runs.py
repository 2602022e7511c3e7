"""Removing old runs' folders: the nightly DAG's `expire_runs` task (by hand: `recsys expire-runs`).

A run's folder `<data_root>/runs/<run>` holds its data at every stage (Parquet, cleaned, resplit, encoded: about
1.5 times its CSV input on 50k generated rows), its models, lists and exports; one a night piles up. Kept:
- the `keep_runs` (RECSYS_KEEP_RUNS, 7) runs changed last, whatever they are;
- every run changed within `recent` (2 days): a run in progress never loses its folder under its tasks;
- every version the published store may serve or switch to (`versions_in_use`: current, previous, an A/B
  experiment's challenger, the retained versions and those being loaded): Triton's follower stages its export,
  the monitoring's drift reference is its training split;
- the runs whose batch scores the quality gate may publish again (the MLflow `champion` and `challenger` versions'
  `batch_score_dir`, a reviewer's promotion);
- the runs whose feature tables Feast's registry reads (`feast_apply` runs before the quality gate, so it may be a
  run that never was published).
Every other run's folder is moved into `<data_root>/.expiring/` (one rename: nothing lists runs there), then
deleted; one left there by a removal cut short goes at the next. Idempotent.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from recsys.run_layout import RunLayout, runs_dir

log = logging.getLogger(__name__)

RECENT = timedelta(days=2)
EXPIRING_FOLDER = ".expiring"


@dataclass(frozen=True)
class RunFolder:
    name: str
    changed: datetime  # the newest change of the folder or of one of its steps' folders


def last_change(folder: Path) -> datetime:
    """When `folder` or one of the folders in it last changed (a step's output renamed into place, a file added)."""
    times = [folder.stat().st_mtime, *(entry.stat().st_mtime for entry in folder.iterdir() if entry.is_dir())]
    return datetime.fromtimestamp(max(times), UTC)


def runs_holding(paths: Iterable[Path], data_root: Path) -> set[str]:
    """The names of the runs whose folders hold any of `paths`."""
    runs = runs_dir(data_root).resolve()
    names = set()
    for path in paths:
        parts = Path(path).resolve().parts
        if parts[: len(runs.parts)] == runs.parts and len(parts) > len(runs.parts):
            names.add(parts[len(runs.parts)])
    return names


def runs_to_remove(runs: Collection[RunFolder], *, in_use: Collection[str], keep_runs: int, now: datetime,
                   recent: timedelta = RECENT) -> list[str]:  # fmt: skip
    """The runs that no rule keeps (the module's docstring), oldest first."""
    newest_first = sorted(runs, key=lambda run: run.changed, reverse=True)
    kept = {run.name for run in newest_first[:keep_runs]} | set(in_use)
    return [run.name for run in reversed(newest_first) if run.name not in kept and now - run.changed >= recent]


def remove_runs(data_root: Path, *, in_use: Collection[str], keep_runs: int, now: datetime | None = None,
                recent: timedelta = RECENT) -> dict[str, Any]:  # fmt: skip
    """Remove the runs' folders that no rule keeps; return what went, what stayed and the bytes freed."""
    if keep_runs < 1:
        raise ValueError(f"keep_runs is 1 at least (the newest run's folder is the demo page's), got {keep_runs}")
    now = now or datetime.now(UTC)
    expiring = Path(data_root) / EXPIRING_FOLDER
    freed = sum(_delete(leftover) for leftover in sorted(expiring.iterdir())) if expiring.is_dir() else 0
    runs = [RunFolder(run.root.name, last_change(run.root)) for run in RunLayout.every_run(data_root)]
    removed = []
    for name in runs_to_remove(runs, in_use=in_use, keep_runs=keep_runs, now=now, recent=recent):
        expiring.mkdir(exist_ok=True)
        aside = expiring / f"{name}.{uuid.uuid4().hex[:12]}"
        try:
            os.rename(runs_dir(data_root) / name, aside)
        except FileNotFoundError:  # another removal took it
            continue
        freed += _delete(aside)
        removed.append(name)
    kept = sorted({run.name for run in runs} - set(removed))
    log.info("expire_runs: removed %d runs (%.1f GB): %s; kept %d", len(removed), freed / 1e9, ", ".join(removed),
             len(kept))  # fmt: skip
    return {"runs_removed": removed, "runs_kept": kept, "in_use": sorted(set(in_use)), "bytes_freed": freed}


def _delete(folder: Path) -> int:
    """Delete `folder`; return the bytes its files took. A folder another removal deletes meanwhile is fine."""
    size = 0
    for parent, _, files in os.walk(folder):  # os.walk skips what vanishes under it
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                size += os.lstat(os.path.join(parent, name)).st_size
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(folder)
    return size


def runs_in_use(data_root: Path, *, redis_url: str, redis_type: str, key_prefix: str, tracking_uri: str,
                feast_config: Any = None) -> set[str]:  # fmt: skip
    """The runs the serving tier, the quality gate or Feast may still read (the module's docstring)."""
    from recsys.recommendation_store import versions_in_use
    from recsys.redis_connection import redis_client
    from tasks.feast_features import registered_source_paths
    from tasks.quality_gate import batch_dirs_the_gate_may_publish

    client = redis_client(redis_url, redis_type)
    try:
        versions = versions_in_use(client, key_prefix)  # a version is the name of the run it came from
    finally:
        client.close()
    gate = runs_holding(batch_dirs_the_gate_may_publish(tracking_uri), data_root)
    feast = runs_holding(registered_source_paths(feast_config), data_root)
    return versions | gate | feast


def expire_runs(data_root: Path, *, redis_url: str, redis_type: str, key_prefix: str, tracking_uri: str,
                keep_runs: int, feast_config: Any = None, now: datetime | None = None) -> dict[str, Any]:
    """The step: the runs in use found, then every other run beyond the newest `keep_runs` removed."""
    in_use = runs_in_use(data_root, redis_url=redis_url, redis_type=redis_type, key_prefix=key_prefix,
                         tracking_uri=tracking_uri, feast_config=feast_config)  # fmt: skip
    return remove_runs(data_root, in_use=in_use, keep_runs=keep_runs, now=now)

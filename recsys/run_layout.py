"""Where each step of one pipeline run writes: `<data root>/runs/<run id>/<step folder>`.

The DAG, `tasks/pipeline.py` (the tests' trained runs, the benchmarks), batch scoring and the online pipeline's
loaders read the folders from here, so a step's folder is named once. Plain Python: the trainer environment and
Triton's stages import it too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from pathlib import Path

RUNS_FOLDER = "runs"


def runs_dir(data_root: Path) -> Path:
    return Path(data_root) / RUNS_FOLDER


def safe_run_id(run_id: str) -> str:
    """A run id as a single path component (Airflow run ids contain ':' and '+')."""
    cleaned = "".join(char if char.isalnum() or char in "-_." else "_" for char in run_id)
    if not cleaned.strip("._"):
        raise ValueError(f"run id {run_id!r} gives no usable directory name")
    return cleaned


@dataclasses.dataclass(frozen=True)
class RunLayout:
    """A run's folder and its steps' folders, each named like its field."""

    root: Path
    landing: Path = field(init=False, repr=False)  # an s3:// input location, copied here before conversion
    parquet: Path = field(init=False, repr=False)
    clean: Path = field(init=False, repr=False)
    resplit: Path = field(init=False, repr=False)  # also the validated data: `validate` writes only its report
    validate: Path = field(init=False, repr=False)
    nvtabular: Path = field(init=False, repr=False)
    two_tower: Path = field(init=False, repr=False)
    ranker: Path = field(init=False, repr=False)
    ranker_comparison: Path = field(init=False, repr=False)
    faiss_index: Path = field(init=False, repr=False)
    batch_score: Path = field(init=False, repr=False)
    evaluate: Path = field(init=False, repr=False)
    demo: Path = field(init=False, repr=False)
    triton_repository: Path = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))
        for folder in dataclasses.fields(self)[1:]:
            object.__setattr__(self, folder.name, self.root / folder.name)

    @classmethod
    def of_run(cls, data_root: Path, run_id: str) -> RunLayout:
        """The folder of an Airflow run id (made safe: it becomes the published version's name)."""
        return cls(runs_dir(data_root) / safe_run_id(run_id))

    @classmethod
    def every_run(cls, data_root: Path) -> list[RunLayout]:
        """The runs under the data root, by folder name."""
        runs = runs_dir(data_root)
        return [cls(path) for path in sorted(runs.iterdir()) if path.is_dir()] if runs.is_dir() else []

    @classmethod
    def of_version(cls, data_root: Path, version: str) -> RunLayout:
        """The run a published version came from: the DAG publishes a run under its folder's name."""
        return cls(runs_dir(data_root) / version)

"""Settings from the environment (prefix RECSYS_), with local defaults; built lazily, never at import.

Platform environment only: the trainer environment gets every path it needs on its command line.
"""

from __future__ import annotations

import functools
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RECSYS_")

    # Root of run-scoped outputs: <data_root>/runs/<run id>/<step>.
    data_root: Path = PROJECT_ROOT / "var" / "data"
    # Where raw CSV files land when a run does not name an input location.
    landing_dir: Path | None = None
    # Interpreter of the trainer environment (TensorFlow 2.12 + Merlin 23.08), see README.
    trainer_python: Path = PROJECT_ROOT / ".venv-trainer" / "bin" / "python"

    # MLflow: a local SQLite store and artifact folder by default; any tracking URI (http://, postgresql://).
    mlflow_tracking_uri: str = f"sqlite:///{PROJECT_ROOT / 'var' / 'mlflow' / 'mlflow.db'}"
    mlflow_artifact_root: Path = PROJECT_ROOT / "var" / "mlflow" / "artifacts"

    # Triton Inference Server: where `make setup` installed it (see README, "Triton server"), and the
    # HTTP endpoint the serving tier sends inference requests to.
    triton_env: Path = PROJECT_ROOT / ".venv-triton"
    triton_url: str = "http://127.0.0.1:8000"

    # Feast: the online store is Redis, in a DB index of its own (not 0) so that Feast's keys never mix
    # with ours (redis://[:password@]host:port/db, rediss:// for TLS); the registry is a local file.
    feast_redis_url: str = "redis://127.0.0.1:6379/1"
    feast_registry_path: Path = PROJECT_ROOT / "var" / "feast" / "registry.db"

    # Redis that the web tier reads the published batch recommendations from
    # (tasks/publish_recommendations.py); every key written there starts with the prefix.
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_key_prefix: str = "recsys:"

    @property
    def default_landing_dir(self) -> Path:
        return self.landing_dir or self.data_root / "landing"

    def run_dir(self, run_id: str) -> Path:
        return self.data_root / "runs" / safe_run_id(run_id)


def safe_run_id(run_id: str) -> str:
    """A run id as a single path component (Airflow run ids contain ':' and '+')."""
    cleaned = "".join(char if char.isalnum() or char in "-_." else "_" for char in run_id)
    if not cleaned.strip("._"):
        raise ValueError(f"run id {run_id!r} gives no usable directory name")
    return cleaned


@functools.cache
def get_settings() -> Settings:
    return Settings()

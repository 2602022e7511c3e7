"""Settings from the environment (prefix RECSYS_), with local defaults; built lazily, never at import.

Platform environment only: the trainer environment gets every path it needs on its command line.
"""

from __future__ import annotations

import functools
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from recsys.list_defaults import TOP_K
from recsys.locations import local_path
from recsys.redis_connection import RedisType
from recsys.run_layout import RunLayout

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RECSYS_")

    # Root of run-scoped outputs: <data_root>/runs/<run id>/<step>.
    data_root: Path = PROJECT_ROOT / "var" / "data"
    # Where raw CSV files land when a run does not name an input location: a local folder, or
    # s3://bucket/prefix, which a run first fetches into <run>/landing (recsys/locations.py).
    landing_dir: str | None = None
    # Interpreter of the trainer environment (TensorFlow 2.12 + Merlin 23.08), see docs/environments.md.
    trainer_python: Path = PROJECT_ROOT / ".venv-trainer" / "bin" / "python"

    # MLflow: a local SQLite store and artifact folder by default; any tracking URI (http://, postgresql://).
    mlflow_tracking_uri: str = f"sqlite:///{PROJECT_ROOT / 'var' / 'mlflow' / 'mlflow.db'}"
    # Artifact root: a local folder or a URI (s3://bucket/prefix, file:///...); experiment X's artifacts go to <root>/X.
    mlflow_artifact_root: str = str(PROJECT_ROOT / "var" / "mlflow" / "artifacts")
    # Endpoint of an S3-compatible store (MinIO, Ceph, ...); None is AWS S3. Read from the standard variables,
    # not a RECSYS_ one, because boto3 reads them too, and so MLflow's S3 artifact store sees the same endpoint.
    # Credentials are never settings: boto3 takes them from the environment, ~/.aws or an instance role.
    s3_endpoint_url: str | None = Field(default=None, validation_alias=AliasChoices("AWS_ENDPOINT_URL_S3",
                                                                                    "AWS_ENDPOINT_URL"))

    # Triton Inference Server: where `make setup` installed it (see docs/environments.md, "Triton server"), and the
    # HTTP endpoint the serving tier sends inference requests to; several, comma-separated, share the requests
    # and take over from one that fails (serving/triton_client.py; `triton_urls`).
    triton_env: Path = PROJECT_ROOT / ".venv-triton"
    triton_url: str = "http://127.0.0.1:8000"
    # True where Triton serves every published version's models under names of their own and follows the version
    # pointer (serving/model_versions.py): `serving.run` sets it for its workers when it starts Triton itself.
    triton_versioned_models: bool = False
    # Where that Triton finds every version's models, laid out under version names.
    triton_models_dir: Path = PROJECT_ROOT / "var" / "triton" / "models"

    # Feast: the online store is Redis, in a DB index of its own (not 0) so that Feast's keys never mix
    # with ours (redis://[:password@]host:port/db, rediss:// for TLS); the registry is a local file.
    feast_redis_url: str = "redis://127.0.0.1:6379/1"
    # Feast's name for the kind of Redis: "redis" (one server, the URL's DB) or "redis_cluster" (a Redis Cluster,
    # the URL naming any one of its nodes, DB 0: a cluster has no other; Feast finds the other nodes).
    feast_redis_type: RedisType = "redis"
    feast_registry_path: Path = PROJECT_ROOT / "var" / "feast" / "registry.db"
    # Feast on the gateway's online path (serving/live_features.py): a customer's features are read from its
    # online store at request time and written through when the API creates or changes the customer. Off, the
    # online path looks customers up in the run's own table inside Triton and the API writes nothing to Feast.
    live_features: bool = True
    # Budget of the online path's Feast read (a Redis round trip and Feast's own conversions).
    feast_timeout_ms: int = Field(default=50, gt=0)

    # Redis that the web tier reads the published batch recommendations from
    # (tasks/publish_recommendations.py); every key written there starts with the prefix.
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_key_prefix: str = "recsys:"
    # "redis" (one server, the URL's DB) or "redis_cluster" (a Redis Cluster, the URL naming any one of its nodes, DB
    # 0): the publisher, the gateway and the operators' commands all make their clients from it (docs/deploy.md).
    redis_type: RedisType = "redis"

    # The API gateway's main database (customers, products, interactions; serving/api/): a SQLite file by
    # default, PostgreSQL by URL (postgresql://user:password@host:port/db, driven by psycopg 3). Created and
    # upgraded by the migrations (`make migrate`), never by the application.
    database_url: str = f"sqlite:///{PROJECT_ROOT / 'var' / 'serving' / 'recsys.db'}"
    # Budget of one database call on the request path, well below the 500 ms SLA of a whole request:
    # PostgreSQL's statement and lock timeouts, SQLite's busy timeout, the wait for a pooled connection.
    database_timeout_ms: int = Field(default=200, gt=0)
    # Writes (customers, products, interactions) each API key may make: a token bucket in Redis shared by all
    # workers, refilled at this rate, holding at most `ingest_burst` (serving/api/rate_limit.py).
    # How long a gateway process trusts a verified API key before reading it again: a revoked key is refused
    # within this many seconds.
    api_key_cache_s: float = Field(default=10.0, ge=0)
    ingest_rate_per_s: float = Field(default=200.0, gt=0)
    ingest_burst: int = Field(default=400, ge=1)
    # Recommendation reads each API key may make, the same way (a bucket per key in Redis), taken in the read's
    # own round trip; a web tier serving many visitors through one key needs a key of its own with room.
    read_rate_per_s: float = Field(default=2_000.0, gt=0)
    read_burst: int = Field(default=4_000, ge=1)
    # Request bodies above this many bytes are refused with 413 before they reach a route.
    max_request_bytes: int = Field(default=65_536, gt=0)
    # Budgets of the gateway's other calls on the request path (well inside the 500 ms SLA), the TTL of
    # cached online (Triton) answers, and the promotion rule's threshold (report 4.4.7), compared with the ranker's
    # P(click) that every list keeps (a promoted item reaching it gets order score 1.0).
    redis_timeout_ms: int = Field(default=50, gt=0)
    triton_timeout_ms: int = Field(default=250, gt=0)
    online_cache_ttl_s: int = Field(default=600, gt=0)
    # Candidates the online (Triton) path retrieves for a customer without a nightly list: the report's TopK,
    # as batch scoring's default (the export's max_top_k, 10,000, bounds it).
    online_top_k: int = Field(default=TOP_K, ge=1, le=10_000)
    promotion_threshold: float = Field(default=0.5, ge=0, le=1)
    # How long a gateway process keeps products' availability and promotion flags: a product changed through
    # another worker (or straight in the database) is seen within this many seconds.
    product_flags_ttl_s: float = Field(default=5.0, gt=0)
    # The `recsys demo-data` output the gateway's /demo page reads (validation clicks, retrieved candidates);
    # unset: the newest `<data_root>/runs/<run>/demo`.
    demo_dir: Path | None = None
    # Where the gateway appends every served recommendation list (serving/api/impressions.py) and the monitoring
    # DAG reads them: date=YYYY-MM-DD/hour=HH/<host>-<pid>.jsonl; unset: <data_root>/impressions.
    impressions_dir: Path | None = None
    # Also log, for each sampled list (temperature > 0), its candidates' order scores and which one was shown
    # first: what the monitoring step's off-policy estimates of other temperatures need (a few hundred bytes more
    # a sampled line; tasks/monitor.py).
    impressions_candidate_scores: bool = False
    # How long the impression files are kept: the monitoring DAG removes older hours after each run, which also
    # bounds what a forget rewrites (recsys/impression_log.py). A day at least: the writer only appends to now.
    impressions_retention_days: int = Field(default=90, ge=1)
    # How many of the newest runs' folders the nightly DAG keeps besides those still in use (tasks/expire_runs.py).
    keep_runs: int = Field(default=7, ge=1)
    # The dataset spec the gateway follows (segment features, which interactions keep an item out of a
    # customer's lists: `exclude_seen`); unset: specs/aliccp.yaml, as the nightly DAG's default.
    spec: Path | None = None
    # How long a customer's items seen since the nightly run stay in Redis (renewed by each new one): longer
    # than it takes the next nightly runs to have them in their data (serving/seen_items.py).
    seen_items_ttl_s: int = Field(default=3 * 24 * 3600, gt=0)

    @field_validator("triton_url")
    @classmethod
    def _triton_urls_are_http(cls, value: str) -> str:
        for url in value.split(","):
            parts = urlsplit(url.strip())
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{url.strip()!r} is not an http(s)://host:port URL (RECSYS_TRITON_URL takes one "
                                 "or several, comma-separated)")  # fmt: skip
        return value

    @property
    def triton_urls(self) -> list[str]:
        """The Triton servers of `triton_url`, in the order given."""
        return [url.strip() for url in self.triton_url.split(",") if url.strip()]

    @property
    def landing_location(self) -> str:
        """The landing zone: a local folder or an s3:// URI (`recsys.locations.fetch_input` makes it local)."""
        return self.landing_dir or str(self.data_root / "landing")

    @property
    def default_landing_dir(self) -> Path:
        """The landing zone as a local folder; refused when it is remote (use `landing_location`)."""
        return local_path(self.landing_location)

    @property
    def impressions_path(self) -> Path:
        return self.impressions_dir or self.data_root / "impressions"

    def run_layout(self, run_id: str) -> RunLayout:
        return RunLayout.of_run(self.data_root, run_id)


@functools.cache
def get_settings() -> Settings:
    return Settings()

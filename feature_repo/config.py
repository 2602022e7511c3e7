"""Where the feature store lives: the Redis online store, the registry file and the Feast project."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

from feast import RepoConfig
from feast.infra.offline_stores.dask import DaskOfflineStoreConfig
from feast.infra.online_stores.redis import RedisOnlineStoreConfig, RedisType

from recsys.redis_connection import check_redis_type, redis_client
from recsys.settings import Settings, get_settings
from recsys.spec import DatasetSpec

REPO_DIR = Path(__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class FeastStoreConfig:
    """The online store's Redis URL, the registry file and the kind of Redis ("redis" or "redis_cluster", Feast's
    names: a cluster's URL names any one of its nodes); `from_settings` reads RECSYS_FEAST_*."""

    redis_url: str
    registry_path: Path
    redis_type: str = "redis"

    def __post_init__(self) -> None:
        check_redis_type(self.redis_type)

    @property
    def cluster(self) -> bool:
        return check_redis_type(self.redis_type)

    @classmethod
    def from_settings(cls, settings: Settings | None = None) -> FeastStoreConfig:
        settings = settings or get_settings()
        return cls(redis_url=settings.feast_redis_url, registry_path=settings.feast_registry_path,
                   redis_type=settings.feast_redis_type)  # fmt: skip

    def redis_client(self) -> Any:
        """A redis-py client of the online store: a RedisCluster for a cluster (multi-key commands split by slot)."""
        return redis_client(self.redis_url, self.redis_type)


def project_name(spec: DatasetSpec) -> str:
    """The Feast project of a dataset: its spec's name (Feast allows letters, digits and '_')."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", spec.name).lstrip("_")
    if not name:
        raise ValueError(f"{spec.source}: spec name {spec.name!r} gives no usable Feast project name")
    return name


def redis_connection_string(url: str, *, cluster: bool = False) -> str:
    """Feast's Redis connection string (`host:port,db=1,password=...,ssl=true`) for a `redis://` URL.

    Settings hold a standard URL (`redis://[[user]:password@]host[:port][/db][?option=value]`,
    `rediss://` for TLS) like every other Redis client takes; Feast parses its own comma-separated
    format, which cannot carry a comma inside a value. For a cluster (`cluster`), the URL names one node and no
    DB but 0: a Redis Cluster has DB 0 only, and Feast's cluster client takes no `db`.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"Feast Redis URL must start with redis:// or rediss://, got {redact_url(url)!r}")
    host = parts.hostname or "127.0.0.1"
    if ":" in host:
        raise ValueError(f"Feast's Redis connection string cannot address an IPv6 host: {redact_url(url)!r}")
    database = parts.path.strip("/") or "0"
    if not database.isdigit():
        raise ValueError(f"Redis database in {redact_url(url)!r} must be a number, got {database!r}")
    if cluster and int(database) != 0:
        raise ValueError(f"a Redis Cluster has DB 0 only; {redact_url(url)!r} names DB {database} "
                         "(RECSYS_FEAST_REDIS_URL with RECSYS_FEAST_REDIS_TYPE=redis_cluster)")  # fmt: skip
    options = [] if cluster else [("db", str(int(database)))]
    if parts.username:
        options.append(("username", unquote(parts.username)))
    if parts.password:
        options.append(("password", unquote(parts.password)))
    if parts.scheme == "rediss":
        options.append(("ssl", "true"))
    options += parse_qsl(parts.query)
    for key, value in options:
        if "," in key or "," in value or "=" in key:
            raise ValueError(f"Feast's Redis connection string cannot carry ',' in option {key!r}")
    return ",".join([f"{host}:{parts.port or 6379}", *(f"{key}={value}" for key, value in options)])


def redact_url(url: str) -> str:
    """The URL without its password, for logs and metrics."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def repo_config(project: str, config: FeastStoreConfig, *, writes_always_land: bool = False) -> RepoConfig:
    """Feast's RepoConfig: local provider, file registry, Redis online store, Dask reading the Parquet tables.

    Feast skips a write whose event time is not newer than the stored row's (DESIGN.md); `writes_always_land`
    turns that check off (Feast's `skip_dedup`), for the gateway's write-through: its rows carry the served
    run's snapshot time, so that the next nightly load, a newer snapshot, replaces them, and a second change
    of the same customer must land too."""
    return RepoConfig(
        project=project,
        provider="local",
        registry=str(config.registry_path),
        online_store=RedisOnlineStoreConfig(redis_type=RedisType(config.redis_type), skip_dedup=writes_always_land,
                                            connection_string=redis_connection_string(config.redis_url,
                                                                                      cluster=config.cluster)),
        offline_store=DaskOfflineStoreConfig(),
        entity_key_serialization_version=3,
        repo_path=REPO_DIR,
    )

"""redis-py clients for one Redis server or a Redis Cluster, chosen by the kind of Redis (`RECSYS_REDIS_TYPE` for the
published lists, `RECSYS_FEAST_REDIS_TYPE` for Feast's online store): one place, so every caller of the store makes
the same client from the same two settings.

On a cluster (docs/deploy.md, "Redis Cluster"), redis-py's RedisCluster routes each command to the node owning its key's
slot and splits a pipeline by node; a transaction (WATCH/MULTI/EXEC) or a Lua script must keep to the keys of one
slot, which the store's key layout provides where it needs one (recsys/recommendation_store.py's hash tags).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, get_args

if TYPE_CHECKING:
    import redis
    import redis.asyncio

# Feast's own names for the kinds (its RedisType values, not redis_sentinel), used for both settings.
RedisType = Literal["redis", "redis_cluster"]
REDIS_TYPES: tuple[str, ...] = get_args(RedisType)


def check_redis_type(redis_type: str) -> bool:
    """Whether `redis_type` names a cluster; ValueError for a kind that is neither."""
    if redis_type not in REDIS_TYPES:
        raise ValueError(f"the kind of Redis must be one of {', '.join(REDIS_TYPES)}, got {redis_type!r}")
    return redis_type == "redis_cluster"


def redis_client(url: str, redis_type: str = "redis", **options: Any) -> redis.Redis:
    """A synchronous client of `url`: a RedisCluster for "redis_cluster" (the URL names any one node; a cluster has
    DB 0 only), else a Redis. Typed as redis.Redis, whose commands the cluster client shares."""
    import redis

    if check_redis_type(redis_type):
        return redis.RedisCluster.from_url(url, **options)  # type: ignore[return-value]
    return redis.Redis.from_url(url, **options)


def async_redis_client(url: str, redis_type: str = "redis", **options: Any) -> redis.asyncio.Redis:
    """`redis_client` for asyncio (the gateway)."""
    import redis.asyncio

    if check_redis_type(redis_type):
        return redis.asyncio.RedisCluster.from_url(url, **options)  # type: ignore[return-value]
    return redis.asyncio.Redis.from_url(url, **options)


def is_cluster(client: Any) -> bool:
    """Whether a client (sync or asyncio) talks to a Redis Cluster."""
    import redis
    import redis.asyncio

    return isinstance(client, redis.RedisCluster | redis.asyncio.RedisCluster)


def mget_across_slots(client: Any, keys: list[str]) -> Any:
    """MGET of keys that may live in several slots (the reply, or its awaitable for an asyncio client): on a cluster
    redis-py's `mget_nonatomic` splits it by slot (each node's part is still one MGET)."""
    return client.mget_nonatomic(keys) if is_cluster(client) else client.mget(keys)

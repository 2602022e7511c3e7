"""What the gateway's Redis read costs per route, in process: `Recommender.candidates` against one raw GET.

    .venv/bin/python benchmarks/recommender_reads.py [--redis-url redis://127.0.0.1:6379/6] [--calls 2000] [--rounds 5]
    .venv/bin/python benchmarks/recommender_reads.py --redis-type redis_cluster --redis-url redis://127.0.0.1:7000

No HTTP server and no load generator, so the numbers are the recommender's own (the version pointer, the
list, the known-users bitmap and, for a new visitor, the segment lists) without uvicorn's and FastAPI's
share, which make `benchmarks/serving.py`'s per-route differences of a tenth of a millisecond hard to see on
a shared 2-core machine. A version with 100-item lists (one user, one segment, all segments, the bitmap) is
written under a prefix of its own, deleted afterwards; `--calls` sequential calls per round, rounds
alternating between the routes. Prints the best round's CPU and wall microseconds per call and the ratios
to a raw redis-py asyncio GET of the same list (the reference: one round trip, nothing else), and the CPU Redis
itself spent per call (INFO's used_cpu, summed over a cluster's primaries).

With `--redis-type redis_cluster` the URL names a node of a Redis Cluster (DB 0; only this benchmark's prefix is
written and deleted) and the reads take the gateway's cluster path (serving/list_reader.py): the pointer kept in
process, one pipeline over the nodes.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

PREFIX = "bench-reads:"
VERSION = "v1"
KNOWN_USER, NEW_VISITOR = 1, 5
CONTEXT = {"location": "1", "device": "2"}


def publish(redis_url: str, redis_type: str) -> None:
    from recsys.recommendation_store import ALL_SEGMENTS, RecommendationKeys, encode_recommendations, segment_key
    from recsys.redis_connection import redis_client

    client = redis_client(redis_url, redis_type)
    lists = encode_recommendations(list(range(1000, 1100)), [1.0 - index / 200 for index in range(100)])
    keys = RecommendationKeys(PREFIX)
    client.set(keys.current, VERSION)
    client.set(keys.data(VERSION, "user", KNOWN_USER), lists)
    for segment in (segment_key(list(CONTEXT.values())), ALL_SEGMENTS):
        client.set(keys.data(VERSION, "segment", segment), lists)
    client.setbit(keys.known_users(VERSION), KNOWN_USER, 1)


def remove(redis_url: str, redis_type: str) -> None:
    from recsys.recommendation_store import RecommendationKeys
    from recsys.redis_connection import redis_client

    client = redis_client(redis_url, redis_type)
    for key in [key for pattern in RecommendationKeys(PREFIX).patterns for key in client.scan_iter(pattern)]:
        client.delete(key)


def redis_servers(redis_url: str, redis_type: str) -> list:
    """A client of each server: the one, or a cluster's primaries (whose INFO is per node)."""
    from recsys.redis_connection import is_cluster, redis_client

    client = redis_client(redis_url, redis_type)
    return [node.redis_connection for node in client.get_primaries()] if is_cluster(client) else [client]


def redis_cpu_s(nodes: list) -> float:
    """CPU seconds the servers have used (user and system), summed."""
    return sum(float(info["used_cpu_user"]) + float(info["used_cpu_sys"]) for info in
               (node.info("cpu") for node in nodes))  # fmt: skip


async def measure(redis_url: str, redis_type: str, calls: int, rounds: int) -> dict[str, tuple[float, float, float]]:
    """Best round's (CPU, wall, Redis CPU) microseconds per call, by route."""
    from recsys.recommendation_store import RecommendationKeys
    from recsys.redis_connection import async_redis_client
    from serving.recommender import Recommender, RecommenderConfig, VisitorQuery

    client = async_redis_client(redis_url, redis_type)
    servers = redis_servers(redis_url, redis_type)

    async def no_flags(items):  # type: ignore[no-untyped-def]  # the rules are not measured here
        return {}

    recommender = Recommender(client, None, RecommenderConfig(key_prefix=PREFIX), no_flags)
    # The same read with the caller's read bucket taken in the script (a rate it never reaches).
    limited = Recommender(client, None, RecommenderConfig(key_prefix=PREFIX, read_rate_per_s=1e9, read_burst=10**9),
                          no_flags)  # fmt: skip
    list_key = RecommendationKeys(PREFIX).data(VERSION, "user", KNOWN_USER)
    routes: dict[str, Callable[[], Awaitable[object]]] = {
        "redis_get": lambda: client.get(list_key),
        "precomputed": lambda: recommender.candidates(VisitorQuery(KNOWN_USER, CONTEXT)),
        "precomputed_rate_limited": lambda: limited.candidates(VisitorQuery(KNOWN_USER, CONTEXT, api_key="bench")),
        "new_visitor": lambda: recommender.candidates(VisitorQuery(NEW_VISITOR, CONTEXT)),
    }
    expected = {"precomputed": "precomputed", "precomputed_rate_limited": "precomputed", "new_visitor": "generic"}
    for name, route in expected.items():  # the routes are the ones meant
        answer = await routes[name]()
        assert answer.route == route and len(answer.items) == 100, (name, answer)  # type: ignore[attr-defined]
    best: dict[str, tuple[float, float, float]] = {}
    for round_number in range(rounds):
        for name, call in routes.items():
            for _ in range(calls // 10):  # warm-up
                await call()
            served = redis_cpu_s(servers)
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(calls):
                await call()
            result = ((time.process_time() - cpu) / calls * 1e6, (time.perf_counter() - wall) / calls * 1e6,
                      (redis_cpu_s(servers) - served) / calls * 1e6)  # fmt: skip
            print(f"round {round_number + 1}/{rounds} {name:24s} cpu {result[0]:7.1f} us  wall {result[1]:7.1f} us  "
                  f"redis cpu {result[2]:6.1f} us")  # fmt: skip
            best[name] = min(best.get(name, result), result)
    await recommender.close()
    await limited.close()
    return best


def main() -> None:
    from recsys.redis_connection import REDIS_TYPES, check_redis_type

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/6")
    parser.add_argument("--redis-type", default="redis", choices=REDIS_TYPES)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    import redis

    database = redis.Redis.from_url(args.redis_url).connection_pool.connection_kwargs.get("db", 0)
    if not check_redis_type(args.redis_type) and database == 0:  # a cluster has DB 0 only: prefix keys alone
        raise SystemExit("refusing Redis database 0: pass a dedicated --redis-url")
    publish(args.redis_url, args.redis_type)
    try:
        best = asyncio.run(measure(args.redis_url, args.redis_type, args.calls, args.rounds))
    finally:
        remove(args.redis_url, args.redis_type)
    reference_cpu, reference_wall, reference_redis = best["redis_get"]
    print(f"\n{args.redis_type}")
    print("route                     cpu us  wall us  redis cpu us  vs one redis-py GET: cpu, wall, redis cpu")
    for name, (cpu, wall, served) in best.items():
        print(f"{name:24s} {cpu:7.1f} {wall:8.1f} {served:13.1f}  {cpu / reference_cpu:5.2f}x "
              f"{wall / reference_wall:5.2f}x {served / reference_redis:5.2f}x")  # fmt: skip
    print(f"new visitor vs precomputed hit: cpu {best['new_visitor'][0] / best['precomputed'][0]:.2f}x, "
          f"wall {best['new_visitor'][1] / best['precomputed'][1]:.2f}x")  # fmt: skip
    limited, plain = best["precomputed_rate_limited"], best["precomputed"]
    print(f"read rate limit on a precomputed hit: cpu {limited[0] / plain[0]:.2f}x, wall {limited[1] / plain[1]:.2f}x")


if __name__ == "__main__":
    main()

"""Publish benchmark: keys/s of `publish_recommendations` against plain redis-py pipelined SETs.

    .venv/bin/python benchmarks/publish.py [--users 100000] [--items 100] [--repeats 3]
                                           [--redis-url redis://127.0.0.1:6379/6]
    .venv/bin/python benchmarks/publish.py --redis-type redis_cluster --redis-url redis://127.0.0.1:7000

Generates a batch_score-shaped output (users x items lists, plus segment and similar-item lists),
then, in the same run and on the same dedicated Redis database (flushed before every measurement,
never database 0), alternates:
- publish: the whole `publish_recommendations` call, from Parquet files to the pointer swap
  (reading, encoding, SET NX pipelines, count check, MULTI/EXEC);
- reference: the same keys and the same values, already encoded in memory, written with redis-py
  pipelines of plain SETs (transaction=False) in chunks of the same size.
Goal (issue): publish keys/s at 0.8 or better of the reference. Then a steady-state run publishes two
more versions on top of the first, the last one retiring the first (EXPIRE of its keys after the swap).
With `--redis-type redis_cluster` the URL names a node of a Redis Cluster, which the benchmark flushes (every
primary): both the publish and the reference go through redis-py's cluster client.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import redis

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from recsys.parquet_io import PartitionWriter  # noqa: E402
from recsys.recommendation_store import RecommendationKeys  # noqa: E402
from recsys.redis_connection import REDIS_TYPES, check_redis_type, redis_client  # noqa: E402
from tasks.publish_recommendations import (  # noqa: E402
    PIPELINE_CHUNK,
    _batches,
    _encode_batch,
    _sources,
    publish_recommendations,
)

PREFIX = "bench:"
WRITE_ROWS = 512  # batch_score writes one row group per 512 users


def lists_table(id_column: str, ids: np.ndarray | list[str], length: int, rng: np.random.Generator) -> pa.Table:
    count = len(ids)
    offsets = pa.array(np.arange(0, count * length + 1, length, dtype=np.int32))
    scores = -np.sort(-rng.random((count, length), dtype=np.float32), axis=1).ravel()
    return pa.table({
        id_column: pa.array(ids, type=pa.string() if id_column == "segment" else pa.int64()),
        "item_ids": pa.ListArray.from_arrays(offsets, pa.array(rng.integers(1, 5_000_000, count * length))),
        "scores": pa.ListArray.from_arrays(offsets, pa.array(scores)),
    })  # fmt: skip


def generate_batch(directory: Path, users: int, items: int, similar: int, similar_items: int) -> None:
    rng = np.random.default_rng(0)
    segments = ["*"] + [f"{location}:{device}" for location in range(50) for device in range(2)]
    parts: dict[str, tuple[str, np.ndarray | list[str], int]] = {
        "users": ("user_id", np.arange(users, dtype=np.int64) * 7 + 1_000_000, items),
        "segments": ("segment", segments, items),
        "similar": ("item_id", np.arange(similar, dtype=np.int64) + 5_000_000, similar_items),
    }
    for folder, (id_column, ids, length) in parts.items():
        with PartitionWriter(directory / folder, lists_table(id_column, ids[:1], 1, rng).schema) as writer:
            for start in range(0, len(ids), WRITE_ROWS):
                writer.write(lists_table(id_column, ids[start : start + WRITE_ROWS], length, rng))
    (directory / "_metrics.json").write_text(json.dumps({"model_versions": {"ranker": "1", "two_tower": "1"}}))


def reference_payloads(batch_dir: Path, version: str, chunk_size: int) -> list[tuple[bytes, bytes]]:
    """The exact keys and values the publish writes, encoded up front (not timed)."""
    keys = RecommendationKeys(PREFIX)
    pairs: list[tuple[bytes, bytes]] = []
    for source in _sources(batch_dir):
        base = f"{keys.namespace(version)}{source.kind}:".encode()
        for path, batch in _batches(source, chunk_size):
            ids, values, _ = _encode_batch(batch, source.id_column, path)
            pairs += [(base + key_id, value) for key_id, value in zip(ids, values, strict=True)]
    return pairs


def reference_set(client: redis.Redis, pairs: list[tuple[bytes, bytes]], chunk_size: int, raw: bool = False) -> float:
    """Seconds to write `pairs` with pipelines of `pipe.set` (or, raw, of `pipe.execute_command("SET", ...)`)."""
    started = time.perf_counter()
    for start in range(0, len(pairs), chunk_size):
        pipe = client.pipeline(transaction=False)
        for key, value in pairs[start : start + chunk_size]:
            if raw:
                pipe.execute_command("SET", key, value)
            else:
                pipe.set(key, value)
        pipe.execute()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=100, help="items per user and per segment list")
    parser.add_argument("--similar", type=int, default=20_000, help="items with a similar-items list")
    parser.add_argument("--similar-items", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=PIPELINE_CHUNK)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/6", help="a database this benchmark flushes")
    parser.add_argument("--redis-type", default="redis", choices=REDIS_TYPES)
    parser.add_argument("--work", type=Path, default=None, help="folder for the generated batch (default: temporary)")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "benchmarks" / "results" / "publish.json")
    args = parser.parse_args()

    client = redis_client(args.redis_url, args.redis_type)
    if not check_redis_type(args.redis_type) and client.connection_pool.connection_kwargs.get("db", 0) == 0:
        parser.error("the benchmark flushes its database: give one other than 0")
    target = {"redis_url": args.redis_url, "redis_type": args.redis_type, "key_prefix": PREFIX,
              "chunk_size": args.chunk_size, "progress": False}  # fmt: skip
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        batch_dir = Path(work) / "batch"
        generate_batch(batch_dir, args.users, args.items, args.similar, args.similar_items)
        pairs = reference_payloads(batch_dir, "v1", args.chunk_size)
        total = len(pairs)
        print(f"{total:,} keys ({args.users:,} users x {args.items} items, 101 segments, {args.similar:,} similar "
              f"x {args.similar_items}); value bytes {sum(len(v) for _, v in pairs) / total:.0f} a key")  # fmt: skip

        publish_s, reference_s, raw_s, load_rates = [], [], [], []
        for repeat in range(args.repeats):
            client.flushdb()
            started = time.perf_counter()
            metrics = publish_recommendations(batch_dir, version="v1", **target)
            publish_s.append(time.perf_counter() - started)
            load_rates.append(metrics["keys_per_s"])
            assert metrics["keys_total"] == total
            key, value = pairs[len(pairs) // 2]
            assert client.get(key) == value, "the publish wrote other values than the reference"
            client.flushdb()
            reference_s.append(reference_set(client, pairs, args.chunk_size))
            client.flushdb()
            raw_s.append(reference_set(client, pairs, args.chunk_size, raw=True))
            print(f"repeat {repeat + 1}: publish {total / publish_s[-1]:,.0f} keys/s (load phase "
                  f"{metrics['keys_per_s']:,}), pipe.set {total / reference_s[-1]:,.0f}, "
                  f"pipe.execute_command {total / raw_s[-1]:,.0f}")  # fmt: skip

        # Steady state: two more versions on top of v1; publishing v3 retires v1 after its swap.
        client.flushdb()
        publish_recommendations(batch_dir, version="v1", **target)
        publish_recommendations(batch_dir, version="v2", **target)
        started = time.perf_counter()
        steady = publish_recommendations(batch_dir, version="v3", **target)
        steady_s = time.perf_counter() - started
        client.flushdb()

    rates = {name: (total / min(seconds), total / statistics.median(seconds))
             for name, seconds in (("publish", publish_s), ("set", reference_s), ("execute_command", raw_s))}
    result = {
        "redis_type": args.redis_type, "keys": total, "users": args.users, "items": args.items,
        "chunk_size": args.chunk_size,
        "keys_per_s": {name: {"best": round(best), "median": round(median)} for name, (best, median) in rates.items()},
        "publish_load_phase_keys_per_s": {"best": max(load_rates), "median": statistics.median(load_rates)},
        "ratio_to_set": {"best": round(rates["publish"][0] / rates["set"][0], 3),
                         "median": round(rates["publish"][1] / rates["set"][1], 3)},
        "ratio_to_execute_command": {"best": round(rates["publish"][0] / rates["execute_command"][0], 3),
                                     "median": round(rates["publish"][1] / rates["execute_command"][1], 3)},
        "steady_state_v3": {"seconds": round(steady_s, 2), "load_keys_per_s": steady["keys_per_s"],
                            "retire_seconds": steady["retire_seconds"], "retired": steady["retired_versions"],
                            "keys_per_s_including_retire": round(total / steady_s)},
    }  # fmt: skip
    print()
    print(f"| {total:,} keys | keys/s, best of {args.repeats} | median | publish / this (best, median) |")
    print("|---|---:|---:|---:|")
    labels = {"publish": "publish_recommendations (whole call)", "set": "redis-py pipelined `pipe.set(k, v)`",
              "execute_command": "redis-py pipelined `pipe.execute_command('SET', k, v)`"}
    for name, (best, median) in rates.items():
        ratio = "" if name == "publish" else f"{rates['publish'][0] / best:.2f}, {rates['publish'][1] / median:.2f}"
        print(f"| {labels[name]} | {best:,.0f} | {median:,.0f} | {ratio} |")
    print(f"steady state (v3 on top of v1, v2; retires v1): {steady_s:.2f} s in all, load {steady['keys_per_s']:,} "
          f"keys/s, EXPIRE of the retired version {steady['retire_seconds']:.2f} s")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

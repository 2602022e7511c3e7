"""The published lists, the gateway's reads and its rate limits on a real Redis Cluster (issue 20, item 3).

The module starts a cluster of its own (three primaries on free loopback ports, `tests.servers.redis_cluster`) and
stops it; the single-server comparisons use the publish tests' Redis database.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import redis
import redis.asyncio
from fastapi.testclient import TestClient

from recsys.errors import InputDataError
from recsys.recommendation_store import RecommendationKeys
from recsys.settings import Settings
from serving.api.main import create_app
from serving.api.migrate import upgrade
from serving.api.rate_limit import TokenBucket
from serving.forget import _forget_in_redis
from serving.list_reader import CurrentLists, ListReader, ReadRateLimited
from serving.seen_items import seen_key
from tasks.cli import main as cli_main
from tasks.publish_recommendations import make_current, publish_recommendations, rollback
from tests.api_keys import authorized
from tests.conftest import environment
from tests.servers import redis_cluster
from tests.test_publish_recommendations import (
    PREFIX,
    REDIS_URL,
    assert_readers_see,
    expected_scored_lists,
    lists_table,
    pointers,
    write_batch,
)

KEYS = RecommendationKeys(PREFIX)
CLUSTER = "redis_cluster"


@pytest.fixture(scope="module")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_cluster(tmp_path_factory.mktemp("cluster")) as nodes:
        yield nodes[0]


@pytest.fixture
def cluster(cluster_url: str) -> Iterator[Any]:
    client = redis.RedisCluster.from_url(cluster_url)
    client.flushall(target_nodes=redis.RedisCluster.PRIMARIES)
    yield client
    client.close()


@pytest.fixture
def single(cluster: Any) -> Iterator[Any]:
    """The publish tests' Redis database (one server), flushed."""
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def publish(url: str, batch: Path, version: str, redis_type: str = CLUSTER, **options: Any) -> dict:
    return publish_recommendations(batch, redis_url=url, version=version, key_prefix=PREFIX, redis_type=redis_type,
                                   progress=False, **options)  # fmt: skip


def keys_of(client: Any, version: str) -> list[bytes]:
    return list(client.scan_iter(match=f"{KEYS.namespace(version)}*", count=1000))


def test_publish_rollback_retire_and_forget_on_a_cluster(cluster: Any, cluster_url: str, tmp_path: Path):
    control = [KEYS.current, KEYS.previous, KEYS.versions, KEYS.loading, KEYS.forgotten, KEYS.experiment,
               KEYS.meta("v1")]  # fmt: skip
    assert len({cluster.keyslot(key) for key in control}) == 1  # the transactions' keys share one slot
    first, second = write_batch(tmp_path / "b1", seed=1), write_batch(tmp_path / "b2", seed=2)

    published = publish(cluster_url, first, "v1")
    assert published["keys"] == {"user": 30, "segment": 4, "similar": 20} and pointers(cluster) == ("v1", None)
    assert_readers_see(cluster, "v1", first)
    # A version's lists spread over every primary.
    sizes = [node.redis_connection.dbsize() for node in cluster.get_primaries()]
    assert len(sizes) == 3 and min(sizes) > 5, sizes
    assert publish(cluster_url, first, "v1")["loaded"] is False  # the same version again writes nothing

    publish(cluster_url, second, "v2")
    assert pointers(cluster) == ("v2", "v1")
    assert_readers_see(cluster, "v2", second)
    assert rollback(cluster_url, PREFIX, CLUSTER) == {"current": "v1", "previous": "v2"}
    assert_readers_see(cluster, "v1", first)
    assert make_current(cluster_url, "v2", PREFIX, CLUSTER) == "v1" and pointers(cluster) == ("v2", "v1")

    # A refused batch (a duplicated user) leaves the readers where they were; its keys expire, on every node.
    duplicated = write_batch(tmp_path / "bad", seed=3, user_tables=[lists_table("user_id", [5, 6, 5], 4, seed=3)])
    with pytest.raises(InputDataError, match="duplicated user_id"):
        publish(cluster_url, duplicated, "v-bad")
    assert pointers(cluster) == ("v2", "v1") and keys_of(cluster, "v-bad")
    assert all(cluster.ttl(key) > 0 for key in keys_of(cluster, "v-bad"))

    # A third version retires the first: its keys (on all the nodes) expire, its meta hash last.
    publish(cluster_url, write_batch(tmp_path / "b3", seed=4), "v3")
    assert pointers(cluster) == ("v3", "v2")
    assert keys_of(cluster, "v1") and all(cluster.ttl(key) > 0 for key in keys_of(cluster, "v1"))
    assert cluster.hget(KEYS.meta("v1"), "status") == b"retired"

    # Forgetting customers erases their lists and bits under every kept version, and their seen sets.
    forgotten = [3, 4]
    cluster.sadd(seen_key(PREFIX, 3), 77)
    settings = Settings(redis_url=cluster_url, redis_type=CLUSTER, redis_key_prefix=PREFIX)
    assert _forget_in_redis(settings, forgotten) == 2 * 2 + 1  # two versions' lists, one seen set
    for version in ("v3", "v2"):
        for user in forgotten:
            assert not cluster.exists(KEYS.data(version, "user", user))
            assert cluster.getbit(KEYS.known_users(version), user) == 0
        assert cluster.exists(KEYS.data(version, "user", 5)) and cluster.getbit(KEYS.known_users(version), 5) == 1
    assert not cluster.exists(seen_key(PREFIX, 3))
    assert {int(member) for member in cluster.smembers(KEYS.forgotten)} == set(forgotten)


def without_nan(lists: list) -> list:
    """Published lists with NaN (an item without P(click)) as None, so that equal lists compare equal."""
    return [None if found is None else tuple([None if isinstance(x, float) and math.isnan(x) else x for x in part]
                                             for part in found) for found in lists]  # fmt: skip


def comparable(read: CurrentLists) -> tuple:
    return (read.version, without_nan(read.lists), read.seen, read.known, without_nan(read.segments), read.live,
            read.experiment, read.bucket)  # fmt: skip


def test_the_gateways_reads_on_a_cluster_answer_as_its_script_on_one_server(
    cluster: Any, single: Any, cluster_url: str, tmp_path: Path
):
    """The same publishes on both; every kind of read (a known customer, a new visitor with their segments, a
    customer whose list is missing, one written live since, items seen since, similar products, an experiment's
    buckets, the read rate limit, also after the scripts were flushed) gives the same answer from the cluster's
    pipeline as from the one-round-trip script."""
    first, second = write_batch(tmp_path / "b1", seed=1), write_batch(tmp_path / "b2", seed=2)
    for url, redis_type in ((cluster_url, CLUSTER), (REDIS_URL, "redis")):
        publish(url, first, "v1", redis_type)
        publish(url, second, "v2", redis_type, switch=False)  # staged: an experiment's challenger
    for client in (cluster, single):
        client.delete(KEYS.data("v1", "user", 7))  # known to the version, list missing
        client.setbit(KEYS.live_users("v1"), 8, 1)  # written live since the run
        client.sadd(seen_key(PREFIX, 9), 501, 502)

    async def reads(url: str, redis_type: str) -> list[Any]:
        client = (redis.asyncio.RedisCluster if redis_type == CLUSTER else redis.asyncio.Redis).from_url(url)
        reader = ListReader(client, PREFIX, timeout_s=5.0)
        reader.control_ttl_s = 0  # the experiment below starts between reads
        limited = ListReader(client, PREFIX, timeout_s=5.0, read_rate_per_s=0.01, read_burst=2)
        found: list[Any] = []
        try:
            for customer in (1, 7, 8, 9, 10_000, 0, -5):
                found.append(comparable(await reader.current("user", [str(customer)], customer, ask_known=True,
                                                             segments_if_unknown=["3:1", "*"])))  # fmt: skip
            found.append(comparable(await reader.current("similar", ["100", "101", "999"], 9)))
            await client.hset(KEYS.experiment, mapping={"name": "spring", "challenger": "v2", "share": "0.5",
                                                        "salt": "s1"})  # fmt: skip
            for customer in range(1, 13):
                found.append(comparable(await reader.current("user", [str(customer)], customer)))
            found.append(comparable(await limited.current("user", ["1"], 1, api_key="web")))
            await client.script_flush()  # as a restarted node: the bucket's script is loaded again
            found.append(comparable(await limited.current("user", ["1"], 1, api_key="web")))
            with pytest.raises(ReadRateLimited) as refused:
                await limited.current("user", ["1"], 1, api_key="web")
            found.append(0 < refused.value.wait_s <= 100)
            found.append(without_nan(await reader.published("v2", "segment", ["*", "3:1", "9:9"])))
        finally:
            await client.aclose()
        return found

    on_cluster, on_one_server = asyncio.run(reads(cluster_url, CLUSTER)), asyncio.run(reads(REDIS_URL, "redis"))
    assert on_cluster == on_one_server
    known, missing, live, seen, new, zero, negative = on_cluster[:7]
    assert known[3] is None and known[1][0] is not None  # found: no need to ask
    assert missing[3] is True and missing[1] == [None] and missing[4] == []
    assert live[5] is True
    assert seen[2] == frozenset({501, 502})
    assert new[3] is False and all(segment is not None for segment in new[4])  # the generic lists came along
    assert zero[1][0] is not None and negative[3] is False  # user 0 has a list; no bitmap holds a negative id
    buckets = {read[7] for read in on_cluster[8:20]}
    assert buckets == {"control", "challenger"}
    assert all(read[0] == ("v2" if read[7] == "challenger" else "v1") for read in on_cluster[8:20])


def test_the_write_rate_limit_counts_on_a_cluster(cluster: Any, cluster_url: str):
    async def takes() -> list[float]:
        client = redis.asyncio.RedisCluster.from_url(cluster_url)
        try:
            bucket = TokenBucket(client, PREFIX, rate_per_s=0.01, burst=2, timeout_s=5.0)
            return [await bucket.take("ingest") for _ in range(3)]
        finally:
            await client.aclose()

    first, second, third = asyncio.run(takes())
    assert first == second == 0 and third > 0


def test_the_api_serves_a_customer_and_a_new_visitor_from_a_cluster(cluster: Any, cluster_url: str, tmp_path: Path):
    """The gateway with RECSYS_REDIS_TYPE=redis_cluster: a customer's precomputed list, a purchase posted now kept
    out of it, a new visitor's generic list, and both rate limits answered with 429."""
    users = lists_table("user_id", np.arange(1, 21), 6, seed=5)  # product ids the API takes: 1 to 120
    offsets = pa.array(np.arange(0, 20 * 6 + 1, 6, dtype=np.int32))
    users = users.set_column(1, "item_ids", pa.ListArray.from_arrays(offsets, pa.array(np.arange(1, 121))))
    batch = write_batch(tmp_path / "batch", seed=5, user_tables=[users])
    publish(cluster_url, batch, "v1")
    nightly = expected_scored_lists(batch, "users", "user_id")
    generic = expected_scored_lists(batch, "segments", "segment")["*"][0]
    database_url = f"sqlite:///{tmp_path / 'gateway.db'}"
    upgrade(database_url)
    settings = Settings(database_url=database_url, redis_url=cluster_url, redis_type=CLUSTER, redis_key_prefix=PREFIX,
                        live_features=False, redis_timeout_ms=2_000, database_timeout_ms=2_000, read_burst=6,
                        read_rate_per_s=0.01, ingest_burst=3, ingest_rate_per_s=0.01)  # fmt: skip
    with authorized(TestClient(create_app(settings)), database_url) as client:
        answer = client.get("/recommendations/3", params={"count": 6})
        assert answer.status_code == 200, answer.text
        assert answer.json()["route"] == "precomputed"
        assert [item["product_id"] for item in answer.json()["items"]] == nightly[3][0]
        bought = nightly[3][0][0]
        for path, body in (("/customers", {"id": 3}), ("/products", {"id": bought})):
            assert client.post(path, json=body).status_code == 201
        event = {"customer_id": 3, "product_id": bought, "type": "purchase", "session_id": "s-1",
                 "timestamp": "2026-11-01T10:00:00Z"}
        assert client.post("/interactions", json=event).status_code == 201
        after = client.get("/recommendations/3", params={"count": 6}).json()
        assert [item["product_id"] for item in after["items"]] == nightly[3][0][1:]  # kept out at once
        assert cluster.smembers(seen_key(PREFIX, 3)) == {str(bought).encode()}
        visitor = client.get("/recommendations/999999", params={"count": 4}).json()
        assert visitor["route"] == "generic" and [item["product_id"] for item in visitor["items"]] == generic[:4]
        statuses = [client.get("/recommendations/4").status_code for _ in range(4)]
        assert statuses[:3] == [200] * 3 and statuses[3] == 429  # six reads a burst, three spent above
        assert client.post("/products", json={"id": 9_999}).status_code == 429  # three writes a burst, spent


def test_the_operators_commands_work_on_a_cluster(cluster: Any, cluster_url: str, mlflow_tracking_uri: str,
                                                  tmp_path: Path, capsys: pytest.CaptureFixture):  # fmt: skip
    """`recsys publish-recommendations`, `experiment start/status/promote` and `rollback-recommendations` as an
    operator runs them, with RECSYS_REDIS_TYPE=redis_cluster and the cluster's URL in the environment."""
    settings = {"RECSYS_REDIS_URL": cluster_url, "RECSYS_REDIS_TYPE": CLUSTER, "RECSYS_REDIS_KEY_PREFIX": PREFIX,
                "RECSYS_MLFLOW_TRACKING_URI": mlflow_tracking_uri,
                "RECSYS_MLFLOW_ARTIFACT_ROOT": str(tmp_path / "artifacts")}  # fmt: skip

    def recsys(*arguments: str) -> dict:
        assert cli_main(list(arguments)) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    with environment(settings):
        for seed, version in enumerate(["v1", "v2"]):
            batch = write_batch(tmp_path / version, seed=seed)
            staged = ["--stage"] if version == "v2" else []
            recsys("publish-recommendations", "--input", str(batch), "--version", version, "--quiet", *staged)
        assert pointers(cluster) == ("v1", None)
        assert recsys("experiment", "start", "spring", "--challenger", "v2", "--share", "0.5")["control"] == "v1"
        assert recsys("experiment", "status")["challenger"] == "v2"
        recsys("experiment", "promote")
        assert pointers(cluster) == ("v2", "v1") and not cluster.exists(KEYS.experiment)
        assert recsys("rollback-recommendations") == {"current": "v1", "previous": "v2"}
    assert pointers(cluster) == ("v1", "v2")

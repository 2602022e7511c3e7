"""Availability and promotion flags on the request path: cached for a few seconds, forgotten on a write,
and a database outage degrades the answer instead of failing it.

Runs the real gateway in-process on a migrated SQLite file and the real Redis (DB 10, its own prefix),
with a nightly list published by hand; no trained model is needed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError

from recsys.recommendation_store import RecommendationKeys, encode_recommendations
from recsys.settings import Settings
from serving.api.main import create_app
from serving.api.migrate import upgrade
from tests.api_keys import authorized
from tests.redis_databases import delete_keys_under, redis_url

REDIS_URL = redis_url("api")
PREFIX = "flags-test:"
CUSTOMER = 7
NIGHTLY = ([11, 12, 13, 14], [0.9, 0.8, 0.7, 0.6])


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    store = redis.Redis.from_url(REDIS_URL)
    store.set(RecommendationKeys(PREFIX).current, "v1")
    store.set(f"{PREFIX}recs:v1:user:{CUSTOMER}", encode_recommendations(*NIGHTLY))
    database_url = f"sqlite:///{tmp_path / 'gateway.db'}"
    upgrade(database_url)
    # Generous budgets (2 busy cores in the full suite): the test counts database reads, not their speed.
    settings = Settings(database_url=database_url, redis_url=REDIS_URL, redis_key_prefix=PREFIX,
                        redis_timeout_ms=2_000, database_timeout_ms=2_000, product_flags_ttl_s=3600)  # fmt: skip
    try:
        with authorized(TestClient(create_app(settings)), database_url) as test_client:
            for product in NIGHTLY[0]:
                assert test_client.post("/products", json={"id": product}).status_code == 201
            yield test_client
    finally:
        delete_keys_under(store, PREFIX)


def count_reads(client: TestClient) -> list[list[int]]:
    """The product ids each database read of flags asked for, from now on."""
    recommender = client.app.state.recommender  # type: ignore[attr-defined]
    reads: list[list[int]] = []
    read = recommender.product_flags

    async def counted(items):  # type: ignore[no-untyped-def]
        reads.append(sorted(items))
        return await read(items)

    recommender.product_flags = counted
    return reads


def items(client: TestClient, **params: object) -> list[int]:
    response = client.get(f"/recommendations/{CUSTOMER}", params=params)
    assert response.status_code == 200, response.text
    return [item["product_id"] for item in response.json()["items"]]


def test_flags_are_read_once_then_served_from_the_process(client: TestClient) -> None:
    reads = count_reads(client)
    assert items(client) == NIGHTLY[0]
    assert items(client) == NIGHTLY[0] and items(client, count=2) == NIGHTLY[0][:2]
    assert reads == [NIGHTLY[0]]


def test_a_product_written_through_the_gateway_applies_to_the_next_request(client: TestClient) -> None:
    assert items(client) == NIGHTLY[0]
    reads = count_reads(client)
    assert client.patch("/products/12", json={"available": False}).status_code == 200
    assert items(client) == [11, 13, 14]
    assert reads == [[12]]  # only the changed product was read again


def test_a_database_outage_degrades_the_answer_and_keeps_cached_flags(client: TestClient) -> None:
    assert client.patch("/products/12", json={"available": False}).status_code == 200
    assert items(client) == [11, 13, 14]
    recommender = client.app.state.recommender  # type: ignore[attr-defined]
    recommender.forget_product(14)  # 14 must be read again, and the database is gone meanwhile

    async def unreachable(items):  # type: ignore[no-untyped-def]  # the fault: a database that cannot be reached
        raise OperationalError("SELECT", {}, ConnectionRefusedError("connection refused"))

    recommender.product_flags = unreachable
    response = client.get(f"/recommendations/{CUSTOMER}")
    assert response.status_code == 200
    body = response.json()
    assert body["degraded"] == ["database_unavailable"] and body["route"] == "precomputed"
    # 12 is still known to be unavailable; 14, unknown now, keeps the nightly run's view (available).
    assert [item["product_id"] for item in body["items"]] == [11, 13, 14]


def test_the_process_copy_keeps_the_whole_list_whatever_count_was_asked(client: TestClient) -> None:
    assert items(client, count=1) == [11]
    recommender = client.app.state.recommender  # type: ignore[attr-defined]
    copy = recommender._local_copy("user", str(CUSTOMER))
    assert copy.items == NIGHTLY[0]


@pytest.mark.parametrize("temperature", [0, 0.5])
def test_a_list_whose_products_all_became_unavailable_is_an_empty_answer(client: TestClient,
                                                                         temperature: float) -> None:
    for product in NIGHTLY[0]:
        assert client.patch(f"/products/{product}", json={"available": False}).status_code == 200
    assert items(client, temperature=temperature, seed=1) == []

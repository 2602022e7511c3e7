"""Who may call what: API keys with scopes (401, 403), the key CLI, and rate limits per key (429).

The real gateway in-process on a migrated SQLite file; rate-limit buckets in the real Redis (DB 10,
this file's own key prefix, removed afterwards).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from recsys.database import database_url as engine_url
from recsys.settings import Settings
from serving.api import keys
from serving.api.main import create_app
from serving.api.migrate import upgrade
from tests.api_keys import new_key
from tests.redis_databases import delete_keys_under, redis_url
from tests.servers import free_port

REDIS_URL = redis_url("api")
PREFIX = "security-test:"


@pytest.fixture
def database(tmp_path: Path) -> Iterator[str]:
    url = f"sqlite:///{tmp_path / 'gateway.db'}"
    upgrade(url)
    yield url
    delete_keys_under(redis.Redis.from_url(REDIS_URL), PREFIX)


def gateway(database_url: str, **overrides: object) -> TestClient:
    settings = Settings(database_url=database_url, redis_url=REDIS_URL, redis_key_prefix=PREFIX,
                        redis_timeout_ms=2_000, database_timeout_ms=5_000, **overrides)  # type: ignore[arg-type]  # fmt: skip
    return TestClient(create_app(settings))


def interaction(number: int) -> dict[str, object]:
    return {"type": "view", "customer_id": 1, "product_id": 10, "session_id": f"s{number}",
            "timestamp": datetime(2024, 5, 1, tzinfo=UTC).isoformat()}  # fmt: skip


def seed(client: TestClient, admin: str) -> None:
    headers = {"X-API-Key": admin}
    assert client.post("/customers", json={"id": 1}, headers=headers).status_code == 201
    assert client.post("/products", json={"id": 10}, headers=headers).status_code == 201


def test_no_key_or_an_unknown_one_is_401_and_health_and_docs_are_open(database: str) -> None:
    with gateway(database) as client:
        for path in ("/recommendations/1", "/products/10", "/customers/1", "/interactions"):
            missing = client.get(path)
            assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == "ApiKey", path
            assert client.get(path, headers={"X-API-Key": "rk_not-a-key"}).status_code == 401, path
        assert client.post("/interactions", json=interaction(0)).status_code == 401
        assert client.get("/health").status_code == 200
        assert client.get("/openapi.json").status_code == 200 and client.get("/docs").status_code == 200


@pytest.mark.parametrize(
    ("scopes", "allowed"),
    [
        (("read",), {"recommendations", "read product"}),
        (("ingest",), {"post interaction"}),
        (("admin",), {"write product", "read customer", "read interactions"}),
    ],
)
def test_each_scope_opens_its_routes_and_nothing_else(database: str, scopes: tuple[str, ...], allowed: set[str]):
    with gateway(database) as client:
        seed(client, new_key(database, ("admin",)))
        headers = {"X-API-Key": new_key(database, scopes)}
        calls = {
            "recommendations": lambda: client.get("/recommendations/1", headers=headers),
            "read product": lambda: client.get("/products/10", headers=headers),
            "post interaction": lambda: client.post("/interactions", json=interaction(1), headers=headers),
            "write product": lambda: client.patch("/products/10", json={"promoted": True}, headers=headers),
            "read customer": lambda: client.get("/customers/1", headers=headers),
            "read interactions": lambda: client.get("/interactions", headers=headers),
        }
        statuses = {name: call().status_code for name, call in calls.items()}
    assert {name for name, status in statuses.items() if status != 403} == allowed, statuses
    assert all(status < 400 for name, status in statuses.items() if name in allowed), statuses


def test_the_cli_creates_lists_and_revokes_keys_and_stores_only_their_hash(database: str, capsys) -> None:
    assert keys.main(["--database-url", database, "create", "web-tier", "--scopes", "read"]) == 0
    secret = capsys.readouterr().out.strip()
    assert secret.startswith("rk_") and len(secret) > 40
    assert keys.main(["--database-url", database, "create", "web-tier", "--scopes", "read"]) == 1  # name taken
    capsys.readouterr()
    with gateway(database, api_key_cache_s=0) as client:
        assert client.get("/products/10", headers={"X-API-Key": secret}).status_code == 404  # in, and no such product
        assert keys.main(["--database-url", database, "list"]) == 0
        listing = capsys.readouterr().out
        assert "web-tier" in listing and "read" in listing and "live" in listing and secret not in listing
        assert keys.main(["--database-url", database, "revoke", "web-tier"]) == 0
        assert client.get("/products/10", headers={"X-API-Key": secret}).status_code == 401
    assert keys.main(["--database-url", database, "revoke", "web-tier"]) == 1  # nothing live by that name
    engine = create_engine(engine_url(database))
    with engine.connect() as connection:
        stored = " ".join(str(value) for row in connection.execute(text("SELECT * FROM api_keys")) for value in row)
    engine.dispose()
    assert secret not in stored and secret[10:] not in stored


def test_a_revoked_key_works_until_the_cache_forgets_it(database: str) -> None:
    secret = new_key(database, ("read",))
    with gateway(database, api_key_cache_s=3600) as client:
        assert client.get("/products/10", headers={"X-API-Key": secret}).status_code == 404
        assert keys.main(["--database-url", database, "revoke", next(iter(names(database)))]) == 0
        assert client.get("/products/10", headers={"X-API-Key": secret}).status_code == 404  # cached
    with gateway(database, api_key_cache_s=3600) as client:  # a new process reads the key again
        assert client.get("/products/10", headers={"X-API-Key": secret}).status_code == 401


def names(database: str) -> list[str]:
    engine = create_engine(engine_url(database))
    with engine.connect() as connection:
        found = [row.name for row in connection.execute(text("SELECT name FROM api_keys"))]
    engine.dispose()
    return found


def test_writes_over_the_rate_are_429_with_retry_after_per_key_and_shared_by_workers(database: str) -> None:
    limits = {"ingest_rate_per_s": 0.5, "ingest_burst": 3}
    admin, tracker, other = (new_key(database, scopes) for scopes in (("admin",), ("ingest",), ("ingest",)))
    with gateway(database, **limits) as first, gateway(database, **limits) as second:  # two workers
        seed(first, admin)
        statuses = [worker.post("/interactions", json=interaction(number), headers={"X-API-Key": tracker})
                    for number, worker in enumerate([first, second, first, second])]  # fmt: skip
        assert [response.status_code for response in statuses] == [201, 201, 201, 429]
        refused = statuses[-1]
        assert 1 <= int(refused.headers["Retry-After"]) <= 2 and "rate limit" in refused.json()["detail"]
        # Another key has its own bucket.
        assert second.post("/interactions", json=interaction(9), headers={"X-API-Key": other}).status_code == 201


def test_without_redis_writes_are_let_through_unlimited(database: str) -> None:
    tracker = new_key(database, ("ingest",))
    limits = {"ingest_rate_per_s": 0.5, "ingest_burst": 1}
    with gateway(database) as client:
        seed(client, new_key(database, ("admin",)))
    settings = Settings(database_url=database, redis_url=f"redis://127.0.0.1:{free_port()}/0",
                        redis_timeout_ms=100, **limits)  # type: ignore[arg-type]  # fmt: skip
    with TestClient(create_app(settings)) as client:
        statuses = [client.post("/interactions", json=interaction(number), headers={"X-API-Key": tracker}).status_code
                    for number in range(3)]  # fmt: skip
    assert statuses == [201, 201, 201]


def test_reads_over_the_rate_are_429_with_retry_after_per_key_and_shared_by_routes_and_workers(database: str) -> None:
    """Recommendation reads take their key's token in the Lua call that reads the list (serving/recommender.py; that
    a read stays one round trip is `test_new_visitor_gets_the_generic_list_of_their_segment`'s to check)."""
    limits = {"read_rate_per_s": 0.5, "read_burst": 3, "triton_url": f"http://127.0.0.1:{free_port()}"}
    reader, other = new_key(database, ("read",)), new_key(database, ("read",))
    with gateway(database, **limits) as first, gateway(database, **limits) as second:  # two workers
        statuses = [worker.get(path, headers={"X-API-Key": reader})
                    for worker, path in ((first, "/recommendations/7"), (second, "/products/5/similar"),
                                         (first, "/recommendations/8"), (second, "/recommendations/9"))]  # fmt: skip
        assert [response.status_code for response in statuses] == [200, 200, 200, 429]
        refused = statuses[-1]
        assert 1 <= int(refused.headers["Retry-After"]) <= 2 and "read rate limit" in refused.json()["detail"]
        # Another key has its own bucket.
        assert second.get("/recommendations/7", headers={"X-API-Key": other}).status_code == 200

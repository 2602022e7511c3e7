"""Forgetting a customer, store by store, where it can be shown without a trained run: the impression logs
(rewritten while the gateway's writer appends), the landing zone's extracts, and the tombstone's effect on the
API. The whole operation against real Redis, Feast and Triton is `tests/test_recommendations_api.py`'s
`test_a_forgotten_customer_is_gone_from_every_store_and_stays_gone`."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis
from fastapi.testclient import TestClient

from recsys.impression_log import partition_dir, read_impressions, remove_customers
from recsys.settings import Settings
from serving.api.impressions import ImpressionLog
from serving.api.main import create_app
from serving.forget import forget_customers
from tasks.extract_interactions import partition_path
from tasks.monitor import floor_hour
from tests.api_keys import authorized
from tests.redis_databases import delete_keys_under, redis_url

REDIS_URL = redis_url("api")  # shared with other in-process gateways: keys under PREFIX only
PREFIX = "forget-test:"


def test_impression_lines_of_a_forgotten_customer_go_and_no_concurrent_append_is_lost(tmp_path: Path):
    """The gateway's writer thread appends while the files are rewritten again and again: every line of the
    other customers is there at the end, none of the forgotten one's written before the last rewrite."""
    log = ImpressionLog(tmp_path, flush_interval_s=0.001)
    log.start()
    moment = datetime(2026, 12, 4, 10, 30, tzinfo=UTC)
    stop = threading.Event()
    removed_total = 0

    def rewrite() -> None:
        nonlocal removed_total
        while not stop.is_set():
            removed_total += remove_customers(tmp_path, [13])[0]

    rewriter = threading.Thread(target=rewrite)
    rewriter.start()
    try:
        for number in range(3_000):
            log.record({"request_id": str(number), "time": moment.timestamp(), "customer_id": 13 if number % 3 == 0
                        else 100 + number, "items": [7, 8]})  # fmt: skip
            if number % 100 == 0:
                time.sleep(0.005)  # let batches go out between rewrites
    finally:
        log.close()
        stop.set()
        rewriter.join()
    removed, _ = remove_customers(tmp_path, [13])
    records, malformed = read_impressions(tmp_path, floor_hour(moment))
    assert malformed == 0
    assert sorted(int(record["request_id"]) for record in records) == [n for n in range(3_000) if n % 3]
    assert removed_total + removed == 1_000 and removed_total > 0  # rewrites ran while the writer appended
    assert not list(partition_dir(tmp_path, moment).glob(".*.tmp"))


def extract_rows(customers: list[int]) -> pa.Table:
    return pa.table({"user_id": pa.array(customers, pa.int64()), "item_id": pa.array(range(len(customers)),
                                                                                      pa.int64())})  # fmt: skip


@pytest.fixture
def settings(migrated_database_url: str, tmp_path: Path) -> Iterator[Settings]:
    client = redis.Redis.from_url(REDIS_URL)
    delete_keys_under(client, PREFIX)
    yield Settings(database_url=migrated_database_url, redis_url=REDIS_URL, redis_key_prefix=PREFIX,
                    landing_dir=str(tmp_path / "landing"), impressions_dir=tmp_path / "impressions",
                    feast_registry_path=tmp_path / "no-feast" / "registry.db", live_features=False)  # fmt: skip
    delete_keys_under(client, PREFIX)
    client.close()


def test_forgetting_rewrites_only_the_extracts_that_hold_the_customer_and_the_id_cannot_come_back(
    settings: Settings, tmp_path: Path
):
    """Extract days with the customer are rewritten without their rows (others untouched, byte for byte);
    the database keeps a tombstone: the API refuses the id with 410 and a second forget finds nothing left."""
    landing = Path(settings.landing_location)
    with_them, without_them = partition_path(landing, date(2026, 12, 1)), partition_path(landing, date(2026, 12, 2))
    for path, customers in ((with_them, [5, 13, 13, 6]), (without_them, [5, 6])):
        path.parent.mkdir(parents=True)
        pq.write_table(extract_rows(customers), path)
    untouched = without_them.read_bytes()
    with authorized(TestClient(create_app(settings)), settings.database_url) as client:
        assert client.post("/customers", json={"id": 13}).status_code == 201
        report = client.post("/customers/13/forget")
        assert report.status_code == 200, report.text
        assert report.json() | {"customer_ids": [13], "customers_deleted": 1, "extract_rows_removed": 2,
                                "extract_files_rewritten": 1} == report.json()  # fmt: skip
        assert pq.read_table(with_them).column("user_id").to_pylist() == [5, 6]
        assert without_them.read_bytes() == untouched
        assert client.get("/customers/13").status_code == 404
        again = client.post("/customers", json={"id": 13})
        assert again.status_code == 410 and "forgotten" in again.json()["detail"]
        assert client.post("/customers/13/forget").json()["extract_rows_removed"] == 0  # idempotent
    second = forget_customers(settings, [13])  # the CLI's call
    assert second["customers_deleted"] == 0 and second["redis_keys_deleted"] == 0

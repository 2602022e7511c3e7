"""`extract_interactions`: what is posted through the gateway's API reaches the landing zone, one day at a time.

Runs on SQLite and PostgreSQL (the `database_url` fixture), with the data written through the real API.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import date, datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from recsys.interactions import IngestionColumns
from recsys.settings import PROJECT_ROOT, Settings
from recsys.spec import DatasetSpec, SpecError, load_spec, parse_spec
from serving.api.main import create_app
from tasks.batch_score import read_unavailable
from tasks.cli import main as recsys_main
from tasks.extract_interactions import (
    arrow_schema,
    export_unavailable_items,
    extract_interactions,
    partition_path,
)
from tests.api_keys import authorized
from tests.redis_databases import redis_url

DAY = date(2024, 5, 1)


def unix(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp())


@pytest.fixture
def client(migrated_database_url: str) -> Iterator[TestClient]:
    app = create_app(Settings(database_url=migrated_database_url, redis_url=redis_url("api")))
    with authorized(TestClient(app), migrated_database_url) as client:
        for body in (
            {"id": 1, "location": "DE", "device": "mobile", "attributes": {"user_age": 3, "user_gender": 2}},
            {"id": 2, "location": "FR", "device": "app"},
        ):  # fmt: skip
            assert client.post("/customers", json=body).status_code == 201
        stored_before_profiles_were_typed(migrated_database_url, 1, {"user_profile": "not an int", "nickname": "x"})
        for body in ({"id": 10, "attributes": {"item_category": 7, "item_shop": 70, "item_brand": 700}},
                     {"id": 11, "attributes": {"item_category": 8}, "available": False}):  # fmt: skip
            assert client.post("/products", json=body).status_code == 201
        stored_before_profiles_were_typed(migrated_database_url, 11, {"item_shop": 2**40}, table="products")
        yield client


def stored_before_profiles_were_typed(database_url: str, row_id: int, attributes: dict, *,
                                     table: str = "customers") -> None:  # fmt: skip
    """Attributes the API now refuses (a string or a too big number for an int32 feature, a name no feature has),
    written straight into a customer's or product's row, as a gateway before typed attributes stored them: the
    extract must still cope."""
    from sqlalchemy.orm import Session

    from recsys.database import Customer, Product, create_database_engine

    engine = create_database_engine(database_url, timeout_ms=None)
    try:
        with Session(engine) as session:
            row = session.get(Customer if table == "customers" else Product, row_id)
            assert row is not None
            row.attributes = {**row.attributes, **attributes}
            session.commit()
    finally:
        engine.dispose()


def post(client: TestClient, **fields: object) -> None:
    body = {"type": "view", "customer_id": 1, "product_id": 10, "session_id": "s-1", **fields}
    response = client.post("/interactions", json=body)
    assert response.status_code == 201, response.text


def read_rows(path: Path) -> list[dict]:
    rows = pq.read_table(path).to_pylist()
    return sorted(rows, key=lambda row: (row["user_id"], row["item_id"], row["event_timestamp"]))


def test_interactions_posted_through_the_api_appear_in_their_days_extract(
    client: TestClient, migrated_database_url: str, tmp_path: Path, spec: DatasetSpec
) -> None:
    # Customer 1, session s-1: a view, a click, a purchase of product 10 -> one row, both targets 1.
    # The view is 01:30 on May 1st in +02:00 notation: 23:30 UTC on April 30th, so another day.
    post(client, type="view", timestamp="2024-05-01T08:00:00Z", location="IT", device="desktop",
         context={"position": 3})
    post(client, type="click", timestamp="2024-05-01T08:01:00+00:00", context={"position": 1})
    post(client, type="purchase", timestamp="2024-05-01T10:05:00+02:00")
    # The same customer and product in another session: a row of its own, a view only.
    post(client, type="view", session_id="s-2", timestamp="2024-05-01T20:00:00Z")
    # Customer 2 adds product 11 to the cart; no location or device sent: the customer's are used.
    post(client, type="add_to_cart", customer_id=2, product_id=11, timestamp="2024-05-01T23:59:59Z")
    # Other days (UTC): excluded.
    post(client, type="purchase", timestamp="2024-05-01T01:30:00+02:00")
    post(client, type="click", customer_id=2, timestamp="2024-05-02T00:00:00Z")

    metrics = extract_interactions(migrated_database_url, tmp_path / "landing", DAY)

    output = tmp_path / "landing" / "interactions" / "day=2024-05-01" / "part-00000.parquet"
    assert metrics["output"] == str(output) == str(partition_path(tmp_path / "landing", DAY))
    table = pq.read_table(output)
    assert table.schema == arrow_schema(spec)  # the spec's columns, order and types: what csv_to_parquet writes
    rows = read_rows(output)
    assert [(row["user_id"], row["item_id"], row["click"], row["conversion"]) for row in rows] == [
        (1, 10, 1, 1), (1, 10, 0, 0), (2, 11, 1, 0),
    ]  # fmt: skip
    bought, viewed, carted = rows
    assert bought["event_timestamp"] == unix("2024-05-01T08:00:00+00:00")  # the first event of the group
    assert (bought["location"], bought["device"]) == ("IT", "desktop")  # the first event's
    assert (viewed["location"], viewed["device"]) == ("DE", "mobile")  # none sent: the customer's
    assert (carted["location"], carted["device"]) == ("FR", "app")
    assert (bought["item_category"], bought["item_shop"], bought["item_brand"]) == (7, 70, 700)
    assert (carted["item_category"], carted["item_shop"], carted["item_brand"]) == (8, None, None)
    assert (bought["user_age"], bought["user_gender"]) == (3, 2)  # profile attributes named as user features
    assert bought["user_profile"] is None  # a string in an int32 column: left null, counted
    assert carted["user_age"] is None
    assert bought["item_intention"] is None  # not sent
    assert (bought["position"], viewed["position"], carted["position"]) == (3, None, None)  # the first event's context
    assert all(row[name] is None for row in rows for name in spec.user_item_features)  # never known to the gateway

    assert metrics["interactions"] == 5 and metrics["rows"] == 3
    assert metrics["positive_rows"] == {"click": 2, "conversion": 1}
    assert metrics["customers"] == 2 and metrics["products"] == 2
    assert metrics["attribute_values_dropped"] == 3  # user_profile in each of customer 1's two rows, item_shop of 11
    assert metrics["rows_over_5_null_features"] == 3
    assert "user_item_categories" in metrics["features_never_filled"]
    assert "user_age" not in metrics["features_never_filled"]


def test_another_specs_context_features_come_from_the_events_context(migrated_database_url: str,
                                                                     tmp_path: Path) -> None:  # fmt: skip
    """shop_events' context features (`slot`, `channel`) are neither location nor device: a gateway on that spec
    takes them in an interaction's `context`, and its extract writes them into their own columns."""
    path = PROJECT_ROOT / "tests" / "data" / "shop_events.yaml"
    app = create_app(Settings(database_url=migrated_database_url, redis_url=redis_url("api"), spec=path))
    with authorized(TestClient(app), migrated_database_url) as client:
        assert client.post("/customers", json={"id": 1, "attributes": {"customer_segment": 4}}).status_code == 201
        assert client.post("/products", json={"id": 10, "attributes": {"sku_brand": 9}}).status_code == 201
        post(client, timestamp="2024-05-01T08:00:00Z", context={"slot": 2, "channel": "app"})
        post(client, type="click", session_id="s-2", timestamp="2024-05-01T09:00:00Z", context={"channel": "web"})

    spec = load_spec(path)
    extract_interactions(migrated_database_url, tmp_path, DAY, spec=spec)
    rows = pq.read_table(partition_path(tmp_path, DAY)).to_pylist()
    assert [(row["customer"], row["sku"], row["slot"], row["channel"], row["clicked"]) for row in rows] == [
        (1, 10, 2, "app", 0), (1, 10, None, "web", 1),
    ]  # fmt: skip
    assert {row["customer_segment"] for row in rows} == {4} and {row["sku_brand"] for row in rows} == {9}


def test_a_rerun_replaces_the_day_with_the_same_bytes_and_picks_up_late_events(
    client: TestClient, migrated_database_url: str, tmp_path: Path
) -> None:
    post(client, type="click", timestamp="2024-05-01T08:00:00Z")
    landing = tmp_path / "landing"
    output = partition_path(landing, DAY)
    extract_interactions(migrated_database_url, landing, DAY)
    first = output.read_bytes()
    extract_interactions(migrated_database_url, landing, DAY)
    assert output.read_bytes() == first  # replayable: same database, same bytes
    assert sorted(path.name for path in output.parent.iterdir()) == ["part-00000.parquet"]  # nothing left aside

    post(client, type="view", customer_id=2, timestamp="2024-05-01T09:00:00Z")  # arrives late
    metrics = extract_interactions(migrated_database_url, landing, DAY)
    assert metrics["rows"] == 2 and len(read_rows(output)) == 2  # replaced, not appended
    assert sorted(path.name for path in output.parent.iterdir()) == ["part-00000.parquet"]


def test_a_day_without_interactions_gets_an_empty_file_with_the_schema(
    migrated_database_url: str, tmp_path: Path, spec: DatasetSpec
) -> None:
    metrics = extract_interactions(migrated_database_url, tmp_path, date(2030, 1, 1))
    table = pq.read_table(metrics["output"])
    assert table.num_rows == 0 and table.schema == arrow_schema(spec)


def test_the_cli_extracts_and_exports_unavailable_items(
    client: TestClient, migrated_database_url: str, tmp_path: Path, spec: DatasetSpec,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    post(client, type="click", timestamp="2024-05-01T08:00:00Z")
    code = recsys_main(["extract-interactions", "--day", "2024-05-01", "--database-url", migrated_database_url,
                        "--output", str(tmp_path / "landing")])  # fmt: skip
    assert code == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 1
    assert partition_path(tmp_path / "landing", DAY).exists()

    csv_path = tmp_path / "unavailable.csv"
    assert recsys_main(["export-unavailable-items", "--database-url", migrated_database_url,
                        "--output", str(csv_path)]) == 0  # fmt: skip
    assert read_unavailable(csv_path, spec) == {11}  # what batch_score's --unavailable-items reads
    assert client.patch("/products/11", json={"available": True}).status_code == 200
    assert export_unavailable_items(migrated_database_url, csv_path)["unavailable_items"] == 0
    assert read_unavailable(csv_path, spec) == set()


def test_a_spec_whose_targets_cannot_be_derived_is_refused(migrated_database_url: str, tmp_path: Path,
                                                           spec: DatasetSpec) -> None:  # fmt: skip
    roles = {"user_id": spec.user_id, "item_id": spec.item_id, "timestamp": spec.timestamp,
             "item_features": list(spec.item_features), "targets": ["click", "conversion"]}  # fmt: skip
    raw = {"name": "x", "splits": spec.splits, "columns": spec.columns, "roles": roles}  # no purchase_target
    with pytest.raises(SpecError, match="conversion cannot be derived"):
        extract_interactions(migrated_database_url, tmp_path, DAY, spec=parse_spec(raw))
    with pytest.raises(SpecError, match="not a column"):
        extract_interactions(migrated_database_url, tmp_path, DAY, columns=IngestionColumns(device="channel"))


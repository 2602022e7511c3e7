"""The gateway's metrics, request ids, request log and impression files, on a real Redis (DB 7) and SQLite.

Lists are published to Redis DB 7 under `test-monitor:` as the publisher stores them (a version pointer and
lists encoded by `encode_recommendations`); Triton's URL is a closed port, so a customer without a nightly list
meets the real `triton_unavailable` fallback, and a second gateway on a closed Redis port the real
`redis_unavailable` one.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from recsys.impression_log import partition_dir, read_impressions
from recsys.recommendation_store import RecommendationKeys, encode_recommendations
from recsys.settings import Settings
from serving.api.impressions import ImpressionLog
from serving.api.main import create_app
from serving.api.migrate import upgrade
from tasks.monitor import MonitoringConfig, floor_hour, monitor_hour
from tests.api_keys import authorized
from tests.redis_databases import delete_keys_under, redis_url
from tests.servers import free_port

REDIS_URL = redis_url("gateway")
PREFIX = "test-monitor:"
VERSION = "v-monitor"
CUSTOMER = 101
CUSTOMER_ITEMS = list(range(1_001, 1_031))  # 30 items, best first
GENERIC_ITEMS = list(range(2_001, 2_021))


def _delete_prefix(client: redis.Redis) -> None:
    delete_keys_under(client, PREFIX)


@pytest.fixture
def published() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(REDIS_URL)
    _delete_prefix(client)
    scores = [1.0 - index / 100 for index in range(30)]
    client.set(RecommendationKeys(PREFIX).current, VERSION)
    client.set(f"{PREFIX}recs:{VERSION}:user:{CUSTOMER}", encode_recommendations(CUSTOMER_ITEMS, scores))
    client.set(f"{PREFIX}recs:{VERSION}:segment:*", encode_recommendations(GENERIC_ITEMS, scores[:20]))
    yield client
    _delete_prefix(client)


def gateway(tmp_path: Path, **overrides: object) -> tuple[TestClient, str]:
    """An app with its own database, impressions folder and closed Triton port; (authorized client, database URL)."""
    database_url = f"sqlite:///{tmp_path / 'gateway.db'}"
    upgrade(database_url)
    values: dict[str, object] = {
        "database_url": database_url, "redis_url": REDIS_URL, "redis_key_prefix": PREFIX,
        "triton_url": f"http://127.0.0.1:{free_port()}", "impressions_dir": tmp_path / "impressions",
        "redis_timeout_ms": 2_000, "triton_timeout_ms": 2_000,  # generous: 2 busy cores; the benchmark checks speed
    }  # fmt: skip
    settings = Settings(**{**values, **overrides})  # type: ignore[arg-type]
    return authorized(TestClient(create_app(settings)), database_url), database_url


def scrape(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics without an API key: sample (name, sorted labels) -> value."""
    key = client.headers.pop("X-API-Key")
    try:
        answer = client.get("/metrics")
    finally:
        client.headers["X-API-Key"] = key
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(answer.text) for sample in family.samples}  # fmt: skip


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


RECOMMENDATIONS = "/recommendations/{customer_id}"
SIMILAR = "/products/{product_id}/similar"


def test_metrics_count_latency_answers_fallbacks_errors_and_keys(published: redis.Redis, tmp_path: Path):
    client, _ = gateway(tmp_path / "up")
    with client:
        assert client.get(f"/recommendations/{CUSTOMER}").json()["route"] == "precomputed"
        stranger = client.get("/recommendations/999").json()  # no nightly list: Triton (down) -> generic
        assert stranger["route"] == "generic" and stranger["degraded"] == ["triton_unavailable"]
        similar = client.get("/products/1001/similar").json()  # no similar list published: Triton (down) -> generic
        assert similar["route"] == "generic" and similar["degraded"] == ["triton_unavailable"]
        assert client.get("/recommendations/0").status_code == 422
        assert client.get("/no/such/path").status_code == 404
        assert client.get(f"/recommendations/{CUSTOMER}", headers={"X-API-Key": "rk_wrong"}).status_code == 401
        samples = scrape(client)
        again = scrape(client)
    key_names = {dict(labels)["api_key"] for name, labels in samples if name == "recsys_http_requests_by_api_key_total"}
    assert len(key_names - {"none"}) == 1, key_names
    [key_name] = key_names - {"none"}

    histogram = "recsys_http_request_duration_seconds_count"
    assert value(samples, histogram, method="GET", handler=RECOMMENDATIONS, status="200") == 2
    assert value(samples, histogram, method="GET", handler=SIMILAR, status="200") == 1
    assert value(samples, histogram, method="GET", handler=RECOMMENDATIONS, status="422") == 1
    assert value(samples, histogram, method="GET", handler=RECOMMENDATIONS, status="401") == 1
    assert value(samples, histogram, method="GET", handler="unmatched", status="404") == 1
    assert value(samples, "recsys_http_request_duration_seconds_bucket", method="GET", handler=RECOMMENDATIONS,
                 status="200", le="+Inf") == 2  # fmt: skip
    assert value(samples, "recsys_http_request_duration_seconds_sum", method="GET", handler=RECOMMENDATIONS,
                 status="200") > 0  # fmt: skip
    assert value(samples, "recsys_recommendations_total", handler=RECOMMENDATIONS, route="precomputed") == 1
    assert value(samples, "recsys_recommendations_total", handler=RECOMMENDATIONS, route="generic") == 1
    assert value(samples, "recsys_recommendations_total", handler=SIMILAR, route="generic") == 1
    assert value(samples, "recsys_recommendation_fallbacks_total", cause="triton_unavailable") == 2
    for status, handler in (("422", RECOMMENDATIONS), ("401", RECOMMENDATIONS), ("404", "unmatched")):
        assert value(samples, "recsys_http_errors_total", method="GET", handler=handler, status=status) == 1
    assert not any(name == "recsys_http_errors_total" and dict(labels)["status"] == "200" for name, labels in samples)
    # The key that authenticated, by name (3 answers and the 422); the 404, the 401 and the scrape carry none.
    assert value(samples, "recsys_http_requests_by_api_key_total", api_key=key_name) == 4
    assert value(samples, "recsys_http_requests_by_api_key_total", api_key="none") == 2
    assert value(again, histogram, method="GET", handler="/metrics", status="200") == 1
    assert "/recommendations/101" not in json.dumps([labels for _, labels in samples])  # templates, never raw paths

    # Redis down: another app (its own registry) counts the redis_unavailable fallback; the first app's does not.
    down, _ = gateway(tmp_path / "down", redis_url=f"redis://127.0.0.1:{free_port()}/7")
    with down:
        body = down.get(f"/recommendations/{CUSTOMER}").json()
        assert body["route"] == "none" and body["degraded"] == ["redis_unavailable"]
        down_samples = scrape(down)
    assert value(down_samples, "recsys_recommendation_fallbacks_total", cause="redis_unavailable") == 1
    assert value(down_samples, "recsys_recommendations_total", handler=RECOMMENDATIONS, route="none") == 1
    assert value(down_samples, histogram, method="GET", handler=RECOMMENDATIONS, status="200") == 1
    assert value(samples, "recsys_recommendation_fallbacks_total", cause="redis_unavailable") == 0


def test_impressions_are_written_with_the_request_id_and_the_request_is_logged(
    published: redis.Redis, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    client, _ = gateway(tmp_path)
    before = datetime.now(UTC)
    with client, caplog.at_level(logging.INFO, logger="serving.api.requests"):
        answer = client.get(f"/recommendations/{CUSTOMER}", params={"count": 5}, headers={"X-Request-ID": "web.req-42"})
        similar = client.get("/products/1001/similar", params={"count": 3})
        unsafe = client.get(f"/recommendations/{CUSTOMER}", headers={"X-Request-ID": "two words"})
        too_long = client.get(f"/recommendations/{CUSTOMER}", headers={"X-Request-ID": "x" * 65})
        health = client.get("/health")
    # Closing the client ran the lifespan's shutdown, which drains the writer's queue.
    after = datetime.now(UTC)

    assert answer.headers["X-Request-ID"] == answer.json()["request_id"] == "web.req-42"
    generated = [response.headers["X-Request-ID"] for response in (similar, unsafe, too_long, health)]
    assert all(len(request_id) == 32 and int(request_id, 16) >= 0 for request_id in generated)
    assert len(set(generated)) == 4
    assert [response.json()["request_id"] for response in (similar, unsafe, too_long)] == generated[:3]

    hours = {floor_hour(before), floor_hour(after)}
    records = [record for hour in sorted(hours) for record in read_impressions(tmp_path / "impressions", hour)[0]]
    assert [record["request_id"] for record in records] == ["web.req-42", *generated[:3]]  # not /health
    files = list(partition_dir(tmp_path / "impressions", before).glob("*.jsonl"))
    assert len(files) == 1 and files[0].name.endswith(".jsonl") and "-" in files[0].name  # <host>-<pid>.jsonl
    first, second = records[0], records[1]
    key_name = first["api_key"]
    assert key_name.startswith("test-")
    assert before <= first["time"] <= after and first["time"].tzinfo is not None
    assert first == {
        "request_id": "web.req-42", "time": first["time"], "customer_id": CUSTOMER, "handler": RECOMMENDATIONS,
        "route": "precomputed", "model_version": VERSION, "degraded": [], "api_key": key_name, "temperature": 0.0,
        "items": [{"product_id": item, "position": position} for position, item in enumerate(CUSTOMER_ITEMS[:5])],
    }  # fmt: skip
    assert second["customer_id"] is None and second["handler"] == SIMILAR
    assert second["route"] == "generic" and second["degraded"] == ["triton_unavailable"]
    assert [item["product_id"] for item in second["items"]] == GENERIC_ITEMS[:3]

    lines = [json.loads(record.getMessage()) for record in caplog.records if record.name == "serving.api.requests"]
    assert [line["request_id"] for line in lines] == ["web.req-42", *generated]
    assert lines[0] | {"duration_ms": 0, "time": ""} == {
        "event": "request", "request_id": "web.req-42", "time": "", "method": "GET", "handler": RECOMMENDATIONS,
        "status": 200, "duration_ms": 0, "api_key": key_name, "route": "precomputed", "model_version": VERSION,
        "degraded": [], "items": 5,
    }  # fmt: skip
    assert lines[-1]["handler"] == "/health" and "route" not in lines[-1]


def test_a_sampled_list_is_logged_with_its_policy_and_each_items_probability(published: redis.Redis,
                                                                             tmp_path: Path):  # fmt: skip
    """Issue 23's off-policy estimates reweight clicks by the probability the shown item was drawn with."""
    client, _ = gateway(tmp_path)
    before = datetime.now(UTC)
    with client:
        sampled = client.get(f"/recommendations/{CUSTOMER}", params={"count": 4, "temperature": 0.5, "seed": 3}).json()
    hours = sorted({floor_hour(before), floor_hour(datetime.now(UTC))})
    [record] = [record for hour in hours for record in read_impressions(tmp_path / "impressions", hour)[0]]
    assert record["temperature"] == 0.5 and record["model_version"] == VERSION
    assert record["items"] == [{"product_id": item["product_id"], "position": position,
                                "probability": item["probability"]} for position, item in enumerate(sampled["items"])]
    assert all(0 < item["probability"] < 1 for item in record["items"])  # fmt: skip
    assert "candidate_scores" not in record  # off unless asked for


def test_with_candidate_scores_a_sampled_line_holds_what_another_temperature_would_have_shown(
    published: redis.Redis, tmp_path: Path
):
    """`RECSYS_IMPRESSIONS_CANDIDATE_SCORES`: the candidates' order scores and the first item's index among them,
    from which softmax(scores / T) gives back the logged probability at the served temperature."""
    import numpy as np

    from recsys.off_policy import softmax_propensities

    client, _ = gateway(tmp_path, impressions_candidate_scores=True)
    before = datetime.now(UTC)
    with client:
        sampled = client.get(f"/recommendations/{CUSTOMER}", params={"count": 4, "temperature": 0.5, "seed": 3}).json()
        client.get(f"/recommendations/{CUSTOMER}", params={"count": 4})  # ranked: nothing to reweight
    hours = sorted({floor_hour(before), floor_hour(datetime.now(UTC))})
    first, ranked = [record for hour in hours for record in read_impressions(tmp_path / "impressions", hour)[0]]
    scores = np.array([first["candidate_scores"]])
    assert scores.shape[1] > 4 and first["candidate_scores"][first["top_candidate"]] == sampled["items"][0]["score"]
    assert softmax_propensities(scores, 0.5)[0, first["top_candidate"]] == pytest.approx(
        sampled["items"][0]["probability"], rel=1e-5)  # fmt: skip
    assert "candidate_scores" not in ranked


def test_a_click_sent_back_with_the_request_id_counts_for_the_served_list(published: redis.Redis, tmp_path: Path):
    """The loop the monitoring DAG measures: a served list, a click posted with its request id, the hour's CTR."""
    client, database_url = gateway(tmp_path)
    before = datetime.now(UTC)
    with client:
        assert client.post("/customers", json={"id": CUSTOMER}).status_code == 201
        for product in CUSTOMER_ITEMS[:3]:
            assert client.post("/products", json={"id": product}).status_code == 201
        clicked = client.get(f"/recommendations/{CUSTOMER}", params={"count": 3}).json()
        unclicked = client.get(f"/recommendations/{CUSTOMER}", params={"count": 3}).json()
        assert unclicked["request_id"] != clicked["request_id"] and unclicked["items"] == clicked["items"]
        time.sleep(0.01)  # the click follows the list by a little
        event = {"customer_id": CUSTOMER, "product_id": clicked["items"][1]["product_id"], "type": "click",
                 "session_id": "s-1", "timestamp": datetime.now(UTC).isoformat(),
                 "request_id": clicked["request_id"]}  # fmt: skip
        assert client.post("/interactions", json=event).status_code == 201
    hours = sorted({floor_hour(before), floor_hour(datetime.now(UTC))})
    [record] = [record for hour in hours for record in read_impressions(tmp_path / "impressions", hour)[0]
                if record["request_id"] == clicked["request_id"]]  # fmt: skip
    hour = floor_hour(record["time"])
    config = MonitoringConfig(attribution_window=timedelta(minutes=60), k=3, match_without_request_id=False)
    report = monitor_hour(hour, impressions_dir=tmp_path / "impressions", database_url=database_url,
                          runs_dir=tmp_path / "runs", config=config)  # fmt: skip
    metrics = report["versions"][VERSION]
    assert metrics["impressions_served"] == 2 and metrics["clicks_by_request_id"] == 1
    assert metrics["ctr"] == 0.5
    assert metrics["precision_at_3"] == pytest.approx((1 / 3 + 0) / 2)


def test_a_full_impression_queue_drops_and_counts_instead_of_waiting(tmp_path: Path):
    dropped: list[int] = []
    log = ImpressionLog(tmp_path, on_drop=dropped.append, max_pending=2)
    moment = datetime(2026, 11, 26, 10, 30, tzinfo=UTC)
    for request_id in ("a", "b", "c"):  # the writer is not running: the third finds the queue full
        log.record({"request_id": request_id, "time": moment.timestamp(), "customer_id": 1, "items": [7, 8]})
    assert dropped == [1]
    log.start()
    log.close()  # drains the queue
    records, malformed = read_impressions(tmp_path, floor_hour(moment))
    assert malformed == 0 and [record["request_id"] for record in records] == ["a", "b"]
    assert records[0]["time"] == moment and records[0]["items"] == [{"product_id": 7, "position": 0},
                                                                     {"product_id": 8, "position": 1}]


def _request_count(metrics_text: str, handler: str) -> float:
    return sum(sample.value for family in text_string_to_metric_families(metrics_text)
               for sample in family.samples
               if sample.name == "recsys_http_request_duration_seconds_count" and sample.labels["handler"] == handler)


def test_one_scrape_counts_the_requests_of_every_worker(tmp_path: Path):
    """`serving.run --workers 2` as users start it: whichever worker answers `/metrics`, it counts the requests
    both served (multiprocess mode); without it each scrape would count one worker's share."""
    import os

    import httpx

    from tests.servers import serving_run

    env = {**os.environ, "RECSYS_DATABASE_URL": f"sqlite:///{tmp_path / 'gateway.db'}", "RECSYS_REDIS_URL": REDIS_URL,
           "RECSYS_REDIS_KEY_PREFIX": PREFIX, "RECSYS_IMPRESSIONS_DIR": str(tmp_path / "impressions")}  # fmt: skip
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    arguments = ["--workers", "2", "--no-triton", "--no-redis-start", "--no-access-log"]
    with serving_run(arguments, env, tmp_path / "serve.log", startup_timeout_s=60) as url:
        for _ in range(60):  # a new connection each: the kernel hands them to either worker
            assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        counts = [_request_count(httpx.get(f"{url}/metrics", timeout=5).text, "/health") for _ in range(8)]

    assert counts == [61.0] * 8  # and the one that said it was up


def test_what_startup_built_is_left_out_of_full_garbage_collections(tmp_path: Path):
    """`serving.api.main.freeze_startup_objects`: a full collection walking the startup heap stalled every request in
    flight for 70-75 ms under load (past the 50 ms Redis budget)."""
    import gc

    client, _ = gateway(tmp_path)
    with client:
        assert client.get("/health").status_code == 200
        assert gc.get_freeze_count() > 0

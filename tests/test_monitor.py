"""The monitoring step on hand-made impressions and interactions: CTR, precision@k, drift, MLflow, alerts.

Interactions live in a SQLite database built by the gateway's migrations, impressions in files written in
the gateway's format (`serving/api/impressions.py`), MLflow in a SQLite store of the test's own, and the alert
webhook is a real HTTP server on a free local port.
"""

from __future__ import annotations

import http.server
import json
import logging
import math
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy.orm import Session

from recsys.database import Customer, Interaction, InteractionType, Product, create_database_engine
from recsys.impression_log import partition_dir
from serving.api.migrate import upgrade
from tasks.monitor import (
    MONITORING_EXPERIMENT,
    PREVIOUS_24_HOURS,
    AlertThresholds,
    MonitoringAlertError,
    MonitoringConfig,
    hour_to_monitor,
    monitor,
    monitor_hour,
    population_stability_index,
)
from tests.servers import free_port

HOUR = datetime(2026, 11, 26, 10, tzinfo=UTC)
WINDOW = timedelta(minutes=30)


def at(minute: int, second: int = 0) -> datetime:
    """HOUR + minutes (more than 59 reach into the next hour, negative ones into the previous)."""
    return HOUR + timedelta(minutes=minute, seconds=second)


def impression(request_id: str, minute: int, customer: int | None, items: list[int], *, version: str = "v1",
               degraded: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    return {"request_id": request_id, "time": at(minute).strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "customer_id": customer,
            "handler": "/recommendations/{customer_id}" if customer else "/products/{product_id}/similar",
            "route": "precomputed" if items else "none", "model_version": version, "degraded": degraded or [],
            "api_key": "web", "items": [{"product_id": item, "position": index} for index, item in enumerate(items)]}


def write_impressions(root: Path, records: list[dict[str, Any]], *, extra: str = "") -> None:
    """Into each record's hourly file, as the gateway's writer appends them."""
    for record in records:
        folder = partition_dir(root, datetime.fromisoformat(record["time"]))
        folder.mkdir(parents=True, exist_ok=True)
        with (folder / "host-1.jsonl").open("a") as file:
            file.write(json.dumps(record) + "\n")
    if extra:
        with (partition_dir(root, HOUR) / "host-1.jsonl").open("a") as file:
            file.write(extra)


Event = tuple[int, int, str, datetime, str | None]  # customer, product, type, time, request id


def database(path: Path, events: list[Event], *, location: str | None = None, device: str | None = None,
             categories: dict[int, int] | None = None) -> str:  # fmt: skip
    """A migrated SQLite database with the customers, products and interactions of `events`."""
    url = f"sqlite:///{path}"
    upgrade(url)
    engine = create_database_engine(url, timeout_ms=None)
    now = at(-120)
    with Session(engine) as session:
        for customer in sorted({event[0] for event in events}):
            session.add(Customer(id=customer, location=location, device=device, attributes={}, created_at=now,
                                 updated_at=now))  # fmt: skip
        for product in sorted({event[1] for event in events}):
            session.add(Product(id=product, attributes={"item_category": (categories or {}).get(product, 1)},
                                created_at=now, updated_at=now))  # fmt: skip
        session.flush()
        for index, (customer, product, kind, moment, request_id) in enumerate(events):
            session.add(Interaction(customer_id=customer, product_id=product, type=InteractionType(kind),
                                    session_id=f"s{index}", timestamp=moment, received_at=moment,
                                    request_id=request_id))  # fmt: skip
        session.commit()
    engine.dispose()
    return url


# Hour 10:00-11:00, a 30-minute window, k = 2. Hand-checked below.
IMPRESSIONS = [
    impression("a", 5, 1, [11, 12, 13]),
    impression("b", 10, 2, [21, 22, 23]),
    impression("c", 20, 3, [31, 32]),
    impression("d", 50, 4, [], degraded=["redis_unavailable"]),  # nothing served
    impression("e", 30, None, [11, 41]),  # similar products: no customer
    impression("h", 40, 7, [71], version="v2"),
    impression("f", 70, 1, [12, 14]),  # the next hour, inside the window: a candidate, not counted
    impression("g", -10, 5, [51]),  # the previous hour: not read
]
EVENTS: list[Event] = [
    (1, 12, "click", at(6), "a"),  # A, by request id
    (1, 13, "click", at(7), "a"),  # A, position 2: outside the top 2
    (1, 11, "click", at(4), "a"),  # A, a minute before it was shown: a client clock behind the gateway's
    (2, 21, "view", at(11), "b"),  # a view is not a click
    (2, 22, "purchase", at(50), "b"),  # 40 minutes after B: outside the window
    (3, 31, "add_to_cart", at(25), None),  # C, by customer and product
    (1, 12, "click", at(75), None),  # F (the latest list showing 12 to customer 1), not A (window over)
    (4, 99, "click", at(51), "zzz"),  # an unknown request id
    (6, 41, "click", at(31), "e"),  # E, by request id, though E named no customer
    (7, 71, "click", at(41), "h"),  # H of version v2
    (5, 51, "click", at(-9), "g"),  # the previous hour's G
]


def test_ctr_and_precision_at_k_on_hand_made_data(tmp_path: Path):
    url = database(tmp_path / "gateway.db", EVENTS)
    write_impressions(tmp_path / "impressions", IMPRESSIONS, extra="not json\n" + '{"request_id": "partial"')
    config = MonitoringConfig(attribution_window=WINDOW, k=2, min_drift_interactions=1_000)
    report = monitor_hour(HOUR, impressions_dir=tmp_path / "impressions", database_url=url,
                          runs_dir=tmp_path / "runs", config=config)  # fmt: skip
    assert report["hour"] == "2026-11-26T10:00:00Z" and report["step"] == int(HOUR.timestamp())
    assert report["impression_lines_malformed"] == 1  # the partial last line is a write in progress: skipped
    v1 = report["versions"]["v1"]
    # Served A, B, C, E (D was empty); clicked A {11, 12, 13}, C {31}, E {41}.
    assert (v1["impressions"], v1["impressions_served"], v1["degraded_impressions"]) == (5, 4, 1)
    assert v1["ctr"] == 3 / 4
    # precision@2: A {11, 12} of [11, 12] = 1, B 0, C {31} of [31, 32] = 1/2, E {41} of [11, 41] = 1/2.
    assert v1["precision_at_2"] == pytest.approx((1 + 0 + 0.5 + 0.5) / 4)
    assert (v1["clicks_by_request_id"], v1["clicks_by_customer_product"]) == (4, 1)
    v2 = report["versions"]["v2"]
    assert (v2["impressions_served"], v2["ctr"], v2["precision_at_2"]) == (1, 1.0, 0.5)
    assert set(report["versions"]) == {"v1", "v2"}  # G's hour is not this one
    assert "psi_location" not in v1  # too few interactions this hour to judge drift

    strict = MonitoringConfig(attribution_window=WINDOW, k=2, match_without_request_id=False)
    only_ids = monitor_hour(HOUR, impressions_dir=tmp_path / "impressions", database_url=url,
                            runs_dir=tmp_path / "runs", config=strict)["versions"]["v1"]  # fmt: skip
    assert only_ids["ctr"] == 2 / 4 and only_ids["precision_at_2"] == pytest.approx((1 + 0 + 0 + 0.5) / 4)
    assert only_ids["clicks_by_customer_product"] == 0

    with pytest.raises(ValueError, match="start of an hour"):
        monitor_hour(at(5), impressions_dir=tmp_path, database_url=url, runs_dir=tmp_path)


def test_the_hour_monitored_is_the_latest_whose_windows_closed():
    run_end = datetime(2026, 11, 26, 12, tzinfo=UTC)
    assert hour_to_monitor(run_end, timedelta(minutes=60)) == datetime(2026, 11, 26, 10, tzinfo=UTC)
    assert hour_to_monitor(run_end, timedelta(minutes=30)) == datetime(2026, 11, 26, 10, tzinfo=UTC)
    assert hour_to_monitor(run_end, timedelta(0)) == datetime(2026, 11, 26, 11, tzinfo=UTC)
    assert hour_to_monitor(run_end, timedelta(minutes=90)) == datetime(2026, 11, 26, 9, tzinfo=UTC)


def test_population_stability_index_by_hand():
    # Bins a, b and the pooled rest; p = (0.9, 0.1, 0) and q = (0.5, 0.5, 0), zero shares floored at 1e-4.
    expected = 0.4 * math.log(0.9 / 0.5) + (-0.4) * math.log(0.1 / 0.5)
    assert population_stability_index(Counter(a=50, b=50), Counter(a=90, b=10), max_bins=2) == pytest.approx(expected)
    assert population_stability_index(Counter(a=50, b=50), Counter(a=5, b=5), max_bins=2) == 0.0
    # c is not among the reference's 2 most frequent values: pooled with d, unseen in the reference.
    pooled = population_stability_index(Counter(a=50, b=30, c=20), Counter(a=50, b=30, d=20), max_bins=2)
    assert pooled == pytest.approx(0.0)


def write_train_split(runs_dir: Path, version: str, rows: dict[str, list]) -> None:
    train = runs_dir / version / "resplit" / "train"
    train.mkdir(parents=True)
    pq.write_table(pa.table(rows), train / "part-00000.parquet")


def drift_events(count: int, start_minute: int = 0) -> list[Event]:
    return [(1, 100 + index % 2, "view", at(start_minute, index), None) for index in range(count)]


def test_drift_against_the_training_split_or_else_the_previous_day(tmp_path: Path):
    runs = tmp_path / "runs"
    # Training data: locations DE and FR, devices mobile and desktop, categories 7 and 8, half and half.
    write_train_split(runs, "v1", {"location": ["DE", "FR"] * 50, "device": ["mobile", "desktop"] * 50,
                                   "item_category": pa.array([7, 8] * 50, pa.int32())})  # fmt: skip
    # This hour: 40 interactions, all from DE on mobile, products of categories 7 and 8 alternately.
    url = database(tmp_path / "gateway.db", drift_events(40), location="DE", device="mobile",
                   categories={100: 7, 101: 8})  # fmt: skip
    write_impressions(tmp_path / "impressions", [impression("x", 1, 1, [100]), impression("y", 2, 1, [101],
                                                                                          version="v9")])
    config = MonitoringConfig(attribution_window=WINDOW, min_drift_interactions=40)
    report = monitor_hour(HOUR, impressions_dir=tmp_path / "impressions", database_url=url, runs_dir=runs,
                          config=config)  # fmt: skip
    v1, v9 = report["versions"]["v1"], report["versions"]["v9"]
    shifted = population_stability_index(Counter(DE=50, FR=50), Counter(DE=40), max_bins=20)
    assert v1["psi_location"] == pytest.approx(shifted) and v1["psi_device"] == pytest.approx(shifted)
    assert v1["psi_item_category"] == pytest.approx(0.0)
    assert "psi_item_shop" not in v1  # the training split has no such column: no reference
    assert v1["drift_reference"] == str(runs / "v1" / "resplit" / "train")
    # v9 has no training split: the previous 24 hours (no interactions) give no reference to compare with.
    assert v9["drift_reference"] == PREVIOUS_24_HOURS and "psi_location" not in v9

    config = MonitoringConfig(attribution_window=WINDOW, min_drift_interactions=41)
    assert "psi_location" not in monitor_hour(HOUR, impressions_dir=tmp_path / "impressions", database_url=url,
                                              runs_dir=runs, config=config)["versions"]["v1"]  # fmt: skip


class Webhook:
    """A real HTTP server on a free port that keeps the JSON bodies POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        received = self.bodies

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/alerts"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Webhook:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    with Webhook() as server:
        yield server


def alert_lines(caplog: pytest.LogCaptureFixture) -> list[dict]:
    return [json.loads(record.getMessage()) for record in caplog.records
            if record.levelno == logging.WARNING and record.name == "tasks.monitor"]  # fmt: skip


def test_a_drop_in_click_through_raises_the_alert(tmp_path: Path, webhook: Webhook, caplog: pytest.LogCaptureFixture,
                                                  mlflow_tracking_uri: str):
    # 10:00-11:00: 20 lists shown, 10 clicked (CTR 0.5). 11:00-12:00: 20 lists shown, 1 clicked (CTR 0.05).
    shown, events = [], []
    for hour_offset, clicked in ((0, 10), (60, 1)):
        for index in range(20):
            request_id = f"r{hour_offset}-{index}"
            shown.append(impression(request_id, hour_offset + index, 1, [500 + index, 600]))
            if index < clicked:
                events.append((1, 500 + index, "click", at(hour_offset + index, 30), request_id))
    url = database(tmp_path / "gateway.db", events)
    write_impressions(tmp_path / "impressions", shown)
    arguments = {"impressions_dir": tmp_path / "impressions", "database_url": url, "runs_dir": tmp_path / "runs",
                 "tracking_uri": mlflow_tracking_uri, "artifact_root": str(tmp_path / "artifacts"),
                 "config": MonitoringConfig(attribution_window=WINDOW, k=2),
                 "thresholds": AlertThresholds(min_ctr=0.2, max_psi=None, min_impressions=20)}  # fmt: skip

    with caplog.at_level(logging.WARNING, logger="tasks.monitor"):
        healthy = monitor(HOUR, **arguments, webhook_url=webhook.url, fail_on_alert=True)
    assert healthy["versions"]["v1"]["ctr"] == 0.5 and healthy["alerts"] == [] and webhook.bodies == []
    assert alert_lines(caplog) == []

    with caplog.at_level(logging.WARNING, logger="tasks.monitor"), pytest.raises(MonitoringAlertError, match="ctr"):
        monitor(HOUR + timedelta(hours=1), **arguments, webhook_url=webhook.url, fail_on_alert=True)
    expected = {"hour": "2026-11-26T11:00:00Z", "model_version": "v1", "metric": "ctr", "value": 0.05,
                "threshold": 0.2, "condition": "below"}  # fmt: skip
    assert alert_lines(caplog) == [{"event": "monitoring_alert", **expected}]
    assert webhook.bodies == [{"source": MONITORING_EXPERIMENT, "alerts": [expected]}]

    # Without fail_on_alert the step returns; a webhook that cannot be reached hides nothing.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tasks.monitor"):
        report = monitor(HOUR + timedelta(hours=1), **arguments, webhook_url=f"http://127.0.0.1:{free_port()}/x")
    assert report["alerts"] == [expected] and report["webhook_delivered"] is False
    assert alert_lines(caplog) == [{"event": "monitoring_alert", **expected}]
    [failure] = [json.loads(record.getMessage()) for record in caplog.records
                 if record.levelno == logging.ERROR and record.name == "tasks.monitor"]
    assert failure["event"] == "monitoring_webhook_failed"
    with pytest.raises(MonitoringAlertError):
        monitor(HOUR + timedelta(hours=1), **arguments, webhook_url=f"http://127.0.0.1:{free_port()}/x",
                fail_on_alert=True)  # fmt: skip


def test_metrics_go_to_mlflow_once_per_hour_and_version(tmp_path: Path, mlflow_tracking_uri: str):
    from mlflow.tracking import MlflowClient

    url = database(tmp_path / "gateway.db", EVENTS)
    write_impressions(tmp_path / "impressions", IMPRESSIONS)
    tracking_uri = mlflow_tracking_uri
    arguments = {"impressions_dir": tmp_path / "impressions", "database_url": url, "runs_dir": tmp_path / "runs",
                 "tracking_uri": tracking_uri, "artifact_root": str(tmp_path / "artifacts"),
                 "config": MonitoringConfig(attribution_window=WINDOW, k=2),
                 "thresholds": AlertThresholds(min_ctr=None, max_psi=None)}  # fmt: skip
    first = monitor(HOUR, **arguments)
    again = monitor(HOUR, **arguments)  # a rerun of the same hour on the same data
    assert again["mlflow_run_ids"] == first["mlflow_run_ids"]

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(MONITORING_EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(run.data.tags["model_version"] for run in runs) == ["v1", "v2"]
    [v1] = [run for run in runs if run.data.tags["model_version"] == "v1"]
    assert v1.data.tags["monitoring_hour"] == "2026-11-26T10:00:00Z"
    assert v1.data.metrics["ctr"] == 0.75 and v1.data.metrics["precision_at_2"] == 0.5
    [point] = client.get_metric_history(v1.info.run_id, "ctr")
    assert point.step == int(HOUR.timestamp()) and point.timestamp == int(HOUR.timestamp()) * 1000

    # A late click arrives; the rerun replaces the hour's runs instead of adding a second value.
    engine = create_database_engine(url, timeout_ms=None)
    with Session(engine) as session:
        session.add(Interaction(customer_id=2, product_id=21, type=InteractionType.CLICK, session_id="late",
                                timestamp=at(12), received_at=at(90), request_id="b"))  # fmt: skip
        session.commit()
    engine.dispose()
    late = monitor(HOUR, **arguments)
    assert late["mlflow_run_ids"]["v1"] != first["mlflow_run_ids"]["v1"]
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2
    [v1] = [run for run in runs if run.data.tags["model_version"] == "v1"]
    assert v1.data.metrics["ctr"] == 1.0
    assert [point.value for point in client.get_metric_history(v1.info.run_id, "ctr")] == [1.0]
    # The next hour's runs extend the series.
    monitor(HOUR + timedelta(hours=1), **arguments)
    v1_runs = client.search_runs([experiment.experiment_id], filter_string="tags.model_version = 'v1'")
    assert sorted(run.data.tags["monitoring_hour"] for run in v1_runs) == ["2026-11-26T10:00:00Z",
                                                                          "2026-11-26T11:00:00Z"]


@pytest.mark.e2e
def test_the_dag_task_fails_on_an_alert_and_calls_the_webhook(tmp_path: Path, webhook: Webhook):
    """`airflow dags test recsys_monitoring` in an Airflow home of its own, on an hour whose CTR dropped."""
    import os
    import subprocess

    project = Path(__file__).resolve().parent.parent
    shown = [impression(f"r{index}", 60 + index, 1, [500 + index]) for index in range(20)]
    url = database(tmp_path / "gateway.db", [(1, 500, "click", at(60, 30), "r0")])
    write_impressions(tmp_path / "impressions", shown)
    home = tmp_path / "airflow"
    env = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW_CONFIG": str(project / "airflow.cfg"),
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
           "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"), "RECSYS_DATABASE_URL": url,
           "RECSYS_IMPRESSIONS_DIR": str(tmp_path / "impressions"), "RECSYS_DATA_ROOT": str(tmp_path / "data"),
           "RECSYS_MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "RECSYS_MLFLOW_ARTIFACT_ROOT": str(tmp_path / "artifacts"),
           # the DAG's other task keeps the fixed hour's files, however old they get
           "RECSYS_IMPRESSIONS_RETENTION_DAYS": str(36_500)}  # fmt: skip
    airflow = str(project / ".venv/bin/airflow")
    subprocess.run([airflow, "db", "migrate"], env=env, check=True, capture_output=True, timeout=300)
    conf = {"hour": "2026-11-26T11:00:00Z", "attribution_window_minutes": 30, "min_ctr": 0.2, "min_impressions": 20,
            "alert_webhook_url": webhook.url}  # fmt: skip
    process = subprocess.run([airflow, "dags", "test", "recsys_monitoring", "-c", json.dumps(conf)], env=env,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    output = process.stdout + process.stderr
    assert process.returncode != 0, output[-3000:]  # the DagRun failed
    assert "AirflowFailException" in output and "monitoring 2026-11-26T11:00:00Z: v1 ctr 0.05 below 0.2" in output
    assert [alert["metric"] for body in webhook.bodies for alert in body["alerts"]] == ["ctr"]


def test_off_policy_estimates_of_other_temperatures_from_sampled_lines_find_the_truth(tmp_path: Path):
    """Simulated logs with a known truth: 3,000 lists, each drawn at T = 1 from 20 candidates whose click
    probabilities are known, the first item clicked with its probability. The hour's estimates of the top slot's
    click-through at T = 0, 0.5 and 1 land near the exact values (sum over candidates of softmax(scores / T) x
    click probability, averaged over lists); at the logged temperature SNIPS is the logged click-through itself."""
    import numpy as np

    from recsys.off_policy import softmax_propensities

    rng = np.random.default_rng(0)
    records, events, truths = [], [], {0.0: [], 0.5: [], 1.0: []}
    for number in range(3_000):
        scores = rng.uniform(0, 1, 20)
        click_probabilities = 0.05 + 0.4 * scores**2  # better-scored candidates are clicked more
        drawn = softmax_propensities(scores[None, :], 1.0)[0]
        top = int(rng.choice(20, p=drawn))
        for temperature, values in truths.items():
            values.append(float(softmax_propensities(scores[None, :], temperature)[0] @ click_probabilities))
        record = impression(f"s{number}", number % 60, 1 + number % 50, [1_000 + top, 2_000 + number % 7])
        record["items"][0]["probability"] = float(drawn[top])
        records.append(record | {"temperature": 1.0, "candidate_scores": scores.tolist(), "top_candidate": top})
        if rng.random() < click_probabilities[top]:
            events.append((1 + number % 50, 1_000 + top, "click", at(number % 60, 20), f"s{number}"))
    url = database(tmp_path / "gateway.db", events)
    write_impressions(tmp_path / "impressions", records)
    report = monitor_hour(HOUR, impressions_dir=tmp_path / "impressions", database_url=url,
                          runs_dir=tmp_path / "runs", config=MonitoringConfig(attribution_window=WINDOW))  # fmt: skip
    metrics = report["versions"]["v1"]
    assert metrics["ope_sampled_impressions"] == 3_000
    assert metrics["ope_snips_t1"] == pytest.approx(metrics["ope_top_slot_ctr"])  # weights of 1
    for temperature, values in truths.items():
        truth = float(np.mean(values))
        for estimator in ("ips", "snips"):
            key = f"ope_{estimator}_t{temperature:g}"
            half = (metrics[f"{key}_high"] - metrics[f"{key}_low"]) / 2
            print(f"{key}: {metrics[key]:.4f} [{metrics[key + '_low']:.4f}, {metrics[key + '_high']:.4f}], "
                  f"truth {truth:.4f}")  # fmt: skip
            assert abs(metrics[key] - truth) < 2 * half, (key, metrics[key], truth, half)  # within about 4 s.e.
    assert truths[0.0] != truths[1.0] and np.mean(truths[0.0]) > np.mean(truths[1.0]) + 0.05  # T matters here

"""Airflow as `make airflow` runs it: the real scheduler, DAG processor, API server and triggerer.

`make airflow` (`airflow standalone`) starts on loopback with a metadata database, logs and data of the test's
own, and a PATH without the project's environments (as a user's shell has it). Everything goes through the
REST API the UI uses: unpause, trigger with a `conf`, read runs, task instances and logs. Every task runs in
the scheduler's LocalExecutor with a token the API server must accept, so the shared secrets that `make setup`
generates are exercised too. The triggered nightly run is on a second, differently named dataset with its own
spec (tests/data/shop_events.yaml), as a user brings one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from recsys.impression_log import partition_dir, read_impressions
from recsys.run_layout import safe_run_id
from recsys.spec import load_spec
from tests.servers import free_port
from tests.test_e2e_nightly import (
    E2E_FEAST_REDIS_URL,
    E2E_REDIS_URL,
    SHOP_EVENTS_SPEC,
    check_published_recommendations,
    check_shop_events_run,
    write_shop_events,
)
from tests.test_monitor import EVENTS, HOUR, IMPRESSIONS, database, write_impressions

PROJECT_ROOT = Path(__file__).resolve().parent.parent
KEY_PREFIX = "scheduler:"
STARTUP_TIMEOUT_S = 180
NIGHTLY_TIMEOUT_S = 1200
pytestmark = pytest.mark.e2e


class RunningAirflow:
    """`make airflow` (or `target`) in a process group of its own, and a client of its REST API (logged in as
    admin)."""

    def __init__(self, home: Path, env: dict[str, str], port: int, *, target: str = "airflow") -> None:
        self.home, self.env, self.target = home, env, target
        self.base_url = f"http://127.0.0.1:{port}"
        self.log_path = home / "standalone.log"
        self.client = httpx.Client(base_url=self.base_url, timeout=30)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(["make", "-s", self.target, f"AIRFLOW_HOME={self.home}"], cwd=PROJECT_ROOT,
                                            env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self._ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"Airflow did not start:\n{self.log_tail()}")
            time.sleep(1)

    def _ready(self) -> bool:
        """The API server answers, every component heartbeats and both DAGs are parsed."""
        try:
            health = self.client.get("/api/v2/monitor/health").json()
            if any(health.get(component, {}).get("status") != "healthy"
                   for component in ("metadatabase", "scheduler", "dag_processor", "triggerer")):  # fmt: skip
                return False
            if "authorization" not in self.client.headers:
                self._log_in()
            found = {dag["dag_id"] for dag in self.get("/api/v2/dags", tags="recsys")["dags"]}
            return found == {"recsys_nightly", "recsys_monitoring"}
        except httpx.HTTPError:
            return False

    def _log_in(self) -> None:
        """As the README says: user admin, the password `make setup` generated (the config names the file)."""
        config = subprocess.run([str(PROJECT_ROOT / ".venv/bin/airflow"), "config", "get-value", "core",
                                 "simple_auth_manager_passwords_file"], env=self.env, capture_output=True,
                                text=True, check=True, timeout=120)  # fmt: skip
        password = json.loads(Path(config.stdout.strip()).read_text())["admin"]
        response = self.client.post("/auth/token", json={"username": "admin", "password": password})
        response.raise_for_status()
        self.client.headers["authorization"] = f"Bearer {response.json()['access_token']}"

    def get(self, path: str, **params: Any) -> Any:
        response = self.client.get(path, params=params)
        assert response.is_success, f"GET {path}: {response.status_code} {response.text}"
        return response.json()

    def send(self, method: str, path: str, body: dict[str, Any]) -> Any:
        response = self.client.request(method, path, json=body)
        assert response.is_success, f"{method} {path}: {response.status_code} {response.text}"
        return response.json()

    def trigger(self, dag_id: str, changed: dict[str, Any]) -> str:
        """As the UI's Trigger dialog does: the logical date it proposes (now) and the whole Params form as
        `conf`, each field at its default unless `changed`."""
        params = self.get(f"/api/v2/dags/{dag_id}/details")["params"]
        assert set(changed) <= set(params), f"not Params of {dag_id}: {set(changed) - set(params)}"
        conf = {name: param["value"] for name, param in params.items()} | changed
        body = {"logical_date": datetime.now(UTC).isoformat(), "conf": conf}
        return str(self.send("POST", f"/api/v2/dags/{dag_id}/dagRuns", body)["dag_run_id"])

    def unpause(self, dag_id: str) -> None:
        self.send("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})

    def wait_for_run(self, dag_id: str, timeout_s: float, *, run_id: str | None = None,
                     run_type: str | None = None) -> dict[str, Any]:  # fmt: skip
        """The run (by id, or the first of `run_type`) once it has finished."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            runs = self.get(f"/api/v2/dags/{dag_id}/dagRuns")["dag_runs"]
            matching = [run for run in runs if run["dag_run_id"] == run_id or run["run_type"] == run_type]
            if matching and matching[0]["state"] in ("success", "failed"):
                return dict(matching[0])
            time.sleep(3)
        raise AssertionError(f"{dag_id} run {run_id or run_type} not finished after {timeout_s} s: "
                             f"{self.task_states(dag_id, run_id) if run_id else ''}\n{self.log_tail()}")  # fmt: skip

    def task_states(self, dag_id: str, run_id: str) -> dict[str, tuple[str | None, int]]:
        instances = self.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]
        return {instance["task_id"]: (instance["state"], instance["try_number"]) for instance in instances}

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int = 1) -> str:
        path = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}"
        return json.dumps(self.get(path, full_content=True))

    def failure_report(self, dag_id: str, run_id: str) -> str:
        """The states of a run's tasks and the log of each failed one, for an assertion's message."""
        states = self.task_states(dag_id, run_id)
        logs = [self.task_log(dag_id, run_id, task, max(tries, 1))[-3000:]
                for task, (state, tries) in states.items() if state == "failed"]  # fmt: skip
        return f"{states}\n" + "\n".join(logs)

    def log_tail(self, characters: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-characters:]

    def stop(self) -> None:
        """Every process it started: standalone's components and their task processes share its group. SIGTERM,
        as a service manager stops it: the group is gone in about 4 s, where after a SIGINT (a terminal's Ctrl-C)
        the scheduler waits on its LocalExecutor workers for more than 30 s (Airflow 3.3.2)."""
        self.client.close()
        if self.process is None:
            return
        for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 15)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and _group_alive(self.process.pid):
                self.process.poll()
                time.sleep(0.5)
            if not _group_alive(self.process.pid):
                break
        self.process.wait(timeout=15)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def path_without_project_environments() -> str:
    """The user's PATH with none of the project's virtual environments (an activated one included)."""
    entries = [entry for entry in os.environ["PATH"].split(os.pathsep) if not entry.startswith(str(PROJECT_ROOT))]
    path = os.pathsep.join(entries)
    assert shutil.which("airflow", path=path) is None, "an `airflow` outside the project is on PATH"
    return path


def airflow_environment(home: Path, port: int, **extra: str) -> dict[str, str]:
    """The environment of the tests' Airflow: its metadata database, logs, data, MLflow and Feast stores in `home`,
    the API server on `port`, the tests' own Redis databases, and a PATH without the project's environments."""
    config = PROJECT_ROOT / "airflow.cfg"
    assert config.exists(), "airflow.cfg is missing: run the README's setup command (make setup)"
    return {
        **os.environ,
        "PATH": path_without_project_environments(),
        "AIRFLOW_CONFIG": str(config),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        # The log servers of the scheduler's workers and of the triggerer: free ports, not a running Airflow's.
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        "RECSYS_DATA_ROOT": str(home / "data"),
        "RECSYS_LANDING_DIR": str(home / "landing"),
        "RECSYS_IMPRESSIONS_DIR": str(home / "impressions"),
        "RECSYS_MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db",
        "RECSYS_MLFLOW_ARTIFACT_ROOT": str(home / "mlartifacts"),
        # Redis DBs of the tests' own (flushed here), never the user's DB 0.
        "RECSYS_REDIS_URL": E2E_REDIS_URL,
        "RECSYS_REDIS_KEY_PREFIX": KEY_PREFIX,
        "RECSYS_FEAST_REDIS_URL": E2E_FEAST_REDIS_URL,
        "RECSYS_FEAST_REGISTRY_PATH": str(home / "feast" / "registry.db"),
        **extra,
    }  # fmt: skip


@pytest.fixture(scope="module")
def airflow(tmp_path_factory: pytest.TempPathFactory, small_raw: Path) -> Iterator[RunningAirflow]:
    home = tmp_path_factory.mktemp("airflow-scheduler")
    (home / "landing").mkdir()  # empty: a scheduled nightly run finds no CSV there
    # The gateway's database and impressions that the monitoring DAG reads (hand-checked in test_monitor.py).
    gateway_database = database(home / "gateway.db", EVENTS)
    write_impressions(home / "impressions", IMPRESSIONS)
    write_impressions(home / "impressions", [{**IMPRESSIONS[0], "time": EXPIRED_HOUR.isoformat()}])
    port = free_port()
    # The monitored hour's files are kept a month past today, whenever the test runs; EXPIRED_HOUR's are not.
    retention_days = (datetime.now(UTC) - HOUR).days + 30
    env = airflow_environment(home, port, RECSYS_DATABASE_URL=gateway_database,
                              RECSYS_IMPRESSIONS_RETENTION_DAYS=str(retention_days))  # fmt: skip
    for url in (E2E_REDIS_URL, E2E_FEAST_REDIS_URL):
        redis.Redis.from_url(url).flushdb()
    running = RunningAirflow(home, env, port)
    try:
        running.start()
        yield running
    finally:
        running.stop()


EXPIRED_HOUR = datetime(2020, 1, 1, 5, tzinfo=UTC)

SECRET_FILES = ("airflow_jwt_secret", "airflow_api_secret_key", "airflow_fernet_key", "airflow_passwords.json")


def test_secrets_are_per_installation_owner_only_uncommitted_and_the_environment_wins(tmp_path: Path):
    """What `make setup` generated: var/secrets/ (0700, files 0600, ignored by git), read through airflow.cfg's
    `_cmd` options by every Airflow process; a value in the environment (a fleet's) takes precedence."""
    import stat

    from cryptography.fernet import Fernet

    secrets = PROJECT_ROOT / "var" / "secrets"
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o700
    for name in SECRET_FILES:
        path = secrets / name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.stat().st_size > 0, name
        ignored = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=PROJECT_ROOT, timeout=30)
        assert ignored.returncode == 0, f"{path} is not ignored by git"
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path), "AIRFLOW_CONFIG": str(PROJECT_ROOT / "airflow.cfg")}

    def value(section: str, key: str, **overrides: str) -> str:
        process = subprocess.run([str(PROJECT_ROOT / ".venv/bin/airflow"), "config", "get-value", section, key],
                                 env={**env, **overrides}, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert process.returncode == 0, process.stderr[-2000:]
        return process.stdout.strip()

    assert value("api_auth", "jwt_secret") == (secrets / "airflow_jwt_secret").read_text()
    assert value("api", "secret_key") == (secrets / "airflow_api_secret_key").read_text()
    Fernet(value("core", "fernet_key"))  # a valid key
    assert value("api_auth", "jwt_secret", AIRFLOW__API_AUTH__JWT_SECRET="set-by-the-fleet") == "set-by-the-fleet"


def latest_tick(now: datetime, *, hour: int | None) -> datetime:
    """The newest schedule tick at or before `now`: daily at `hour`:00 UTC, or hourly when `hour` is None."""
    tick = now.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    if hour is None:
        return tick
    tick = tick.replace(hour=hour)
    return tick if tick <= now else tick - timedelta(days=1)


def run_after(run: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(run["run_after"].replace("Z", "+00:00"))


def test_the_monitoring_dag_runs_triggered_and_scheduled(airflow: RunningAirflow):
    from mlflow.tracking import MlflowClient

    from tasks.monitor import MONITORING_EXPERIMENT

    conf = {"hour": HOUR.isoformat(), "attribution_window_minutes": 30, "k": 2, "min_ctr": None, "max_psi": None}
    airflow.unpause("recsys_monitoring")  # the UI's dialog does it with the trigger ("Unpause on trigger")
    run_id = airflow.trigger("recsys_monitoring", conf)
    started = datetime.now(UTC)
    run = airflow.wait_for_run("recsys_monitoring", 300, run_id=run_id)
    assert run["state"] == "success", airflow.failure_report("recsys_monitoring", run_id)
    client = MlflowClient(airflow.env["RECSYS_MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(MONITORING_EXPERIMENT)
    [v1] = client.search_runs([experiment.experiment_id], filter_string="tags.model_version = 'v1'")
    assert v1.data.metrics["ctr"] == 0.75 and v1.data.metrics["precision_at_2"] == 0.5  # as in test_monitor.py
    # The run's other task removed the impressions older than the retention, and only those.
    impressions = Path(airflow.env["RECSYS_IMPRESSIONS_DIR"])
    assert airflow.task_states("recsys_monitoring", run_id)["expire_impressions"][0] == "success"
    assert not partition_dir(impressions, EXPIRED_HOUR).parent.exists()
    assert read_impressions(impressions, HOUR)[0]

    # Unpaused, the scheduler creates the run of the latest hour (catchup is off) and it succeeds.
    scheduled = airflow.wait_for_run("recsys_monitoring", 300, run_type="scheduled")
    assert run_after(scheduled) in {latest_tick(started, hour=None), latest_tick(datetime.now(UTC), hour=None)}
    assert scheduled["state"] == "success", airflow.failure_report("recsys_monitoring", scheduled["dag_run_id"])


def test_the_nightly_dag_runs_scheduled_and_triggered(airflow: RunningAirflow, small_raw: Path):
    # Unpaused, the scheduler creates the run of the latest 02:00 UTC; the landing zone is empty, so it fails
    # at csv_to_parquet with the step's own message, at once (bad input is not retried), and nothing runs after.
    started = datetime.now(UTC)
    airflow.unpause("recsys_nightly")
    scheduled = airflow.wait_for_run("recsys_nightly", 600, run_type="scheduled")
    assert run_after(scheduled) in {latest_tick(started, hour=2), latest_tick(datetime.now(UTC), hour=2)}
    assert scheduled["state"] == "failed"
    states = airflow.task_states("recsys_nightly", scheduled["dag_run_id"])
    assert states["csv_to_parquet"] == ("failed", 1), states
    assert states["extract_interactions"][0] == states["expire_runs"][0] == "success", states
    ran = ("extract_interactions", "expire_runs", "csv_to_parquet")
    assert {state for task, (state, _) in states.items() if task not in ran} <= {"upstream_failed", None}, (
        states)  # fmt: skip
    log = airflow.task_log("recsys_nightly", scheduled["dag_run_id"], "csv_to_parquet")
    assert f"{airflow.env['RECSYS_LANDING_DIR']}: no CSV files for split" in log, log[-3000:]

    # Triggered with a conf, as the UI's form sends it, on a dataset of the user's own (shop_events: other file and
    # column names, no purchase target) named by its spec: every task succeeds and the run's version is published
    # (forced past the quality gate: 10k rows are too few for the two-tower to beat popularity).
    raw = write_shop_events(small_raw, Path(airflow.env["RECSYS_DATA_ROOT"]).parent / "shop_events")
    conf = {"input_dir": str(raw), "spec": str(SHOP_EVENTS_SPEC), "max_null_features": 1, "resplit_fraction": 0.5,
            "ranker_epochs": 2, "quality_gate": "force"}  # fmt: skip
    run_id = airflow.trigger("recsys_nightly", conf)
    run = airflow.wait_for_run("recsys_nightly", NIGHTLY_TIMEOUT_S, run_id=run_id)
    assert run["state"] == "success", airflow.failure_report("recsys_nightly", run_id)
    states = airflow.task_states("recsys_nightly", run_id)
    skipped = {"extract_interactions", "compare_rankers"}  # a manual run names no day; the comparison is off
    assert {task for task, (state, _) in states.items() if state != "success"} <= skipped, states
    run_dir = Path(airflow.env["RECSYS_DATA_ROOT"]) / "runs" / safe_run_id(run_id)
    check_shop_events_run(run_dir)
    shop_events = load_spec(SHOP_EVENTS_SPEC)
    assert check_published_recommendations(run_dir, shop_events, key_prefix=KEY_PREFIX) == safe_run_id(run_id)

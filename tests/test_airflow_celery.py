"""Airflow on Celery as `make airflow-celery` runs it: scheduler, DAG processor, triggerer, API server and a Celery
worker, PostgreSQL as the metadata database and Celery's result backend, Redis as the broker.

The nightly DAG is triggered on small generated data. Its data stage runs on the Celery worker, the NVTabular step
through the `trainer` queue. While that step runs, the worker is killed with everything it started, as when a
machine is lost: the scheduler misses the task's heartbeat, fails that try and retries it on a worker started in
the meantime, and the rerun replaces the step's output (nothing the lost try half-wrote is left).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from recsys.run_layout import safe_run_id
from tests.conftest import PostgresServer
from tests.redis_databases import redis_url
from tests.servers import free_port
from tests.test_airflow_scheduler import PROJECT_ROOT, RunningAirflow, airflow_environment

pytestmark = pytest.mark.e2e

# The broker shares the gateway tests' Redis database under a key prefix of its own (every database has an owner).
BROKER_URL = redis_url("gateway")
BROKER_PREFIX = "airflow-celery-test:"
HEARTBEAT_TIMEOUT_S = 20  # how soon the scheduler gives up on a task whose worker is gone (Airflow's default: 300)
RETRY_DELAY_S = 5  # before the lost task's retry (airflow.cfg's: 120)
DATA_STAGE = ("csv_to_parquet", "clean_null_rows", "resplit", "validate", "nvtabular_fit_transform")
LOST = "nvtabular_fit_transform"  # the task whose worker is lost: the longest of the data stage, a trainer step


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (children of any of its threads, and theirs)."""
    found = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            found += [int(child) for child in children.read_text().split()]
    return found + [grandchild for child in found for grandchild in _descendants(child)]


def _command(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _celery_workers(group: int) -> list[int]:
    """The main processes of the Celery workers in a process group (Celery retitles them `[celeryd: ...]`)."""
    workers = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != group:
                continue
        except ProcessLookupError:
            continue
        command = _command(int(entry.name))
        if b"celery\0worker" in command or b"celeryd:" in command:
            workers.append(int(entry.name))
    # Its pool, its log server and the task processes are the main process's descendants.
    below = {child for pid in workers for child in _descendants(pid)}
    return [pid for pid in workers if pid not in below]


@pytest.fixture(scope="module")
def celery_airflow(tmp_path_factory: pytest.TempPathFactory,
                   postgres_server: PostgresServer) -> Iterator[RunningAirflow]:  # fmt: skip
    from serving.api.migrate import upgrade

    home = tmp_path_factory.mktemp("airflow-celery")
    gateway_database = f"sqlite:///{home}/gateway.db"
    upgrade(gateway_database)  # the nightly run reads the forgotten customers' tombstones from it
    # The server without a database (URL.set keeps a field given None: the named tuple's own replace clears it).
    server = postgres_server.admin_url.set(drivername="postgresql+psycopg")._replace(database=None)
    database = f"airflow_test_{uuid.uuid4().hex[:12]}"  # created by the command, as it creates `airflow`
    port = free_port()
    metadata = f"{server.render_as_string(hide_password=False)}/{database}"
    env = airflow_environment(
        home, port, RECSYS_DATABASE_URL=gateway_database,
        AIRFLOW_POSTGRES=server.render_as_string(hide_password=False), AIRFLOW_POSTGRES_DATABASE=database,
        # As the command sets them; the test's own `airflow` calls (the login, the second worker) need them too.
        AIRFLOW__CORE__EXECUTOR="CeleryExecutor", AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=metadata,
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC=metadata.replace("+psycopg:", "+psycopg_async:"),
        AIRFLOW__CELERY__RESULT_BACKEND=f"db+{metadata}",
        AIRFLOW__CELERY__BROKER_URL=BROKER_URL,
        AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__GLOBAL_KEYPREFIX=BROKER_PREFIX,
        AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT=str(HEARTBEAT_TIMEOUT_S),
        AIRFLOW__CORE__DEFAULT_TASK_RETRY_DELAY=str(RETRY_DELAY_S),
    )  # fmt: skip
    running = RunningAirflow(home, env, port, target="airflow-celery")
    broker = redis.Redis.from_url(BROKER_URL)
    try:
        running.start()
        yield running
    finally:
        running.stop()
        for key in broker.scan_iter(f"{BROKER_PREFIX}*", count=1000):
            broker.delete(key)
        broker.close()
        postgres_server.drop(database)


def test_the_data_stage_runs_on_celery_and_a_lost_worker_is_retried(celery_airflow: RunningAirflow, small_raw: Path,
                                                                    tmp_path: Path):  # fmt: skip
    airflow = celery_airflow
    assert airflow.process is not None
    [worker] = _celery_workers(airflow.process.pid)
    airflow.unpause("recsys_nightly")
    run_id = airflow.trigger("recsys_nightly", {"input_dir": str(small_raw), "quality_gate": "force",
                                                "ranker_epochs": 1})  # fmt: skip

    # The NVTabular step running on the worker (the trainer environment's process its task started): the worker and
    # every process it started are killed, with no chance to report anything, as when a machine is lost.
    deadline = time.monotonic() + 600
    while not any(b"nvtabular-fit-transform" in _command(pid) for pid in _descendants(worker)):
        assert time.monotonic() < deadline, airflow.failure_report("recsys_nightly", run_id)
        time.sleep(0.1)
    time.sleep(1)  # into the step (it takes about 10 s here)
    for pid in [worker, *_descendants(worker)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    # Another worker takes over, as a replacement machine would (`airflow celery worker`, the same configuration).
    with (tmp_path / "worker.log").open("wb") as log:
        replacement = subprocess.Popen([str(PROJECT_ROOT / ".venv/bin/airflow"), "celery", "worker", "--queues",
                                        "default,trainer"], env={**airflow.env, "AIRFLOW_HOME": str(airflow.home)},
                                       stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 900
        while True:
            states = airflow.task_states("recsys_nightly", run_id)
            if states.get(LOST, (None, 0))[0] in ("success", "failed", "upstream_failed"):
                break
            assert time.monotonic() < deadline, airflow.failure_report("recsys_nightly", run_id)
            time.sleep(3)
    finally:
        os.killpg(replacement.pid, signal.SIGTERM)
        replacement.wait(timeout=60)

    assert states[LOST] == ("success", 2), states  # the lost try failed, the retry succeeded
    assert all(states[task] == ("success", 1) for task in DATA_STAGE if task != LOST), states
    instances = airflow.get(f"/api/v2/dags/recsys_nightly/dagRuns/{run_id}/taskInstances")["task_instances"]
    queues = {instance["task_id"]: instance["queue"] for instance in instances}
    assert queues["nvtabular_fit_transform"] == "trainer" and queues["validate"] == "default", queues
    worker_log = (tmp_path / "worker.log").read_text(errors="replace")
    assert "execute_workload" in worker_log, worker_log[-3000:]  # the replacement ran the retried task
    # The rerun replaced the step's output: one folder behind the step's name, no staging left by the lost try.
    run_dir = Path(airflow.env["RECSYS_DATA_ROOT"]) / "runs" / safe_run_id(run_id)
    step = run_dir / "nvtabular"  # RunLayout's folder of the step
    leftovers = [path.name for path in run_dir.glob(".nvtabular.*") if path != step.resolve()]
    assert step.is_dir() and (step / "workflow").is_dir() and not leftovers, leftovers


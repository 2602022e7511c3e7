"""The NVTabular step and batch scoring on Dask (issue 20, item 1; `recsys/dask_cluster.py`): a real `dask
scheduler` and two `dask worker` processes of the trainer environment on loopback, and a LocalCluster, each run the
step the way the DAG runs it (the trainer CLI in a subprocess); the outputs equal the single-process run's
(conftest's `nvtabular_output` and `batch_scored`), and both workers did a share of the work."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest

from recsys.dask_cluster import SCHEDULER_ENV
from recsys.settings import get_settings
from recsys.trainer_env import TrainerStepError, run_trainer_step
from tests.conftest import environment, read_nvtabular_output
from tests.servers import free_port

START_TIMEOUT_S = 60


def dask_command(*arguments: str) -> list[str]:
    return [str(Path(get_settings().trainer_python).with_name("dask")), *arguments]


def answers(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def dask_cluster(workers: int, log_dir: Path) -> Iterator[str]:
    """`dask scheduler` and `workers` single-threaded `dask worker` processes on loopback, stopped afterwards."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    processes: list[subprocess.Popen[bytes]] = []

    def start(name: str, *arguments: str) -> None:
        with (log_dir / f"{name}.log").open("w") as log:
            processes.append(subprocess.Popen(dask_command(*arguments), stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))  # fmt: skip

    def wait_for(ready: Callable[[], bool], name: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not ready():
            assert time.monotonic() < deadline, (log_dir / f"{name}.log").read_text()
            time.sleep(0.2)

    try:
        start("scheduler", "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard")
        wait_for(lambda: answers(port), "scheduler")
        for number in range(workers):
            start(f"worker-{number}", "worker", address, "--host", "127.0.0.1", "--nthreads", "1", "--no-dashboard")
        for name in [f"worker-{number}" for number in range(workers)]:
            log = log_dir / f"{name}.log"
            wait_for(lambda log=log: "Registered to" in log.read_text(), name)  # type: ignore[misc]
        yield address
    finally:
        for process in reversed(processes):  # workers first
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def assert_same_output(single: Path, distributed: Path) -> None:
    """Row for row the same splits, feature tables and fitted category tables."""
    for split in ("train", "valid"):
        pd.testing.assert_frame_equal(read_nvtabular_output(single / split), read_nvtabular_output(distributed / split))
    for table in ("user_features.parquet", "item_features.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(single / table), pd.read_parquet(distributed / table))
    categories = sorted(path.name for path in (single / "workflow" / "categories").glob("*.parquet"))
    assert categories
    assert categories == sorted(path.name for path in (distributed / "workflow" / "categories").glob("*.parquet"))
    for name in categories:
        pd.testing.assert_frame_equal(pd.read_parquet(single / "workflow" / "categories" / name),
                                      pd.read_parquet(distributed / "workflow" / "categories" / name))  # fmt: skip


def nvtabular_step(resplit: Path, output: Path, *arguments: str) -> dict:
    return run_trainer_step(get_settings().trainer_python, "nvtabular-fit-transform",
                            ["--input", str(resplit), "--output", str(output), *arguments])  # fmt: skip


def test_the_step_on_a_dask_cluster_writes_what_one_process_writes(nvtabular_output, tmp_path: Path):
    resplit, single, single_metrics = nvtabular_output
    with dask_cluster(2, tmp_path) as address:
        metrics = nvtabular_step(resplit, tmp_path / "distributed", "--dask-scheduler", address)
    assert_same_output(single, tmp_path / "distributed")
    assert metrics["dask"]["scheduler"] == address
    tasks = metrics["dask"]["tasks_by_worker"]
    assert len(tasks) == 2 and all(count > 0 for count in tasks.values()), tasks  # both did a share
    assert {key: value for key, value in metrics.items() if key != "dask"} == single_metrics
    assert json.loads((tmp_path / "distributed" / "_metrics.json").read_text())["dask"] == metrics["dask"]


def test_a_local_cluster_is_chosen_by_the_environment_variable(nvtabular_output, tmp_path: Path):
    resplit, single, _ = nvtabular_output
    with environment({SCHEDULER_ENV: "local"}):
        metrics = nvtabular_step(resplit, tmp_path / "local")
    assert_same_output(single, tmp_path / "local")
    assert metrics["dask"]["scheduler"] == "local" and len(metrics["dask"]["tasks_by_worker"]) == os.cpu_count()


@pytest.mark.trainer
def test_a_scheduler_that_does_not_answer_fails_the_step_naming_it(tmp_path: Path):
    (tmp_path / "resplit" / "train").mkdir(parents=True)
    address = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(TrainerStepError, match=f"no Dask scheduler answers at {address}"):
        nvtabular_step(tmp_path / "resplit", tmp_path / "out", "--dask-scheduler", address)
    assert not (tmp_path / "out").exists()


def read_lists(directory: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(path) for path in sorted(directory.glob("part-*.parquet"))], ignore_index=True)


def test_batch_scoring_on_a_dask_cluster_writes_the_lists_one_process_writes(trained_run, batch_scored,
                                                                              tmp_path: Path):  # fmt: skip
    """362 users in batches of 64: three shards of two batches over the two workers."""
    with dask_cluster(2, tmp_path) as address:
        metrics = run_trainer_step(get_settings().trainer_python, "batch-score",
                                   ["--input", str(trained_run), "--output", str(tmp_path / "distributed"),
                                    "--dask-scheduler", address, "--users-per-batch", "64"])  # fmt: skip
    # The same lists, in the same order (shards in user order), though batches of 64 users, not 512: a user's list
    # does not depend on whom they are scored with.
    for folder in ("users", "segments", "similar"):
        pd.testing.assert_frame_equal(read_lists(batch_scored / folder), read_lists(tmp_path / "distributed" / folder))
    assert len(list((tmp_path / "distributed" / "users").glob("part-*.parquet"))) == metrics["dask"]["shards"] > 1
    tasks = metrics["dask"]["tasks_by_worker"]
    assert len(tasks) == 2 and all(count > 0 for count in tasks.values()), tasks  # both scored a share
    single = json.loads((batch_scored / "_metrics.json").read_text())
    assert metrics["users"] == single["users"] and metrics["blend"] == single["blend"]

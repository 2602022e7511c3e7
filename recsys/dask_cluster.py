"""Where the Dask work of the NVTabular step and of batch scoring runs (trainer environment): in this process, on a
LocalCluster, or on a cluster.

`RECSYS_DASK_SCHEDULER` (or a step's `--dask-scheduler`) chooses:
- unset or empty: one process, as NVTabular runs without a client (the default; enough up to tens of millions
  of rows on one machine);
- `local`: a `distributed.LocalCluster` of this machine's cores, one single-threaded worker process each;
- `tcp://host:8786` (any address `distributed.Client` takes): the cluster whose scheduler listens there, started
  with `dask scheduler` and `dask worker tcp://host:8786` from the trainer environment (the workers import this
  project's NVTabular ops, so they need the same environment and code).

With a client, NVTabular finds it as merlin.core's global client (`merlin.core.utils.Distributed`), and every
worker reads the step's input and writes its part of the output and of Categorify's tables itself: the run
folder (`RECSYS_DATA_ROOT`) must be storage every worker reaches under the same path (a shared file system).
Batch scoring submits its shards of users as tasks (tasks/batch_score.py), which write into the output folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

SCHEDULER_ENV = "RECSYS_DASK_SCHEDULER"
LOCAL = "local"
CONNECT_TIMEOUT_S = 10


def scheduler_from_environment() -> str | None:
    return os.environ.get(SCHEDULER_ENV) or None


@contextlib.contextmanager
def dask_execution(scheduler: str | None) -> Iterator[Any | None]:
    """The block's Dask client, also NVTabular's global one (None: no client, one process)."""
    if not scheduler:
        yield None
        return
    from distributed import Client, LocalCluster
    from merlin.core.utils import Distributed

    with contextlib.ExitStack() as stack:
        if scheduler == LOCAL:
            cluster = stack.enter_context(LocalCluster(n_workers=os.cpu_count() or 1, threads_per_worker=1,
                                                       processes=True, dashboard_address=None))  # fmt: skip
            client = stack.enter_context(Client(cluster))
        else:
            try:
                client = stack.enter_context(Client(scheduler, timeout=CONNECT_TIMEOUT_S))
            except OSError as error:
                raise RuntimeError(f"no Dask scheduler answers at {scheduler} ({SCHEDULER_ENV} or "
                                   f"--dask-scheduler): {error}") from error  # fmt: skip
        workers = len(client.scheduler_info()["workers"])
        if workers == 0:
            raise RuntimeError(f"the Dask scheduler at {scheduler} has no workers: start some with "
                               f"`dask worker {scheduler}` in the trainer environment")  # fmt: skip
        log.info("Dask: %s, %d workers", scheduler, workers)
        stack.enter_context(Distributed(client=client))
        yield client


def tasks_by_worker(client: Any) -> dict[str, int]:
    """How many tasks each worker of `client`'s cluster has executed so far."""

    def executed(dask_worker: Any) -> int:
        return int(dask_worker.state.executed_count)

    return {str(address): count for address, count in client.run(executed).items()}


def partitions_for(dataset: Any, client: Any | None) -> Any:
    """`dataset` with at least two partitions per worker, or without a client per thread of Dask's local
    scheduler, so that every one has a share: a small input is one partition, which one thread or worker would
    take alone, and NVTabular's fit transforms the whole first partition once more to learn the output's dtypes
    (`merlin.dag.executors.DaskExecutor.fit`). Row order is kept."""
    from dask.system import CPU_COUNT  # the local scheduler's thread count (cgroup and affinity aware)

    wanted = 2 * (len(client.scheduler_info()["workers"]) if client is not None else CPU_COUNT)
    if dataset.npartitions >= wanted:
        return dataset
    # Each partition numbered from 0 again: NVTabular 23.08's Categorify takes a partition's index labels for
    # positions (a multi-valued column's nulls), which a repartitioned frame's carried-over labels overrun.
    frame = dataset.to_ddf().repartition(npartitions=wanted).map_partitions(_numbered_from_zero)
    return type(dataset)(frame, cpu=dataset.cpu)


def _numbered_from_zero(frame: Any) -> Any:
    return frame.reset_index(drop=True)

"""Servers for real on loopback and free ports: the gateway in a thread of the test process (uvicorn) or as its own
process (`python -m serving.run`), and a Redis Cluster of its own."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def served(app: FastAPI, startup_timeout_s: float = 60) -> Iterator[str]:
    """Serve `app` until the block ends; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the gateway did not start (see the log above)")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@contextmanager
def serving_run(arguments: list[str], env: dict[str, str], log: Path, startup_timeout_s: float) -> Iterator[str]:
    """`python -m serving.run --port <free> ARGUMENTS`, as users start it, until the block ends; yields its base
    URL once `/health` answers 200 (stderr in `log`)."""
    import httpx

    port = free_port()
    with log.open("w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "serving.run", "--port", str(port), *arguments], env=env,
                                   stdout=subprocess.DEVNULL, stderr=stderr)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"serving.run did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=60)


@contextmanager
def redis_cluster(directory: Path, masters: int = 3, startup_timeout_s: float = 30) -> Iterator[list[str]]:
    """A real Redis Cluster of `masters` primaries on loopback (`redis-server --cluster-enabled yes` on free ports,
    joined by `redis-cli --cluster create`), stopped when the block ends; yields each node's `redis://` URL."""
    import redis

    ports = [free_port() for _ in range(masters)]
    bus_ports = [free_port() for _ in range(masters)]  # the default, port + 10000, may be past 65535
    processes = []
    try:
        for port, bus_port in zip(ports, bus_ports, strict=True):
            node = directory / f"node-{port}"
            node.mkdir(parents=True)
            processes.append(subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--cluster-port", str(bus_port),
                 "--cluster-config-file", str(node / "nodes.conf"), "--dir", str(node), "--save", "",
                 "--appendonly", "no"],
                stdout=(node / "redis.log").open("w"), stderr=subprocess.STDOUT))  # fmt: skip
        deadline = time.monotonic() + startup_timeout_s
        for port in ports:
            while True:
                try:
                    redis.Redis(port=port).ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"redis-server on port {port} did not start") from None
                    time.sleep(0.05)
        subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{port}" for port in ports),
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=startup_timeout_s)  # fmt: skip
        while not all(redis.Redis(port=port).cluster("info")["cluster_state"] == "ok" for port in ports):
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.1)
        yield [f"redis://127.0.0.1:{port}" for port in ports]
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)

"""`make demo` as a newcomer runs it: `scripts/demo.py` generates data, runs the nightly DAG, starts the serving
stack, prints a working curl line, and Ctrl-C stops everything it started and revokes its key."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import httpx
import pytest
import redis

from recsys.recommendation_store import RecommendationKeys, as_text
from tests.servers import free_port
from tests.test_e2e_nightly import E2E_REDIS_URL, airflow_env  # noqa: F401  (the Airflow home fixture)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PREFIX = "e2e-demo:"
READY_TIMEOUT_S = 1500  # data, the DAG on 50k rows (about 5 minutes on 2 cores), Triton's start
CURL_LINE = re.compile(r"curl -H 'X-API-Key: (\S+)' (\S+)/recommendations/(\d+)")
pytestmark = pytest.mark.e2e


def read_until(lines: queue.Queue[str | None], marker: str, timeout_s: float) -> str:
    """The demo's output up to the line starting with `marker`; fails with what it printed if that never comes."""
    printed: list[str] = []
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            break
        if line is None:  # the demo exited
            break
        printed.append(line)
        if line.startswith(marker):
            return "".join(printed)
    raise AssertionError(f"the demo never printed {marker!r}:\n{''.join(printed)[-4000:]}")


def lines_of(stream: IO[str]) -> queue.Queue[str | None]:
    """The stream's lines as they come, from a thread (select() does not see lines already in Python's buffer),
    then None."""
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def port_is_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_make_demo_serves_a_recommendation_and_stops_cleanly(airflow_env, tmp_path: Path):  # noqa: F811
    gateway_port, triton_port = free_port(), free_port()
    env = {**airflow_env, "RECSYS_DATA_ROOT": str(tmp_path / "data"), "RECSYS_LANDING_DIR": str(tmp_path / "landing"),
           "RECSYS_REDIS_URL": E2E_REDIS_URL, "RECSYS_REDIS_KEY_PREFIX": PREFIX,
           "RECSYS_DATABASE_URL": f"sqlite:///{tmp_path / 'gateway.db'}",
           "RECSYS_TRITON_URL": f"http://127.0.0.1:{triton_port}",
           "RECSYS_TRITON_MODELS_DIR": str(tmp_path / "triton_models")}  # fmt: skip
    demo = subprocess.Popen([sys.executable, str(PROJECT_ROOT / "scripts" / "demo.py"), "--port", str(gateway_port),
                             "--log-dir", str(tmp_path / "logs")], env=env, cwd=PROJECT_ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    assert demo.stdout is not None
    lines = lines_of(demo.stdout)
    try:
        printed = read_until(lines, "Ctrl-C stops", READY_TIMEOUT_S)
        assert any((tmp_path / "landing").glob("*.csv")), "the demo generated no data into the landing zone"
        match = CURL_LINE.search(printed)
        assert match, printed
        key, url, customer = match.groups()
        assert url == f"http://127.0.0.1:{gateway_port}"
        served = as_text(redis.Redis.from_url(E2E_REDIS_URL).get(RecommendationKeys(PREFIX).current))
        assert f"version {served} is served" in printed

        # The printed curl line works as printed: the nightly run's list for that customer.
        answer = httpx.get(f"{url}/recommendations/{customer}", headers={"X-API-Key": key}, timeout=30)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["route"] == "precomputed" and body["model_version"] == served
        assert len(body["items"]) == 20
        # The demo page as a browser opens it: the sign-in form, then the page with the printed key.
        with httpx.Client(base_url=url, timeout=30, follow_redirects=True) as browser:
            assert 'name="api_key"' in browser.get("/demo").text
            page = browser.post("/demo/session", data={"api_key": key})
            assert page.status_code == 200 and str(page.url).endswith("/demo"), page.text[:500]

        demo.send_signal(signal.SIGINT)  # Ctrl-C
        demo.wait(timeout=180)
        rest = "".join(iter(lambda: lines.get(timeout=60), None))  # up to the end of its output
    finally:
        if demo.poll() is None:  # a failed check: Ctrl-C, so that the demo stops the servers it started
            demo.send_signal(signal.SIGINT)
            try:
                demo.wait(timeout=180)
            except subprocess.TimeoutExpired:
                os.killpg(demo.pid, signal.SIGKILL)  # the demo and everything it started
                demo.wait()
    assert demo.returncode == 0, rest
    assert "revoked the demo's key" in rest, rest
    assert not port_is_open(gateway_port) and not port_is_open(triton_port), "the demo left a server running"
    keys = subprocess.run([sys.executable, "-m", "serving.api.keys", "list"], env=env, capture_output=True, text=True,
                          check=True, timeout=120).stdout  # fmt: skip
    demo_keys = [line for line in keys.splitlines() if line.startswith("demo-")]
    assert demo_keys and all("revoked" in line for line in demo_keys), keys

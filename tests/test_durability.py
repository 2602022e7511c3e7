"""No data lost, faults survived: the gateway as a real uvicorn process, and the real Redis and PostgreSQL
processes it depends on, killed and stopped under load.

- `test_a_killed_gateway_loses_no_acknowledged_interaction`: a burst of interactions from concurrent clients,
  each with its own `Idempotency-Key`; the gateway is SIGKILLed mid-burst and restarted, clients retry what was
  not acknowledged. Every acknowledged interaction is then stored exactly once, and nothing else is (SQLite
  file and a throw-away PostgreSQL database).
- `test_a_stopped_redis_degrades_answers_and_they_recover`: the gateway's Redis is killed under load; every
  answer stays a 200 from the process's copies, marked `redis_unavailable`; Redis restarted on the same port,
  normal answers resume in the same gateway process.
- `test_a_stopped_database_is_503_and_loses_nothing_acknowledged`: the gateway's PostgreSQL server (a private
  cluster this test runs) is stopped under load; posts get 503 with Retry-After at once, recommendations stay
  200 (degraded); started again, posts succeed in the same gateway process and everything acknowledged is there.
- Recommendations for a session while the database is down, and once the API key's cache entry expired
  during the outage, are still answered (degraded).
- A hung (not stopped) database: a post is answered 503 within the gateway's client-side deadline, and the
  same post is acknowledged once the database answers again.

Each process is started by the test and stopped in a `finally`, whatever happens; every wait is bounded.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from recsys.database import CALL_DEADLINE_FACTOR, Interaction, create_database_engine
from recsys.settings import Settings
from serving.api.auth import KeyCache
from serving.api.main import create_app
from serving.api.migrate import upgrade
from tasks.publish_recommendations import publish_recommendations
from tests.api_keys import authorized, new_key
from tests.servers import free_port
from tests.test_publish_recommendations import write_batch

pytestmark = pytest.mark.e2e

PROJECT_ROOT = Path(__file__).resolve().parent.parent
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
PREFIX = "durability:"
VERSION = "v1"


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(interval_s)


def tail(path: Path, characters: int = 3000) -> str:
    return path.read_text(errors="replace")[-characters:] if path.exists() else f"(no {path})"


# -- the processes ------------------------------------------------------------------------------------------


class GatewayProcess:
    """`python -m uvicorn serving.api.main:create_app --factory` on a port of its own, configured by environment."""

    def __init__(self, environment: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.environment = {**os.environ, **environment}
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60) -> None:
        argv = [sys.executable, "-m", "uvicorn", "serving.api.main:create_app", "--factory", "--host", "127.0.0.1",
                "--port", str(self.port), "--log-level", "warning", "--no-access-log"]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(argv, cwd=PROJECT_ROOT, env=self.environment, stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        process = self.process

        def ready() -> bool:
            if process.poll() is not None:
                raise AssertionError(f"the gateway exited with {process.returncode}:\n{tail(self.log_path)}")
            try:
                return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, timeout_s, f"gateway on {self.url} healthy (log {self.log_path})", interval_s=0.1)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=15)


@contextlib.contextmanager
def gateway(environment: dict[str, str], log_path: Path) -> Iterator[GatewayProcess]:
    process = GatewayProcess(environment, log_path)
    try:
        process.start()
        yield process
    finally:
        process.stop()


class RedisProcess:
    """A private redis-server on a free port, with an append-only file written on every command, so that a
    SIGKILL loses nothing and a restart in the same folder serves the same keys (how a production Redis that
    must survive a crash is configured)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        import redis

        if not Path(REDIS_SERVER).exists():
            pytest.fail(f"no redis-server at {REDIS_SERVER}: `make setup` installs it")
        argv = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
                "--save", "", "--appendonly", "yes", "--appendfsync", "always",
                "--logfile", str(self.directory / "redis.log")]  # fmt: skip
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT)  # fmt: skip
        client = redis.Redis.from_url(self.url(), socket_timeout=1, socket_connect_timeout=1)

        def answers() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"redis-server exited: {tail(self.directory / 'redis.log')}")
            try:
                return bool(client.ping())
            except redis.RedisError:  # not listening yet, or still loading its append-only file
                return False

        try:
            wait_until(answers, 15, f"redis-server on port {self.port}")
        finally:
            client.close()

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


@pytest.fixture
def redis_process(tmp_path: Path) -> Iterator[RedisProcess]:
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisProcess(directory)
    try:
        server.start()
        yield server
    finally:
        server.stop()


class PostgresCluster:
    """A private PostgreSQL cluster (initdb in a temporary folder, trust authentication, a free port, its
    socket in that folder) that the test can stop and start. initdb refuses to run as root: as root, the
    binaries run as the `postgres` user, which owns the folder."""

    def __init__(self) -> None:
        binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
        initdb = binaries[-1] if binaries else shutil.which("initdb")
        if initdb is None:
            pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) on this machine")
        self.bin = Path(initdb).parent
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            if runuser is None:
                pytest.skip("running as root, and no runuser to run PostgreSQL as another user")
            self.as_user = [runuser, "-u", "postgres", "--"]
        self.directory = Path(tempfile.mkdtemp(prefix="recsys-pg-"))
        if self.as_user:
            shutil.chown(self.directory, "postgres")
        self.data = self.directory / "data"
        self.log_path = self.directory / "postgresql.log"
        self.port = free_port()

    def _run(self, *argv: str, timeout_s: float = 60) -> None:
        finished = subprocess.run([*self.as_user, *argv], capture_output=True, text=True, timeout=timeout_s)
        if finished.returncode != 0:
            raise AssertionError(f"{' '.join(argv)} failed: {finished.stdout}{finished.stderr}\n{tail(self.log_path)}")

    def init(self) -> None:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                  "--no-sync", "--no-instructions")  # fmt: skip

    def start(self) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log_path), "-o", options,
                  "-w", "-t", "60", "start")  # fmt: skip

    def stop(self, mode: str) -> None:
        """`immediate`: every server process quits at once, as in a crash (recovery replays the WAL on start);
        `fast`: sessions are ended with an error, then a clean shutdown."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def processes(self) -> list[int]:
        """The postmaster and its children (sessions, background workers)."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        children = subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True, text=True).stdout.split()
        return [postmaster, *map(int, children)]

    def signal(self, number: signal.Signals) -> None:
        for pid in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, number)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def remove(self) -> None:
        if self.running():
            with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                self.stop("immediate")
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture
def postgres_cluster() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster()
    try:
        cluster.init()
        cluster.start()
        yield cluster
    finally:
        cluster.remove()


def create_database(cluster: PostgresCluster, name: str) -> str:
    from sqlalchemy import create_engine

    from recsys.database import database_url

    admin = create_engine(database_url(cluster.url()), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(f"CREATE DATABASE {name}")
    finally:
        admin.dispose()
    return cluster.url(name)


# -- what the clients send ------------------------------------------------------------------------------------

CUSTOMERS = range(1, 21)
PRODUCTS = range(1, 51)
TYPES = ("view", "click", "add_to_cart", "purchase")
FIRST_EVENT = datetime(2024, 5, 1, 12, tzinfo=UTC)


def event(number: int) -> dict[str, Any]:
    """The number-th interaction of a burst: varied customers, products, types and sessions."""
    return {"type": TYPES[number % 4], "customer_id": CUSTOMERS[number % len(CUSTOMERS)],
            "product_id": PRODUCTS[(number * 7) % len(PRODUCTS)], "session_id": f"s-{number % 97}",
            "timestamp": (FIRST_EVENT + timedelta(seconds=number)).isoformat()}  # fmt: skip


def seed_catalog(url: str, key: str) -> None:
    with httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=10) as client:
        for customer_id in CUSTOMERS:
            assert client.post("/customers", json={"id": customer_id}).status_code == 201
        for product_id in PRODUCTS:
            assert client.post("/products", json={"id": product_id}).status_code == 201


def stored_interactions(database_url: str) -> list[Interaction]:
    engine = create_database_engine(database_url, timeout_ms=None)
    try:
        with Session(engine) as session:
            return list(session.scalars(select(Interaction).order_by(Interaction.id)))
    finally:
        engine.dispose()


def assert_stored_exactly_once(database_url: str, sent: dict[str, dict[str, Any]],
                               acknowledged: dict[str, int]) -> None:  # fmt: skip
    """Every acknowledged interaction is stored once, as it was sent and under the id it was acknowledged with;
    no row was never sent."""
    rows = stored_interactions(database_url)
    counts = collections.Counter(row.event_id for row in rows)
    assert [key for key, count in counts.items() if count > 1] == []
    assert None not in counts, "a row without the Idempotency-Key it was sent with"
    assert set(counts) - set(sent) == set(), "rows that were never sent"
    missing = set(acknowledged) - set(counts)
    assert missing == set(), f"{len(missing)} acknowledged interactions lost, e.g. {sorted(missing)[:5]}"
    by_key = {row.event_id: row for row in rows}
    for key, interaction_id in acknowledged.items():
        row, body = by_key[key], sent[key]
        assert row.id == interaction_id, key
        assert (row.type.value, row.customer_id, row.product_id, row.session_id) == (
            body["type"], body["customer_id"], body["product_id"], body["session_id"]), key  # fmt: skip
        assert row.timestamp == datetime.fromisoformat(body["timestamp"]), key


@dataclasses.dataclass
class Attempt:
    key: str
    started: float
    ended: float
    status: int | None  # None: no answer (connection refused or lost)
    retry_after: str | None = None
    interaction_id: int | None = None


class Poster:
    """Posts interactions with their Idempotency-Key from several threads, one HTTP client each, and records
    every attempt (thread-safe)."""

    def __init__(self, url: str, key: str, request_timeout_s: float = 10) -> None:
        self.url = url
        self.key = key
        self.request_timeout_s = request_timeout_s
        self.attempts: list[Attempt] = []
        self.acknowledged: dict[str, int] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    def _client(self) -> httpx.Client:
        if not hasattr(self._local, "client"):
            self._local.client = httpx.Client(base_url=self.url, headers={"X-API-Key": self.key},
                                              timeout=self.request_timeout_s)  # fmt: skip
        client: httpx.Client = self._local.client
        return client

    def post_once(self, key: str, body: dict[str, Any]) -> Attempt:
        started = time.monotonic()
        try:
            response = self._client().post("/interactions", json=body, headers={"Idempotency-Key": key})
        except httpx.TransportError:
            attempt = Attempt(key, started, time.monotonic(), None)
        else:
            attempt = Attempt(key, started, time.monotonic(), response.status_code, response.headers.get("retry-after"))
            if response.status_code in (200, 201):
                attempt.interaction_id = response.json()["id"]
            elif response.status_code not in (429, 503):  # anything but "retry later" is a failure of the test
                raise AssertionError(f"{key}: {response.status_code} {response.text}")
        with self._lock:
            self.attempts.append(attempt)
            if attempt.interaction_id is not None:
                previous = self.acknowledged.setdefault(key, attempt.interaction_id)
                assert previous == attempt.interaction_id, (key, previous, attempt.interaction_id)
        return attempt

    def post_until_acknowledged(self, key: str, body: dict[str, Any], deadline: float) -> None:
        while self.post_once(key, body).interaction_id is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"{key} not acknowledged before the deadline")
            time.sleep(0.05)

    def acknowledged_count(self) -> int:
        with self._lock:
            return len(self.acknowledged)


# -- 1. the gateway killed mid-burst ----------------------------------------------------------------------------

BURST = 3000
CLIENTS = 8


@pytest.mark.timeout(240)
def test_a_killed_gateway_loses_no_acknowledged_interaction(migrated_database_url: str, redis_process: RedisProcess,
                                                            tmp_path: Path) -> None:  # fmt: skip
    started = time.monotonic()
    key = new_key(migrated_database_url, ("ingest", "admin"))
    environment = {"RECSYS_DATABASE_URL": migrated_database_url, "RECSYS_REDIS_URL": redis_process.url(),
                   "RECSYS_REDIS_KEY_PREFIX": PREFIX, "RECSYS_DATABASE_TIMEOUT_MS": "2000",
                   # Rate limits far above the burst: this test is about durability, not limits.
                   "RECSYS_INGEST_RATE_PER_S": "1000000", "RECSYS_INGEST_BURST": "1000000"}  # fmt: skip
    sent = {f"burst-{number}": event(number) for number in range(BURST)}
    with gateway(environment, tmp_path / "gateway.log") as process:
        seed_catalog(process.url, key)
        poster = Poster(process.url, key)
        deadline = time.monotonic() + 150
        with ThreadPoolExecutor(CLIENTS) as pool:
            futures = [pool.submit(poster.post_until_acknowledged, key_, body, deadline) for key_, body in sent.items()]
            wait_until(lambda: poster.acknowledged_count() >= BURST // 3, 60, "a third of the burst acknowledged")
            killed_at = time.monotonic()
            process.kill()
            acknowledged_before_kill = dict(poster.acknowledged)
            time.sleep(0.5)  # clients meet a closed port for a while
            process.start()
            restarted_at = time.monotonic()
            for future in futures:
                future.result()

    assert_stored_exactly_once(migrated_database_url, sent, poster.acknowledged)
    assert len(poster.acknowledged) == BURST and set(acknowledged_before_kill) <= set(poster.acknowledged)
    unanswered = [attempt for attempt in poster.attempts if attempt.status is None]
    # The kill hit the burst: requests were cut off or refused, and every one of them was retried to an answer.
    assert unanswered and all(attempt.key in poster.acknowledged for attempt in unanswered)
    # None failed on its own before the kill (a slow request may have started well before it on busy cores).
    assert all(attempt.ended >= killed_at for attempt in unanswered)
    replays = sum(attempt.status == 200 for attempt in poster.attempts)
    backend = migrated_database_url.split(":")[0].split("+")[0]
    print(f"\n{backend}: {BURST} interactions, {len(acknowledged_before_kill)} "
          f"acknowledged before the SIGKILL, {len(unanswered)} attempts without an answer, {replays} answered 200 "
          f"(stored before the kill, acknowledged only on retry), restart took {restarted_at - killed_at:.1f} s, "
          f"whole test {time.monotonic() - started:.1f} s")  # fmt: skip


# -- 2. Redis stopped under load --------------------------------------------------------------------------------


def publish_small_set(redis_url: str, directory: Path) -> None:
    """Users 0-29, segments `*`, `3:1`, `3:2`, `7:1`, similar lists of items 100-119 (as batch_score writes them)."""
    batch = write_batch(directory, seed=3)
    publish_recommendations(batch, redis_url=redis_url, version=VERSION, key_prefix=PREFIX, progress=False)


@dataclasses.dataclass
class Answer:
    path: str
    started: float
    ended: float
    status: int
    body: dict[str, Any]


class Reader:
    """Sends GETs over `paths` round-robin from a background thread until stopped; records every answer."""

    def __init__(self, url: str, key: str, paths: list[str]) -> None:
        self.client = httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=10)
        self.paths = paths
        self.answers: list[Answer] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        number = 0
        try:
            while not self._stop.is_set():
                path = self.paths[number % len(self.paths)]
                started = time.monotonic()
                response = self.client.get(path)
                body = response.json() if response.headers.get("content-type") == "application/json" else {}
                self.answers.append(Answer(path, started, time.monotonic(), response.status_code, body))
                number += 1
        except BaseException as error:  # a transport error is a finding: the gateway must always answer
            self.error = error

    def __enter__(self) -> Reader:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.client.close()

    def count(self) -> int:
        return len(self.answers)


def items(body: dict[str, Any]) -> list[int]:
    return [item["product_id"] for item in body["items"]]


@pytest.mark.timeout(180)
def test_a_stopped_redis_degrades_answers_and_they_recover(redis_process: RedisProcess, tmp_path: Path) -> None:
    publish_small_set(redis_process.url(), tmp_path / "batch")
    database_url = f"sqlite:///{tmp_path / 'gateway.db'}"
    upgrade(database_url)
    key = new_key(database_url, ("read", "ingest", "admin"))
    environment = {"RECSYS_DATABASE_URL": database_url, "RECSYS_REDIS_URL": redis_process.url(),
                   "RECSYS_REDIS_KEY_PREFIX": PREFIX,
                   # No Triton here; generous Redis budget: a busy 2-core machine must not look like an outage.
                   "RECSYS_TRITON_URL": f"http://127.0.0.1:{free_port()}",
                   "RECSYS_REDIS_TIMEOUT_MS": "1000"}  # fmt: skip
    users = [f"/recommendations/{user}?count=5" for user in range(1, 30)]
    paths = [*users, "/recommendations/999999?count=5", "/products/105/similar?count=5"]
    with gateway(environment, tmp_path / "gateway.log") as process, \
            httpx.Client(base_url=process.url, headers={"X-API-Key": key}, timeout=10) as client:  # fmt: skip
        normal = {path: client.get(path).json() for path in paths}  # the process remembers these answers
        assert {normal[path]["route"] for path in users} == {"precomputed"}
        assert all(normal[path]["degraded"] == [] for path in users)
        assert normal[paths[-2]]["route"] == "generic" and normal[paths[-1]]["route"] == "browsing_now"
        assert client.post("/customers", json={"id": 1}).status_code == 201
        assert client.post("/products", json={"id": 1}).status_code == 201
        gateway_pid = process.process.pid if process.process else None

        with Reader(process.url, key, paths) as reader:
            wait_until(lambda: reader.count() >= 60, 30, "answers before the outage")
            killed_at = time.monotonic()
            redis_process.kill()
            time.sleep(2)  # an outage of some length, not a blip
            wait_until(lambda: sum(answer.started > killed_at for answer in reader.answers) >= 2 * len(paths), 30,
                       "answers during the outage")  # fmt: skip
            # Ingestion does not need Redis (the rate limit lets requests through when Redis is away).
            posted = client.post("/interactions", headers={"Idempotency-Key": "during-redis-outage"},
                                 json={**event(0), "customer_id": 1, "product_id": 1})  # fmt: skip
            restart_at = time.monotonic()
            redis_process.start()  # the same port, the same append-only file
            restarted_at = time.monotonic()

            def normal_again() -> bool:
                recent = [answer for answer in reader.answers if answer.started > restarted_at]
                return len(recent) >= len(paths) and all(answer.body.get("degraded") == [] for answer in recent[-5:]
                                                          if answer.path in users)  # fmt: skip

            wait_until(normal_again, 20, "normal answers after Redis is back")
            recovered_at = time.monotonic()
            wait_until(lambda: sum(answer.started > recovered_at for answer in reader.answers) >= len(paths), 20,
                       "a full round after recovery")  # fmt: skip
        assert reader.error is None, f"a request got no answer: {reader.error!r}"
        assert process.process is not None and process.process.pid == gateway_pid and process.process.poll() is None

    assert posted.status_code == 201, posted.text
    assert [answer for answer in reader.answers if answer.status != 200] == []
    outage = [answer for answer in reader.answers if answer.started > killed_at and answer.ended < restart_at]
    assert len(outage) >= 2 * len(paths)
    for answer in outage:
        body = answer.body
        assert "redis_unavailable" in body["degraded"], answer
        assert body["route"].endswith("_local_copy"), answer
        if answer.path in users:  # the same list the customer got before, from the process's copy
            assert body["route"] == "precomputed_local_copy" and items(body) == items(normal[answer.path]), answer
        else:  # a stranger, or a product without a copy of its own: the remembered generic list
            assert body["route"] == "generic_local_copy" and body["items"], answer
    slowest = max(answer.ended - answer.started for answer in outage)
    assert slowest < 2.0, f"an answer during the outage took {slowest:.2f} s"
    after = [answer for answer in reader.answers if answer.started > recovered_at]
    assert after and all(answer.body["degraded"] == [] or answer.path == paths[-2] for answer in after)
    assert {answer.body["route"] for answer in after if answer.path in users} == {"precomputed"}
    assert all(items(answer.body) == items(normal[answer.path]) for answer in after)
    print(f"\nRedis down {restart_at - killed_at:.1f} s: {len(outage)} answers, all 200 and degraded, slowest "
          f"{slowest * 1000:.0f} ms; normal again {recovered_at - restarted_at:.1f} s after the restart")


@pytest.mark.timeout(180)
def test_a_hung_redis_costs_one_budget_and_no_reply_goes_to_another_request(redis_process: RedisProcess,
                                                                            tmp_path: Path) -> None:  # fmt: skip
    """Redis stops answering without closing anything (SIGSTOP: the kernel still accepts and buffers). Each
    request gives up after the Redis budget and answers from the process's copy; once Redis continues, it
    answers every command it was sent, late: a connection that went back to the pool with such a reply
    pending would hand it to the next request, which would then answer with another customer's list."""
    publish_small_set(redis_process.url(), tmp_path / "batch")
    database_url = f"sqlite:///{tmp_path / 'gateway.db'}"
    upgrade(database_url)
    key = new_key(database_url, ("read",))
    budget_s = 0.3
    environment = {"RECSYS_DATABASE_URL": database_url, "RECSYS_REDIS_URL": redis_process.url(),
                   "RECSYS_REDIS_KEY_PREFIX": PREFIX, "RECSYS_TRITON_URL": f"http://127.0.0.1:{free_port()}",
                   "RECSYS_REDIS_TIMEOUT_MS": str(int(budget_s * 1000))}  # fmt: skip
    users = [f"/recommendations/{user}?count=5" for user in range(1, 17)]
    assert redis_process.process is not None
    with gateway(environment, tmp_path / "gateway.log") as process, \
            httpx.Client(base_url=process.url, headers={"X-API-Key": key}, timeout=10) as client, \
            ThreadPoolExecutor(8) as clients:  # fmt: skip

        def answer(path: str) -> tuple[str, float, dict[str, Any]]:
            started = time.monotonic()
            response = client.get(path)
            assert response.status_code == 200, response.text
            return path, time.monotonic() - started, response.json()

        def round_of(paths: list[str]) -> list[tuple[str, float, dict[str, Any]]]:
            return list(clients.map(answer, paths))  # 8 at once: several pooled connections in use

        normal = {path: body for path, _, body in round_of(users)}
        assert {body["route"] for body in normal.values()} == {"precomputed"}
        assert len({tuple(items(body)) for body in normal.values()}) == len(users)  # a mix-up would show
        redis_process.process.send_signal(signal.SIGSTOP)
        try:
            hung = round_of(users * 2)
        finally:
            redis_process.process.send_signal(signal.SIGCONT)
        wait_until(lambda: all(body["degraded"] == [] for _, _, body in round_of(users[:8])), 20,
                   "normal answers after Redis continues")  # fmt: skip
        after = [round_of(users) for _ in range(3)]
    for path, elapsed, body in hung:
        assert body["route"] == "precomputed_local_copy" and "redis_unavailable" in body["degraded"], body
        assert items(body) == items(normal[path])
        assert elapsed < budget_s + 1.0, f"{path}: {elapsed:.2f} s with Redis hung, budget {budget_s} s"
    for path, _, body in (answer for answers in after for answer in answers):
        assert body["route"] == "precomputed" and body["degraded"] == [], body
        assert items(body) == items(normal[path]), f"{path} got another request's list: {body}"


# -- 3. the database stopped under load ------------------------------------------------------------------------


@pytest.mark.timeout(180)
@pytest.mark.parametrize("stop_mode", ["immediate", "fast"])
def test_a_stopped_database_is_503_and_loses_nothing_acknowledged(
    postgres_cluster: PostgresCluster, redis_process: RedisProcess, tmp_path: Path, stop_mode: str
) -> None:
    database_url = create_database(postgres_cluster, "gateway")
    upgrade(database_url)
    ingest_key = new_key(database_url, ("ingest", "admin"))
    read_key = new_key(database_url, ("read",))
    publish_small_set(redis_process.url(), tmp_path / "batch")
    budget_ms = 500
    environment = {"RECSYS_DATABASE_URL": database_url, "RECSYS_DATABASE_TIMEOUT_MS": str(budget_ms),
                   "RECSYS_REDIS_URL": redis_process.url(), "RECSYS_REDIS_KEY_PREFIX": PREFIX,
                   "RECSYS_REDIS_TIMEOUT_MS": "1000", "RECSYS_TRITON_URL": f"http://127.0.0.1:{free_port()}",
                   "RECSYS_INGEST_RATE_PER_S": "1000000", "RECSYS_INGEST_BURST": "1000000"}  # fmt: skip
    sent: dict[str, dict[str, Any]] = {}
    stop = threading.Event()

    def post_steadily(poster: Poster, client_number: int) -> None:
        number = client_number
        while not stop.is_set():
            key = f"c{client_number}-{number}"
            sent[key] = event(number)
            acknowledged = poster.post_once(key, sent[key]).interaction_id is not None
            number += 4
            time.sleep(0.005 if acknowledged else 0.1)  # a client backs off when told to retry later

    with gateway(environment, tmp_path / "gateway.log") as process:
        seed_catalog(process.url, ingest_key)
        gateway_pid = process.process.pid if process.process else None
        poster = Poster(process.url, ingest_key)
        reader = httpx.Client(base_url=process.url, headers={"X-API-Key": read_key}, timeout=10)
        with ThreadPoolExecutor(4) as pool:
            try:
                clients = [pool.submit(post_steadily, poster, number) for number in range(4)]
                wait_until(lambda: poster.acknowledged_count() >= 150, 60, "acknowledged before the outage")
                # The read key is verified now (and kept in process for a few seconds), the first user's list read.
                assert reader.get("/recommendations/1?count=5").json()["degraded"] == []
                stopping_at = time.monotonic()
                postgres_cluster.stop(stop_mode)
                stopped_at = time.monotonic()
                acknowledged_before = dict(poster.acknowledged)
                # Products not read before: their flags must come from the database, which is away.
                during = [reader.get(f"/recommendations/{user}?count=5") for user in (2, 3)]
                time.sleep(3)  # an outage of some length, not a blip
                wait_until(lambda: sum(attempt.started > stopped_at for attempt in poster.attempts) >= 40, 30,
                           "posts during the outage")  # fmt: skip
                restarting_at = time.monotonic()
                postgres_cluster.start()
                started_at = time.monotonic()

                def accepted_again() -> bool:
                    return any(attempt.started > started_at and attempt.status == 201 for attempt in poster.attempts)

                wait_until(accepted_again, 20, "posts accepted after the database is back")
                recovered_at = time.monotonic()
                wait_until(lambda: sum(attempt.started > recovered_at for attempt in poster.attempts) >= 40, 30,
                           "posts after recovery")  # fmt: skip
            finally:
                stop.set()
            for future in clients:
                future.result()
        # What got no acknowledgement is retried with its key: stored once, whether or not it was stored before.
        unacknowledged = [key for key in sent if key not in poster.acknowledged]
        retry_deadline = time.monotonic() + 60
        with ThreadPoolExecutor(4) as pool:
            for future in [pool.submit(poster.post_until_acknowledged, key, sent[key], retry_deadline)
                           for key in unacknowledged]:  # fmt: skip
                future.result()
        reader.close()
        assert process.process is not None and process.process.pid == gateway_pid and process.process.poll() is None

    outage = [attempt for attempt in poster.attempts if stopped_at < attempt.started and attempt.ended < restarting_at]
    assert len(outage) >= 40
    assert {attempt.status for attempt in outage} == {503}, collections.Counter(a.status for a in outage)
    assert all(attempt.retry_after == "1" for attempt in outage)
    slowest = max(attempt.ended - attempt.started for attempt in outage)
    assert slowest < 2.0, f"a post during the outage took {slowest:.2f} s"
    # While the server was shutting down, answers were an acknowledgement or a 503, never a 500 or a dropped request.
    stopping = [attempt for attempt in poster.attempts
                if stopping_at <= attempt.ended and attempt.started <= stopped_at]  # fmt: skip
    assert {attempt.status for attempt in stopping} <= {200, 201, 503}
    # Once one post went through, every later one did: no flapping while the pool reconnects.
    after = [attempt for attempt in poster.attempts if attempt.started > recovered_at]
    assert len(after) >= 40 and {attempt.status for attempt in after} <= {200, 201}
    # Recommendations do not need the database: the nightly list, marked database_unavailable.
    for answer in during:
        assert answer.status_code == 200, answer.text
        assert answer.json()["route"] == "precomputed" and answer.json()["degraded"] == ["database_unavailable"]
        assert len(answer.json()["items"]) == 5

    assert set(acknowledged_before) <= set(poster.acknowledged)
    assert_stored_exactly_once(database_url, sent, poster.acknowledged)
    assert len(stored_interactions(database_url)) == len(sent)
    print(f"\nPostgreSQL stopped ({stop_mode}) for {restarting_at - stopped_at:.1f} s: {len(outage)} posts, 503 "
          f"(slowest {slowest * 1000:.0f} ms); accepted again {recovered_at - started_at:.1f} s after the start; "
          f"{len(acknowledged_before)} acknowledged before, {len(unacknowledged)} retried after, all stored once")


# -- 4. what reads still need the database -------------------------------------------------------------------


@pytest.fixture
def gateway_on_a_private_database(postgres_cluster: PostgresCluster, redis_process: RedisProcess,
                                  tmp_path: Path) -> Iterator[TestClient]:  # fmt: skip
    """The gateway in process on the private PostgreSQL cluster and Redis (the small published set), with a
    read key kept in process for 1 s instead of `api_key_cache_s` (10 s), so that a test can outlast it quickly."""
    database_url = create_database(postgres_cluster, "gateway")
    upgrade(database_url)
    publish_small_set(redis_process.url(), tmp_path / "batch")
    settings = Settings(database_url=database_url, database_timeout_ms=500, redis_url=redis_process.url(),
                        redis_key_prefix=PREFIX, redis_timeout_ms=1000, triton_url=f"http://127.0.0.1:{free_port()}")
    app = create_app(settings)
    app.state.key_cache = KeyCache(ttl_s=1.0)
    with authorized(TestClient(app), database_url, ("read",)) as client:
        assert client.get("/recommendations/1?count=5").json()["degraded"] == []  # the key is verified and kept
        yield client


@pytest.mark.timeout(120)
def test_browsing_recommendations_while_the_database_is_down(gateway_on_a_private_database: TestClient,
                                                             postgres_cluster: PostgresCluster) -> None:  # fmt: skip
    client = gateway_on_a_private_database
    postgres_cluster.stop("immediate")
    answer = client.get("/recommendations/2?count=5&session_id=s-1")  # the session's views are read from the database
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["route"] == "precomputed" and "database_unavailable" in body["degraded"] and len(body["items"]) == 5


@pytest.mark.timeout(120)
def test_recommendations_outlast_the_key_cache_while_the_database_is_down(gateway_on_a_private_database: TestClient,
                                                                          postgres_cluster: PostgresCluster) -> None:
    client = gateway_on_a_private_database
    postgres_cluster.stop("immediate")
    assert client.get("/recommendations/2?count=5").json()["degraded"] == ["database_unavailable"]
    time.sleep(1.2)  # the key's verification expires: it would be looked up in the database again
    answer = client.get("/recommendations/3?count=5")
    assert answer.status_code == 200, answer.text
    assert answer.json()["degraded"] == ["database_unavailable"] and len(answer.json()["items"]) == 5
    # A key never verified by this process is still refused: nothing is let through unverified.
    stranger = client.get("/recommendations/3?count=5", headers={"X-API-Key": "rk_never-issued"})
    assert stranger.status_code in (401, 503)


@pytest.mark.timeout(120)
def test_a_hung_database_is_503_within_the_budget(postgres_cluster: PostgresCluster, tmp_path: Path) -> None:
    """The server stops answering without closing anything (every PostgreSQL process SIGSTOPped, as in a storage
    stall: connections stay open, the kernel still accepts new ones)."""
    database_url = create_database(postgres_cluster, "gateway")
    upgrade(database_url)
    key = new_key(database_url, ("ingest", "admin"))
    budget_s = 0.5
    environment = {"RECSYS_DATABASE_URL": database_url, "RECSYS_DATABASE_TIMEOUT_MS": str(int(budget_s * 1000)),
                   "RECSYS_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}  # fmt: skip
    with gateway(environment, tmp_path / "gateway.log") as process, \
            httpx.Client(base_url=process.url, headers={"X-API-Key": key}, timeout=5) as client:  # fmt: skip
        seed_catalog(process.url, key)
        postgres_cluster.signal(signal.SIGSTOP)
        answers: list[tuple[httpx.Response | None, float]] = []
        try:
            for attempt in range(2):  # the first finds a pooled connection, the second has to open one
                started = time.monotonic()
                try:
                    idempotency = {"Idempotency-Key": f"hung-{attempt}"}
                    answer: httpx.Response | None = client.post("/interactions", json=event(attempt),
                                                                headers=idempotency)  # fmt: skip
                except httpx.TimeoutException:
                    answer = None
                answers.append((answer, time.monotonic() - started))
        finally:
            postgres_cluster.signal(signal.SIGCONT)
        # Continued, the database answers again: the same key is acknowledged, and stored once.
        acknowledged = client.post("/interactions", json=event(0), headers={"Idempotency-Key": "hung-0"})
    assert acknowledged.status_code in (200, 201), acknowledged.text
    assert [row.event_id for row in stored_interactions(database_url)] == ["hung-0"]
    # statement_timeout is the server's to enforce, so a frozen server never does: the gateway's call
    # deadline (CALL_DEADLINE_FACTOR budgets, recsys/call_deadline.py) cuts the pooled connection, and
    # gives up opening a new one (psycopg's own connect timeout would wait 2 s).
    for attempt, (answer, elapsed) in enumerate(answers):
        assert answer is not None, f"request {attempt}: no answer within the client's 5 s, budget {budget_s} s"
        assert answer.status_code == 503 and answer.headers["retry-after"] == "1", answer.text
        assert elapsed <= (CALL_DEADLINE_FACTOR + 1) * budget_s, f"request {attempt}: 503 after {elapsed:.2f} s"


@pytest.mark.timeout(120)
def test_a_database_stalled_at_startup_delays_the_start_instead_of_failing_it(postgres_cluster: PostgresCluster,
                                                                             tmp_path: Path) -> None:  # fmt: skip
    """Startup is not a request: with every PostgreSQL process stopped for 1.5 s, far past the call deadline of
    a 0.2 s budget, the startup schema check waits for the database, and the gateway starts once it answers
    (with the request budget, the start failed at 0.4 s)."""
    database_url = create_database(postgres_cluster, "startup")
    upgrade(database_url)
    settings = Settings(database_url=database_url, database_timeout_ms=200,
                        redis_url=f"redis://127.0.0.1:{free_port()}/0")  # fmt: skip
    stall_s = 1.5
    postgres_cluster.signal(signal.SIGSTOP)
    resume = threading.Timer(stall_s, postgres_cluster.signal, (signal.SIGCONT,))
    resume.start()
    try:
        started = time.monotonic()
        with TestClient(create_app(settings)) as client:
            waited = time.monotonic() - started
            health = client.get("/health")
    finally:
        resume.cancel()
        postgres_cluster.signal(signal.SIGCONT)
    assert health.status_code == 200, health.text
    assert waited >= stall_s - 0.1, f"started after {waited:.2f} s, while the database was stopped"

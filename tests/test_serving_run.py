"""`python -m serving.run` (`make serve`): which Triton repository it serves, and how it gets Redis running.

Against the real Redis on 127.0.0.1:6379, DB 7, under a prefix of this test's own (only its keys are deleted);
starting a Redis runs the real `redis-server` on a free port, stopped afterwards. Serving end to end (Triton,
uvicorn) is what `benchmarks/serving.py` runs.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from recsys.recommendation_store import RecommendationKeys
from recsys.settings import Settings
from serving.run import ServeError, ensure_redis, latest_published_repository, triton_for
from tests.redis_databases import delete_keys_under, redis_url
from tests.servers import free_port

REDIS_URL = redis_url("gateway")


@pytest.fixture
def client() -> Iterator[tuple[redis.Redis, str]]:
    prefix = f"serve-run-test-{uuid.uuid4().hex[:8]}:"
    connection = redis.Redis.from_url(REDIS_URL)
    yield connection, prefix
    delete_keys_under(connection, prefix)
    connection.close()


def exported(data_root: Path, run: str, age_s: float) -> Path:
    repository = data_root / "runs" / run / "triton_repository"
    repository.mkdir(parents=True)
    stamp = time.time() - age_s
    os.utime(repository, (stamp, stamp), follow_symlinks=False)
    return repository


def test_serves_the_current_versions_run_else_the_newest_published(tmp_path: Path, client) -> None:
    connection, prefix = client
    keys = RecommendationKeys(prefix)
    oldest, newer, newest = (exported(tmp_path, run, age) for run, age in (("run_a", 300), ("run_b", 200),
                                                                            ("run_c", 100)))  # fmt: skip
    (tmp_path / "runs" / "run_d").mkdir()  # a run that exported nothing
    for run, status in (("run_a", "complete"), ("run_b", "complete"), ("run_c", "loading")):
        connection.hset(keys.meta(run), "status", status)
    connection.set(keys.current, "run_a")  # e.g. the quality gate kept an older champion's lists
    assert latest_published_repository(tmp_path, connection, prefix) == oldest
    connection.set(keys.current, "run_d")  # current, but without a repository: the newest published one
    assert latest_published_repository(tmp_path, connection, prefix) == newer
    connection.hset(keys.meta("run_c"), "status", "complete")
    assert latest_published_repository(tmp_path, connection, prefix) == newest


def test_refuses_when_no_run_published_or_nothing_was_exported(tmp_path: Path, client) -> None:
    connection, prefix = client
    with pytest.raises(ServeError, match="no exported Triton repository"):
        latest_published_repository(tmp_path, connection, prefix)
    exported(tmp_path, "run_a", 10)
    with pytest.raises(ServeError, match="no run of theirs is published"):
        latest_published_repository(tmp_path, connection, prefix)


def test_several_triton_urls_are_read_in_order_and_each_must_be_an_http_url(tmp_path: Path) -> None:
    settings = Settings(triton_url="http://127.0.0.1:8000, http://127.0.0.1:8010")
    assert settings.triton_urls == ["http://127.0.0.1:8000", "http://127.0.0.1:8010"]
    with pytest.raises(ValueError, match=r"'127\.0\.0\.1:8010' is not an http"):
        Settings(triton_url="http://127.0.0.1:8000,127.0.0.1:8010")
    # A server that does not answer and is not local cannot be started here: the start fails, naming it.
    remote = Settings(triton_url=f"http://127.0.0.1:{free_port()},http://triton.invalid:8000", data_root=tmp_path)
    with pytest.raises(ServeError, match=r"does not answer at http://triton.invalid:8000 \(RECSYS_TRITON_URL\)"), \
            triton_for(remote, None, enabled=True):  # fmt: skip
        pass


def test_redis_that_answers_is_used_and_one_that_cannot_be_started_is_refused() -> None:
    assert ensure_redis(REDIS_URL) is False
    with pytest.raises(ServeError, match="--no-redis-start"):
        ensure_redis(f"redis://127.0.0.1:{free_port()}/0", allow_start=False)
    with pytest.raises(ServeError, match=r"Redis Cluster node .* does not answer: start the cluster"):
        ensure_redis(f"redis://127.0.0.1:{free_port()}/0", cluster=True)
    with pytest.raises(ServeError, match="password"):
        ensure_redis(f"redis://:secret@127.0.0.1:{free_port()}/0")


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_a_local_redis_that_does_not_answer_is_started() -> None:
    from recsys.settings import PROJECT_ROOT

    port = free_port()
    files = [PROJECT_ROOT / "var" / "redis" / f"redis-{port}.{suffix}" for suffix in ("pid", "log", "rdb")]
    try:
        assert ensure_redis(f"redis://127.0.0.1:{port}/0") is True
        assert redis.Redis(port=port).ping()
    finally:
        if files[0].exists():
            os.kill(int(files[0].read_text()), signal.SIGTERM)
            deadline = time.monotonic() + 10
            while files[0].exists() and time.monotonic() < deadline:  # Redis removes its pid file on exit
                time.sleep(0.05)
        for path in files:
            path.unlink(missing_ok=True)

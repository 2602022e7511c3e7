"""Triton follows the published version (`serving/model_versions.py`), on a real Triton and a real Redis (DB 7).

One trained run is exported twice, as two published runs: `run_a` as it is, `run_b` with the most clicked items
marked unavailable, so an answer shows whose models produced it. The version pointer moves as publishing and
`rollback` move it; after each `ModelFollower.sync` the version-named ensembles of the current version answer,
and an older version's models stay loaded for the grace period, then are unloaded.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import redis
import tritonclient.http as httpclient
from prometheus_client.parser import text_string_to_metric_families

from recsys.recommendation_store import RecommendationKeys
from recsys.spec import DatasetSpec
from serving.model_versions import SEPARATOR, ModelFollower, stage_version, unstage_version, versioned_name
from serving.triton_client import TritonEnsembles
from serving.triton_server import TritonServer
from tasks.cli import main as recsys_cli
from tasks.publish_recommendations import rollback
from tests.redis_databases import delete_keys_under, redis_url

pytestmark = pytest.mark.e2e

REDIS_URL = redis_url("gateway")
GRACE_S = 60.0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def published(trained_run: Path, spec: DatasetSpec, tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[Path, np.ndarray, np.ndarray]:  # fmt: skip
    """<data_root>/runs/run_a and run_b with their exports; the users asked, and the items run_b withholds."""
    data_root = tmp_path_factory.mktemp("versions")
    users = pd.read_parquet(trained_run / "nvtabular" / "user_features.parquet")[spec.user_id].to_numpy(np.int64)[:6]
    items = pd.read_parquet(trained_run / "nvtabular" / "item_features.parquet")[spec.item_id].to_numpy(np.int64)
    withheld = items[:200]  # unavailable in run_b: a fifth of this small catalog
    pd.DataFrame({spec.item_id: withheld}).to_csv(data_root / "withheld.csv", index=False)
    for run, extra in (("run_a", []), ("run_b", ["--unavailable-items", str(data_root / "withheld.csv")])):
        output = data_root / "runs" / run / "triton_repository"
        assert recsys_cli(["export-triton-ensemble", "--input", str(trained_run), "--output", str(output),
                           "--top-n", "20", *extra]) == 0  # fmt: skip
    return data_root, users, withheld


@pytest.fixture
def pointer() -> Iterator[tuple[redis.Redis, str]]:
    prefix = f"versions-test-{uuid.uuid4().hex[:8]}:"
    client = redis.Redis.from_url(REDIS_URL)
    yield client, prefix
    delete_keys_under(client, prefix)
    client.close()


def answers(url: str, users: np.ndarray, version: str) -> list[list[int]]:
    async def ask() -> list[list[int]]:
        triton = TritonEnsembles(url, timeout_s=60, versioned=True)
        try:
            found = [await triton.recommend(int(user), top_k=200, version=version) for user in users]
        finally:
            await triton.close()
        assert all(answer is not None for answer in found)
        return [answer[0] for answer in found if answer is not None]

    return asyncio.run(ask())


def ready(url: str, model: str) -> bool:
    client = httpclient.InferenceServerClient(url.removeprefix("http://"))
    try:
        return bool(client.is_model_ready(model))
    finally:
        client.close()


def staged(repository: Path) -> set[str]:
    """The versions with models in the serving repository (staging folders, hidden, left out)."""
    return {folder.name.split(SEPARATOR, 1)[1] for folder in repository.iterdir() if not folder.name.startswith(".")}


def test_triton_serves_the_version_the_pointer_names_through_publish_and_rollback(
        published: tuple[Path, np.ndarray, np.ndarray], pointer: tuple[redis.Redis, str], tmp_path: Path):  # fmt: skip
    data_root, users, withheld = published
    client, prefix = pointer
    keys = RecommendationKeys(prefix)
    for run in ("run_a", "run_b"):
        client.hset(keys.meta(run), "status", "complete")
    client.set(keys.current, "run_a")
    clock = Clock()
    repository = tmp_path / "models"
    repository.mkdir()

    with TritonServer(repository, model_control_mode="explicit", startup_timeout_s=180,
                      log_path=tmp_path / "tritonserver.log") as server:  # fmt: skip
        follower = ModelFollower(triton_url=server.http_url, repository=repository, data_root=data_root,
                                 redis_client=client, key_prefix=prefix, grace_s=GRACE_S, clock=clock)  # fmt: skip
        try:
            assert follower.sync() == "run_a"
            first = answers(server.http_url, users, "run_a")
            # Published: run_b becomes current, run_a previous (what publish_recommendations' switch writes).
            client.set(keys.previous, "run_a")
            client.set(keys.current, "run_b")
            assert follower.sync() == "run_b"
            second = answers(server.http_url, users, "run_b")
            # Within the grace period the older version still answers (requests already on their way to it).
            assert ready(server.http_url, versioned_name("recommend", "run_a"))
            assert answers(server.http_url, users, "run_a") == first
            clock.now += GRACE_S
            follower.sync()
            assert not ready(server.http_url, versioned_name("recommend", "run_a"))
            assert not ready(server.http_url, versioned_name("query_tower", "run_a"))  # its stages went with it
            # Unloaded, its models left the serving repository (their hard links would keep the run's export).
            assert staged(repository) == {"run_b"}

            rollback(REDIS_URL, prefix)
            assert follower.sync() == "run_a"
            assert staged(repository) == {"run_a", "run_b"}  # laid out again from run_a's export
            clock.now += GRACE_S
            follower.sync()
            again = answers(server.http_url, users, "run_a")
            assert not ready(server.http_url, versioned_name("recommend", "run_b"))

            # An A/B experiment with run_b as its challenger: its models load and stay past the grace, as long
            # as it runs (its bucket is answered from them), and go when it stops.
            client.hset(keys.experiment, mapping={"name": "spring", "challenger": "run_b", "share": "0.5",
                                                  "salt": "s"})  # fmt: skip
            assert follower.sync() == "run_a"
            clock.now += GRACE_S
            follower.sync()
            assert answers(server.http_url, users, "run_b") == second
            client.delete(keys.experiment)
            clock.now += GRACE_S
            follower.sync()
            assert not ready(server.http_url, versioned_name("recommend", "run_b"))
            assert staged(repository) == {"run_a"}
        finally:
            follower.close()

    # Each answer came from its version's models: run_b's never hold what it withholds, run_a's do.
    held = set(withheld.tolist())
    assert any(held & set(row) for row in first)
    assert not any(held & set(row) for row in second)
    assert again == first


def test_a_version_is_laid_out_once_under_its_own_names(published: tuple[Path, np.ndarray, np.ndarray],
                                                         tmp_path: Path):  # fmt: skip
    data_root, _, _ = published
    exported = data_root / "runs" / "run_a" / "triton_repository"

    names = stage_version(exported, tmp_path / "models", "2026-12-01 nightly")
    again = stage_version(exported, tmp_path / "models", "2026-12-01 nightly")

    assert names == again and "recommend--2026-12-01_nightly" in names
    config = (tmp_path / "models" / "recommend--2026-12-01_nightly" / "config.pbtxt").read_text()
    assert 'name: "recommend--2026-12-01_nightly"' in config
    assert 'model_name: "query_tower--2026-12-01_nightly"' in config and 'model_name: "query_tower"' not in config
    # The export's own config is untouched (the laid-out files are hard links; the config is written anew).
    assert 'name: "recommend"' in (exported / "recommend" / "config.pbtxt").read_text()
    # Unstaged, the version's models go, another version's stay, and the export keeps its files.
    other = stage_version(exported, tmp_path / "models", "2026-12-01 nightly-2")
    assert unstage_version(tmp_path / "models", "2026-12-01 nightly") == sorted(names)
    assert sorted(path.name for path in (tmp_path / "models").iterdir()) == sorted(other)
    assert (exported / "recommend" / "config.pbtxt").is_file()

    async def without_a_version() -> None:
        triton = TritonEnsembles("http://127.0.0.1:1", timeout_s=1, versioned=True)
        try:
            await triton.recommend(1, top_k=1)
        finally:
            await triton.close()

    with pytest.raises(ValueError, match="needs the version"):
        asyncio.run(without_a_version())


def test_make_serve_answers_from_the_models_of_the_version_it_names(
        published: tuple[Path, np.ndarray, np.ndarray], pointer: tuple[redis.Redis, str], batch_scored: Path,
        spec: DatasetSpec, tmp_path: Path):  # fmt: skip
    """`python -m serving.run`, as users start it, with two Triton URLs: it starts a server on each, and customers
    without a nightly list are answered online by the current version's models, and by the other run's after a
    publish and after a rollback, with no restart, whichever server's turn it is: both follow the version."""
    import os
    import time

    import httpx

    from serving.api.migrate import upgrade
    from tasks.publish_recommendations import publish_recommendations
    from tests.api_keys import new_key
    from tests.servers import free_port, serving_run

    data_root, users, withheld = published
    client, prefix = pointer
    publish_recommendations(batch_scored, redis_url=REDIS_URL, version="run_a", key_prefix=prefix, progress=False)
    database_url = f"sqlite:///{tmp_path / 'gateway.db'}"
    upgrade(database_url)
    key = new_key(database_url)
    triton_urls = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    env = {**os.environ, "RECSYS_DATA_ROOT": str(data_root), "RECSYS_REDIS_URL": REDIS_URL,
           "RECSYS_REDIS_KEY_PREFIX": prefix, "RECSYS_DATABASE_URL": database_url,
           "RECSYS_TRITON_URL": ",".join(triton_urls), "RECSYS_TRITON_MODELS_DIR": str(tmp_path / "models"),
           "RECSYS_TRITON_TIMEOUT_MS": "20000", "RECSYS_REDIS_TIMEOUT_MS": "2000",
           "RECSYS_IMPRESSIONS_DIR": str(tmp_path / "impressions")}  # fmt: skip
    log = tmp_path / "serve.log"

    def online_answers() -> tuple[set[str], list[list[int]]]:
        for user in users:  # as if the nightly run had missed these customers: the online path answers
            client.delete(*[f"{prefix}recs:{version}:user:{user}" for version in ("run_a", "run_b")])
            client.delete(*[f"{prefix}cache:{version}:customer:{user}" for version in ("run_a", "run_b")])
        bodies = [httpx.get(f"{url}/recommendations/{user}", params={"count": 20}, headers={"X-API-Key": key},
                            timeout=30).json() for user in users]  # fmt: skip
        answered = {(body["route"], body["model_version"]) for body in bodies}
        return answered, [[item["product_id"] for item in body["items"]] for body in bodies]

    def until_version(version: str) -> list[list[int]]:
        """The online answers once they come from `version`: right after the pointer moves, until the follower
        has loaded that version's models, the gateway answers the generic list (`triton_unavailable`)."""
        deadline = time.monotonic() + 120
        while True:
            answered, lists = online_answers()
            if answered == {("online", version)}:
                return lists
            # Every read after the move names the new version, online or (in the window) generic: never the old.
            assert answered <= {("online", version), ("generic", version)}, answered
            assert time.monotonic() < deadline, f"still {answered}, not {version}: {log.read_text()[-3000:]}"
            time.sleep(1)

    with serving_run(["--no-redis-start", "--no-access-log"], env, log, startup_timeout_s=300) as url:
        first = until_version("run_a")  # Triton started and loaded the current version before the gateway
        publish_recommendations(batch_scored, redis_url=REDIS_URL, version="run_b", key_prefix=prefix, progress=False)
        second = until_version("run_b")
        rollback(REDIS_URL, prefix)
        again = until_version("run_a")
        metrics = httpx.get(f"{url}/metrics", timeout=30).text

    # Both servers answered: the requests took turns.
    calls = {(sample.labels["server"], sample.labels["outcome"]): sample.value
             for family in text_string_to_metric_families(metrics) for sample in family.samples
             if sample.name == "recsys_triton_calls_total"}  # fmt: skip
    assert {server for (server, outcome), count in calls.items() if outcome == "answered" and count} == set(triton_urls)

    held = set(withheld.tolist())
    assert any(held & set(row) for row in first) and not any(held & set(row) for row in second)
    assert again == first

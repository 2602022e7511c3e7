"""Publishing batch recommendations to Redis: versions, the atomic pointer swap, rollback, kills.

Runs against the real Redis of `make setup`, in a database of its own (tests/redis_databases.py), which each
test flushes: never database 0.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis
import redis.asyncio

import tasks.publish_recommendations as publish_module
from recsys.errors import InputDataError
from recsys.recommendation_store import (
    LIST_HEADER,
    RecommendationKeys,
    decode_recommendations,
    decode_scored_list,
    encode_recommendations,
    read_recommendations,
    read_recommendations_async,
    segment_key,
    version_metadata,
)
from tasks.cli import main as cli_main
from tasks.publish_recommendations import (
    PublishError,
    VersionConflictError,
    publish_recommendations,
    rollback,
)
from tests.redis_databases import redis_url

PROJECT_ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = redis_url("publish")
PREFIX = "test:"
KEYS = RecommendationKeys(PREFIX)
# redis-py annotates every reply as "a value or an awaitable" (one set of types for both clients);
# the tests use the sync client's replies as they are.
Client = Any
Lists = dict[Any, tuple[list[int], list[float]]]


@pytest.fixture
def client() -> Iterator[Client]:
    client = redis.Redis.from_url(REDIS_URL)
    if client.connection_pool.connection_kwargs.get("db", 0) == 0:
        pytest.fail(f"{REDIS_URL}: the tests flush their database, so it must not be database 0")
    try:
        client.ping()
    except redis.ConnectionError as error:
        pytest.fail(f"no Redis at {REDIS_URL} ({error}); `make setup` starts one")
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def lists_table(id_column: str, ids: list | np.ndarray, length: int, seed: int, clicks: bool = True) -> pa.Table:
    """One list of `length` (item id, order score, P(click)) per id, best first, as batch_score writes them;
    without `clicks`, as batch scoring wrote them before it kept P(click)."""
    rng = np.random.default_rng(seed)
    count = len(ids)
    items = rng.integers(1, 10**12, size=count * length, dtype=np.int64)
    scores = -np.sort(-rng.random((count, length), dtype=np.float32), axis=1).ravel()
    offsets = pa.array(np.arange(0, count * length + 1, length, dtype=np.int32))
    id_type = pa.string() if id_column == "segment" else pa.int64()
    columns = {
        id_column: pa.array(ids, type=id_type),
        "item_ids": pa.ListArray.from_arrays(offsets, pa.array(items)),
        "scores": pa.ListArray.from_arrays(offsets, pa.array(scores)),
    }  # fmt: skip
    if clicks:  # the blend never exceeds P(click); NaN where a list has none
        click_probabilities = np.minimum(scores * 1.5, 1.0).astype(np.float32)
        click_probabilities[::7] = np.nan
        columns["click_probabilities"] = pa.ListArray.from_arrays(offsets, pa.array(click_probabilities))
    return pa.table(columns)


def write_batch(directory: Path, seed: int, users: int = 30, user_tables: list[pa.Table] | None = None,
                model_versions: dict | None = None) -> Path:  # fmt: skip
    """A small batch_score output: users in two files (small row groups), segments, similar items."""
    user_tables = user_tables or [lists_table("user_id", np.arange(users), 5, seed)]
    if len(user_tables) == 1 and user_tables[0].num_rows > 1:
        half = user_tables[0].num_rows // 2
        user_tables = [user_tables[0].slice(0, half), user_tables[0].slice(half)]
    tables = {
        "users": user_tables,
        "segments": [lists_table("segment", ["*", "3:1", "3:2", "7:1"], 4, seed + 1)],
        "similar": [lists_table("item_id", np.arange(100, 120), 3, seed + 2, clicks=False)],
    }
    for folder, parts in tables.items():
        (directory / folder).mkdir(parents=True)
        for number, table in enumerate(parts):
            pq.write_table(table, directory / folder / f"part-{number:05d}.parquet", row_group_size=7)
    metrics = {"users": users, "model_versions": model_versions or {"ranker": "3", "two_tower": "2"}}
    (directory / "_metrics.json").write_text(json.dumps(metrics))
    return directory


def expected_lists(directory: Path, folder: str, id_column: str) -> Lists:
    """(item ids, order scores) of each list."""
    return {key: (items, scores) for key, (items, scores, _) in expected_scored_lists(directory, folder,
                                                                                      id_column).items()}


def expected_scored_lists(directory: Path, folder: str, id_column: str) -> dict[Any, tuple[list, list, list]]:
    """(item ids, order scores, P(click)) of each list: the scores stand for P(click) where there is none."""
    table = pq.read_table(directory / folder)
    names = [id_column, "item_ids", "scores"]
    clicks = "click_probabilities" if "click_probabilities" in table.column_names else "scores"
    columns = (table.column(name).to_pylist() for name in [*names, clicks])
    # Arrow gives a float32 score as the Python float of that float32, as decoding does.
    return {key: (items, scores, click) for key, items, scores, click in zip(*columns, strict=True)}


def assert_readers_see(client: Client, version: str, batch: Path) -> None:
    """Every list of `batch` reads back whole, from `version`."""
    for kind, folder, id_column in (("user", "users", "user_id"), ("segment", "segments", "segment"),
                                    ("similar", "similar", "item_id")):  # fmt: skip
        for key, (items, scores, clicks) in expected_scored_lists(batch, folder, id_column).items():
            found = read_recommendations(client, PREFIX, kind, key)
            assert found is not None, (kind, key)
            assert found.version == version, (kind, key)
            assert found.item_ids == items, (kind, key)
            assert found.scores == scores, (kind, key)
            np.testing.assert_array_equal(found.click_probabilities, clicks)  # NaN equals NaN here


def publish(batch: Path, version: str, **options: Any) -> dict:
    return publish_recommendations(batch, redis_url=REDIS_URL, version=version, key_prefix=PREFIX, progress=False,
                                   **options)  # fmt: skip


def pointers(client: Client) -> tuple[str | None, str | None]:
    current, previous = client.mget(KEYS.current, KEYS.previous)
    return (current.decode() if current else None), (previous.decode() if previous else None)


def version_keys(client: Client, version: str) -> list[bytes]:
    return [key for key in client.scan_iter(match=f"{KEYS.namespace(version)}*", count=1000)
            if key != KEYS.meta(version).encode()]  # fmt: skip


def snapshot(client: Client) -> dict[bytes, tuple[Any, bool]]:
    """Every key's value and whether it has a TTL."""
    state: dict[bytes, tuple[Any, bool]] = {}
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        value: Any = {b"string": client.get, b"hash": client.hgetall, b"list": lambda k: client.lrange(k, 0, -1),
                      b"set": lambda k: sorted(client.smembers(k))}[kind](key)  # fmt: skip
        state[key] = (value, client.ttl(key) > 0)
    return state


def meta_int(client: Client, version: str, field: str) -> int:
    return int(version_metadata(client, PREFIX, version)[field])


def test_payload_round_trip():
    value = encode_recommendations([5, 2**40, -1], [0.5, 0.25, 0.125], [0.75, 0.5, float("nan")])
    assert len(value) == 16 + 3 * 16 and value[:16] == LIST_HEADER.tobytes()
    assert decode_recommendations(value) == ([5, 2**40, -1], [0.5, 0.25, 0.125])
    items, scores, clicks = decode_scored_list(value)
    assert (items, scores, clicks[:2]) == ([5, 2**40, -1], [0.5, 0.25, 0.125], [0.75, 0.5]) and np.isnan(clicks[2])
    assert decode_scored_list(encode_recommendations([7], [0.25]))[2] == [0.25]  # no P(click): the score's
    assert decode_scored_list(encode_recommendations([], [])) == ([], [], [])
    with pytest.raises(ValueError):
        decode_recommendations(value[:-1])
    # A value of a version published before the header (12-byte pairs): its one number stands for both.
    legacy = np.array([(5, 0.5), (9, 0.25)], dtype=[("item_id", "<i8"), ("score", "<f4")]).tobytes()
    assert decode_scored_list(legacy) == ([5, 9], [0.5, 0.25], [0.5, 0.25])
    assert decode_recommendations(legacy) == ([5, 9], [0.5, 0.25])


def test_publish_then_every_list_reads_back(client: Client, tmp_path: Path):
    batch = write_batch(tmp_path / "batch", seed=1)
    metrics = publish(batch, "v1")
    assert metrics["keys"] == {"user": 30, "segment": 4, "similar": 20}
    assert metrics["keys_total"] == 54 and metrics["version"] == "v1" and metrics["previous_version"] is None
    assert pointers(client) == ("v1", None)
    assert_readers_see(client, "v1", batch)
    assert read_recommendations(client, PREFIX, "user", 999) is None  # unknown user: the caller falls back
    meta = version_metadata(client, PREFIX, "v1")
    assert meta["status"] == "complete"
    assert (meta["rows_user"], meta["rows_segment"], meta["rows_similar"]) == ("30", "4", "20")
    assert json.loads(meta["model_versions"]) == {"ranker": "3", "two_tower": "2"}
    assert meta["published_at"] and meta["fingerprint"] == metrics["fingerprint"]
    assert client.smembers(KEYS.loading) == set()
    assert client.ttl(KEYS.data("v1", "user", 0)) == -1  # the current version never expires
    # The known-users bitmap: bit `user_id` set for each of the 30 users (0-29), in 4 bytes.
    assert metrics["known_users_bytes"] == meta_int(client, "v1", "known_users_bytes") == 4
    assert [client.getbit(KEYS.known_users("v1"), user) for user in range(32)] == [1] * 30 + [0, 0]

    # The serving tier's clients: one that decodes replies to text, and an asyncio one.
    decoding = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    found = read_recommendations(decoding, PREFIX, "segment", "3:1")
    assert found is not None and repr(found) == repr(read_recommendations(client, PREFIX, "segment", "3:1"))  # NaN
    decoding.close()

    async def read_async() -> Any:
        async with redis.asyncio.Redis.from_url(REDIS_URL) as async_client:
            return await read_recommendations_async(async_client, PREFIX, "similar", 105)

    assert asyncio.run(read_async()) == read_recommendations(client, PREFIX, "similar", 105)


def test_new_version_swaps_keeps_previous_expires_older_and_rolls_back(client: Client, tmp_path: Path):
    batches = {version: write_batch(tmp_path / version, seed=seed) for seed, version in enumerate(["v1", "v2", "v3"])}
    publish(batches["v1"], "v1", expire_after_s=3600)
    metrics = publish(batches["v2"], "v2", expire_after_s=3600)
    assert metrics["previous_version"] == "v1" and metrics["retired_versions"] == []
    assert pointers(client) == ("v2", "v1")
    assert_readers_see(client, "v2", batches["v2"])

    metrics = publish(batches["v3"], "v3", expire_after_s=3600)
    assert metrics["retired_versions"] == ["v1"]
    assert pointers(client) == ("v3", "v2")
    assert [value.decode() for value in client.lrange(KEYS.versions, 0, -1)] == ["v3", "v2"]
    # v1 is not deleted but expires: every key within the grace period, its meta hash after them.
    v1_ttls = [client.ttl(key) for key in version_keys(client, "v1")]
    assert len(v1_ttls) == 55 and all(3500 < ttl <= 3600 for ttl in v1_ttls)
    assert client.ttl(KEYS.meta("v1")) > 3600 and version_metadata(client, PREFIX, "v1")["status"] == "retired"
    assert all(client.ttl(key) == -1 for key in version_keys(client, "v2") + version_keys(client, "v3"))
    assert_readers_see(client, "v3", batches["v3"])

    assert rollback(REDIS_URL, PREFIX) == {"current": "v2", "previous": "v3"}
    assert_readers_see(client, "v2", batches["v2"])
    assert rollback(REDIS_URL, PREFIX) == {"current": "v3", "previous": "v2"}  # a second rollback undoes it
    assert_readers_see(client, "v3", batches["v3"])


def test_rollback_needs_a_previous_version(client: Client, tmp_path: Path):
    with pytest.raises(PublishError, match="no previous version"):
        rollback(REDIS_URL, PREFIX)
    publish(write_batch(tmp_path / "v1", seed=1), "v1")
    with pytest.raises(PublishError, match="no previous version"):
        rollback(REDIS_URL, PREFIX)
    assert pointers(client) == ("v1", None)


def test_publishing_a_version_again_changes_nothing(client: Client, tmp_path: Path):
    batch = write_batch(tmp_path / "batch", seed=1)
    publish(batch, "v1")
    before = snapshot(client)
    metrics = publish(batch, "v1")
    assert metrics["loaded"] is False and metrics["keys"] == {"user": 30, "segment": 4, "similar": 20}
    assert snapshot(client) == before

    # The same version from different input is refused, and nothing changes.
    with pytest.raises(VersionConflictError, match="different input"):
        publish(write_batch(tmp_path / "other", seed=2), "v1")
    assert snapshot(client) == before

    # A rerun of the pipeline on the same input: only the version differs.
    publish(batch, "v2")
    assert pointers(client) == ("v2", "v1")
    assert_readers_see(client, "v2", batch)
    meta_v1, meta_v2 = version_metadata(client, PREFIX, "v1"), version_metadata(client, PREFIX, "v2")
    assert meta_v1["fingerprint"] == meta_v2["fingerprint"]
    assert {key.split(b":", 3)[3]: value for key, (value, _) in snapshot(client).items() if b":v1:" in key} == \
        {key.split(b":", 3)[3]: value for key, (value, _) in snapshot(client).items() if b":v2:" in key}


def test_the_known_users_bitmap_holds_exactly_the_users_with_a_list(client: Client, tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture):  # fmt: skip
    """Unsorted ids with gaps, in chunks smaller than the files' row groups: bit i set exactly for the ids given.
    Ids too sparse for a bitmap (or negative) publish none, with a warning, and the lists still publish."""
    rng = np.random.default_rng(3)
    ids = rng.permutation(rng.choice(np.arange(1, 50_000), size=3_000, replace=False))
    batch = write_batch(tmp_path / "gaps", seed=3, user_tables=[lists_table("user_id", ids, 2, seed=3)])
    metrics = publish(batch, "v1", chunk_size=100)
    bitmap = np.unpackbits(np.frombuffer(client.get(KEYS.known_users("v1")), dtype=np.uint8))  # MSB first, as Redis
    assert np.array_equal(np.flatnonzero(bitmap), np.sort(ids))
    assert metrics["known_users_bytes"] == len(bitmap) // 8 == ids.max() // 8 + 1

    for version, user_ids in (("v2", [5, 2**40]), ("v3", [-1, 5])):
        caplog.clear()
        batch = write_batch(tmp_path / version, seed=4, user_tables=[lists_table("user_id", user_ids, 2, seed=4)])
        metrics = publish(batch, version)
        assert metrics["known_users_bytes"] == meta_int(client, version, "known_users_bytes") == 0
        assert not client.exists(KEYS.known_users(version))
        assert "no known-users bitmap (user ids from" in caplog.text
        assert read_recommendations(client, PREFIX, "user", 5) is not None


def test_a_bitmap_that_does_not_count_every_user_refuses_the_version(client: Client, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch):  # fmt: skip
    """A fault no real input shows (ids are checked for duplicates before): a bitmap missing a user would send
    that user's misses to the generic list, so the version is refused and readers stay where they were."""
    good = write_batch(tmp_path / "good", seed=1)
    publish(good, "v1")
    add = publish_module._KnownUsers.add
    monkeypatch.setattr(publish_module._KnownUsers, "add", lambda self, ids: add(self, ids[1:]))  # loses one a chunk
    with pytest.raises(PublishError, match="bits set for 30 users"):
        publish(write_batch(tmp_path / "bad", seed=2), "v2")
    assert pointers(client) == ("v1", None) and version_metadata(client, PREFIX, "v2")["status"] == "failed"
    assert_readers_see(client, "v1", good)


def _duplicated_user(directory: Path) -> Path:
    table = lists_table("user_id", np.arange(30), 5, seed=5)
    return write_batch(directory, seed=5, user_tables=[table, table.slice(10, 1)])


def _scores_missing(directory: Path) -> Path:
    table = lists_table("user_id", np.arange(30), 5, seed=5)
    short = pa.ListArray.from_arrays(pa.array([0, 4], type=pa.int32()), pa.array([0.4, 0.3, 0.2, 0.1], pa.float32()))
    broken = pa.table({"user_id": pa.array([31], pa.int64()), "item_ids": table.column("item_ids").combine_chunks()
                       .slice(0, 1), "scores": short})  # fmt: skip
    return write_batch(directory, seed=5, user_tables=[table, broken])


@pytest.mark.parametrize(("make_batch", "message"), [
    (_duplicated_user, "only 30 user keys created: duplicated user_id values \\(e.g. 10\\)"),
    (_scores_missing, "user_id 31 has 5 item ids but 4 scores"),
])  # fmt: skip
def test_a_bad_batch_is_refused_and_readers_stay(client: Client, tmp_path: Path, make_batch, message: str):
    good = write_batch(tmp_path / "good", seed=1)
    publish(good, "v1", expire_after_s=3600)
    with pytest.raises(InputDataError, match=message):
        publish(make_batch(tmp_path / "bad"), "v2", expire_after_s=3600)
    assert pointers(client) == ("v1", None)
    assert_readers_see(client, "v1", good)
    assert version_metadata(client, PREFIX, "v2")["status"] == "failed"
    written = version_keys(client, "v2")
    assert written and all(0 < client.ttl(key) <= 3600 for key in written)  # kept a while for inspection
    assert client.smembers(KEYS.loading) == set()

    # Once the input is fixed, the same version publishes: the refused attempt's keys are replaced.
    fixed = write_batch(tmp_path / "fixed", seed=6)
    assert publish(fixed, "v2", expire_after_s=3600)["keys"] == {"user": 30, "segment": 4, "similar": 20}
    assert pointers(client) == ("v2", "v1")
    assert_readers_see(client, "v2", fixed)
    assert len(version_keys(client, "v2")) == 55  # 54 lists and the known-users bitmap
    assert all(client.ttl(key) == -1 for key in version_keys(client, "v2"))


def test_missing_or_mistyped_input_is_refused_before_anything_is_written(client: Client, tmp_path: Path):
    publish(write_batch(tmp_path / "good", seed=1), "v1")
    before = snapshot(client)
    missing = write_batch(tmp_path / "missing", seed=2)
    for path in (missing / "similar").iterdir():
        path.unlink()
    with pytest.raises(InputDataError, match="similar: no part-"):
        publish(missing, "v2")
    mistyped = tmp_path / "mistyped"
    write_batch(mistyped, seed=2)
    pq.write_table(pa.table({"segment": ["*"], "item_ids": [["a"]], "scores": [[0.5]]}),
                   mistyped / "segments" / "part-00000.parquet")  # fmt: skip
    with pytest.raises(InputDataError, match="column 'item_ids' has type list<element: string>"):
        publish(mistyped, "v2")
    with pytest.raises(ValueError, match="letters, digits"):
        publish(tmp_path / "good", "run:1")
    assert snapshot(client) == before


KILLED_PUBLISH = """
import sys
from tasks.publish_recommendations import publish_recommendations
publish_recommendations(sys.argv[1], redis_url=sys.argv[2], version="v2", key_prefix=sys.argv[3], chunk_size=1000,
                        progress=False)
"""


def test_a_killed_publish_leaves_readers_on_the_previous_version(client: Client, tmp_path: Path):
    small = write_batch(tmp_path / "v1", seed=1)
    publish(small, "v1", expire_after_s=3600)
    users = 100_000
    large = write_batch(tmp_path / "v2", seed=2, user_tables=[lists_table("user_id", np.arange(users), 5, seed=2)])

    log = tmp_path / "publish.log"
    with log.open("wb") as stderr:
        process = subprocess.Popen([sys.executable, "-c", KILLED_PUBLISH, str(large), REDIS_URL, PREFIX],
                                   cwd=PROJECT_ROOT, stderr=stderr)  # fmt: skip
    deadline = time.monotonic() + 60
    while process.poll() is None and time.monotonic() < deadline:
        if client.hget(KEYS.meta("v2"), "loaded_user"):  # the first chunk of users is in
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL, log.read_text()[-2000:]

    # Half of v2 is in Redis, and nothing of it is visible.
    assert version_metadata(client, PREFIX, "v2")["status"] == "loading"
    half_written = len(version_keys(client, "v2"))
    assert 0 < half_written < users
    assert client.exists(KEYS.data("v2", "user", 0))
    assert pointers(client) == ("v1", None)
    assert_readers_see(client, "v1", small)
    for user in (30, 5_000, users - 1):  # only in v2
        assert read_recommendations(client, PREFIX, "user", user) is None

    # A later publish of another version expires the abandoned load (its heartbeat is old enough here).
    metrics = publish(small, "v3", expire_after_s=3600, abandoned_after_s=0)
    assert metrics["abandoned_versions"] == ["v2"]
    assert version_metadata(client, PREFIX, "v2")["status"] == "abandoned"
    assert all(0 < client.ttl(key) <= 3600 for key in version_keys(client, "v2"))
    assert pointers(client) == ("v3", "v1")

    # The retry of v2 takes its keys over (deleting the leftovers) and completes.
    metrics = publish(large, "v2", expire_after_s=3600)
    assert metrics["loaded"] is True
    assert metrics["keys"] == {"user": users, "segment": 4, "similar": 20}
    assert pointers(client) == ("v2", "v3")
    assert version_metadata(client, PREFIX, "v2")["status"] == "complete"
    assert client.smembers(KEYS.loading) == set()
    assert len(version_keys(client, "v2")) == users + 25  # the known-users bitmap
    assert client.bitcount(KEYS.known_users("v2")) == users
    assert client.ttl(KEYS.data("v2", "user", 0)) == -1 and client.ttl(KEYS.meta("v2")) == -1
    expected = expected_lists(large, "users", "user_id")
    for user in (0, 30, 5_000, users - 1):
        found = read_recommendations(client, PREFIX, "user", user)
        assert found is not None and (found.version, found.item_ids, found.scores) == ("v2", *expected[user])


def test_cli_publishes_and_rolls_back(client: Client, tmp_path: Path, capsys: pytest.CaptureFixture):
    for seed, version in enumerate(["v1", "v2"]):
        batch = write_batch(tmp_path / version, seed=seed)
        assert cli_main(["publish-recommendations", "--input", str(batch), "--version", version,
                         "--redis-url", REDIS_URL, "--key-prefix", PREFIX, "--quiet"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["previous_version"] == "v1"
    assert cli_main(["rollback-recommendations", "--redis-url", REDIS_URL, "--key-prefix", PREFIX]) == 0
    assert pointers(client) == ("v1", "v2")


def test_a_publish_between_a_readers_two_gets_leaves_it_the_whole_list_of_the_version_it_read(
        client: Client, tmp_path: Path):  # fmt: skip
    """The contract of docs/redis-contract.md: the pointer, then the list, with publishes in between."""
    batches = {version: write_batch(tmp_path / version, seed=seed) for seed, version in enumerate(["v1", "v2", "v3"])}
    publish(batches["v1"], "v1", expire_after_s=3600)
    read_first = client.get(KEYS.current).decode()  # the reader's first GET
    publish(batches["v2"], "v2", expire_after_s=3600)
    publish(batches["v3"], "v3", expire_after_s=3600)  # v1 is now retired: expiring, still readable

    expected = expected_lists(batches["v1"], "users", "user_id")
    for user, lists in expected.items():  # the reader's second GET
        assert decode_recommendations(client.get(KEYS.data(read_first, "user", user))) == lists


def test_a_segment_key_joins_values_and_takes_one_value_whole():
    """pandas 1.x (the trainer environment) groups by one column with the value itself as the key, 2.x with a
    1-tuple: a string segment value is one value either way (it was split into 't:a:b:l:e:t')."""
    assert segment_key(("DE", "mobile", 3)) == "DE:mobile:3"
    assert segment_key(("tablet",)) == segment_key("tablet") == "tablet"
    assert segment_key(7) == segment_key([7]) == "7"


def test_customers_forgotten_while_a_run_was_in_flight_are_erased_before_the_switch(client: Client, tmp_path: Path):
    """A run that read its data before a customer was forgotten still scored them: the publish erases their list
    and their known-users bit from its version before readers see it (serving/forget.py adds them to the set).
    `erase_users` on a version without a bitmap creates none."""
    from recsys.recommendation_store import erase_users

    client.sadd(KEYS.forgotten, 4, 7)
    metrics = publish(write_batch(tmp_path / "v1", seed=1), "v1")
    assert metrics["forgotten_lists_erased"] == 2
    assert [read_recommendations(client, PREFIX, "user", user) for user in (4, 7)] == [None, None]
    assert client.getbit(KEYS.known_users("v1"), 4) == client.getbit(KEYS.known_users("v1"), 7) == 0
    assert read_recommendations(client, PREFIX, "user", 5) is not None and client.getbit(KEYS.known_users("v1"), 5)

    client.delete(KEYS.known_users("v1"))
    client.hset(KEYS.online_answers("v1", 5), "location=DE", b"cached")
    assert erase_users(client, KEYS, ["v1"], [5]) == 2  # the list and the cached online answer
    assert not client.exists(KEYS.known_users("v1")) and not client.exists(KEYS.live_users("v1"))


def test_a_staged_version_is_kept_without_a_switch_and_an_experiments_challenger_is_not_retired(
    client: Client, tmp_path: Path
):
    """`--stage`: complete and listed, readers stay on the current version; while an A/B experiment names it as
    its challenger, later publishes keep it past `keep_versions`; `make_current` switches to it."""
    from tasks.publish_recommendations import make_current

    batches = {version: write_batch(tmp_path / version, seed=seed) for seed, version in enumerate(["v1", "v2", "v3"])}
    publish(batches["v1"], "v1")
    staged = publish(batches["v2"], "v2", switch=False)
    assert staged["switched"] is False and staged["previous_version"] is None
    assert pointers(client) == ("v1", None) and version_metadata(client, PREFIX, "v2")["status"] == "complete"
    assert_readers_see(client, "v1", batches["v1"])
    client.hset(KEYS.experiment, mapping={"name": "spring", "challenger": "v2", "share": "0.1", "salt": "s"})
    metrics = publish(batches["v3"], "v3")  # v3 current, v1 previous: v2 is beyond keep_versions, but kept
    assert metrics["retired_versions"] == [] and pointers(client) == ("v3", "v1")
    assert all(client.ttl(key) == -1 for key in version_keys(client, "v2"))
    assert make_current(REDIS_URL, "v2", PREFIX) == "v3"
    assert pointers(client) == ("v2", "v3")
    assert_readers_see(client, "v2", batches["v2"])

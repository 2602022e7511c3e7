"""Publish the nightly batch recommendations to Redis for the web tier: versioned, atomic, with rollback.

Readers resolve the pointer `{<prefix>recs}:current` to a version and read that version's keys, so a
publish never touches what readers can see until its last step:

1. claim the version: its meta hash says `loading` (leftovers of an earlier, killed attempt of the
   same version are deleted first: nothing points at them);
2. stream `users/`, `segments/` and `similar/` from Parquet and write one key per list with
   `SET key value NX` in chunked, non-transactional pipelines. NX makes Redis tell us which keys were
   created: a key that already exists is a duplicated id in the input;
3. verify that each kind's keys created equal the rows read (else refuse: the version is marked
   `failed` and expires, the pointer does not move);
4. erase the lists of customers forgotten since the run read its data (`{<prefix>recs}:forgotten`);
5. switch `current` (and `previous`, kept for rollback) in one MULTI/EXEC, WATCHing the pointers and
   the version's meta hash, so a concurrent rollback or a second publisher cannot interleave;
6. retire versions beyond `keep_versions`: their keys get a TTL (`expire_after_s`), they are never
   deleted on the hot path, and a reader that resolved the pointer just before a swap still finds them.

The key layout and the value format are `recsys/recommendation_store.py`'s (the readers' contract too).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import itertools
import json
import logging
import queue
import re
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, cast

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import redis

from recsys.errors import InputDataError
from recsys.parquet_io import part_files
from recsys.recommendation_store import (
    DEFAULT_KEY_PREFIX,
    KINDS,
    LIST_HEADER,
    PAYLOAD_DTYPE,
    REDIS_MAX_BITS,
    VALUE_FORMAT,
    RecommendationKeys,
    as_text,
    as_texts,
    erase_users,
    hash_as_text,
)
from recsys.redis_connection import redis_client

if TYPE_CHECKING:
    import redis.asyncio

log = logging.getLogger(__name__)

# Kind of list -> (folder written by batch_score, the column that names the list).
SOURCES: dict[str, tuple[str, str]] = {
    "user": ("users", "user_id"),
    "segment": ("segments", "segment"),
    "similar": ("similar", "item_id"),
}
assert tuple(SOURCES) == KINDS

DEFAULT_KEEP_VERSIONS = 2  # the current and the previous (rollback's target)
DEFAULT_EXPIRE_AFTER_S = 24 * 3600  # grace period of a retired version (late readers, inspection)
DEFAULT_ABANDONED_AFTER_S = 15 * 60  # a load without a heartbeat for this long was killed
# Commands per pipeline round trip: 5k lists of 100 items is ~6 MB a round trip. 1k and 5k measured
# the same here, 20k slower (more memory held in redis-py and in Redis's query buffer).
PIPELINE_CHUNK = 5_000
SCAN_COUNT = 10_000
# The known-users bitmap (see above): at most this many bits a user, never more than Redis allows.
KNOWN_USERS_BITS_PER_USER = 64
KNOWN_USERS_MIN_BITS = 2**23
SETRANGE_CHUNK = 2**20  # bytes of the bitmap per SETRANGE
# A retired version's meta hash outlives its data keys, so "no meta hash" always means "no keys left".
META_GRACE_S = 300

_VERSION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
_RESERVED_VERSIONS = {"current", "previous", "versions", "loading", "forgotten", "experiment"}
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")


class PublishError(RuntimeError):
    """A publish or rollback that could not be done; readers stay on the version they had."""


class VersionConflictError(InputDataError):
    """The version was already published from different input; a version's lists never change."""


# --- publishing -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Source:
    kind: str
    id_column: str
    directory: Path
    files: tuple[Path, ...]
    rows: int


def publish_recommendations(
    batch_dir: Path,
    *,
    redis_url: str,
    version: str,
    key_prefix: str = DEFAULT_KEY_PREFIX,
    redis_type: str = "redis",
    keep_versions: int = DEFAULT_KEEP_VERSIONS,
    expire_after_s: int = DEFAULT_EXPIRE_AFTER_S,
    abandoned_after_s: float = DEFAULT_ABANDONED_AFTER_S,
    chunk_size: int = PIPELINE_CHUNK,
    progress: bool = True,
    switch: bool = True,
) -> dict[str, Any]:
    """Load `batch_dir` (batch_score's output) as `version`, then make it the one readers see (with `switch`
    False, staged: complete and kept, but the pointers stay, e.g. for an A/B experiment's challenger).

    Readers see the whole previous version or the whole new one: the pointer moves in one MULTI/EXEC
    after every key is written and counted. The version that was current becomes `previous` (kept for
    `rollback`); versions beyond `keep_versions` get a TTL of `expire_after_s`. Idempotent: publishing
    a version that is already complete writes nothing (its input must be the same, else
    `VersionConflictError`) and only makes it current. A killed attempt is taken over by the next
    attempt of the same version, or expired by any later publish once its heartbeat is
    `abandoned_after_s` old. One publisher at a time (the DAG runs one at a time).
    """
    _check_version(version)
    if keep_versions < 2:
        raise ValueError(f"keep_versions counts the current version and the one kept for rollback: 2 or more, "
                         f"got {keep_versions}")  # fmt: skip
    if expire_after_s < 1 or chunk_size < 1:
        raise ValueError("expire_after_s and chunk_size must be positive")
    batch_dir = Path(batch_dir)
    sources = _sources(batch_dir)
    model_versions = _model_versions(batch_dir)
    keys = RecommendationKeys(key_prefix)
    started = time.perf_counter()
    client = redis_client(redis_url, redis_type)
    try:
        abandoned = _retire_abandoned_loads(client, keys, version, abandoned_after_s, expire_after_s)
        status = as_text(client.hget(keys.meta(version), "status") or b"")
        if status == "complete":
            fingerprint, counts = _fingerprint_only(sources, chunk_size)
            published = as_text(client.hget(keys.meta(version), "fingerprint") or b"")
            if fingerprint != published:
                raise VersionConflictError(
                    f"version {version} was already published from different input than {batch_dir} "
                    f"(fingerprint {published[:12]}, this input {fingerprint[:12]}); publish it as a new version"
                )
            log.info("publish %s: already published from the same input, nothing to write", version)
            attempt, load_seconds, loaded = None, 0.0, False
        else:
            attempt = _claim(client, keys, version, batch_dir, sources, model_versions)
            try:
                counts, fingerprint, load_seconds = _load(client, keys, version, sources, chunk_size, progress)
            except (InputDataError, PublishError) as error:  # a refused load is marked failed
                _fail(client, keys, version, attempt, str(error), expire_after_s)
                raise
            loaded = True
        # A run scores the users its data had: those forgotten since it read them are erased before readers
        # see the version (a forget meanwhile erases them from every listed and loading version itself).
        forgotten = sorted(int(member) for member in cast(set[Any], client.smembers(keys.forgotten)))
        erased = erase_users(client, keys, [version], forgotten) if forgotten else 0
        previous = _switch(client, keys, version, attempt, fingerprint, move_pointers=switch)
        known_users_bytes = int(as_text(client.hget(keys.meta(version), "known_users_bytes") or 0))
        retire_started = time.perf_counter()
        retired = _retire_old_versions(client, keys, keep_versions, expire_after_s)
        retire_seconds = time.perf_counter() - retire_started
    finally:
        client.close()
    total_keys = sum(counts.values())
    metrics: dict[str, Any] = {
        "version": version,
        "previous_version": previous if switch else None,
        "switched": switch,  # False: staged, complete and kept while readers stay on the current version
        "loaded": loaded,
        "keys": counts,
        "keys_total": total_keys,
        "known_users_bytes": known_users_bytes,
        "load_seconds": round(load_seconds, 3),
        "keys_per_s": round(total_keys / load_seconds) if load_seconds else None,
        "forgotten_lists_erased": erased,
        "retired_versions": retired,
        "abandoned_versions": abandoned,
        "retire_seconds": round(retire_seconds, 3),
        "seconds": round(time.perf_counter() - started, 3),
        "fingerprint": fingerprint,
        "model_versions": model_versions,
    }
    log.info("publish %s: %s; %s keys (%s) at %s keys/s; retired %s", version,
             f"current (previous {previous})" if switch else f"staged (current stays {previous})",
             f"{total_keys:,}", ", ".join(f"{kind} {count:,}" for kind, count in counts.items()),
             f"{metrics['keys_per_s']:,}" if metrics["keys_per_s"] else "-", retired or "none")  # fmt: skip
    return metrics


def rollback(redis_url: str, key_prefix: str = DEFAULT_KEY_PREFIX, redis_type: str = "redis"
             ) -> dict[str, str | None]:  # fmt: skip
    """Swap `current` and `previous` in one MULTI/EXEC; a second rollback undoes the first."""
    keys = RecommendationKeys(key_prefix)
    client = redis_client(redis_url, redis_type)
    try:
        with client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(keys.current, keys.previous)
                    # Two GETs: a cluster pipeline blocks MGET (same slot or not).
                    current, previous = as_texts([pipe.get(keys.current), pipe.get(keys.previous)])
                    if previous is None:
                        raise PublishError("nothing to roll back to: no previous version")
                    pipe.watch(keys.meta(previous))
                    status = as_text(pipe.hget(keys.meta(previous), "status") or b"missing")
                    if status != "complete":
                        raise PublishError(f"cannot roll back to version {previous}: it is {status}")
                    pipe.multi()
                    pipe.set(keys.current, previous)
                    if current is not None:
                        pipe.set(keys.previous, current)
                    pipe.execute()
                    break
                except redis.WatchError:
                    continue
    finally:
        client.close()
    log.info("rollback: current %s (was %s)", previous, current)
    return {"current": previous, "previous": current}


def _check_version(version: str) -> None:
    # No ':' (keys split on it) and no glob characters (a version's keys are found with SCAN MATCH).
    if not _VERSION_PATTERN.fullmatch(version) or version in _RESERVED_VERSIONS:
        raise ValueError(f"version {version!r}: letters, digits and . _ + - only (at most 128), not one of "
                         f"{sorted(_RESERVED_VERSIONS)}")  # fmt: skip


def _sources(batch_dir: Path) -> list[_Source]:
    """The three inputs, their schemas checked and rows counted before anything is written."""
    sources = []
    for kind, (folder, id_column) in SOURCES.items():
        directory = batch_dir / folder
        files = tuple(part_files(directory)) if directory.is_dir() else ()
        if not files:
            raise InputDataError(f"{directory}: no part-*.parquet files; is {batch_dir} a batch_score output?")
        for path in files:
            _check_schema(path, id_column)
        rows = sum(pq.ParquetFile(path).metadata.num_rows for path in files)
        sources.append(_Source(kind, id_column, directory, files, rows))
    return sources


def _check_schema(path: Path, id_column: str) -> None:
    schema = pq.read_schema(path)
    optional = ["click_probabilities"] if "click_probabilities" in schema.names else []
    for column in (id_column, "item_ids", "scores", *optional):
        if column not in schema.names:
            raise InputDataError(f"{path}: no column '{column}' (columns: {', '.join(schema.names)})")
        kind = schema.field(column).type
        is_list = pa.types.is_list(kind) or pa.types.is_large_list(kind)
        if column == "item_ids":
            ok = is_list and pa.types.is_integer(kind.value_type)
        elif column in ("scores", "click_probabilities"):
            ok = is_list and pa.types.is_floating(kind.value_type)
        elif column == "segment":
            ok = pa.types.is_string(kind) or pa.types.is_large_string(kind)
        else:
            ok = pa.types.is_integer(kind)
        if not ok:
            raise InputDataError(f"{path}: column '{column}' has type {kind}")


def _model_versions(batch_dir: Path) -> dict[str, Any]:
    path = batch_dir / "_metrics.json"
    if not path.is_file():
        return {}
    try:
        versions = json.loads(path.read_text()).get("model_versions") or {}
    except (json.JSONDecodeError, AttributeError) as error:
        raise InputDataError(f"{path}: not a JSON object ({error})") from error
    if not isinstance(versions, dict):
        raise InputDataError(f"{path}: model_versions must be an object, got {type(versions).__name__}")
    return versions


def _batches(source: _Source, chunk_size: int) -> Iterator[tuple[Path, pa.RecordBatch]]:
    for path in source.files:
        file = pq.ParquetFile(path)
        columns = [source.id_column, "item_ids", "scores",
                   *(["click_probabilities"] if "click_probabilities" in file.schema_arrow.names else [])]
        for batch in file.iter_batches(batch_size=chunk_size, columns=columns):
            yield path, batch


def _offsets(lists: pa.Array) -> np.ndarray:
    offsets = lists.offsets.to_numpy()
    return offsets - offsets[0]  # a sliced list array's offsets start where its slice does


def _encode_batch(batch: pa.RecordBatch, id_column: str, path: Path) -> tuple[list[bytes], list[bytes], list[Any]]:
    """(key suffixes, values, buffers to fingerprint) of one batch; bad rows raise InputDataError.

    `click_probabilities` (the ranker's P(click) of each listed item) is optional: a batch scoring from before
    it has only `scores`, which then stand for them (`encode_recommendations`)."""
    ids = batch.column(id_column)
    if ids.null_count:
        raise InputDataError(f"{path}: {ids.null_count} rows without a {id_column}")
    id_bytes = pc.cast(pc.cast(ids, pa.string()), pa.binary()).to_pylist()
    names = ["item_ids", "scores", "click_probabilities"]
    columns = [batch.column(name) for name in names if name in batch.schema.names]
    if any(column.null_count for column in columns):
        raise InputDataError(f"{path}: rows without item_ids or scores")
    offsets = _offsets(columns[0])
    for name, column in zip(names[1:], columns[1:], strict=False):
        other = _offsets(column)
        if not np.array_equal(offsets, other):
            row = int(np.argmax(np.diff(offsets) != np.diff(other)))
            raise InputDataError(f"{path}: {id_column} {id_bytes[row].decode()} has {np.diff(offsets)[row]} item "
                                 f"ids but {np.diff(other)[row]} {name}")  # fmt: skip
    flat = [column.flatten() for column in columns]
    if any(values.null_count for values in flat):
        raise InputDataError(f"{path}: null item ids or scores inside lists")
    # Each list's value is LIST_HEADER, then its records: one more record a list, at its start.
    rows = len(batch)
    starts = offsets[:-1] + np.arange(rows)
    records = np.empty(len(flat[0]) + rows, PAYLOAD_DTYPE)
    is_item = np.ones(len(records), dtype=bool)
    is_item[starts] = False
    records[starts] = LIST_HEADER[0]
    records["item_id"][is_item] = flat[0].to_numpy(zero_copy_only=False)
    scores = flat[1].to_numpy(zero_copy_only=False)
    records["score"][is_item] = scores
    records["click_probability"][is_item] = flat[2].to_numpy(zero_copy_only=False) if len(flat) > 2 else scores
    if not np.isfinite(scores).all():
        raise InputDataError(f"{path}: scores that are NaN or infinite")
    value_offsets = (offsets.astype(np.int64) + np.arange(rows + 1)) * PAYLOAD_DTYPE.itemsize
    # One Arrow binary array over the packed records: its values are the per-list slices, made in C.
    values = pa.Array.from_buffers(pa.large_binary(), rows,
                                   [None, pa.py_buffer(value_offsets), pa.py_buffer(records)]).to_pylist()  # fmt: skip
    return id_bytes, values, [b"\n".join(id_bytes), value_offsets, records]


class _EncodedChunk(NamedTuple):
    source: _Source
    ids: list[bytes]  # the key part after "{kind}:"
    values: list[bytes]
    user_ids: np.ndarray | None  # the ids as numbers, for the user kind (the known-users bitmap)


class _Fingerprint:
    """What identifies a version's input: SHA-256 over the CRC-32 and length of every encoded buffer.

    It only has to tell "the same lists" from "other lists" when a version is published again, so a
    CRC (7 GB/s here) does the per-byte work instead of SHA-256 (2 GB/s, a fifth of the SETs' time).
    """

    def __init__(self) -> None:
        self._digest = hashlib.sha256()

    def update(self, buffer: Any) -> None:
        self._digest.update(struct.pack("<IQ", zlib.crc32(buffer), memoryview(buffer).nbytes))

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def _encoded_chunks(sources: list[_Source], chunk_size: int, fingerprint: _Fingerprint) -> Iterator[_EncodedChunk]:
    """Every list of `sources`, encoded chunk by chunk; `fingerprint` sees kinds, ids and values in order."""
    for source in sources:
        fingerprint.update(source.kind.encode())
        for path, batch in _batches(source, chunk_size):
            ids, values, buffers = _encode_batch(batch, source.id_column, path)
            for buffer in buffers:
                fingerprint.update(buffer)
            user_ids = batch.column(source.id_column).to_numpy() if source.kind == "user" else None
            yield _EncodedChunk(source, ids, values, user_ids)


def _prefetch(chunks: Iterator[_EncodedChunk], depth: int = 2) -> Generator[_EncodedChunk, None, None]:
    """`chunks`, produced by a background thread up to `depth` ahead.

    Reading, encoding and fingerprinting cost about a third of the SETs' time here; Arrow's decoding
    and the CRC release the GIL, so most of it overlaps with the pipelines' waits on Redis.
    """
    ready: queue.Queue[_EncodedChunk | BaseException | None] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        item: _EncodedChunk | BaseException | None
        try:
            for item in chunks:
                while not stop.is_set():
                    try:
                        ready.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            item = None
        except BaseException as error:  # handed to the consumer, raised there
            item = error
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    producer = threading.Thread(target=produce, name="publish-prefetch", daemon=True)
    producer.start()
    try:
        while True:
            item = ready.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        producer.join()


def _fingerprint_only(sources: list[_Source], chunk_size: int) -> tuple[str, dict[str, int]]:
    """The fingerprint and counts that loading `sources` would give, without writing anything."""
    fingerprint = _Fingerprint()
    counts = dict.fromkeys(SOURCES, 0)
    for chunk in _encoded_chunks(sources, chunk_size, fingerprint):
        counts[chunk.source.kind] += len(chunk.ids)
    return fingerprint.hexdigest(), counts


class _KnownUsers:
    """The known-users bitmap, built in memory as the user chunks go by; `bitmap` is None once too sparse."""

    def __init__(self, users: int) -> None:
        self.max_bits = min(REDIS_MAX_BITS, max(KNOWN_USERS_MIN_BITS, users * KNOWN_USERS_BITS_PER_USER))
        self.bitmap: np.ndarray | None = np.zeros(0, dtype=np.uint8)
        self.reason = ""

    def add(self, ids: np.ndarray) -> None:
        if self.bitmap is None or not len(ids):
            return
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self.max_bits:
            self.bitmap = None
            self.reason = f"user ids from {low} to {high}: a bitmap would take more than {self.max_bits:,} bits"
            return
        if high // 8 >= len(self.bitmap):  # grown by doubling (ids often come sorted); trimmed when written
            grown = np.zeros(max(high // 8 + 1, min(2 * len(self.bitmap), self.max_bits // 8)), dtype=np.uint8)
            grown[: len(self.bitmap)] = self.bitmap
            self.bitmap = grown
        ids = ids.astype(np.int64, copy=False)
        # Redis numbers a string's bits from the most significant bit of its first byte (GETBIT/SETBIT).
        np.bitwise_or.at(self.bitmap, ids >> 3, (0x80 >> (ids & 7)).astype(np.uint8))

    def write(self, client: redis.Redis, key: str, users: int) -> int:
        """SETRANGE the bitmap to `key` and check that it counts `users`; its bytes (0: none written)."""
        if self.bitmap is None or not self.bitmap.any():
            return 0
        bitmap = self.bitmap[: int(np.flatnonzero(self.bitmap)[-1]) + 1]
        pipe = client.pipeline(transaction=False)
        pipe.delete(key)
        for start in range(0, len(bitmap), SETRANGE_CHUNK):
            pipe.setrange(key, start, bitmap[start : start + SETRANGE_CHUNK].tobytes())
        pipe.bitcount(key)
        counted = pipe.execute()[-1]
        if counted != users:
            raise PublishError(f"{key}: {counted} bits set for {users} users")
        return len(bitmap)


def _now_iso() -> str:
    # Informational only (when a version was loaded and switched to); nothing is decided on it.
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _claim(client: redis.Redis, keys: RecommendationKeys, version: str, batch_dir: Path, sources: list[_Source],
           model_versions: dict[str, Any]) -> str:  # fmt: skip
    """Start (or take over) loading `version`: a fresh meta hash naming this attempt; old leftovers deleted."""
    attempt = uuid.uuid4().hex
    meta_key = keys.meta(version)
    fields: dict[str, str | float] = {
        "status": "loading",
        "attempt": attempt,
        "source": str(batch_dir),
        "started_at": _now_iso(),
        "heartbeat_at": time.time(),
        "value_format": VALUE_FORMAT,
        "model_versions": json.dumps(model_versions, sort_keys=True),
        **{f"rows_{source.kind}": source.rows for source in sources},
    }
    with client.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(meta_key)
                status = pipe.hget(meta_key, "status")
                if status is not None and as_text(status) == "complete":
                    raise PublishError(f"version {version} was completed by another publisher meanwhile")
                existed = status is not None
                pipe.multi()
                pipe.delete(meta_key)
                pipe.hset(meta_key, mapping=fields)  # type: ignore[arg-type]
                pipe.sadd(keys.loading, version)
                pipe.execute()
                break
            except redis.WatchError:
                continue
    if existed:
        # An earlier attempt (killed, failed, or a retired version published again): nothing points
        # at these keys, and SET NX must find none of them to count duplicates.
        deleted = _for_each_version_key(client, keys, version, lambda pipe, key: pipe.unlink(key))
        log.info("publish %s: took over from an earlier attempt (status %s), deleted its %d keys", version,
                 as_text(status or b""), deleted)  # fmt: skip
    return attempt


def _load(client: redis.Redis, keys: RecommendationKeys, version: str, sources: list[_Source], chunk_size: int,
          progress: bool) -> tuple[dict[str, int], str, float]:  # fmt: skip
    """Write every list with SET NX, then the known-users bitmap; return keys created per kind, the input's
    fingerprint and the seconds."""
    from tqdm import tqdm

    meta_key = keys.meta(version)
    fingerprint = _Fingerprint()
    read = dict.fromkeys(SOURCES, 0)
    created = dict.fromkeys(SOURCES, 0)
    duplicates: dict[str, list[str]] = {kind: [] for kind in SOURCES}
    bases = {source.kind: f"{keys.namespace(version)}{source.kind}:".encode() for source in sources}
    total = sum(source.rows for source in sources)
    known_users = _KnownUsers(next(source.rows for source in sources if source.kind == "user"))
    written = 0
    started = last_log = time.perf_counter()
    chunks = _prefetch(_encoded_chunks(sources, chunk_size, fingerprint))
    with contextlib.closing(chunks), tqdm(total=total, unit="keys", unit_scale=True, desc=f"publish {version}",
                                          disable=not progress, mininterval=1.0) as bar:  # fmt: skip
        for chunk in chunks:
            kind, base = chunk.source.kind, bases[chunk.source.kind]
            if chunk.user_ids is not None:
                known_users.add(chunk.user_ids)
            pipe = client.pipeline(transaction=False)
            for key_id, value in zip(chunk.ids, chunk.values, strict=True):
                # SET with NX; execute_command skips `set()`'s option handling: 1.4x the keys/s here.
                pipe.execute_command("SET", base + key_id, value, "NX")
            # Progress and heartbeat, visible to operators (HGETALL) and to later publishers.
            pipe.hset(meta_key, mapping={f"loaded_{kind}": read[kind] + len(chunk.ids), "heartbeat_at": time.time()})
            replies = pipe.execute()[:-1]
            new = sum(1 for reply in replies if reply)
            if new != len(chunk.ids) and len(duplicates[kind]) < 5:
                duplicates[kind] += [key_id.decode() for key_id, reply in zip(chunk.ids, replies, strict=True)
                                     if not reply][:5]  # fmt: skip
            read[kind] += len(chunk.ids)
            created[kind] += new
            written += len(chunk.ids)
            bar.update(len(chunk.ids))
            now = time.perf_counter()
            if now - last_log >= 10:
                log.info("publish %s: %s/%s keys, %s keys/s", version, f"{written:,}", f"{total:,}",
                         f"{written / (now - started):,.0f}")  # fmt: skip
                last_log = now
    for source in sources:
        if read[source.kind] != source.rows:
            raise InputDataError(f"{source.directory}: {read[source.kind]} rows read but the files' footers say "
                                 f"{source.rows} (changed while publishing?)")  # fmt: skip
        if created[source.kind] != read[source.kind]:
            raise InputDataError(
                f"{source.directory}: {read[source.kind]} rows read but only {created[source.kind]} {source.kind} "
                f"keys created: duplicated {source.id_column} values (e.g. {', '.join(duplicates[source.kind])}); "
                f"refusing to publish version {version}"
            )
    bitmap_bytes = known_users.write(client, keys.known_users(version), created["user"])
    client.hset(meta_key, "known_users_bytes", str(bitmap_bytes))
    if not bitmap_bytes:
        log.warning("publish %s: no known-users bitmap (%s); the gateway asks Triton on every missing list",
                    version, known_users.reason or "no users")  # fmt: skip
    return created, fingerprint.hexdigest(), time.perf_counter() - started


def make_current(redis_url: str, version: str, key_prefix: str = DEFAULT_KEY_PREFIX, redis_type: str = "redis"
                 ) -> str | None:  # fmt: skip
    """Point `current` at a complete version (a staged one, an experiment's challenger), as a publish's switch
    does; return the version that was current."""
    keys = RecommendationKeys(key_prefix)
    client = redis_client(redis_url, redis_type)
    try:
        fingerprint = as_text(client.hget(keys.meta(version), "fingerprint") or b"")
        return _switch(client, keys, version, None, fingerprint)
    finally:
        client.close()


def _switch(client: redis.Redis, keys: RecommendationKeys, version: str, attempt: str | None, fingerprint: str,
            *, move_pointers: bool = True) -> str | None:  # fmt: skip
    """Point `current` at `version` in one MULTI/EXEC (without `move_pointers`, only mark it complete and keep
    it); return the version that was current."""
    meta_key = keys.meta(version)
    with client.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(keys.current, keys.previous, meta_key)
                status, owner = as_texts(pipe.hmget(meta_key, ["status", "attempt"]))
                if attempt is None and status != "complete":
                    raise PublishError(f"version {version} is {status} now, not complete: not switching to it")
                if attempt is not None and (status, owner) != ("loading", attempt):
                    raise PublishError(f"version {version} was taken over or expired while loading "
                                       f"(status {status}); not switching to it")  # fmt: skip
                current = pipe.get(keys.current)
                current_text = as_text(current) if current is not None else None
                pipe.multi()
                if move_pointers:
                    pipe.set(keys.current, version)
                    if current_text is not None and current_text != version:
                        pipe.set(keys.previous, current_text)
                if attempt is not None:
                    pipe.hset(meta_key, mapping={"status": "complete", "fingerprint": fingerprint,
                                                 "published_at": _now_iso()})  # fmt: skip
                    pipe.hdel(meta_key, "heartbeat_at")
                pipe.lrem(keys.versions, 0, version)
                pipe.lpush(keys.versions, version)
                pipe.srem(keys.loading, version)
                pipe.execute()
                return current_text
            except redis.WatchError:
                continue


def _set_status(client: redis.Redis, meta_key: str, expected: set[str], new: str, **fields: str) -> bool:
    """Change a version's status only if it is one of `expected` (WATCH: no lost update)."""
    with client.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(meta_key)
                status = pipe.hget(meta_key, "status")
                if status is None or as_text(status) not in expected:
                    return False
                pipe.multi()
                pipe.hset(meta_key, mapping={"status": new, **fields})
                pipe.execute()
                return True
            except redis.WatchError:
                continue


def _for_each_version_key(client: redis.Redis, keys: RecommendationKeys, version: str, command: Any) -> int:
    """Run `command(pipeline, key)` on every key of `version` except its meta hash; return how many keys.

    SCAN walks the whole keyspace in steps (never blocking Redis like KEYS), so this runs only off the
    hot path: after a swap, or on a version nothing points at.
    """
    pattern = _GLOB_SPECIAL.sub(r"\\\1", keys.namespace(version)) + "*"
    meta_key = keys.meta(version)
    done = 0
    for batch in _scan_chunks(client, pattern, SCAN_COUNT):
        pipe = client.pipeline(transaction=False)
        for key in batch:
            if as_text(key) != meta_key:
                command(pipe, key)
                done += 1
        pipe.execute()
    return done


def _scan_chunks(client: redis.Redis, pattern: str, count: int) -> Iterator[tuple[Any, ...]]:
    """The keys matching `pattern` in chunks of `count`; on a Redis Cluster, every primary's (redis-py's scan_iter
    walks them all)."""
    found = client.scan_iter(match=pattern, count=count)
    while chunk := tuple(itertools.islice(found, count)):
        yield chunk


def _expire_version(client: redis.Redis, keys: RecommendationKeys, version: str, expire_after_s: int) -> int:
    """Give every key of `version` a TTL, its meta hash last and longest (see META_GRACE_S)."""
    expired = _for_each_version_key(client, keys, version, lambda pipe, key: pipe.expire(key, expire_after_s))
    client.expire(keys.meta(version), expire_after_s + META_GRACE_S)
    return expired


def _fail(client: redis.Redis, keys: RecommendationKeys, version: str, attempt: str, reason: str,
          expire_after_s: int) -> None:  # fmt: skip
    """A refused load: never pointed at; its keys expire (kept a while for inspection)."""
    meta_key = keys.meta(version)
    if as_text(client.hget(meta_key, "attempt") or "") != attempt:
        return  # taken over by another attempt: its keys are that attempt's now
    if _set_status(client, meta_key, {"loading"}, "failed", reason=reason[:1000]):
        _expire_version(client, keys, version, expire_after_s)
        client.srem(keys.loading, version)
    log.error("publish %s: refused (%s); readers stay on the current version", version, reason)


def _retire_abandoned_loads(client: redis.Redis, keys: RecommendationKeys, own_version: str,
                            abandoned_after_s: float, expire_after_s: int) -> list[str]:  # fmt: skip
    """Expire loads of other versions that were killed (no heartbeat for `abandoned_after_s`) or refused."""
    abandoned = []
    for version in sorted(as_text(member) for member in cast(set[Any], client.smembers(keys.loading))):
        if version == own_version:
            continue  # this attempt takes it over in _claim
        meta = hash_as_text(client.hgetall(keys.meta(version)))
        status = meta.get("status")
        if status == "loading" and time.time() - float(meta.get("heartbeat_at", 0)) < abandoned_after_s:
            continue  # may still be loading somewhere
        left_behind = {"loading", "failed", "abandoned"}  # abandoned: a publish killed while expiring it
        if status in left_behind and _set_status(client, keys.meta(version), left_behind, "abandoned"):
            expired = _expire_version(client, keys, version, expire_after_s)
            abandoned.append(version)
            log.warning("publish: version %s was left half-loaded (%s keys): they expire in %d s", version,
                        f"{expired:,}", expire_after_s)  # fmt: skip
        client.srem(keys.loading, version)
    return abandoned


def _retire_old_versions(client: redis.Redis, keys: RecommendationKeys, keep_versions: int, expire_after_s: int
                         ) -> list[str]:  # fmt: skip
    """Keep `current`, `previous`, an experiment's challenger and the newest others up to `keep_versions`; the
    rest expire."""
    pointers = [*as_texts(client.mget(keys.current, keys.previous)),
                *as_texts(client.hmget(keys.experiment, ["challenger"]))]  # fmt: skip
    pointed = [value for value in pointers if value is not None]
    listed = [as_text(value) for value in cast(list[Any], client.lrange(keys.versions, 0, -1))]
    keep = list(dict.fromkeys(pointed))
    for version in listed:
        if len(keep) >= keep_versions:
            break
        if version not in keep and as_text(client.hget(keys.meta(version), "status") or "") == "complete":
            keep.append(version)
    retired = []
    for version in listed:
        if version in keep:
            continue
        # Marked first, removed from the list last: a publish killed in between retires it again.
        if _set_status(client, keys.meta(version), {"complete", "retiring"}, "retiring"):
            expired = _expire_version(client, keys, version, expire_after_s)
            _set_status(client, keys.meta(version), {"retiring"}, "retired")
            retired.append(version)
            log.info("publish: retired version %s: its %s keys expire in %d s", version, f"{expired:,}",
                     expire_after_s)  # fmt: skip
        client.lrem(keys.versions, 0, version)
    return retired

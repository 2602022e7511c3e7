"""The nightly lists' store in Redis: its key layout, the value format and the reference readers.

This is the contract between the publisher (`tasks/publish_recommendations.py`, which writes it) and every
reader: the gateway (`serving/recommender.py`) and a web tier that reads Redis itself (docs/redis-contract.md).
Readers resolve the pointer `{<prefix>recs}:current` to a version and read that version's keys.

Key layout 2 (prefix `recsys:` by default; DESIGN.md, "Publishing a batch to Redis atomically"). The
control keys share the hash tag `{<prefix>recs}`, one slot on a Redis Cluster, so that the transactions that move
the pointers may WATCH them all; a version's lists carry no tag and spread over the cluster (`RecommendationKeys`):

    {<prefix>recs}:current                   string: the version readers use
    {<prefix>recs}:previous                  string: the version `rollback` switches back to
    {<prefix>recs}:versions                  list: retained versions, newest publish first
    {<prefix>recs}:loading                   set: versions whose load has started but not been switched to
    {<prefix>recs}:forgotten                 set: customers erased on request (serving/forget.py), whose lists a
                                             publish erases from its version before switching to it
    {<prefix>recs}:experiment                hash: the running A/B experiment (recsys/experiments.py): name,
                                             the challenger version (kept from retirement), share, salt, times
    {<prefix>recs}:meta:<version>            hash: status, counts, times, model versions, fingerprint
    <prefix>recs:<version>:user:<user_id>    value: one user's list (raw ids, best first)
    <prefix>recs:<version>:segment:<segment> value: a new visitor's generic list ("3:1", "*" for all)
    <prefix>recs:<version>:similar:<item_id> value: the items similar to one item
    <prefix>recs:<version>:known_users       string: a bitmap, bit `user_id` set for every user with a list
    <prefix>recs:<version>:live_users        string: a bitmap, bit `user_id` set by the gateway for every customer
                                             whose features it wrote to Feast since (serving/live_features.py)
    <prefix>recs:<version>:fresh_items       hash: product id -> a product the version does not know, added with
                                             features since (`encode_fresh_item`; serving/live_features.py)

Layout 1 (until 2026-12-05) had the control keys without the tag (`<prefix>recs:current`, meta hashes at
`<prefix>recs:<version>:meta`): readers of layout 2 do not see a version published in layout 1; publish it again.

The bitmap lets a reader tell a visitor the models do not know (a new visitor: the generic list) from a
known customer whose list is missing (evicted, deleted: the online path), in the same round trip as the
list, instead of asking Triton. It is written only while it stays small: ids below Redis's 2**32-bit
limit and at most the publisher's `KNOWN_USERS_BITS_PER_USER` bits a user (dense ids, as database sequences give; 1 MiB
is always allowed). Otherwise a version has none, and readers treat every miss as possibly known.

A value is the list as packed little-endian records (item id int64, order score float32, P(click) float32):
16 bytes an item, after one 16-byte header record (`LIST_HEADER`: item id -2**63, which no item has, and the
format number 2), no parsing on the serving path (`decode_scored_list`). The order score orders the list;
P(click) is the ranker's probability, which the promotion rule compares with its threshold (NaN where a list
has none: similar products). Values of versions published before the header (12-byte pairs, item id and
score) still decode: their one number stands for both. Encoding a batch is a few vectorized numpy
and Arrow calls (0.4 µs a list of 100), so the publish runs at the rate of redis-py's pipelines
themselves; JSON, even built by Arrow, took 28 µs a list here, more than its SET. See
`benchmarks/publish.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from redis.client import NEVER_DECODE

if TYPE_CHECKING:
    import redis
    import redis.asyncio

KINDS = ("user", "segment", "similar")
PAYLOAD_DTYPE = np.dtype([("item_id", "<i8"), ("score", "<f4"), ("click_probability", "<f4")])  # 16 bytes
# The first record of every list value: says the format (the item id no item has, then the format number).
LIST_HEADER = np.array([(np.iinfo(np.int64).min, 2.0, 0.0)], dtype=PAYLOAD_DTYPE)
_HEADER_BYTES = LIST_HEADER.tobytes()
LEGACY_PAYLOAD_DTYPE = np.dtype([("item_id", "<i8"), ("score", "<f4")])  # format 1: 12 bytes an item, no header
# Recorded in every version's meta hash.
VALUE_FORMAT = "header:item_id=-2**63,score=2;item_id:int64le,score:float32le,click_probability:float32le"
DEFAULT_KEY_PREFIX = "recsys:"
REDIS_MAX_BITS = 2**32
ALL_SEGMENTS = "*"  # the generic list of visitors whose segment is unknown
SEGMENT_SEPARATOR = ":"


def segment_key(values: Sequence[Any] | Any) -> str:
    """The key part of a segment: its context values joined, e.g. 'DE:mobile'. A group key of pandas' groupby
    over one column is the value itself in pandas 1.x (the trainer environment), a 1-tuple in 2.x: both are one
    value, never a string's characters."""
    if isinstance(values, str) or not isinstance(values, Sequence):
        values = (values,)
    return SEGMENT_SEPARATOR.join(str(value) for value in values)


ScoredList = tuple[list[int], list[float], list[float]]  # item ids, order scores, P(click), best first


class Recommendations(NamedTuple):
    version: str
    item_ids: list[int]
    scores: list[float]  # the order scores, best first
    click_probabilities: list[float]  # the ranker's P(click) of each (NaN: none)


@dataclasses.dataclass(frozen=True)
class RecommendationKeys:
    """The Redis key names, in one place for the publisher and every reader.

    The control keys (the pointers, the lists of versions, the experiment, every version's meta hash) share one hash
    tag, `{<prefix>recs}`: on a Redis Cluster they live in one slot, so that the publisher's and the rollback's
    WATCH/MULTI transactions over them are allowed there. A version's lists have no tag and spread over the slots."""

    prefix: str = DEFAULT_KEY_PREFIX

    def __post_init__(self) -> None:
        if "{" in self.prefix or "}" in self.prefix:
            raise ValueError(f"key prefix {self.prefix!r}: no '{{' or '}}' (they would change the keys' hash tags)")

    @property
    def control(self) -> str:
        """What every control key starts with: the hash tag of their slot."""
        return f"{{{self.prefix}recs}}:"

    @property
    def patterns(self) -> tuple[str, ...]:
        """SCAN MATCH patterns that together match every key under the prefix: the control keys start with '{'."""
        return f"{self.prefix}*", f"{self.control}*"

    @property
    def current(self) -> str:
        return f"{self.control}current"

    @property
    def previous(self) -> str:
        return f"{self.control}previous"

    @property
    def versions(self) -> str:
        return f"{self.control}versions"

    @property
    def loading(self) -> str:
        return f"{self.control}loading"

    @property
    def forgotten(self) -> str:
        return f"{self.control}forgotten"

    @property
    def experiment(self) -> str:
        return f"{self.control}experiment"

    def meta(self, version: str) -> str:
        return f"{self.control}meta:{version}"

    @property
    def versions_prefix(self) -> str:
        """What every version's namespace starts with (the gateway's read script appends the version)."""
        return f"{self.prefix}recs:"

    def namespace(self, version: str) -> str:
        """What the names of a version's lists, bitmaps and fresh products start with (not its meta hash's)."""
        return f"{self.versions_prefix}{version}:"

    def data(self, version: str, kind: str, key: str | int) -> str:
        return f"{self.namespace(version)}{kind}:{key}"

    def known_users(self, version: str) -> str:
        return f"{self.namespace(version)}known_users"

    def live_users(self, version: str) -> str:
        return f"{self.namespace(version)}live_users"

    def fresh_items(self, version: str) -> str:
        return f"{self.namespace(version)}fresh_items"

    def online_cache(self, version: str, kind: str, key: str | int) -> str:
        """The gateway's cache of an online (Triton) answer under `version`, with a TTL."""
        return f"{self.prefix}cache:{version}:{kind}:{key}"

    def online_answers(self, version: str, customer_id: int) -> str:
        """A hash of one customer's cached online answers under `version` by request context (one TTL for the
        whole hash), so that deleting this one key drops every context's answer."""
        return self.online_cache(version, "customer", customer_id)


def encode_recommendations(item_ids: Sequence[int], scores: Sequence[float],
                           click_probabilities: Sequence[float] | None = None) -> bytes:  # fmt: skip
    """One list as stored in Redis (the publisher encodes whole batches at once, the same way); without
    `click_probabilities`, the scores stand for them (a list ordered by P(click) itself)."""
    clicks = scores if click_probabilities is None else click_probabilities
    if not len(item_ids) == len(scores) == len(clicks):
        raise ValueError(f"{len(item_ids)} item ids but {len(scores)} scores and {len(clicks)} click probabilities")
    records = np.empty(len(item_ids), PAYLOAD_DTYPE)
    records["item_id"] = item_ids
    records["score"] = scores
    records["click_probability"] = clicks
    return _HEADER_BYTES + records.tobytes()


def _records(value: bytes) -> np.ndarray:
    if value[:16] == _HEADER_BYTES:
        if len(value) % PAYLOAD_DTYPE.itemsize:
            raise ValueError(f"a stored list is a multiple of {PAYLOAD_DTYPE.itemsize} bytes, got {len(value)}")
        return np.frombuffer(value, dtype=PAYLOAD_DTYPE, offset=PAYLOAD_DTYPE.itemsize)
    if len(value) % LEGACY_PAYLOAD_DTYPE.itemsize:
        raise ValueError(f"a stored list is a multiple of {LEGACY_PAYLOAD_DTYPE.itemsize} bytes, got {len(value)}")
    return np.frombuffer(value, dtype=LEGACY_PAYLOAD_DTYPE)


def decode_recommendations(value: bytes) -> tuple[list[int], list[float]]:
    """(item ids, order scores) of a stored list, best first."""
    records = _records(value)
    return records["item_id"].tolist(), records["score"].tolist()


def decode_scored_list(value: bytes) -> ScoredList:
    """(item ids, order scores, click probabilities) of a stored list, best first; a list of the first format
    has one number, which stands for both."""
    records = _records(value)
    scores = records["score"].tolist()
    clicks = records["click_probability"].tolist() if records.dtype == PAYLOAD_DTYPE else scores
    return records["item_id"].tolist(), scores, clicks


# --- erasing a customer (serving/forget.py, and every publish for the customers forgotten meanwhile) ---------

# A bitmap bit is cleared only where the version has the bitmap: SETBIT would create one, and a version without a
# known-users bitmap would then call everyone unknown. One key a call: a version's two bitmaps may live in different
# slots of a Redis Cluster.
_CLEAR_BITS = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  for _, bit in ipairs(ARGV) do redis.call('SETBIT', KEYS[1], bit, 0) end
end
return 0
"""


def erase_users(client: redis.Redis, keys: RecommendationKeys, versions: Sequence[str], user_ids: Sequence[int]
                ) -> int:  # fmt: skip
    """Delete the users' lists and cached online answers under every version named, and clear their bits in the
    versions' known-users and live-users bitmaps; return the keys deleted. One key a command, so that a Redis
    Cluster's pipeline sends each to its slot's node."""
    deleted = 0
    for start in range(0, len(user_ids), 1_000):
        chunk = [int(user) for user in user_ids[start:start + 1_000]]
        bits = [user for user in chunk if 0 <= user < REDIS_MAX_BITS]
        pipe = client.pipeline(transaction=False)
        deletes = 0
        for version in versions:
            for user in chunk:
                pipe.delete(keys.data(version, "user", user))
                pipe.delete(keys.online_answers(version, user))
                deletes += 2
        for version in versions:
            if bits:
                for bitmap in (keys.known_users(version), keys.live_users(version)):
                    # EVAL, not a registered script's EVALSHA: a cluster pipeline does not load scripts first
                    # (and blocks its `eval` method: the command itself is routed by its key).
                    pipe.execute_command("EVAL", _CLEAR_BITS, 1, bitmap, *bits)
        deleted += sum(pipe.execute()[:deletes])
    return deleted


# --- reading (the serving tier) ---------------------------------------------------------------------


def read_recommendations(client: redis.Redis, key_prefix: str, kind: str, key: str | int) -> Recommendations | None:
    """The list of `kind` ("user", "segment", "similar") for `key` in the current version, or None.

    Two GETs, the pointer and then the list, and still consistent: a version stays readable after the
    pointer moves away from it (the previous one is kept; older ones expire only after a grace
    period), so a swap between the two reads returns the complete list of the version that was
    current at the first read, never a mix. This also works on Redis Cluster, where one Lua script or
    MGET could not span the pointer and a list living on other slots.
    """
    keys = _reader_keys(key_prefix, kind)
    version = client.get(keys.current)
    if version is None:
        return None
    version_text = as_text(version)
    # NEVER_DECODE: the value is binary even when the caller's client has decode_responses=True.
    value = client.execute_command("GET", keys.data(version_text, kind, key), **{NEVER_DECODE: []})
    if value is None:
        return None
    return Recommendations(version_text, *decode_scored_list(value))


async def read_recommendations_async(client: redis.asyncio.Redis, key_prefix: str, kind: str, key: str | int
                                     ) -> Recommendations | None:  # fmt: skip
    """`read_recommendations` for an asyncio client (FastAPI)."""
    keys = _reader_keys(key_prefix, kind)
    version = await client.get(keys.current)
    if version is None:
        return None
    version_text = as_text(version)
    value = await client.execute_command("GET", keys.data(version_text, kind, key), **{NEVER_DECODE: []})
    if value is None:
        return None
    return Recommendations(version_text, *decode_scored_list(value))


def version_metadata(client: redis.Redis, key_prefix: str, version: str) -> dict[str, str]:
    """A version's meta hash as text (status, counts, times, `model_versions` as JSON); {} if unknown."""
    return hash_as_text(client.hgetall(RecommendationKeys(key_prefix).meta(version)))


def versions_in_use(client: redis.Redis, key_prefix: str) -> set[str]:
    """Every version the store may still serve or switch to: the pointers (current, previous), a running
    experiment's challenger, the retained versions and those being loaded."""
    keys = RecommendationKeys(key_prefix)
    found = [*as_texts(client.mget(keys.current, keys.previous)),
             *as_texts(client.hmget(keys.experiment, ["challenger"])),
             *as_texts(client.lrange(keys.versions, 0, -1)), *as_texts(client.smembers(keys.loading))]  # fmt: skip
    return {version for version in found if version is not None}


def _reader_keys(key_prefix: str, kind: str) -> RecommendationKeys:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return RecommendationKeys(key_prefix)


# redis-py types every reply as "a value or an awaitable" (one set of annotations for both clients):
# these take the sync client's replies as they come and give them a type.
def as_text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def as_texts(values: Any) -> list[str | None]:
    return [None if value is None else as_text(value) for value in values]


def hash_as_text(values: Any) -> dict[str, str]:
    return {as_text(field): as_text(value) for field, value in values.items()}


def encode_fresh_item(features: np.ndarray, embedding: np.ndarray) -> bytes:
    """A product's value in a version's `fresh_items` hash, little-endian: the number of its packed columns (int64),
    the packed columns (int64, `models.online_pipeline.PipelineColumns.pack`), its item-tower embedding (float32)."""
    packed = np.asarray(features, dtype="<i8").reshape(-1)
    return np.array([len(packed)], dtype="<i8").tobytes() + packed.tobytes() + np.asarray(embedding, "<f4").tobytes()


def decode_fresh_items(values: dict[bytes, bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A `fresh_items` hash as read (product id -> `encode_fresh_item`'s value) -> product ids (sorted), packed
    columns [products, width] and embeddings [products, dim]: the recommend ensemble's `fresh_item_*` tensors."""
    ids = sorted(int(product_id) for product_id in values)
    features, embeddings = [], []
    for product_id in ids:
        value = values[str(product_id).encode()]
        width = int(np.frombuffer(value[:8], dtype="<i8")[0])
        features.append(np.frombuffer(value[8 : 8 + 8 * width], dtype="<i8"))
        embeddings.append(np.frombuffer(value[8 + 8 * width :], dtype="<f4"))
    if not ids:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.int64), np.zeros((0, 0), np.float32)
    return np.array(ids, dtype=np.int64), np.stack(features).astype(np.int64), np.stack(embeddings).astype(np.float32)

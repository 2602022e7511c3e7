"""The gateway's reads of the published lists: the version pointer, a visitor's lists, the items they saw since the
nightly run, whether the models know them and a read token of their API key, in one Redis round trip (a Lua
script), and a version's lists by name. Key names from recsys/recommendation_store.py, as the publisher writes them.

On a Redis Cluster a script may touch the keys of one slot only, and these live in many. There the pointer and the
running experiment are read at most once every `CONTROL_TTL_S` (one node: they share a slot) and kept in process,
and the rest is one pipeline that redis-py's cluster client sends to the nodes at once; the bucket is drawn in
Python (`recsys.experiments.bucket_of`, the script's hash), and a new visitor's segment lists are read once per
version and kept. A pointer kept a second too long reads a complete version all the same: versions never change once
published, and the one before the current is kept (tasks/publish_recommendations.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import Any, NamedTuple

from redis.exceptions import NoScriptError, RedisError

from recsys.experiments import CHALLENGER, bucket_of
from recsys.recommendation_store import REDIS_MAX_BITS, RecommendationKeys, ScoredList, as_text, decode_scored_list
from recsys.redis_connection import is_cluster, mget_across_slots
from serving.seen_items import seen_key
from serving.token_bucket import TOKEN_BUCKET, TOKEN_BUCKET_STEP, read_bucket_key

# Redis down, unreachable or too slow: asyncio.timeout raises TimeoutError, sockets OSError.
REDIS_FAILURES = (RedisError, TimeoutError, OSError)

# The version pointer and the lists of `kind` under it, in one round trip (and read atomically): KEYS[2] is
# the customer's set of items seen since the nightly run (serving/seen_items.py), KEYS[3] the API key's read
# bucket; ARGV[1] is "<prefix>recs:", ARGV[2] a user id to look up in the version's known users when the first
# list is missing ("" for none; -1 for an id no bitmap can hold), ARGV[3] and ARGV[4] the bucket's tokens a
# second and size ("" for no limit), ARGV[5] how many "<kind>:<key>" names follow that are always read, ARGV[6]
# the customer ("" for none); the names after those are read only for a user the bitmap says the models do not
# know (a new visitor's segment lists, so that the generic route costs no second round trip). KEYS[4] is the
# running A/B experiment's hash (recsys/experiments.py): with one, the customer's bucket is drawn here, by the
# same hash as `recsys.experiments.bucket_of`, and the challenger bucket reads the challenger version instead
# of the current one (KEYS[1]). Replies {0, seconds to wait} when the key is over its read rate
# (serving/api/rate_limit.py's bucket, taken here so that a read costs no second round trip), {} without a
# version, else {{version[, experiment, bucket]}, seen items, list or nil, ...} and, when asked, 2 for a user
# whose features the gateway wrote since the nightly run (the version's `live_users` bitmap,
# serving/live_features.py: the online path answers them), else, when the first list is missing, the user's bit
# (1 known, 0 not, -1 the version has no bitmap) followed, for 0, by the lists read for an unknown user.
# It reads keys it derives (not passed in KEYS): fine on one Redis server, not on Redis Cluster (ListReader's
# cluster path).
_CURRENT_AND_LISTS = """
if ARGV[3] ~= '' then
  local bucket, rate, burst = KEYS[3], tonumber(ARGV[3]), tonumber(ARGV[4])
  local allowed, wait
""" + TOKEN_BUCKET_STEP + """
  if allowed == 0 then return {0, tostring(wait)} end
end
local version, bucket = nil, nil
local experiment = redis.call('HMGET', KEYS[4], 'salt', 'share', 'challenger', 'name')
if experiment[1] and ARGV[6] ~= '' then
  local draw = tonumber(string.sub(redis.sha1hex(experiment[1] .. ':' .. ARGV[6]), 1, 8), 16) / 4294967296
  if draw < tonumber(experiment[2]) then
    bucket, version = 'challenger', experiment[3]
  else
    bucket = 'control'
  end
end
version = version or redis.call('GET', KEYS[1])
if not version then return {} end
local namespace = ARGV[1] .. version .. ':'
local head = {version}
if bucket then head = {version, experiment[4], bucket} end
local reply = {head, redis.call('SMEMBERS', KEYS[2])}
local function read(first, last)
  if last < first then return end
  local names = {}
  for i = first, last do names[#names + 1] = namespace .. ARGV[i] end
  local values = redis.call('MGET', unpack(names))
  for i = 1, #names do reply[#reply + 1] = values[i] end
end
local always = 6 + tonumber(ARGV[5])
read(7, always)
if ARGV[2] ~= '' then
  local user = tonumber(ARGV[2])
  if user >= 0 and redis.call('GETBIT', namespace .. 'live_users', ARGV[2]) == 1 then
    reply[#reply + 1] = 2
  elseif not reply[3] then
    local known = namespace .. 'known_users'
    local bit
    if redis.call('EXISTS', known) == 0 then bit = -1
    elseif user < 0 then bit = 0
    else bit = redis.call('GETBIT', known, ARGV[2]) end
    reply[#reply + 1] = bit
    if bit == 0 then read(always + 1, #ARGV) end
  end
end
return reply
"""


# How long a gateway on a Redis Cluster keeps the version pointer and the running experiment before reading them
# again: a switch, a rollback or an experiment's start or stop reaches it within this many seconds.
CONTROL_TTL_S = 1.0
# Segment lists a gateway on a Redis Cluster keeps per process (all are dropped when more would be kept).
SEGMENT_LISTS_KEPT = 10_000

PublishedList = ScoredList  # item ids, order scores and P(click), best first


class CurrentLists(NamedTuple):
    version: str | None
    lists: list[PublishedList | None]
    # Products the customer interacted with since the nightly run, kept out of whatever list they get.
    seen: frozenset[int]
    # Whether the models know the user asked about; None when not asked, when the first list was found, or
    # when the version has no known-users bitmap.
    known: bool | None
    # The segment lists asked for in case the user is unknown, read when `known` is False; else empty.
    segments: list[PublishedList | None]
    # The gateway wrote the user's features since the nightly run (a new or changed profile): answer online.
    live: bool = False
    # The running A/B experiment and the customer's bucket in it (None: none runs, or no customer).
    experiment: str | None = None
    bucket: str | None = None


class ReadRateLimited(Exception):
    """The API key is over its read rate; `wait_s` until a read is allowed again."""

    def __init__(self, api_key: str, wait_s: float) -> None:
        super().__init__(f"read rate limit of API key {api_key!r} exceeded")
        self.api_key = api_key
        self.wait_s = wait_s


class ListReader:
    """Reads of the published lists under `key_prefix`, each within `timeout_s`; an API key's reads are limited to
    `read_rate_per_s` (bursts of `read_burst`; None: no limit)."""

    def __init__(self, redis_client: Any, key_prefix: str, timeout_s: float, read_rate_per_s: float | None = None,
                 read_burst: int = 1) -> None:  # fmt: skip
        self.redis = redis_client
        self.key_prefix = key_prefix
        self.keys = RecommendationKeys(key_prefix)
        self.timeout_s = timeout_s
        self.read_rate_per_s = read_rate_per_s
        self.read_burst = read_burst
        self._current_and_lists = redis_client.register_script(_CURRENT_AND_LISTS)
        self.cluster = is_cluster(redis_client)
        self.control_ttl_s = CONTROL_TTL_S
        self._control: tuple[float, str | None, list[Any]] | None = None  # (read at, version, experiment fields)
        self._bucket_sha: str | None = None  # the read bucket's script, loaded on every primary
        self._segments: dict[tuple[str, str], PublishedList | None] = {}  # (version, segment) -> its list

    async def timed(self, call: Awaitable[Any]) -> Any:
        """`call` within the read timeout. asyncio.timeout rather than wait_for: no task created per call, on the
        path of every request."""
        async with asyncio.timeout(self.timeout_s):
            return await call

    async def current(self, kind: str, keys: Sequence[str], customer: int, *, ask_known: bool = False,
                       segments_if_unknown: Sequence[str] = (), api_key: str | None = None
                       ) -> CurrentLists:  # fmt: skip
        """The current version, the lists of `kind` for `keys` under it and the customer's items seen since
        the nightly run; with `ask_known`, when the first list is missing, whether the models know the customer,
        and if not the lists of `segments_if_unknown`: all in one round trip, which also takes a token of
        `api_key`'s read bucket (ReadRateLimited when there is none)."""
        if self.cluster:
            return await self._current_on_cluster(kind, keys, customer, ask_known, segments_if_unknown, api_key)
        prefix = self.keys.versions_prefix
        member = "" if not ask_known else str(customer if 0 <= customer < REDIS_MAX_BITS else -1)
        limited = api_key is not None and self.read_rate_per_s is not None
        rate = [str(self.read_rate_per_s), str(self.read_burst)] if limited else ["", ""]
        names = [prefix, member, *rate, str(len(keys)), str(customer) if customer > 0 else "",
                 *(f"{kind}:{key}" for key in keys), *(f"segment:{key}" for key in segments_if_unknown)]  # fmt: skip
        bucket = read_bucket_key(self.key_prefix, api_key) if limited and api_key else ""
        script_keys = [self.keys.current, seen_key(self.key_prefix, customer), bucket, self.keys.experiment]
        reply = await self.timed(self._current_and_lists(keys=script_keys, args=names, client=self.redis))
        if reply and reply[0] == 0:  # integers only here: a version is a string
            raise ReadRateLimited(str(api_key), float(reply[1]))
        if not reply:
            return CurrentLists(None, [None] * len(keys), frozenset(), None, [])
        seen = frozenset(int(item) for item in reply[1])
        lists = reply[2:]
        decoded = [decode_scored_list(value) if value else None for value in lists[: len(keys)]]
        marker = lists[len(keys)] if len(lists) > len(keys) else None
        known = {1: True, 0: False}.get(marker)  # type: ignore[arg-type]  # 2 (live): the bit was not read
        segments = [decode_scored_list(value) if value else None for value in lists[len(keys) + 1 :]]
        version, *experiment = (value.decode() for value in reply[0])
        return CurrentLists(version, decoded, seen, known, segments, live=marker == 2,
                            experiment=experiment[0] if experiment else None,
                            bucket=experiment[1] if experiment else None)  # fmt: skip

    async def _current_on_cluster(self, kind: str, keys: Sequence[str], customer: int, ask_known: bool,
                                  segments_if_unknown: Sequence[str], api_key: str | None) -> CurrentLists:  # fmt: skip
        """`current` on a Redis Cluster (module doc): the same answers, from the pointer kept in process and one
        pipeline over the nodes (a new visitor's segment lists from the process's copy of the version's)."""
        version, experiment = await self._pointer_and_experiment()
        bucket = None
        if experiment[0] is not None and customer > 0:
            bucket = bucket_of(customer, as_text(experiment[0]), float(experiment[1]))
            if bucket == CHALLENGER and experiment[2] is not None:
                version = as_text(experiment[2])
        limited = api_key is not None and self.read_rate_per_s is not None
        bucket_key = read_bucket_key(self.key_prefix, str(api_key)) if limited else None
        bit_asked = ask_known and 0 <= customer < REDIS_MAX_BITS
        try:
            replies = await self._read_on_cluster(version, kind, keys, customer, ask_known, bit_asked, bucket_key)
        except NoScriptError:  # a node restarted or failed over since the bucket's script was loaded
            self._bucket_sha = None
            replies = await self._read_on_cluster(version, kind, keys, customer, ask_known, bit_asked, bucket_key)
        if limited:
            replies = self._raise_if_limited(replies, api_key)
        if version is None:
            return CurrentLists(None, [None] * len(keys), frozenset(), None, [])
        seen = frozenset(int(item) for item in replies[0])
        decoded = [decode_scored_list(value) if value else None for value in replies[1 : 1 + len(keys)]]
        marks = replies[1 + len(keys) :]
        live = bit_asked and marks[1] == 1
        known: bool | None = None
        segments: list[PublishedList | None] = []
        if ask_known and not live and decoded[0] is None and marks[0]:  # the version has a known-users bitmap
            known = bit_asked and marks[2] == 1
            if not known:
                segments = await self._segment_lists(version, segments_if_unknown)
        return CurrentLists(version, decoded, seen, known, segments, live=live,
                            experiment=as_text(experiment[3]) if bucket else None, bucket=bucket)  # fmt: skip

    async def _read_on_cluster(self, version: str | None, kind: str, keys: Sequence[str], customer: int,
                               ask_known: bool, bit_asked: bool, bucket_key: str | None) -> list[Any]:  # fmt: skip
        """One pipeline, which redis-py sends to the nodes at once: the read bucket's step (when `bucket_key`), then
        under `version` the customer's seen items, the lists, and when asked whether the version has a known-users
        bitmap and the customer's live and known bits."""
        pipe = self.redis.pipeline(transaction=False)
        if bucket_key is not None:
            if self._bucket_sha is None:  # a cluster pipeline loads no script itself: SCRIPT LOAD on every primary
                self._bucket_sha = as_text(await self.timed(self.redis.script_load(TOKEN_BUCKET)))
            pipe.execute_command("EVALSHA", self._bucket_sha, 1, bucket_key, str(self.read_rate_per_s),
                                 str(self.read_burst))  # fmt: skip
        if version is not None:
            pipe.smembers(seen_key(self.key_prefix, customer))
            for key in keys:
                pipe.get(self.keys.data(version, kind, key))
            if ask_known:
                pipe.exists(self.keys.known_users(version))
            if bit_asked:
                pipe.getbit(self.keys.live_users(version), customer)
                pipe.getbit(self.keys.known_users(version), customer)
        return await self.timed(pipe.execute()) if len(pipe) else []

    async def _segment_lists(self, version: str, segments: Sequence[str]) -> list[PublishedList | None]:
        """A version's segment lists, read once per process (a version's lists never change) and handed out as
        copies; a cluster's new visitor then costs one round trip, as on one server."""
        missing = [segment for segment in segments if (version, segment) not in self._segments]
        if missing:
            if len(self._segments) + len(missing) > SEGMENT_LISTS_KEPT:
                self._segments.clear()
            for segment, found in zip(missing, await self.published(version, "segment", missing), strict=True):
                self._segments[(version, segment)] = found
        kept = (self._segments[(version, segment)] for segment in segments)
        return [None if found is None else (list(found[0]), list(found[1]), list(found[2])) for found in kept]

    async def _pointer_and_experiment(self) -> tuple[str | None, list[Any]]:
        """The current version and the running experiment's salt, share, challenger and name (None each without
        one), read from Redis at most once every `control_ttl_s` (one node: the control keys share a slot)."""
        now = asyncio.get_running_loop().time()
        if self._control is None or now - self._control[0] >= self.control_ttl_s:
            pipe = self.redis.pipeline(transaction=False)
            pipe.get(self.keys.current)
            pipe.hmget(self.keys.experiment, ["salt", "share", "challenger", "name"])
            version, experiment = await self.timed(pipe.execute())
            self._control = (now, None if version is None else as_text(version), experiment)
        return self._control[1], self._control[2]

    @staticmethod
    def _raise_if_limited(replies: list[Any], api_key: str | None) -> list[Any]:
        """The replies after the read bucket's first; ReadRateLimited when it took no token."""
        allowed, wait = replies[0]
        if int(allowed) == 0:
            raise ReadRateLimited(str(api_key), float(wait))
        return replies[1:]

    async def published(self, version: str, kind: str, keys: Sequence[str]) -> list[PublishedList | None]:
        names = [self.keys.data(version, kind, key) for key in keys]
        values = await self.timed(mget_across_slots(self.redis, names)) if names else []
        return [decode_scored_list(value) if value else None for value in values]

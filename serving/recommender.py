"""Which source answers a visitor, the request-time rules, and the fallbacks (seed 000, report 4.1-4.6).

Routes, in order:

- ``browsing_now``: products viewed now (given, or viewed in the current session) -> the precomputed
  similar lists of those products summed by score (Gorse's session recommender), or the Triton
  ``similar_products`` ensemble for a product without a list (its answer cached in Redis with a TTL);
- ``precomputed``: a known customer's nightly list from Redis;
- ``online`` / ``online_cached``: a customer the models know but without a nightly list (evicted,
  deleted) -> the Triton ``recommend`` ensemble, whose answer is cached in Redis with a TTL under the
  published version;
- ``generic``: a new visitor -> the list of their (location, device) segment, or of all segments.

Who is a new visitor comes with the list's read: the published version's known-users bitmap
(tasks/publish_recommendations.py) answers in the same round trip, and for a new visitor that round trip
also reads the segment's lists, so a new visitor costs one Redis round trip, as a precomputed hit, and no
Triton call. A version published without one (sparse ids) leaves Triton to say it, once per visitor and TTL.

Then the rules of the moment: products the customer interacted with since the nightly run (the spec's
`exclude_seen`; their set comes with the list's read, serving/seen_items.py) and products that became
unavailable since the nightly run are dropped, the promotion rule (report 4.4.7: a promoted product scoring
at least the threshold gets 1.0) and softmax sampling with temperature (``softmax(score / T)``; T = 0 is
the ranked order), with the same ``order`` function that batch scoring and Triton use. Every call to Redis,
Triton and the database has a timeout; when one fails, the answer comes from what the process still has
(its copy of recent answers or of the generic lists) and says so in ``degraded``, instead of failing the
request.

A visitor's list and the version pointer it hangs under are read in one round trip (a Lua script), and the
ranked order (temperature 0) is taken in plain Python: a precomputed hit's CPU went from 0.7 to 0.46 ms
(benchmarks/serving.py, both measured in the same conditions).

The products' availability and promotion flags are kept in process for ``product_flags_ttl_s`` (a few
seconds): a precomputed hit then reads no database, which was most of its cost (benchmarks/serving.py).
This process's own product writes forget the product at once; another worker's show within the TTL.
With the database down, flags still in the cache are used, other products keep the nightly run's view
(available, not promoted), and the answer says ``database_unavailable``.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from redis.exceptions import RedisError

from models.online_pipeline import order, ranked_order
from recsys.recommendation_store import (
    ALL_SEGMENTS,
    REDIS_MAX_BITS,
    RecommendationKeys,
    decode_recommendations,
    encode_recommendations,
    segment_key,
)
from serving.live_features import LiveFeatures
from serving.seen_items import seen_key
from serving.token_bucket import TOKEN_BUCKET_STEP, read_bucket_key

log = logging.getLogger(__name__)

# Redis down, unreachable or too slow: asyncio.timeout raises TimeoutError, sockets OSError.
REDIS_FAILURES = (RedisError, TimeoutError, OSError)

# The version pointer and the lists of `kind` under it, in one round trip (and read atomically): KEYS[2] is
# the customer's set of items seen since the nightly run (serving/seen_items.py), KEYS[3] the API key's read
# bucket; ARGV[1] is "<prefix>recs:", ARGV[2] a user id to look up in the version's known users when the first
# list is missing ("" for none; -1 for an id no bitmap can hold), ARGV[3] and ARGV[4] the bucket's tokens a
# second and size ("" for no limit), ARGV[5] how many "<kind>:<key>" names follow that are always
# read; the names after those are read only for a user the bitmap says the models do not know (a new
# visitor's segment lists, so that the generic route costs no second round trip). Replies {0, seconds to
# wait} when the key is over its read rate (serving/api/rate_limit.py's bucket, taken here so that a read
# costs no second round trip), {} without a version, else {version, seen items, list or nil, ...} and, when
# asked, 2 for a user whose features the gateway wrote since the nightly run (the version's `live_users` bitmap,
# serving/live_features.py: the online path answers them), else, when the first list is missing, the user's bit
# (1 known, 0 not, -1 the version has no bitmap) followed, for 0, by the lists read for an unknown user.
# It reads keys it derives (not passed in KEYS): fine on one Redis server, not on Redis Cluster.
_CURRENT_AND_LISTS = """
if ARGV[3] ~= '' then
  local bucket, rate, burst = KEYS[3], tonumber(ARGV[3]), tonumber(ARGV[4])
  local allowed, wait
""" + TOKEN_BUCKET_STEP + """
  if allowed == 0 then return {0, tostring(wait)} end
end
local version = redis.call('GET', KEYS[1])
if not version then return {} end
local namespace = ARGV[1] .. version .. ':'
local reply = {version, redis.call('SMEMBERS', KEYS[2])}
local function read(first, last)
  if last < first then return end
  local names = {}
  for i = first, last do names[#names + 1] = namespace .. ARGV[i] end
  local values = redis.call('MGET', unpack(names))
  for i = 1, #names do reply[#reply + 1] = values[i] end
end
local always = 5 + tonumber(ARGV[5])
read(6, always)
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


PublishedList = tuple[list[int], list[float]]  # item ids and scores, best first
Inputs = dict[str, np.ndarray]  # tensors of the recommend ensemble by name


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


UNKNOWN_TO_THE_MODELS = b""  # the online cache's value for a customer the models do not know (no list is empty)


@dataclasses.dataclass(frozen=True)
class VisitorQuery:
    customer_id: int
    context: dict[str, str]  # e.g. {"location": "DE", "device": "mobile"}
    viewed: tuple[int, ...] = ()
    count: int = 20
    temperature: float = 0.0
    seed: int | None = None
    api_key: str | None = None  # the caller's key name: its reads are rate-limited (None: not limited)


class ReadRateLimited(Exception):
    """The API key is over its read rate; `wait_s` until a read is allowed again."""

    def __init__(self, api_key: str, wait_s: float) -> None:
        super().__init__(f"read rate limit of API key {api_key!r} exceeded")
        self.api_key = api_key
        self.wait_s = wait_s


@dataclasses.dataclass
class RankedList:
    items: list[int]
    scores: list[float]
    route: str
    model_version: str | None
    degraded: list[str] = dataclasses.field(default_factory=list)
    seen: frozenset[int] = frozenset()  # the customer's items seen since the nightly run: never shown


@dataclasses.dataclass(frozen=True)
class ProductFlags:
    available: bool
    promoted: bool


NIGHTLY_VIEW = ProductFlags(available=True, promoted=False)


@dataclasses.dataclass(frozen=True)
class RecommenderConfig:
    key_prefix: str = "recsys:"
    segment_features: tuple[str, ...] = ("location", "device")
    redis_timeout_s: float = 0.05
    triton_timeout_s: float = 0.25
    online_cache_ttl_s: int = 600
    online_top_k: int = 500
    promotion_threshold: float = 0.5
    database_timeout_s: float = 0.2
    product_flags_ttl_s: float = 5.0
    product_flags_cached: int = 1_000_000  # about 100 MB at most
    local_copies: int = 10_000  # recent answers kept in process for when Redis is down
    # Reads an API key may make, taken from a bucket in the same round trip as the list (None: no limit).
    read_rate_per_s: float | None = None
    read_burst: int = 1


class ProductFlagsCache:
    """Products' flags (None: a product the database does not know) for at most `ttl_s`.

    Two generations of plain dicts: every `ttl_s` (or when it holds `max_entries`) the current one becomes
    the previous one and a new one starts, so an entry is current for at most `ttl_s`, and the previous
    generation answers only while the database cannot. A lookup is one dict operation: cachetools' TTLCache
    cost about 3 us an item, a third of a millisecond for a 100-item list, most of a precomputed hit's CPU
    (benchmarks/serving.py)."""

    def __init__(self, ttl_s: float, max_entries: int) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.current: dict[int, ProductFlags | None] = {}
        self.previous: dict[int, ProductFlags | None] = {}
        self._rotate_at = time.monotonic() + ttl_s

    def rotate_if_due(self) -> None:
        now = time.monotonic()
        if now >= self._rotate_at or len(self.current) >= self.max_entries:
            self.previous, self.current = self.current, {}
            self._rotate_at = now + self.ttl_s

    def forget(self, product_id: int) -> None:
        self.current.pop(product_id, None)
        self.previous.pop(product_id, None)

    def last_known(self, items: Sequence[int]) -> dict[int, ProductFlags]:
        """Flags of the products known to the database, from the previous generation where the current one
        lacks them: only while the database cannot be read."""
        current, previous = self.current, self.previous
        found = {item: flags for item in items if (flags := current.get(item)) is not None}
        for item in items:
            if item not in current and (flags := previous.get(item)) is not None:
                found[item] = flags
        return found


class Recommender:
    """Answers visitors from Redis and Triton; `product_flags` reads availability and promotion now."""

    def __init__(self, redis_client: Any, triton: Any | None, config: RecommenderConfig,
                 product_flags: Callable[[Sequence[int]], Awaitable[dict[int, ProductFlags]]],
                 live: LiveFeatures | None = None) -> None:  # fmt: skip
        self.redis = redis_client
        self.triton = triton
        self.live = live  # Feast on the online path (None: Triton looks customers up in its run's table)
        self.keys = RecommendationKeys(config.key_prefix)
        self.config = config
        self.product_flags = product_flags
        self._flags = ProductFlagsCache(config.product_flags_ttl_s, config.product_flags_cached)
        self._changed: set[int] = set()  # products written since, by any thread of this process
        self._recent: collections.OrderedDict[tuple[str, str], RankedList] = collections.OrderedDict()
        self._current_and_lists = redis_client.register_script(_CURRENT_AND_LISTS)

    async def close(self) -> None:
        await self.redis.aclose()
        if self.triton is not None:
            await self.triton.close()

    # -- Redis, with a timeout and an in-process copy ----------------------------------------------------

    async def _redis(self, call: Awaitable[Any]) -> Any:
        # asyncio.timeout rather than wait_for: no task created per call, on the path of every request.
        async with asyncio.timeout(self.config.redis_timeout_s):
            return await call

    async def _current(self, kind: str, keys: Sequence[str], customer: int, *, ask_known: bool = False,
                       segments_if_unknown: Sequence[str] = (), api_key: str | None = None
                       ) -> CurrentLists:  # fmt: skip
        """The current version, the lists of `kind` for `keys` under it and the customer's items seen since
        the nightly run; with `ask_known`, when the first list is missing, whether the models know the customer,
        and if not the lists of `segments_if_unknown`: all in one round trip, which also takes a token of
        `api_key`'s read bucket (ReadRateLimited when there is none)."""
        prefix = f"{self.config.key_prefix}recs:"
        member = "" if not ask_known else str(customer if 0 <= customer < REDIS_MAX_BITS else -1)
        limited = api_key is not None and self.config.read_rate_per_s is not None
        rate = [str(self.config.read_rate_per_s), str(self.config.read_burst)] if limited else ["", ""]
        names = [prefix, member, *rate, str(len(keys)), *(f"{kind}:{key}" for key in keys),
                 *(f"segment:{key}" for key in segments_if_unknown)]  # fmt: skip
        bucket = read_bucket_key(self.config.key_prefix, api_key) if limited and api_key else ""
        script_keys = [f"{prefix}current", seen_key(self.config.key_prefix, customer), bucket]
        reply = await self._redis(self._current_and_lists(keys=script_keys, args=names, client=self.redis))
        if reply and reply[0] == 0:  # integers only here: a version is a string
            raise ReadRateLimited(str(api_key), float(reply[1]))
        if not reply:
            return CurrentLists(None, [None] * len(keys), frozenset(), None, [])
        seen = frozenset(int(item) for item in reply[1])
        lists = reply[2:]
        decoded = [decode_recommendations(value) if value else None for value in lists[: len(keys)]]
        marker = lists[len(keys)] if len(lists) > len(keys) else None
        known = {1: True, 0: False}.get(marker)  # type: ignore[arg-type]  # 2 (live): the bit was not read
        segments = [decode_recommendations(value) if value else None for value in lists[len(keys) + 1 :]]
        return CurrentLists(reply[0].decode(), decoded, seen, known, segments, live=marker == 2)

    async def _published(self, version: str, kind: str, keys: Sequence[str]) -> list[PublishedList | None]:
        names = [f"{self.config.key_prefix}recs:{version}:{kind}:{key}" for key in keys]
        values = await self._redis(self.redis.mget(names)) if names else []
        return [decode_recommendations(value) if value else None for value in values]

    def _remember(self, kind: str, key: str, answer: RankedList) -> None:
        # A copy: `recommend` goes on to cut and reorder the answer it returns.
        self._recent[(kind, key)] = dataclasses.replace(answer, degraded=list(answer.degraded))
        self._recent.move_to_end((kind, key))
        while len(self._recent) > self.config.local_copies:
            self._recent.popitem(last=False)

    def _local_copy(self, kind: str, key: str) -> RankedList | None:
        copy = self._recent.get((kind, key))
        return dataclasses.replace(copy, degraded=list(copy.degraded)) if copy else None

    # -- the routes ----------------------------------------------------------------------------------

    async def candidates(self, query: VisitorQuery) -> RankedList:
        """The list a visitor gets before the rules of the moment (with the items to keep out of it)."""
        try:
            return await self._candidates(query)
        except REDIS_FAILURES as error:
            return self._without_redis(query, error)

    async def _candidates(self, query: VisitorQuery) -> RankedList:
        if query.viewed:
            version, similar, seen, *_ = await self._current("similar", [str(item) for item in query.viewed],
                                                               query.customer_id, api_key=query.api_key)  # fmt: skip
            return dataclasses.replace(await self._browsing_now(query, version, similar), seen=seen)
        segments = self._segments(query)
        current = await self._current("user", [str(query.customer_id)], query.customer_id, ask_known=True,
                                      segments_if_unknown=segments, api_key=query.api_key)  # fmt: skip
        if current.live:  # features written since the nightly run: the user tower on them, not last night's list
            answer = await self._online(query, current.version)
            if answer is None:  # the models do not know them after all: last night's list, else the generic one
                precomputed = current.lists[0]
                answer = (RankedList(*precomputed, route="precomputed", model_version=current.version)
                          if precomputed is not None else await self._generic(query, current.version))  # fmt: skip
        else:
            answer = await self._answer(query, current.version, current.lists[0], current.known, segments,
                                        current.segments)  # fmt: skip
        return dataclasses.replace(answer, seen=current.seen)

    async def _answer(self, query: VisitorQuery, version: str | None, precomputed: PublishedList | None,
                      known: bool | None, segments: list[str], generic: list[PublishedList | None]
                      ) -> RankedList:  # fmt: skip
        if precomputed is not None:
            answer = RankedList(*precomputed, route="precomputed", model_version=version)
            self._remember("user", str(query.customer_id), answer)
            return answer
        if known is False:  # a new visitor: their segment's lists came with the read
            return self._first_generic(version, segments, generic, degraded=[])
        online = await self._online(query, version)  # known without a list, or a version that cannot say
        if online is not None:
            return online
        return await self._generic(query, version)

    def _without_redis(self, query: VisitorQuery, error: Exception) -> RankedList:
        log.warning("Redis unavailable (%s): answering from the process's copies", type(error).__name__)
        for kind, key in (("user", str(query.customer_id)), *(("segment", key) for key in self._segments(query))):
            copy = self._local_copy(kind, key)
            if copy is not None:
                copy.degraded.append("redis_unavailable")
                copy.route = f"{copy.route}_local_copy"
                return copy
        return RankedList([], [], route="none", model_version=None, degraded=["redis_unavailable"])

    def _segments(self, query: VisitorQuery) -> list[str]:
        """The keys batch_score published generic lists under, the visitor's segment first, then all segments."""
        values = [query.context.get(name) for name in self.config.segment_features]
        if not values or any(value is None or value == "" for value in values):
            return [ALL_SEGMENTS]
        return [segment_key(values), ALL_SEGMENTS]

    async def _generic(self, query: VisitorQuery, version: str | None, degraded: list[str] | None = None) -> RankedList:
        keys = self._segments(query)
        found = await self._published(version, "segment", keys) if version is not None else [None] * len(keys)
        return self._first_generic(version, keys, found, degraded=list(degraded or []))

    def _first_generic(self, version: str | None, keys: Sequence[str], found: Sequence[PublishedList | None],
                       degraded: list[str]) -> RankedList:  # fmt: skip
        """The first of the segment lists `found` for `keys` (the visitor's segment, then all segments)."""
        for key, lists in zip(keys, found, strict=True):
            if lists is not None:
                answer = RankedList(*lists, route="generic", model_version=version, degraded=degraded)
                self._remember("segment", key, answer)
                return answer
        return RankedList([], [], route="none", model_version=version, degraded=degraded)

    async def _online(self, query: VisitorQuery, version: str | None) -> RankedList | None:
        """The Triton ensemble's answer for a customer without a nightly list (cached), or None if unknown.

        That the models do not know a customer is cached too (an empty value, same TTL): where the version
        has no known-users bitmap, a new visitor's next requests then cost the one cache read instead of a
        Triton call each."""
        cache_key = self.keys.online_cache(str(version), "user", query.customer_id)
        cached = await self._redis(self.redis.get(cache_key))
        if cached == UNKNOWN_TO_THE_MODELS:
            return None
        if cached:
            items, scores = decode_recommendations(cached)
            return RankedList(items, scores, route="online_cached", model_version=version)
        if self.triton is None:
            return None
        features, context, degraded = await self._live_inputs(query, version)
        if self.live is not None and features is None and not degraded:  # Feast has no row: a new visitor
            await self._redis(self.redis.set(cache_key, UNKNOWN_TO_THE_MODELS, ex=self.config.online_cache_ttl_s))
            return None
        try:
            call = self.triton.recommend(query.customer_id, top_k=self.config.online_top_k, version=version,
                                         features=features, context=context)  # fmt: skip
            answer = await asyncio.wait_for(call, timeout=self.config.triton_timeout_s)
        except Exception as error:  # any Triton failure falls back; the reason is logged
            log.warning("Triton recommend failed (%s): generic list instead", error)
            return await self._generic(query, version, degraded=[*degraded, "triton_unavailable"])
        if answer is None:  # a customer the models do not know: a new visitor
            if not degraded:
                await self._redis(self.redis.set(cache_key, UNKNOWN_TO_THE_MODELS, ex=self.config.online_cache_ttl_s))
            return None
        items, scores = answer
        if not degraded:  # an answer without the customer's current features or context is not kept for the TTL
            await self._redis(self.redis.set(cache_key, encode_recommendations(items, scores),
                                             ex=self.config.online_cache_ttl_s))  # fmt: skip
        return RankedList(items, scores, route="online", model_version=version, degraded=degraded)

    async def _live_inputs(self, query: VisitorQuery, version: str | None
                           ) -> tuple[Inputs | None, Inputs | None, list[str]]:  # fmt: skip
        """The customer's features from Feast and the request's encoded context, for Triton, and what degraded.

        Feast unreachable: Triton looks the customer up in its run's own table (`feature_store_unavailable`);
        the context not encodable (Triton's `encode_features` down): the ranker sees it missing."""
        if self.live is None:
            return None, None, []
        degraded = []
        features = context = None
        try:
            features = await self.live.user_features(query.customer_id)
        except Exception as error:  # any Feast failure: the run's table instead; the reason is logged
            log.warning("Feast online read failed (%s: %s): Triton's own table instead", type(error).__name__, error)
            degraded.append("feature_store_unavailable")
        try:
            async with asyncio.timeout(self.config.triton_timeout_s):
                context = await self.live.context_features(version, query.context)
        except Exception as error:
            log.warning("encoding the context failed (%s: %s): ranked without it", type(error).__name__, error)
            degraded.append("context_unavailable")
        return features, context, degraded

    async def _browsing_now(self, query: VisitorQuery, version: str | None,
                            found: list[PublishedList | None]) -> RankedList:  # fmt: skip
        """Similar products of everything viewed now (`found`: their published lists), each candidate scored by
        its summed similarity."""
        degraded: list[str] = []
        missing = [item for item, lists in zip(query.viewed, found, strict=True) if lists is None]
        if missing:
            online, degraded = await self._similar_online(version, missing)
            found = [lists if lists is not None else online.get(item) for item, lists in
                     zip(query.viewed, found, strict=True)]  # fmt: skip
        totals: dict[int, float] = collections.defaultdict(float)
        for lists in found:
            if lists is not None:
                for item, score in zip(*lists, strict=True):
                    totals[item] += score
        for item in query.viewed:  # never recommend what is on the screen already
            totals.pop(item, None)
        if not totals:
            return await self._generic(query, version, degraded=degraded)
        ranked = sorted(totals.items(), key=lambda pair: -pair[1])
        return RankedList([item for item, _ in ranked], [score for _, score in ranked], route="browsing_now",
                          model_version=version, degraded=degraded)  # fmt: skip

    async def _similar_online(self, version: str | None, items: list[int]
                              ) -> tuple[dict[int, PublishedList], list[str]]:  # fmt: skip
        """The Triton ensemble's similar lists of products without a published one, and what degraded.

        Cached as the online user lists are (same TTL), "the models do not know this product" too: a new
        product's page, viewed again and again, costs one cache read instead of a Triton call each time."""
        keys = [self.keys.online_cache(str(version), "similar", item) for item in items]
        found: dict[int, PublishedList] = {}
        ask = []
        for item, key, cached in zip(items, keys, await self._redis(self.redis.mget(keys)), strict=True):
            if cached is None:
                ask.append((item, key))
            elif cached != UNKNOWN_TO_THE_MODELS:
                found[item] = decode_recommendations(cached)
        if not ask or self.triton is None:
            return found, []
        try:
            online = await asyncio.wait_for(self.triton.similar([item for item, _ in ask], version=version),
                                            timeout=self.config.triton_timeout_s)  # fmt: skip
        except Exception as error:  # any Triton failure falls back; the reason is logged
            log.warning("Triton similar_products failed (%s)", error)
            return found, ["triton_unavailable"]
        pipe = self.redis.pipeline(transaction=False)
        for item, key in ask:
            value = encode_recommendations(*online[item]) if item in online else UNKNOWN_TO_THE_MODELS
            pipe.set(key, value, ex=self.config.online_cache_ttl_s)
        await self._redis(pipe.execute())
        return {**found, **online}, []

    # -- the rules of the moment -------------------------------------------------------------------------

    def forget_product(self, product_id: int) -> None:
        """A product was created, changed or deleted: read its flags from the database next time.

        Called from the threads sync routes run in: it only notes the id (set.add is atomic), the event
        loop drops the entry before its next use, so the cache itself is only ever touched by one thread."""
        self._changed.add(product_id)

    async def _product_flags(self, items: Sequence[int]) -> tuple[Mapping[int, ProductFlags | None], bool]:
        """(flags by product, None or absent for one the database does not know; whether they were all
        current) from the cache and the database."""
        cache = self._flags
        cache.rotate_if_due()
        while self._changed:
            cache.forget(self._changed.pop())
        # This generation, even if the cache rotates while the database is read: it then holds every item.
        current = cache.current
        missing = [item for item in items if item not in current]
        if missing:
            try:
                read = await asyncio.wait_for(self.product_flags(missing), timeout=self.config.database_timeout_s)
            except Exception as error:  # any database failure: answer with what the cache has, and say so
                log.warning("product flags unavailable (%s): cached flags only", type(error).__name__)
                return cache.last_known(items), False
            for item in missing:
                current[item] = read.get(item)
        return current, True

    async def recommend(self, query: VisitorQuery) -> tuple[RankedList, list[float], list[bool]]:
        """(final list, sampling probabilities, promoted flags) after availability, promotion and sampling."""
        ranked = await self.candidates(query)
        if ranked.seen:
            kept = [(item, score) for item, score in zip(ranked.items, ranked.scores, strict=True)
                    if item not in ranked.seen]  # fmt: skip
            ranked.items, ranked.scores = [item for item, _ in kept], [score for _, score in kept]
        if not ranked.items:
            return ranked, [], []
        flags, current = await self._product_flags(ranked.items)
        if not current:
            ranked.degraded.append("database_unavailable")
        items: list[int] = []
        scores: list[float] = []
        promoted: list[bool] = []
        for item, score in zip(ranked.items, ranked.scores, strict=True):
            # A product the database does not know keeps the nightly run's view: available, not promoted.
            product = flags.get(item) or NIGHTLY_VIEW
            if product.available:
                items.append(item)
                scores.append(score)
                promoted.append(product.promoted)
        if not items:  # every listed product became unavailable
            ranked.items, ranked.scores = [], []
            return ranked, [], []
        top_n = min(query.count, len(items))
        threshold = self.config.promotion_threshold
        if query.temperature > 0:
            positions = np.arange(len(items), dtype=np.int64)[None, :]  # order() works on ids: use positions
            chosen, chosen_scores, chosen_probabilities = order(
                positions, np.array(scores, dtype=np.float32)[None, :], top_n, temperature=query.temperature,
                rng=np.random.default_rng(query.seed), promoted=np.array(promoted, dtype=bool),
                promotion_threshold=threshold,
            )  # fmt: skip
            picked = chosen[0][chosen[0] >= 0].tolist()
            final_scores = chosen_scores[0][: len(picked)].tolist()
            probabilities = chosen_probabilities[0][: len(picked)].tolist()
        else:  # the ranked order: order()'s temperature-0 case for one list, without numpy's per-call costs
            picked, final_scores = ranked_order(scores, promoted, top_n, promotion_threshold=threshold)
            probabilities = [1.0] + [0.0] * (len(picked) - 1) if picked else []
        ranked.items = [items[index] for index in picked]
        ranked.scores = final_scores
        return ranked, probabilities, [promoted[index] for index in picked]

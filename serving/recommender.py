"""Which source answers a visitor, the request-time rules, and the fallbacks (seed 000, report 4.1-4.6).

Routes, in order:

- ``browsing_now``: products viewed now (given, or viewed in the current session) -> the precomputed
  similar lists of those products summed by score (Gorse's session recommender), or the Triton
  ``similar_products`` ensemble for a product without a list (its answer cached in Redis with a TTL);
- ``precomputed``: a known customer's nightly list from Redis;
- ``online`` / ``online_cached``: a customer the models know but without a nightly list (evicted,
  deleted) -> the Triton ``recommend`` ensemble, whose answer is cached in Redis with a TTL under the
  published version, per request context;
- ``generic``: a new visitor -> the list of their (location, device) segment, or of all segments.

Who is a new visitor comes with the list's read: the published version's known-users bitmap
(tasks/publish_recommendations.py) answers in the same round trip, and for a new visitor that round trip
also reads the segment's lists, so a new visitor costs one Redis round trip, as a precomputed hit, and no
Triton call. A version published without one (sparse ids) leaves Triton to say it, once per visitor and TTL.

Then the rules of the moment: products the customer interacted with since the nightly run (the spec's
`exclude_seen`; their set comes with the list's read, serving/seen_items.py) and products that became
unavailable since the nightly run are dropped, the promotion rule (report 4.4.7: a promoted product whose
P(click), the ranker's probability the list keeps next to its order score, is at least the threshold gets
order score 1.0, the top) and softmax sampling with temperature (``softmax(score / T)``; T = 0 is
the ranked order), with the same ``order`` function that batch scoring and Triton use. Every call to Redis,
Triton and the database has a timeout; when one fails, the answer comes from what the process still has
(its copy of recent answers or of the generic lists) and says so in ``degraded``, instead of failing the
request.

A visitor's list and the version pointer it hangs under are read in one round trip (a Lua script,
serving/list_reader.py), and the
ranked order (temperature 0) is taken in plain Python: a precomputed hit's CPU went from 0.7 to 0.46 ms
(benchmarks/serving.py, both measured in the same conditions).

The products' availability and promotion flags are kept in process (serving/product_flags.py) for
``product_flags_ttl_s`` (a few seconds): a precomputed hit then reads no database, which was most of its cost
(benchmarks/serving.py).
This process's own product writes forget the product at once; another worker's show within the TTL.
With the database down, flags still in the cache are used, other products keep the nightly run's view
(available, not promoted), and the answer says ``database_unavailable``.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import numpy as np

from models.online_pipeline import order, promoted_scores, ranked_order
from recsys.list_defaults import TOP_K
from recsys.recommendation_store import (
    ALL_SEGMENTS,
    RecommendationKeys,
    decode_scored_list,
    encode_recommendations,
    segment_key,
)
from recsys.redis_connection import mget_across_slots
from serving.list_reader import REDIS_FAILURES, ListReader, PublishedList
from serving.live_features import LiveFeatures
from serving.product_flags import NIGHTLY_VIEW, ProductFlags, ProductFlagsCache

log = logging.getLogger(__name__)

Inputs = dict[str, np.ndarray]  # tensors of the recommend ensemble by name


UNKNOWN_TO_THE_MODELS = b""  # the online cache's value for a customer the models do not know (no list is empty)
UNKNOWN_FIELD = "?"  # its field in the customer's hash of online answers (a context field never starts with "?")

ContextValue = str | int | float


def context_field(context: Mapping[str, ContextValue]) -> str:
    """The field of a request context in a customer's hash of cached online answers: `name=value` pairs sorted
    by name and joined by `&` ("" without context), e.g. `device=mobile&location=DE&position=1`."""
    return "&".join(f"{name}={context[name]}" for name in sorted(context))


@dataclasses.dataclass(frozen=True)
class VisitorQuery:
    customer_id: int
    context: dict[str, ContextValue]  # the spec's context features given, e.g. {"location": "DE", "position": 1}
    viewed: tuple[int, ...] = ()
    count: int = 20
    temperature: float = 0.0
    seed: int | None = None
    api_key: str | None = None  # the caller's key name: its reads are rate-limited (None: not limited)


@dataclasses.dataclass
class RankedList:
    items: list[int]
    scores: list[float]  # order scores
    click_probabilities: list[float]  # each item's P(click), the promotion rule's number (NaN: none known)
    route: str
    model_version: str | None
    degraded: list[str] = dataclasses.field(default_factory=list)
    seen: frozenset[int] = frozenset()  # the customer's items seen since the nightly run: never shown
    experiment: str | None = None  # the running A/B experiment and the customer's bucket (recsys/experiments.py)
    bucket: str | None = None
    # A sampled list's candidates' order scores (the promotion rule applied), in the order sampled from, and where
    # the first item shown is among them: what an off-policy estimate of another temperature needs (logged when
    # `RecommenderConfig.log_candidate_scores`).
    candidate_scores: list[float] | None = None
    top_candidate: int | None = None


def _copy_of(answer: RankedList) -> RankedList:
    """A nightly or generic answer as the process keeps it (no seen items, experiment or sampling yet)."""
    return RankedList(answer.items, answer.scores, answer.click_probabilities, answer.route, answer.model_version,
                      list(answer.degraded))  # fmt: skip


@dataclasses.dataclass(frozen=True)
class RecommenderConfig:
    key_prefix: str = "recsys:"
    segment_features: tuple[str, ...] = ("location", "device")
    redis_timeout_s: float = 0.05
    triton_timeout_s: float = 0.25
    online_cache_ttl_s: int = 600
    online_top_k: int = TOP_K
    promotion_threshold: float = 0.5
    database_timeout_s: float = 0.2
    product_flags_ttl_s: float = 5.0
    product_flags_cached: int = 1_000_000  # about 100 MB at most
    local_copies: int = 10_000  # recent answers kept in process for when Redis is down
    # How long such a copy may answer: no answer outlives the online cache's TTL anywhere, so a customer forgotten
    # through another worker (serving/forget.py) is gone from this one's copies within it too.
    local_copy_ttl_s: float = 600.0
    log_candidate_scores: bool = False  # keep a sampled list's candidate scores for the impression log
    # Reads an API key may make, taken from a bucket in the same round trip as the list (None: no limit).
    read_rate_per_s: float | None = None
    read_burst: int = 1


class Recommender:
    """Answers visitors from Redis and Triton; `product_flags` reads availability and promotion now."""

    def __init__(self, redis_client: Any, triton: Any | None, config: RecommenderConfig,
                 product_flags: Callable[[Sequence[int]], Awaitable[dict[int, ProductFlags]]],
                 live: LiveFeatures | None = None) -> None:  # fmt: skip
        self.triton = triton
        self.live = live  # Feast on the online path (None: Triton looks customers up in its run's table)
        self.keys = RecommendationKeys(config.key_prefix)
        self.config = config
        self.product_flags = product_flags
        self._flags = ProductFlagsCache(config.product_flags_ttl_s, config.product_flags_cached)
        self._changed: set[int] = set()  # products written since, by any thread of this process
        # (kind, key) -> (answer, when it was kept), least recently kept first
        self._recent: collections.OrderedDict[tuple[str, str], tuple[RankedList, float]] = collections.OrderedDict()
        self.reader = ListReader(redis_client, config.key_prefix, config.redis_timeout_s, config.read_rate_per_s,
                                 config.read_burst)  # fmt: skip

    @property
    def redis(self) -> Any:
        """The one Redis client, the list reader's: the routes' other calls (online caches) go through it too."""
        return self.reader.redis

    @redis.setter
    def redis(self, client: Any) -> None:
        self.reader.redis = client

    async def close(self) -> None:
        await self.redis.aclose()
        if self.triton is not None:
            await self.triton.close()

    # -- Redis, with a timeout and an in-process copy ----------------------------------------------------

    async def _redis(self, call: Awaitable[Any]) -> Any:
        return await self.reader.timed(call)

    def _remember(self, kind: str, key: str, answer: RankedList) -> None:
        # A copy: `recommend` goes on to cut and reorder the answer it returns (it replaces the lists, but appends to
        # `degraded`). Built directly: dataclasses.replace costs 4 us, on every precomputed hit.
        self._recent[(kind, key)] = (_copy_of(answer), time.monotonic())
        self._recent.move_to_end((kind, key))
        while len(self._recent) > self.config.local_copies:
            self._recent.popitem(last=False)

    def _local_copy(self, kind: str, key: str) -> RankedList | None:
        kept = self._recent.get((kind, key))
        if kept is None or time.monotonic() - kept[1] > self.config.local_copy_ttl_s:
            return None
        return _copy_of(kept[0])

    # -- the routes ----------------------------------------------------------------------------------

    async def candidates(self, query: VisitorQuery) -> RankedList:
        """The list a visitor gets before the rules of the moment (with the items to keep out of it)."""
        try:
            return await self._candidates(query)
        except REDIS_FAILURES as error:
            return self._without_redis(query, error)

    async def _candidates(self, query: VisitorQuery) -> RankedList:
        if query.viewed:
            read = await self.reader.current("similar", [str(item) for item in query.viewed], query.customer_id,
                                             api_key=query.api_key)  # fmt: skip
            browsing = await self._browsing_now(query, read.version, read.lists)
            browsing.seen, browsing.experiment, browsing.bucket = read.seen, read.experiment, read.bucket
            return browsing
        segments = self._segments(query)
        current = await self.reader.current("user", [str(query.customer_id)], query.customer_id, ask_known=True,
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
        # Every route's answer is a list of its own (the process's copies are copies): set, not replaced.
        answer.seen, answer.experiment, answer.bucket = current.seen, current.experiment, current.bucket
        return answer

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
        return RankedList([], [], [], route="none", model_version=None, degraded=["redis_unavailable"])

    def _segments(self, query: VisitorQuery) -> list[str]:
        """The keys batch_score published generic lists under, the visitor's segment first, then all segments."""
        values = [query.context.get(name) for name in self.config.segment_features]
        if not values or any(value is None or value == "" for value in values):
            return [ALL_SEGMENTS]
        return [segment_key(values), ALL_SEGMENTS]

    async def _generic(self, query: VisitorQuery, version: str | None, degraded: list[str] | None = None) -> RankedList:
        keys = self._segments(query)
        found = await self.reader.published(version, "segment", keys) if version is not None else [None] * len(keys)
        return self._first_generic(version, keys, found, degraded=list(degraded or []))

    def _first_generic(self, version: str | None, keys: Sequence[str], found: Sequence[PublishedList | None],
                       degraded: list[str]) -> RankedList:  # fmt: skip
        """The first of the segment lists `found` for `keys` (the visitor's segment, then all segments)."""
        for key, lists in zip(keys, found, strict=True):
            if lists is not None:
                answer = RankedList(*lists, route="generic", model_version=version, degraded=degraded)
                self._remember("segment", key, answer)
                return answer
        return RankedList([], [], [], route="none", model_version=version, degraded=degraded)

    async def _online(self, query: VisitorQuery, version: str | None) -> RankedList | None:
        """The Triton ensemble's answer for a customer without a nightly list (cached), or None if unknown.

        Answers are cached per customer and request context (`context_field`; the ranker sees the context), in
        one hash per customer and version, so a write-through deletes them all at once. That the models do not
        know a customer is cached too, in the same hash (`UNKNOWN_FIELD`, whatever the context): where the
        version has no known-users bitmap, a new visitor's next requests then cost the one cache read instead
        of a Triton call each. The hash's TTL runs from its first answer."""
        cache_key = self.keys.online_answers(str(version), query.customer_id)
        field = context_field(query.context)
        cached, unknown = await self._redis(self.redis.hmget(cache_key, [field, UNKNOWN_FIELD]))
        if unknown is not None:
            return None
        if cached:
            return RankedList(*decode_scored_list(cached), route="online_cached", model_version=version)
        if self.triton is None:
            return None
        features, context, fresh, degraded = await self._live_inputs(query, version)
        if self.live is not None and features is None and not degraded:  # Feast has no row: a new visitor
            await self._cache_online(cache_key, UNKNOWN_FIELD, UNKNOWN_TO_THE_MODELS)
            return None
        try:
            call = self.triton.recommend(query.customer_id, top_k=self.config.online_top_k, version=version,
                                         features=features, context=context, fresh=fresh)  # fmt: skip
            answer = await asyncio.wait_for(call, timeout=self.config.triton_timeout_s)
        except Exception as error:  # any Triton failure falls back; the reason is logged
            log.warning("Triton recommend failed (%s): generic list instead", error)
            return await self._generic(query, version, degraded=[*degraded, "triton_unavailable"])
        if answer is None:  # a customer the models do not know: a new visitor
            if not degraded:
                await self._cache_online(cache_key, UNKNOWN_FIELD, UNKNOWN_TO_THE_MODELS)
            return None
        items, scores, clicks = answer
        if not degraded:  # an answer without the customer's current features or context is not kept for the TTL
            await self._cache_online(cache_key, field, encode_recommendations(items, scores, clicks))
        return RankedList(items, scores, clicks, route="online", model_version=version, degraded=degraded)

    async def _cache_online(self, key: str, field: str, value: bytes) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(key, field, value)
        pipe.expire(key, self.config.online_cache_ttl_s, nx=True)  # the first answer starts the TTL
        await self._redis(pipe.execute())

    async def _live_inputs(self, query: VisitorQuery, version: str | None
                           ) -> tuple[Inputs | None, Inputs | None, Inputs | None, list[str]]:  # fmt: skip
        """The customer's features from Feast, the request's encoded context and the products added since the run,
        for Triton, and what degraded.

        Feast unreachable: Triton looks the customer up in its run's own table (`feature_store_unavailable`);
        the context not encodable (Triton's `encode_features` down): the ranker sees it missing; the added products
        not readable: the run's catalog alone (`fresh_products_unavailable`)."""
        if self.live is None:
            return None, None, None, []
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
        fresh, unread = await self._fresh_products(version)
        return features, context, fresh, [*degraded, *unread]

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
                for item, score in zip(lists[0], lists[1], strict=True):
                    totals[item] += score
        for item in query.viewed:  # never recommend what is on the screen already
            totals.pop(item, None)
        if not totals:
            return await self._generic(query, version, degraded=degraded)
        ranked = sorted(totals.items(), key=lambda pair: -pair[1])
        # Similar products carry no P(click): the promotion rule does not apply to them (NaN).
        return RankedList([item for item, _ in ranked], [score for _, score in ranked], [math.nan] * len(ranked),
                          route="browsing_now", model_version=version, degraded=degraded)  # fmt: skip

    async def _similar_online(self, version: str | None, items: list[int]
                              ) -> tuple[dict[int, PublishedList], list[str]]:  # fmt: skip
        """The Triton ensemble's similar lists of products without a published one, and what degraded.

        Cached as the online user lists are (same TTL), "the models do not know this product" too: a new
        product's page, viewed again and again, costs one cache read instead of a Triton call each time."""
        keys = [self.keys.online_cache(str(version), "similar", item) for item in items]
        found: dict[int, PublishedList] = {}
        ask = []
        for item, key, cached in zip(items, keys, await self._redis(mget_across_slots(self.redis, keys)), strict=True):
            if cached is None:
                ask.append((item, key))
            elif cached != UNKNOWN_TO_THE_MODELS:
                found[item] = decode_scored_list(cached)
        if not ask or self.triton is None:
            return found, []
        asked = [item for item, _ in ask]
        fresh, degraded = await self._fresh_products_among(version, asked)
        try:
            answered = await asyncio.wait_for(self.triton.similar(asked, version=version, fresh=fresh),
                                              timeout=self.config.triton_timeout_s)  # fmt: skip
        except Exception as error:  # any Triton failure falls back; the reason is logged
            log.warning("Triton similar_products failed (%s)", error)
            return found, [*degraded, "triton_unavailable"]
        # Similar products carry no P(click) (NaN): the promotion rule does not apply to them.
        online = {item: (items, scores, [math.nan] * len(items)) for item, (items, scores) in answered.items()}
        if degraded:  # not cached: an added product's answer would be "unknown" for the TTL
            return {**found, **online}, degraded
        pipe = self.redis.pipeline(transaction=False)
        for item, key in ask:
            value = encode_recommendations(*online[item]) if item in online else UNKNOWN_TO_THE_MODELS
            pipe.set(key, value, ex=self.config.online_cache_ttl_s)
        await self._redis(pipe.execute())
        return {**found, **online}, []

    async def _fresh_products_among(self, version: str | None, items: Sequence[int]
                                    ) -> tuple[Inputs | None, list[str]]:  # fmt: skip
        """The `fresh_item_*` rows of those of `items` added since the run (None: none is), and what degraded."""
        tensors, degraded = await self._fresh_products(version)
        if tensors is None:
            return None, degraded
        rows = np.isin(tensors["fresh_item_ids"], np.asarray(items, dtype=np.int64))
        return ({name: value[rows] for name, value in tensors.items()} if rows.any() else None), degraded

    async def _fresh_products(self, version: str | None) -> tuple[Inputs | None, list[str]]:
        """The version's products added since the run as `fresh_item_*` tensors (None: none), and what degraded:
        unreadable, the run's catalog alone (`fresh_products_unavailable`)."""
        if self.live is None:
            return None, []
        try:
            return await self._redis(self.live.products.tensors(version)), []
        except Exception as error:
            log.warning("reading the products added since the run failed (%s: %s): the run's catalog alone",
                        type(error).__name__, error)  # fmt: skip
            return None, ["fresh_products_unavailable"]

    # -- the rules of the moment -------------------------------------------------------------------------

    def forget_customer(self, customer_id: int) -> None:
        """A customer forgotten on request: this process's copies of their answers go (serving/forget.py)."""
        self._recent.pop(("user", str(customer_id)), None)

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
            kept = [index for index, item in enumerate(ranked.items) if item not in ranked.seen]
            ranked.items = [ranked.items[index] for index in kept]
            ranked.scores = [ranked.scores[index] for index in kept]
            ranked.click_probabilities = [ranked.click_probabilities[index] for index in kept]
        if not ranked.items:
            return ranked, [], []
        flags, current = await self._product_flags(ranked.items)
        if not current:
            ranked.degraded.append("database_unavailable")
        items: list[int] = []
        scores: list[float] = []
        clicks: list[float] = []
        promoted: list[bool] = []
        for item, score, click in zip(ranked.items, ranked.scores, ranked.click_probabilities, strict=True):
            # A product the database does not know keeps the nightly run's view: available, not promoted.
            product = flags.get(item) or NIGHTLY_VIEW
            if product.available:
                items.append(item)
                scores.append(score)
                clicks.append(click)
                promoted.append(product.promoted)
        if not items:  # every listed product became unavailable
            ranked.items, ranked.scores, ranked.click_probabilities = [], [], []
            return ranked, [], []
        top_n = min(query.count, len(items))
        threshold = self.config.promotion_threshold
        if query.temperature > 0:
            positions = np.arange(len(items), dtype=np.int64)[None, :]  # order() works on ids: use positions
            chosen, chosen_scores, chosen_probabilities, _ = order(
                positions, np.array(scores, dtype=np.float32)[None, :], top_n, temperature=query.temperature,
                rng=np.random.default_rng(query.seed), promoted=np.array(promoted, dtype=bool),
                promotion_threshold=threshold, click_probabilities=np.array(clicks, dtype=np.float32)[None, :],
            )  # fmt: skip
            picked = chosen[0][chosen[0] >= 0].tolist()
            final_scores = chosen_scores[0][: len(picked)].tolist()
            probabilities = chosen_probabilities[0][: len(picked)].tolist()
            if self.config.log_candidate_scores and picked:
                ranked.candidate_scores = promoted_scores(scores, promoted, promotion_threshold=threshold,
                                                          click_probabilities=clicks)  # fmt: skip
                ranked.top_candidate = picked[0]
        else:  # the ranked order: order()'s temperature-0 case for one list, without numpy's per-call costs
            picked, final_scores = ranked_order(scores, promoted, top_n, promotion_threshold=threshold,
                                                click_probabilities=clicks)  # fmt: skip
            probabilities = [1.0] + [0.0] * (len(picked) - 1) if picked else []
        ranked.items = [items[index] for index in picked]
        ranked.scores = final_scores
        ranked.click_probabilities = [clicks[index] for index in picked]
        return ranked, probabilities, [promoted[index] for index in picked]

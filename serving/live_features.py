"""Feast on the gateway's online path: customers' features read at request time and written through on change.

The report's online path (4.4.1-4.4.2) starts with the user's features from the feature store, encoded by the
fitted workflow. Here:

- **Read**: the online `recommend` path reads a customer's encoded features from Feast's online store (Redis)
  by raw id, through the query tower's FeatureService (`two_tower`), and sends them to Triton, whose query tower
  embeds them; a customer Feast has no row for is unknown to the models (a new visitor: the generic list). Item
  features for ranking stay inside Triton (DESIGN.md: per-candidate fetches made the report's latency grow with
  TopK).
- **Encode**: what the API receives (a customer's profile attributes, the request's context) is encoded by the
  served version's own fitted NVTabular workflow, in Triton's `encode_features` model
  (`models/feature_encoding.py`): the Categorify mappings and normalization training used, the
  out-of-vocabulary code for a value the fit never saw. A context's codes are kept in process per version (a
  few hundred distinct contexts at most), so a request pays that call once per context and version.
- **Write through**: creating or updating a customer encodes their profile and writes the row to Feast's online
  store at once (`write_to_online_store`), sets their bit in the version's `live_users` bitmap, and drops their
  cached online answer; their next request then goes online (the recommender's Lua read sees the bit in the
  same round trip) and gets a list from the user tower on their features, even for an id the run never saw
  (its code is the out-of-vocabulary one). The row carries the served run's snapshot time, so the next
  nightly materialization (a newer snapshot, with the refitted workflow's codes) replaces it; the gateway's
  writes skip Feast's newer-than-stored check, so a second change on the same day lands too. The daily extract
  of the database stays the replayable source of truth of the nightly run.

- **Products** (`FreshProducts`): creating or updating a product the served version does not know, with item
  features, encodes them with the version's workflow, embeds them with its item tower (Triton's `item_tower`) and
  keeps both in the version's `fresh_items` hash (recsys/recommendation_store.py); every online answer then sends
  them along to the recommend ensemble, which retrieves such a product where Faiss would have found it, had it
  been indexed, ranks it on its own features and names it by id (`models.online_pipeline.FreshItems`). The
  gateway keeps the hash in process for `FRESH_PRODUCTS_TTL_S` (its own writes drop that copy at once). A
  product the version knows keeps the run's features until the next night; the nightly lists, and so the
  customers answered from them, hold only the run's catalog.

Known limits: the `live_users` bit belongs to the version it was set under, so a customer created after the
nightly extract and before that night's publish is generic again until their next change or the next run.
After a rollback, Feast's rows are those of the newest materialization, whose codes may differ from the older
version's workflow.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import numpy as np

from recsys.recommendation_store import REDIS_MAX_BITS, RecommendationKeys, decode_fresh_items, encode_fresh_item
from recsys.redis_connection import is_cluster
from recsys.spec import DatasetSpec

log = logging.getLogger(__name__)

CONTEXTS_KEPT = 4_096  # encoded contexts kept in process (per version and distinct context values)
FRESH_PRODUCTS_TTL_S = 5.0  # how long a process answers from its copy of a version's fresh products
MAX_FRESH_PRODUCTS = 1_000  # per version: each online answer scores every one; more wait for the nightly run


def tensor_of(value: Any) -> np.ndarray:
    """One row's encoded value as the ensemble's input tensor: a code, a number or a code list."""
    if isinstance(value, list):
        return np.array([value], dtype=np.int64)
    if isinstance(value, float):
        return np.array([value], dtype=np.float32)
    return np.array([value], dtype=np.int64)


class LiveFeatures:
    """Reads and writes customers' encoded features in Feast's online store; encodes with Triton's workflow."""

    def __init__(self, spec: DatasetSpec, store: Any, triton: Any, redis_client: Any, key_prefix: str, *,
                 timeout_s: float) -> None:  # fmt: skip
        from feature_repo.feature_services import TWO_TOWER_SERVICE
        from feature_repo.tables import ENCODED_SUFFIX, entity_tables

        self.spec = spec
        self.store = store
        self.triton = triton
        self.redis = redis_client
        # The live bit and the cached answer change together in one MULTI/EXEC, except on a Redis Cluster, where
        # they live in different slots: there the bit is set first, so a reader between the two at worst answers
        # online from the answer cached before (dropped by the next command).
        self.one_slot_transactions = not is_cluster(redis_client)
        self.keys = RecommendationKeys(key_prefix)
        self.timeout_s = timeout_s
        self.table = entity_tables(spec)[0]
        self.service_name = TWO_TOWER_SERVICE
        # Feast's column of the encoded id -> the models' input, named like the raw id.
        self.encoded_id = spec.user_id + ENCODED_SUFFIX
        self._contexts: collections.OrderedDict[tuple[str, tuple[tuple[str, Any], ...]], dict[str, np.ndarray]]
        self._contexts = collections.OrderedDict()
        self.products = FreshProducts(spec, triton, redis_client, key_prefix)

    def _model_column(self, name: str) -> str:
        return self.spec.user_id if name == self.encoded_id else name

    async def user_features(self, customer_id: int) -> dict[str, np.ndarray] | None:
        """The customer's encoded features as the recommend ensemble takes them, or None where Feast has no row."""
        async with asyncio.timeout(self.timeout_s):
            service = self.store.get_feature_service(self.service_name, allow_cache=True)
            response = await self.store.get_online_features_async(features=service,
                                                                   entity_rows=[{self.table.join_key: customer_id}])
        row = response.to_dict()
        if all(row.get(name, [None])[0] is None for name in self.table.features):
            return None
        return {self._model_column(name): tensor_of(row[name][0]) for name in self.table.features
                if row.get(name, [None])[0] is not None}  # fmt: skip

    async def context_features(self, version: str | None, context: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The request's context features (those the spec has) encoded by the version's workflow, kept in process."""
        values = tuple(sorted((name, value) for name, value in context.items() if name in self.spec.context_features))
        if not values:
            return {}
        key = (version or "", values)
        found = self._contexts.get(key)
        if found is None:
            [encoded], _ = await self.triton.encode("context", [dict(values)], version=version)
            found = {name: tensor_of(value) for name, value in encoded.items()}
            self._contexts[key] = found
            while len(self._contexts) > CONTEXTS_KEPT:
                self._contexts.popitem(last=False)
        return found

    async def write_through(self, customer_id: int, attributes: Mapping[str, Any], *, changed: bool = False
                            ) -> str | None:  # fmt: skip
        """Encode the customer's profile with the current version's workflow, write it to Feast, mark them live
        under that version and drop their cached online answer; return the version (None: none is published,
        or the profile of a new customer names none of the spec's user features).

        A customer created without a profile is not written: a new visitor stays with their segment's list,
        and a customer the models know keeps theirs (the database may learn of them after the run did).
        `changed`: the profile changed, so it is written even if it now names no feature."""
        import pandas as pd

        features = {name: attributes[name] for name in self.spec.user_features if name in attributes}
        if not features and not changed:
            return None
        version = await self._current_version()
        if version is None:
            return None
        raw = {self.spec.user_id: customer_id, **features}
        [encoded], snapshot_time = await self.triton.encode("user", [raw], version=version)
        row = {self.table.join_key: customer_id,
               **{name: encoded[self._model_column(name)] for name in self.table.features},
               "event_timestamp": datetime.fromtimestamp(snapshot_time, tz=UTC)}  # fmt: skip
        await self.store.write_to_online_store_async(self.table.feature_view_name, df=pd.DataFrame([row]))
        pipe = self.redis.pipeline(transaction=self.one_slot_transactions)
        if 0 <= customer_id < REDIS_MAX_BITS:
            pipe.setbit(self.keys.live_users(version), customer_id, 1)
        pipe.delete(self.keys.online_answers(version, customer_id))
        await pipe.execute()
        return version

    async def _current_version(self) -> str | None:
        return await _current_version(self.redis, self.keys)

    async def forget(self, customer_id: int) -> None:
        """A deleted customer: no longer live under the current version, their cached online answer dropped."""
        version = await self._current_version()
        if version is None:
            return
        pipe = self.redis.pipeline(transaction=self.one_slot_transactions)
        if 0 <= customer_id < REDIS_MAX_BITS:
            pipe.setbit(self.keys.live_users(version), customer_id, 0)
        pipe.delete(self.keys.online_answers(version, customer_id))
        await pipe.execute()


class FreshProducts:
    """Products the served version does not know, added with features since: written through on create and update,
    sent with every online answer's request (module doc, "Products")."""

    def __init__(self, spec: DatasetSpec, triton: Any, redis_client: Any, key_prefix: str, *,
                 max_products: int = MAX_FRESH_PRODUCTS, ttl_s: float = FRESH_PRODUCTS_TTL_S,
                 clock: Any = time.monotonic) -> None:  # fmt: skip
        self.spec = spec
        self.triton = triton
        self.redis = redis_client
        self.keys = RecommendationKeys(key_prefix)
        self.max_products = max_products
        self.ttl_s = ttl_s
        self.clock = clock
        self._copies: dict[str, tuple[float, dict[str, np.ndarray] | None]] = {}  # version -> (until, tensors)

    async def write_through(self, product_id: int, attributes: Mapping[str, Any]) -> str | None:
        """Encode and embed the product with the current version's models and keep it in the version's
        `fresh_items` hash; return the version, or None where nothing is kept: no published version, no item
        feature given, a product the version knows, or `max_products` kept already (logged: the nightly run
        takes it). A product that no longer qualifies leaves the hash."""
        version = await _current_version(self.redis, self.keys)
        if version is None:
            return None
        key = self.keys.fresh_items(version)
        self._copies.pop(version, None)
        # Its similar products, cached as online answers (or "unknown"), change with its embedding.
        await self.redis.delete(self.keys.online_cache(version, "similar", product_id))
        features = {name: attributes[name] for name in self.spec.item_features if name in attributes}
        if not features:
            await self.redis.hdel(key, product_id)
            return None
        encoded, _ = await self.triton.encode("item", [{self.spec.item_id: product_id, **features}], version=version)
        embeddings, packed, known = await self.triton.embed_items(encoded, version=version)
        if bool(known[0]):  # its features stay the run's until the next night
            await self.redis.hdel(key, product_id)
            return None
        if not await self.redis.hexists(key, product_id) and await self.redis.hlen(key) >= self.max_products:
            log.warning("product %d: %d products added since version %s are kept already; it waits for the "
                        "nightly run", product_id, self.max_products, version)  # fmt: skip
            return None
        await self.redis.hset(key, product_id, encode_fresh_item(packed[0], embeddings[0]))
        self._copies.pop(version, None)
        return version

    async def forget(self, product_id: int) -> None:
        """A deleted product: out of the current version's fresh products."""
        version = await _current_version(self.redis, self.keys)
        if version is not None:
            await self.redis.hdel(self.keys.fresh_items(version), product_id)
            await self.redis.delete(self.keys.online_cache(version, "similar", product_id))
            self._copies.pop(version, None)

    async def tensors(self, version: str | None) -> dict[str, np.ndarray] | None:
        """The version's fresh products as the recommend ensemble's `fresh_item_*` inputs, None without any; read
        from Redis at most every `ttl_s` per process."""
        if version is None:
            return None
        now = self.clock()
        copy = self._copies.get(version)
        if copy is not None and copy[0] > now:
            return copy[1]
        ids, features, embeddings = decode_fresh_items(await self.redis.hgetall(self.keys.fresh_items(version)))
        tensors = ({"fresh_item_ids": ids, "fresh_item_features": features, "fresh_item_embeddings": embeddings}
                   if len(ids) else None)  # fmt: skip
        self._copies[version] = (now + self.ttl_s, tensors)
        return tensors


async def _current_version(redis_client: Any, keys: RecommendationKeys) -> str | None:
    value = await redis_client.get(keys.current)
    return value.decode() if isinstance(value, bytes) else value

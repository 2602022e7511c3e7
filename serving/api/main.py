"""The gateway's application factory: `create_app(settings)`; nothing is built or connected at import.

    uvicorn serving.api.main:create_app --factory      # `make api`; OpenAPI docs at /docs

The lifespan creates the database engine (and refuses a database the migrations have not brought to
the newest revision), keeps it on `app.state` for the dependencies in `serving.api.deps`, and disposes
of it at shutdown. A new resource router goes in `api_router` below; a new client it needs (Redis,
Triton) is created in `lifespan` next to the engine and read through a dependency in `deps.py`.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI
from sqlalchemy.orm import sessionmaker

from recsys.database import create_database_engine
from recsys.redis_connection import async_redis_client, redis_client
from recsys.settings import Settings, get_settings
from recsys.spec import DatasetSpec, load_spec
from serving.api import metrics
from serving.api.auth import KeyCache
from serving.api.body_limit import BodySizeLimitMiddleware
from serving.api.errors import add_error_handlers
from serving.api.impressions import ImpressionLog
from serving.api.metrics import GatewayMetrics
from serving.api.migrate import ensure_schema_current
from serving.api.observability import ObservabilityMiddleware
from serving.api.rate_limit import TokenBucket
from serving.api.routes import customers, demo, health, interactions, products, recommendations
from serving.live_features import LiveFeatures
from serving.recommender import Recommender, RecommenderConfig
from serving.seen_items import SeenItemsWriter


def api_router(spec: DatasetSpec) -> APIRouter:
    """Every route of the gateway, one router per resource (customers' bodies follow the dataset spec). The read
    routes come first: a request is matched against the routes in order, and reads are most of the traffic."""
    router = APIRouter()
    router.include_router(recommendations.visitor_router(spec))
    router.include_router(recommendations.router)
    router.include_router(health.router)
    router.include_router(metrics.router)
    router.include_router(customers.profile_router(spec))
    router.include_router(customers.router)
    router.include_router(products.catalog_router(spec))
    router.include_router(products.router)
    router.include_router(interactions.event_router(spec))
    router.include_router(interactions.router)
    router.include_router(demo.router)
    return router


def build_recommender(settings: Settings, sessions: sessionmaker) -> Recommender:  # type: ignore[type-arg]
    """Redis and Triton clients with their timeouts; nothing connects until the first request."""
    from serving.triton_client import TritonEnsembles

    timeout_s = settings.redis_timeout_ms / 1000
    client = async_redis_client(settings.redis_url, settings.redis_type, socket_timeout=timeout_s,
                                socket_connect_timeout=timeout_s)  # fmt: skip
    config = RecommenderConfig(
        key_prefix=settings.redis_key_prefix, segment_features=load_spec(settings.spec).segment_features,
        redis_timeout_s=timeout_s, triton_timeout_s=settings.triton_timeout_ms / 1000,
        online_cache_ttl_s=settings.online_cache_ttl_s, local_copy_ttl_s=settings.online_cache_ttl_s,
        online_top_k=settings.online_top_k,
        promotion_threshold=settings.promotion_threshold, database_timeout_s=settings.database_timeout_ms / 1000,
        product_flags_ttl_s=settings.product_flags_ttl_s, read_rate_per_s=settings.read_rate_per_s,
        read_burst=settings.read_burst, log_candidate_scores=settings.impressions_candidate_scores,
    )  # fmt: skip
    triton = TritonEnsembles(settings.triton_urls, timeout_s=settings.triton_timeout_ms / 1000,
                             versioned=settings.triton_versioned_models)  # fmt: skip
    live = build_live_features(settings, triton, client) if settings.live_features else None
    return Recommender(client, triton, config, recommendations.product_flags_reader(sessions), live=live)


def build_live_features(settings: Settings, triton: object, client: object) -> LiveFeatures:
    """Feast's online store (the gateway's writes always land, see feature_repo/config.py) on the online path."""
    from feature_repo.config import FeastStoreConfig
    from feature_repo.store import open_feature_store

    spec = load_spec(settings.spec)
    store = open_feature_store(spec, FeastStoreConfig.from_settings(settings), writes_always_land=True)
    return LiveFeatures(spec, store, triton, client, settings.redis_key_prefix,
                        timeout_s=settings.feast_timeout_ms / 1000)  # fmt: skip


def build_seen_items_writer(settings: Settings) -> SeenItemsWriter:
    """A synchronous Redis client for the routes that run in threads; nothing connects until the first write."""
    from recsys.interactions import types_excluding_seen

    timeout_s = settings.redis_timeout_ms / 1000
    client = redis_client(settings.redis_url, settings.redis_type, socket_timeout=timeout_s,
                          socket_connect_timeout=timeout_s)  # fmt: skip
    return SeenItemsWriter(client, settings.redis_key_prefix, types_excluding_seen(load_spec(settings.spec)),
                           ttl_s=settings.seen_items_ttl_s)  # fmt: skip


def freeze_startup_objects() -> None:
    """Leave what startup built (modules, models, the app: it lives as long as the process) out of the garbage
    collector's full collections. Without this a full collection walked all of it, 70-75 ms every few seconds
    under load (gc callbacks, the gateway called in process at 8 concurrent requests), stalling every request in
    flight past the 50 ms Redis budget: the `*_local_copy` answers and the p99 spikes of benchmarks/serving.py.
    `gc.freeze` moves every object tracked so far to a permanent generation that collections skip (CPython documents
    it for servers that fork workers; the effect used here is the skipping); what requests create is collected.
    Once per process (a worker runs one app; tests build hundreds, whose objects must stay collectable)."""
    if gc.get_freeze_count() == 0:
        gc.collect()
        gc.freeze()


def check_schema_at_startup(url: str) -> None:
    """Refuse to start on a database the migrations have not brought up to date.

    Startup is not a request: this engine waits as the driver does (10 s to connect), not the request budget,
    so a database slow to open its first connection delays the start instead of failing it."""
    engine = create_database_engine(url, timeout_ms=None)
    try:
        ensure_schema_current(engine)
    finally:
        engine.dispose()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        check_schema_at_startup(settings.database_url)
        engine = create_database_engine(settings.database_url, timeout_ms=settings.database_timeout_ms)
        try:
            app.state.engine = engine
            # Objects stay readable after commit, so a route can answer with what it just stored.
            app.state.sessionmaker = sessionmaker(engine, expire_on_commit=False)
            impressions.start()
            app.state.recommender = build_recommender(settings, app.state.sessionmaker)
            app.state.recommender.triton.observe = app.state.metrics.observe_triton
            app.state.seen_items = build_seen_items_writer(settings)
            app.state.ingest_bucket = TokenBucket(
                app.state.recommender.redis, settings.redis_key_prefix, settings.ingest_rate_per_s,
                settings.ingest_burst, timeout_s=settings.redis_timeout_ms / 1000,
            )  # fmt: skip
            freeze_startup_objects()
            yield
        finally:
            if hasattr(app.state, "recommender"):
                await app.state.recommender.close()
            if hasattr(app.state, "seen_items"):
                app.state.seen_items.close()
            impressions.close()  # writes what is still queued
            engine.dispose()

    app = FastAPI(
        title="recsys gateway",
        summary="Ingestion of customers, products and interactions; recommendations and similar products",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.key_cache = KeyCache(ttl_s=settings.api_key_cache_s)
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_request_bytes)
    # Outermost of ours: a refused body is measured and gets its request id too (an unhandled error's 500,
    # made by Starlette's outermost middleware, is measured but carries no X-Request-ID).
    app.state.metrics = GatewayMetrics()
    impressions = ImpressionLog(settings.impressions_path, on_drop=app.state.metrics.impressions_dropped.inc)
    app.add_middleware(ObservabilityMiddleware, metrics=app.state.metrics, impressions=impressions)
    add_error_handlers(app)
    app.include_router(api_router(load_spec(settings.spec)))
    return app

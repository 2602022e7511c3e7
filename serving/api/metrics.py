"""The gateway's Prometheus metrics, served unauthenticated at `GET /metrics` in Prometheus' text format.

- `recsys_http_request_duration_seconds` (histogram; `method`, `handler`, `status`): from the request's arrival
  to the end of its response. `handler` is the route template (`/recommendations/{customer_id}`), `unmatched`
  for a path no route has: never the raw path, whose ids would make a series per customer.
- `recsys_http_errors_total` (`method`, `handler`, `status`): responses with status 400 or more, 4xx by status;
  5xx includes unhandled exceptions, counted as 500.
- `recsys_http_requests_by_api_key_total` (`api_key`): requests by the name of the key that authenticated them
  (`none`: no valid key, or a route without authentication).
- `recsys_recommendations_total` (`handler`, `route`): served recommendation answers by the response's
  `route`: precomputed, online, online_cached, generic, browsing_now, `*_local_copy`, none.
- `recsys_recommendation_fallbacks_total` (`cause`): one per entry of an answer's `degraded` list
  (redis_unavailable, triton_unavailable, ...).
- `recsys_impressions_dropped_total`: impressions not written (writer queue full, or the disk refused them).
- `recsys_triton_calls_total` (`server`, `outcome`): calls to each Triton server (`RECSYS_TRITON_URL`) by
  outcome: `answered`, or `failed_over` (its connection failed or it answered an error, and the next server was
  asked; serving/triton_client.py). A call failing on the last server tried is in neither: its answer falls back.

The online cache's hit ratio, from the answers counted above:

    sum(rate(recsys_recommendations_total{route="online_cached"}[5m]))
      / sum(rate(recsys_recommendations_total{route=~"online|online_cached"}[5m]))

and the share of answers served from the nightly lists: `route="precomputed"` over all routes.

Every application built by `create_app` has its own `CollectorRegistry`, so several apps in one process (the
tests build many) never collide. With several workers (`python -m serving.run --workers N`), `serving.run` turns
on prometheus_client's multiprocess mode: it points `PROMETHEUS_MULTIPROC_DIR` at a fresh empty folder before
the workers start, every worker writes its values there, and `/metrics`, whichever worker answers, reads them all
(`MultiProcessCollector` over a registry made for the scrape), so one scrape counts every worker's requests.
All metrics here are counters and histograms, which the collector sums over live and dead workers alike (a
worker that exits keeps its counts), so no `mark_process_dead` is needed; a gauge added later would need one.
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

# prometheus_client reads it at import: set before a worker starts, its values go to files in that folder.
MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Set with it by serving.run: /metrics reads the folder only then, since other libraries set the folder too
# (Feast does at import), which alone says nothing about where this process's values are.
MULTIPROCESS_ON_ENV = "RECSYS_METRICS_MULTIPROCESS"

# Seconds; the SLA of a whole request is 500 ms, the gateway's own budgets 50 ms (Redis) and 250 ms (Triton).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
NO_API_KEY = "none"


class GatewayMetrics:
    """One application's metrics, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.request_duration = Histogram(
            "recsys_http_request_duration_seconds", "Request latency by route template, method and status",
            ["method", "handler", "status"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.errors = Counter("recsys_http_errors_total", "Responses with status 400 or more",
                              ["method", "handler", "status"], registry=self.registry)  # fmt: skip
        self.requests_by_api_key = Counter("recsys_http_requests_by_api_key_total", "Requests by API key name",
                                           ["api_key"], registry=self.registry)  # fmt: skip
        self.recommendations = Counter("recsys_recommendations_total", "Recommendation answers by route",
                                       ["handler", "route"], registry=self.registry)  # fmt: skip
        self.fallbacks = Counter("recsys_recommendation_fallbacks_total", "Degraded answers by cause",
                                 ["cause"], registry=self.registry)  # fmt: skip
        self.impressions_dropped = Counter("recsys_impressions_dropped_total", "Impressions not written",
                                           registry=self.registry)  # fmt: skip
        self.triton_calls = Counter("recsys_triton_calls_total", "Calls to each Triton server by outcome",
                                    ["server", "outcome"], registry=self.registry)  # fmt: skip

        # Labelled series by label values: `labels()` validates and locks on every call, a dict lookup does not.
        # Bounded: route templates x methods x statuses, API key names, routes and causes are all few.
        self._requests: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._by_key: dict[str, Any] = {}
        self._answers: dict[tuple[str, str], Any] = {}

    def observe_request(self, method: str, handler: str, status: int, seconds: float, api_key: str | None) -> None:
        series = self._requests.get((method, handler, status))
        if series is None:
            code = str(status)
            errors = self.errors.labels(method, handler, code) if status >= 400 else None
            series = self._requests[(method, handler, status)] = (self.request_duration.labels(method, handler, code),
                                                                  errors)  # fmt: skip
        series[0].observe(seconds)
        if series[1] is not None:
            series[1].inc()
        name = api_key or NO_API_KEY
        by_key = self._by_key.get(name)
        if by_key is None:
            by_key = self._by_key[name] = self.requests_by_api_key.labels(name)
        by_key.inc()

    def observe_recommendation(self, handler: str, route: str, degraded: list[str]) -> None:
        answers = self._answers.get((handler, route))
        if answers is None:
            answers = self._answers[(handler, route)] = self.recommendations.labels(handler, route)
        answers.inc()
        for cause in degraded:  # rare: only degraded answers
            self.fallbacks.labels(cause).inc()

    def observe_triton(self, server: str, outcome: str) -> None:
        """Only on the online path (a few servers, two outcomes): labels() is cheap enough there."""
        self.triton_calls.labels(server, outcome).inc()


router = APIRouter(tags=["monitoring"])


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus' text exposition of the gateway's metrics, every worker's in multiprocess mode (no API key:
    scrapers carry none)."""
    registry: CollectorRegistry = request.app.state.metrics.registry
    if os.environ.get(MULTIPROCESS_ON_ENV) == "1" and os.environ.get(MULTIPROCESS_DIR_ENV):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

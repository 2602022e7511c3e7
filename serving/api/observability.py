"""Request ids, metrics, one JSON log line per request, and impressions: one pure ASGI middleware.

- **Request id.** An incoming `X-Request-ID` that is a short printable token (1 to 64 visible ASCII
  characters, no spaces) is kept, anything else is replaced by a new uuid4 hex; it is on `request.state.request_id`
  for the routes and returned in the `X-Request-ID` response header. Clients send it back with the
  interactions that followed a recommendation (`request_id`), which is how live accuracy is measured.
- **Metrics** (`serving.api.metrics`): latency by route template, errors, requests by API key name, and for
  the recommendation routes answers by route and fallbacks by cause.
- **Log.** One JSON line per request on the logger `serving.api.requests`, at INFO: request id, method,
  route template, status, duration, API key name, and a recommendation's route and degraded causes. It costs
  nothing unless that logger is enabled (e.g. uvicorn `--log-config` giving it a handler at INFO).
- **Impressions.** A route that served recommendations leaves its answer (a `RecommendationResponse` as a dict)
  on `request.state.recommendation`; it is queued for `serving.api.impressions`' writer thread.

All of it runs after the response has been handed to the server, in a few microseconds, and no disk I/O.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.api.impressions import ImpressionLog
from serving.api.metrics import GatewayMetrics

log = logging.getLogger(__name__)
request_log = logging.getLogger("serving.api.requests")

REQUEST_ID_HEADER = b"x-request-id"
# Visible ASCII without spaces (what interactions' request_id accepts), short enough for logs and headers.
_REQUEST_ID = re.compile(rb"[!-~]{1,64}")
UNMATCHED = "unmatched"  # a path no route has: never the raw path as a label
# Label values must stay few: a client's made-up method is "other", as a made-up path is "unmatched".
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's X-Request-ID when it is a short printable token, else a new uuid4 hex."""
    for name, value in headers:
        if name == REQUEST_ID_HEADER:
            if _REQUEST_ID.fullmatch(value):
                return value.decode("ascii")
            break
    return uuid.uuid4().hex


class ObservabilityMiddleware:
    def __init__(self, app: ASGIApp, *, metrics: GatewayMetrics, impressions: ImpressionLog) -> None:
        self.app = app
        self.metrics = metrics
        self.impressions = impressions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = request_id_from(scope["headers"])
        state = scope.setdefault("state", {})  # what `request.state` reads and writes
        state["request_id"] = request_id
        header = (REQUEST_ID_HEADER, request_id.encode("ascii"))
        status = 500  # unless a response starts: an exception no handler turned into one

        async def send_with_request_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_request_id)
        finally:
            try:
                self._observe(scope, state, request_id, status, time.perf_counter() - started)
            except Exception:  # monitoring must never fail a request, or mask the error it is propagating
                log.exception("observing request %s failed", request_id)

    def _observe(self, scope: Scope, state: dict[str, Any], request_id: str, status: int, seconds: float) -> None:
        route = scope.get("route")  # set by the router on a match
        handler = getattr(route, "path", None) or UNMATCHED
        caller = state.get("caller")
        api_key = caller.name if caller is not None else None
        method = scope["method"] if scope["method"] in METHODS else "other"
        self.metrics.observe_request(method, handler, status, seconds, api_key)
        answer = state.get("recommendation")
        if answer is not None:
            self.metrics.observe_recommendation(handler, answer["route"], answer["degraded"])
            temperature = state.get("temperature", 0.0)
            impression = {
                "request_id": request_id, "time": time.time(), "customer_id": answer["customer_id"],
                "handler": handler, "route": answer["route"], "model_version": answer["model_version"],
                "degraded": answer["degraded"], "api_key": api_key, "temperature": temperature,
                "items": [item["product_id"] for item in answer["items"]],
                # Sampled lists: each item's softmax probability, what off-policy estimates reweight by.
                "probabilities": [item["probability"] for item in answer["items"]] if temperature > 0 else None,
            }  # fmt: skip
            if answer["experiment"] is not None:  # an A/B experiment runs: the monitoring DAG compares its buckets
                impression.update(experiment=answer["experiment"], bucket=answer["bucket"])
            candidates = state.get("candidates")
            if candidates is not None:
                impression.update(candidate_scores=candidates[0], top_candidate=candidates[1])
            self.impressions.record(impression)
        if request_log.isEnabledFor(logging.INFO):
            line: dict[str, Any] = {"event": "request", "request_id": request_id,
                                    "time": datetime.now(UTC).isoformat(), "method": method,
                                    "handler": handler, "status": status, "duration_ms": round(seconds * 1000, 3),
                                    "api_key": api_key}  # fmt: skip
            if answer is not None:
                line.update(route=answer["route"], model_version=answer["model_version"],
                            degraded=answer["degraded"], items=len(answer["items"]))  # fmt: skip
            request_log.info(json.dumps(line, separators=(",", ":")))

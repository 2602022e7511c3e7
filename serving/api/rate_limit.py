"""Rate limits per API key: a token bucket kept in Redis (`serving/token_bucket.py`).

Each key may write `ingest_rate_per_s` requests a second on average and `ingest_burst` at once, and read
recommendations (`/recommendations/{id}`, `/products/{id}/similar`) `read_rate_per_s` and `read_burst`, in a
bucket of its own. A bucket lives in Redis, so every gateway worker draws from the same one, and it is updated
by one Lua script (atomic, Redis' own clock, so workers' clocks do not matter): for writes the script below, a
round trip before the write; for reads the recommender's read script itself, so a read stays one round trip
(serving/recommender.py). Over the limit: 429 with `Retry-After`, the seconds until a token is back.

If Redis cannot answer within its budget, the request is let through and a warning logged: losing an
interaction would be worse than briefly not limiting a client (a read then answers from the process's copies,
unlimited). (The `limits` library behind slowapi has fixed and sliding windows but no token bucket, which lets
a client spend its burst and then a steady rate; the script is the bucket.)
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, status

from serving.api.auth import Caller, authenticate
from serving.list_reader import REDIS_FAILURES
from serving.token_bucket import TOKEN_BUCKET, write_bucket_key

log = logging.getLogger(__name__)

class TokenBucket:
    """The script, registered once on the gateway's Redis client."""

    def __init__(self, redis_client: Any, key_prefix: str, rate_per_s: float, burst: int, timeout_s: float) -> None:
        self.script = redis_client.register_script(TOKEN_BUCKET)
        self.key_prefix = key_prefix
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.timeout_s = timeout_s

    async def take(self, name: str) -> float:
        """0 if `name` may go on now, else the seconds until it may."""
        allowed, wait = await asyncio.wait_for(
            self.script(keys=[write_bucket_key(self.key_prefix, name)], args=[self.rate_per_s, self.burst]),
            timeout=self.timeout_s,
        )
        return 0.0 if int(allowed) else float(wait)


async def rate_limited(request: Request, caller: Annotated[Caller, Depends(authenticate)]) -> None:
    """A route dependency: 429 with Retry-After when the caller's key is over its rate."""
    bucket: TokenBucket = request.app.state.ingest_bucket
    try:
        wait = await bucket.take(caller.name)
    except REDIS_FAILURES as error:
        log.warning("rate limit not applied to %s: Redis unavailable (%s)", caller.name, type(error).__name__)
        return
    if wait > 0:
        raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, f"rate limit of API key {caller.name!r} exceeded",
                            headers={"Retry-After": str(max(1, math.ceil(wait)))})  # fmt: skip


RateLimit = Depends(rate_limited)
RATE_LIMITED = {429: "this API key is over its rate limit: retry after Retry-After seconds"}

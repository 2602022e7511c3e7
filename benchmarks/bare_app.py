"""The reference endpoints of `benchmarks/serving.py`: a FastAPI app with two routes and nothing else.

- `/constant` returns a constant;
- `/lists/{user_id}` does exactly one Redis GET, of the user's published list, and returns its bytes: the
  reference the gateway's hot path is measured against (issue 19: a gateway must make a Redis round trip).
  `BARE_REDIS_URL` and `BARE_LIST_PREFIX` (the key up to the user id) say where.

Started exactly as the gateway is (uvicorn, same workers, loop, HTTP parser and logging), so the ratio
of the gateway's requests/s to these is what the gateway's own work costs.
"""

from __future__ import annotations

import os

from fastapi import FastAPI, Response

CONSTANT = {"status": "ok"}


def create_app() -> FastAPI:
    import redis.asyncio

    app = FastAPI(title="bare reference")
    client = redis.asyncio.Redis.from_url(os.environ.get("BARE_REDIS_URL", "redis://127.0.0.1:6379/9"))
    prefix = os.environ.get("BARE_LIST_PREFIX", "")

    @app.get("/constant")
    async def constant() -> dict[str, str]:
        return CONSTANT

    @app.get("/lists/{user_id}")
    async def published_list(user_id: int) -> Response:
        value = await client.get(f"{prefix}{user_id}")
        return Response(value or b"", media_type="application/octet-stream", status_code=200 if value else 404)

    return app

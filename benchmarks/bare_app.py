"""The reference endpoint of `benchmarks/serving.py`: a FastAPI app whose one route returns a constant.

Started exactly as the gateway is (uvicorn, same workers, loop, HTTP parser and logging), so the ratio
of the gateway's requests/s to this one's is what the gateway's own work costs.
"""

from __future__ import annotations

from fastapi import FastAPI

CONSTANT = {"status": "ok"}


def create_app() -> FastAPI:
    app = FastAPI(title="bare reference")

    @app.get("/constant")
    async def constant() -> dict[str, str]:
        return CONSTANT

    return app

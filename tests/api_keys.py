"""API keys for tests, made as `python -m serving.api.keys create` makes them (in the gateway's database)."""

from __future__ import annotations

import itertools

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from recsys.database import create_database_engine
from serving.api.auth import Scope, create_api_key

ALL_SCOPES = tuple(scope.value for scope in Scope)
_names = itertools.count()


def new_key(database_url: str, scopes: tuple[str, ...] = ALL_SCOPES) -> str:
    engine = create_database_engine(database_url, timeout_ms=None)
    try:
        with Session(engine) as session:
            return create_api_key(session, f"test-{'-'.join(scopes)}-{next(_names)}", scopes)
    finally:
        engine.dispose()


def authorized(client: TestClient, database_url: str, scopes: tuple[str, ...] = ALL_SCOPES) -> TestClient:
    """The client, sending a new key with these scopes (all of them by default) on every request."""
    client.headers["X-API-Key"] = new_key(database_url, scopes)
    return client

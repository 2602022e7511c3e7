"""API keys with scopes (report 3.2.5): who may call which route.

    python -m serving.api.keys create web-tier --scopes read      # prints the key once
    curl -H 'X-API-Key: rk_...' http://127.0.0.1:8100/recommendations/42

Scopes: `read` (recommendations, similar products, the catalog, the demo page), `ingest` (posting
interactions) and `admin` (creating, changing and deleting customers and products, reading customers and
interactions, which are personal data). A key holds the scopes it was created with, nothing implied.
No key or an unknown or revoked one: 401; a key without the route's scope: 403.

Only the SHA-256 of a key is stored. A verified key is remembered in process for `api_key_cache_s`
(recsys/settings.py), so a request on the hot path costs no database read; a revoked key stops working
within that time.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security, status
from fastapi.security import APIKeyHeader
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from recsys.database import ApiKey, utc_now
from serving.api.errors import is_database_unavailable

log = logging.getLogger(__name__)

KEY_PREFIX = "rk_"
CACHE_SIZE = 10_000

key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="a key from `python -m serving.api.keys`")


class Scope(enum.StrEnum):
    READ = "read"
    INGEST = "ingest"
    ADMIN = "admin"


@dataclasses.dataclass(frozen=True)
class Caller:
    """The key a request came with: its name (for logs, metrics, rate limits) and scopes."""

    name: str
    scopes: frozenset[Scope]


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_scopes(scopes: Iterable[str]) -> frozenset[Scope]:
    """Scopes from names; an unknown name is an error that lists the known ones."""
    parsed = set()
    for name in scopes:
        try:
            parsed.add(Scope(name))
        except ValueError:
            known = ", ".join(scope.value for scope in Scope)
            raise ValueError(f"unknown scope {name!r}; scopes are {known}") from None
    if not parsed:
        raise ValueError("a key needs at least one scope")
    return frozenset(parsed)


def create_api_key(session: Session, name: str, scopes: Iterable[str]) -> str:
    """Store a new key and return its secret: the only time it is ever seen."""
    parsed = parse_scopes(scopes)
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(name=name, prefix=secret[:10], secret_hash=hash_secret(secret),
                       scopes=" ".join(sorted(parsed)), created_at=utc_now()))  # fmt: skip
    session.commit()
    return secret


def revoke_api_key(session: Session, name: str) -> bool:
    """Revoke the key of that name; False if there is no such live key."""
    key = session.scalar(select(ApiKey).where(ApiKey.name == name, ApiKey.revoked_at.is_(None)))
    if key is None:
        return False
    key.revoked_at = utc_now()
    session.commit()
    return True


def find_caller(session: Session, secret: str) -> Caller | None:
    key = session.scalar(select(ApiKey).where(ApiKey.secret_hash == hash_secret(secret), ApiKey.revoked_at.is_(None)))
    return Caller(key.name, parse_scopes(key.scopes.split())) if key is not None else None


class KeyCache:
    """Verified (and unknown) keys by hash for a few seconds: the hot path reads no database."""

    def __init__(self, ttl_s: float, size: int = CACHE_SIZE) -> None:
        self.ttl_s = ttl_s
        self.size = size
        self._entries: dict[str, tuple[float, Caller | None]] = {}

    def get(self, digest: str) -> tuple[bool, Caller | None]:
        entry = self._entries.get(digest)
        if entry is None or entry[0] < time.monotonic():
            return False, None
        return True, entry[1]

    def last_known(self, digest: str) -> Caller | None:
        """The entry even if expired: used only while the database cannot be asked."""
        entry = self._entries.get(digest)
        return entry[1] if entry is not None else None

    def put(self, digest: str, caller: Caller | None) -> None:
        if len(self._entries) >= self.size:
            now = time.monotonic()
            self._entries = {key: value for key, value in self._entries.items() if value[0] >= now}
            if len(self._entries) >= self.size:  # all live: forget them all rather than grow without bound
                self._entries.clear()
        self._entries[digest] = (time.monotonic() + self.ttl_s, caller)


async def caller_of(request: Request, secret: str) -> Caller | None:
    """The caller a secret names (None: unknown or revoked), from this process's cache or the database."""
    cache: KeyCache = request.app.state.key_cache
    digest = hash_secret(secret)
    known, caller = cache.get(digest)
    if not known:

        def lookup() -> Caller | None:
            with request.app.state.sessionmaker() as session:
                return find_caller(session, secret)

        try:
            caller = await run_in_threadpool(lookup)
        except SQLAlchemyError as error:
            # The database is down: a key this process verified before keeps working (a revoked one too,
            # until the database is back), so reads stay up; a key never seen here gets the 503.
            caller = cache.last_known(digest)
            if caller is None or not is_database_unavailable(error):
                raise
            log.warning("API key %r accepted from this process's copy: the database is unavailable", caller.name)
        else:
            cache.put(digest, caller)
    if caller is not None:
        request.state.caller = caller
    return caller


async def authenticate(request: Request, secret: Annotated[str | None, Security(key_header)]) -> Caller:
    """The caller of this request, or 401."""
    if not secret:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing X-API-Key header",
                            headers={"WWW-Authenticate": "ApiKey"})  # fmt: skip
    caller = await caller_of(request, secret)
    if caller is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "unknown or revoked API key",
                            headers={"WWW-Authenticate": "ApiKey"})  # fmt: skip
    return caller


def require(scope: Scope) -> Callable[..., object]:
    """A route dependency: the caller must hold `scope` (403 otherwise)."""

    async def check(caller: Annotated[Caller, Depends(authenticate)]) -> Caller:
        return check_scope(caller, scope)

    return check


def check_scope(caller: Caller, scope: Scope) -> Caller:
    """The caller, if their key holds `scope` (403 otherwise)."""
    if scope not in caller.scopes:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"this API key lacks the {scope.value!r} scope")
    return caller


# OpenAPI documentation of what every authenticated route may answer.
AUTH_ERRORS = {401: "no X-API-Key, or an unknown or revoked one", 403: "the key lacks this route's scope"}

ReadScope = Depends(require(Scope.READ))
IngestScope = Depends(require(Scope.INGEST))
AdminScope = Depends(require(Scope.ADMIN))

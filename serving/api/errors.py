"""Error responses: no stack trace or internal message ever reaches a client.

- a database call that ran out of its time budget, waited too long for a lock or a pooled connection, or
  could not reach the database: 503 with `Retry-After`, so clients and load balancers retry elsewhere;
- an API key over its read rate (serving/recommender.py's read takes the token): 429 with `Retry-After`;
- anything else unexpected: a generic 500, with the traceback in the server log only.
4xx errors come from the routes (`HTTPException`) and from FastAPI's request validation (422).
"""

from __future__ import annotations

import logging
import math
import sqlite3

import psycopg
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from serving.list_reader import ReadRateLimited

log = logging.getLogger(__name__)

# PostgreSQL error codes of a call cut short by our own limits: statement_timeout, lock_timeout.
_TIMEOUT_SQLSTATES = frozenset({"57014", "55P03"})


def is_database_unavailable(error: SQLAlchemyError) -> bool:
    """Whether the database was too slow or unreachable (worth a retry), rather than the request or code wrong."""
    if isinstance(error, PoolTimeoutError):
        return True
    if not isinstance(error, DBAPIError):
        return False
    if error.connection_invalidated:
        return True
    original = error.orig
    if isinstance(original, psycopg.Error):
        sqlstate = original.sqlstate
        # No SQLSTATE: the connection itself failed (refused, timed out, dropped); class 08: connection errors.
        return sqlstate is None or sqlstate in _TIMEOUT_SQLSTATES or sqlstate.startswith("08")
    if isinstance(original, sqlite3.OperationalError):
        return "locked" in str(original) or "busy" in str(original)  # the busy timeout ran out
    return False


async def _database_error(request: Request, error: Exception) -> JSONResponse:
    if isinstance(error, SQLAlchemyError) and is_database_unavailable(error):
        log.warning("%s %s: database unavailable: %s", request.method, request.url.path, error)
        return JSONResponse({"detail": "database busy or unavailable, retry later"}, status_code=503,
                            headers={"Retry-After": "1"})  # fmt: skip
    return await _internal_error(request, error)


async def _read_rate_limited(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, ReadRateLimited)
    return JSONResponse({"detail": str(error)}, status_code=429,
                        headers={"Retry-After": str(max(1, math.ceil(error.wait_s)))})  # fmt: skip


async def _internal_error(request: Request, error: Exception) -> JSONResponse:
    log.error("%s %s failed", request.method, request.url.path, exc_info=error)
    return JSONResponse({"detail": "internal server error"}, status_code=500)


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(SQLAlchemyError, _database_error)
    app.add_exception_handler(ReadRateLimited, _read_rate_limited)
    app.add_exception_handler(Exception, _internal_error)

"""Liveness and readiness: the process answers and its database does, within the call budget."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import text

from serving.api.deps import SessionDep
from serving.api.schemas import HealthPublic, error_responses

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthPublic,
            responses=error_responses({503: "the database is slow or unreachable"}))  # fmt: skip
def health(session: SessionDep) -> HealthPublic:
    session.execute(text("SELECT 1"))  # a slow or unreachable database answers 503 (serving.api.errors)
    return HealthPublic(status="ok", database="ok")

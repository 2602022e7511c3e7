"""What every ingestion route does with the session: fetch or 404, commit or 409."""

from __future__ import annotations

from typing import TypeVar

from fastapi import HTTPException, status
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from recsys.database import Base

Model = TypeVar("Model", bound=Base)


def get_or_404(session: Session, model: type[Model], entity_id: int, name: str) -> Model:
    entity = session.get(model, entity_id)
    if entity is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"{name} {entity_id} not found")
    return entity


def commit_or_conflict(session: Session, detail: str) -> None:
    """Commit; a unique or foreign-key constraint that refuses it (a concurrent request won) is a 409."""
    try:
        session.commit()
    except IntegrityError as error:
        session.rollback()
        raise HTTPException(status.HTTP_409_CONFLICT, detail) from error

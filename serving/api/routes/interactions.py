"""Interactions: views, clicks, add-to-carts and purchases (ingestion, report 4.1.1), an append-only log.

The nightly `extract_interactions` step exports each day of them to the landing zone. An `event_id`
makes a post idempotent: a client that retries after a timeout gets the stored interaction back (200)
instead of storing it twice; the same `event_id` with different fields is a 409.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Response, status
from pydantic import AwareDatetime
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from serving.api.auth import AUTH_ERRORS, AdminScope, IngestScope
from serving.api.db import Customer, Interaction, InteractionType, Product, utc_now
from serving.api.deps import InteractionIdPath, SessionDep
from serving.api.persistence import get_or_404
from serving.api.schemas import (
    INT64_MAX,
    ClientId,
    InteractionCreate,
    InteractionPublic,
    InteractionsPublic,
    error_responses,
)

# Posting needs the ingest scope; reading them back (personal data) needs admin.
router = APIRouter(prefix="/interactions", tags=["interactions"], responses=error_responses(AUTH_ERRORS))


@router.post(
    "", response_model=InteractionPublic, status_code=status.HTTP_201_CREATED, dependencies=[IngestScope],
    responses={
        200: {"model": InteractionPublic, "description": "this event_id was stored before: the stored interaction"},
        **error_responses({404: "unknown customer or product", 409: "event_id stored with other fields"}),
    },
)  # fmt: skip
def create_interaction(body: InteractionCreate, session: SessionDep, response: Response) -> InteractionPublic:
    if body.event_id is not None and (stored := _stored_event(session, body.event_id)) is not None:
        return _replayed(stored, body, response)
    get_or_404(session, Customer, body.customer_id, "customer")
    get_or_404(session, Product, body.product_id, "product")
    interaction = Interaction(**body.model_dump(), received_at=utc_now())
    session.add(interaction)
    try:
        session.commit()
    except IntegrityError as error:
        session.rollback()
        if body.event_id is not None and (stored := _stored_event(session, body.event_id)) is not None:
            return _replayed(stored, body, response)  # the same event, posted concurrently
        raise HTTPException(status.HTTP_409_CONFLICT, "the customer or product was deleted meanwhile") from error
    return InteractionPublic.model_validate(interaction)


def _stored_event(session: Session, event_id: str) -> Interaction | None:
    return session.scalar(select(Interaction).where(Interaction.event_id == event_id))


def _replayed(stored: Interaction, body: InteractionCreate, response: Response) -> InteractionPublic:
    public = InteractionPublic.model_validate(stored)
    if not public.same_event(body):
        raise HTTPException(status.HTTP_409_CONFLICT, f"event_id {body.event_id!r} was stored with other fields")
    response.status_code = status.HTTP_200_OK
    return public


@router.get("", response_model=InteractionsPublic, dependencies=[AdminScope])
def list_interactions(
    session: SessionDep,
    customer_id: Annotated[int | None, Query(gt=0, le=INT64_MAX)] = None,
    product_id: Annotated[int | None, Query(gt=0, le=INT64_MAX)] = None,
    session_id: Annotated[ClientId | None, Query()] = None,
    type: Annotated[InteractionType | None, Query()] = None,
    since: Annotated[AwareDatetime | None, Query(description="events at or after this time")] = None,
    until: Annotated[AwareDatetime | None, Query(description="events before this time")] = None,
    after_id: Annotated[int, Query(ge=0, le=INT64_MAX, description="last id of the previous page")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> InteractionsPublic:
    """Interactions in the order they were stored, optionally of one customer, product, session or type,
    or within a time window."""
    query = select(Interaction).where(Interaction.id > after_id)
    if customer_id is not None:
        query = query.where(Interaction.customer_id == customer_id)
    if product_id is not None:
        query = query.where(Interaction.product_id == product_id)
    if session_id is not None:
        query = query.where(Interaction.session_id == session_id)
    if type is not None:
        query = query.where(Interaction.type == type)
    if since is not None:
        query = query.where(Interaction.timestamp >= since)
    if until is not None:
        query = query.where(Interaction.timestamp < until)
    rows = session.scalars(query.order_by(Interaction.id).limit(limit)).all()
    return InteractionsPublic(data=[InteractionPublic.model_validate(row) for row in rows],
                              next_after_id=rows[-1].id if len(rows) == limit else None)  # fmt: skip


@router.get("/{interaction_id}", response_model=InteractionPublic, dependencies=[AdminScope],
            responses=error_responses({404: "no interaction with this id"}))  # fmt: skip
def read_interaction(interaction_id: InteractionIdPath, session: SessionDep) -> InteractionPublic:
    return InteractionPublic.model_validate(get_or_404(session, Interaction, interaction_id, "interaction"))

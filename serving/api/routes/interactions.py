"""Interactions: views, clicks, add-to-carts and purchases (ingestion, report 4.1.1), an append-only log.

The nightly `extract_interactions` step exports each day of them to the landing zone.

Idempotency: an `event_id` in the body, or the standard `Idempotency-Key` request header (which supplies
the `event_id` when the body has none), makes a post idempotent: a client that retries after a timeout, a
dropped connection or a 503 gets the stored interaction back (200) instead of storing it twice; the same
key with different fields is a 409. A header and a body `event_id` that differ are a 422 naming both.

Durability: a 201 (or 200) is sent only after the interaction's transaction has committed, so an
acknowledged interaction survives a crash of the gateway the moment after; a post that got no answer
(connection lost, gateway killed, 503) may or may not be stored, and retrying it with the same key is
always safe. `tests/test_durability.py` checks both by killing the gateway and the database mid-burst.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Query, Response, status
from fastapi.exceptions import RequestValidationError
from pydantic import AwareDatetime
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from recsys.database import Customer, Interaction, InteractionType, Product, utc_now
from recsys.spec import DatasetSpec
from serving.api.auth import AUTH_ERRORS, AdminScope, IngestScope
from serving.api.deps import InteractionIdPath, SeenItemsDep, SessionDep
from serving.api.persistence import get_or_404
from serving.api.rate_limit import RATE_LIMITED, RateLimit
from serving.api.schemas import (
    INT64_MAX,
    ClientId,
    InteractionCreate,
    InteractionPublic,
    InteractionsPublic,
    error_responses,
    interaction_model,
)

# Posting needs the ingest scope (`event_router`); reading them back (personal data) needs admin.
router = APIRouter(prefix="/interactions", tags=["interactions"], responses=error_responses(AUTH_ERRORS))

IdempotencyKeyHeader = Annotated[
    ClientId | None,
    Header(alias="Idempotency-Key", description="the event's idempotency key (its `event_id`); a retry with the "
                                               "same key stores nothing twice"),
]  # fmt: skip


def event_router(spec: DatasetSpec) -> APIRouter:
    """Posting interactions, whose body's `context` is the spec's other context features (`interaction_model`):
    the route is built per application, for the spec its settings name."""
    events = APIRouter(prefix="/interactions", tags=["interactions"], responses=error_responses(AUTH_ERRORS))

    def create_interaction(body: InteractionCreate, session: SessionDep, seen_items: SeenItemsDep, response: Response,
                           idempotency_key: IdempotencyKeyHeader = None) -> InteractionPublic:  # fmt: skip
        """Store an interaction; the answer (201, or 200 for a replay) comes only after the commit. Then, when the
        spec's `exclude_seen` counts its type, its product is kept out of the customer's lists at once."""
        body = _with_idempotency_key(body, idempotency_key)
        if body.event_id is not None and (stored := _stored_event(session, body.event_id)) is not None:
            return _replayed(stored, body, response)
        get_or_404(session, Customer, body.customer_id, "customer")
        get_or_404(session, Product, body.product_id, "product")
        interaction = Interaction(**body.stored_fields(), received_at=utc_now())
        session.add(interaction)
        try:
            session.commit()
        except IntegrityError as error:
            session.rollback()
            if body.event_id is not None and (stored := _stored_event(session, body.event_id)) is not None:
                return _replayed(stored, body, response)  # the same event, posted concurrently
            raise HTTPException(status.HTTP_409_CONFLICT, "the customer or product was deleted meanwhile") from error
        # Only now, committed, is the interaction acknowledged (a commit that fails raises: 503 or 500, never 201).
        seen_items.note(interaction.customer_id, interaction.product_id, interaction.type)
        return InteractionPublic.model_validate(interaction)

    # FastAPI reads the body's model from the annotation: the spec's, not the free-form base mypy checks against.
    create_interaction.__annotations__["body"] = interaction_model(spec)
    events.post(
        "", response_model=InteractionPublic, status_code=status.HTTP_201_CREATED,
        dependencies=[IngestScope, RateLimit],
        responses={
            200: {"model": InteractionPublic, "description": "this event_id was stored before: the stored interaction"},
            **error_responses({404: "unknown customer or product", 409: "event_id stored with other fields",
                               503: "database busy or unavailable: nothing acknowledged, retry with the same key",
                               **RATE_LIMITED}),
        },
    )(create_interaction)  # fmt: skip
    return events


def _with_idempotency_key(body: InteractionCreate, key: str | None) -> InteractionCreate:
    """The body with the `Idempotency-Key` header as its `event_id`; 422 when both are given and differ."""
    if key is None or body.event_id == key:
        return body
    if body.event_id is None:
        return body.model_copy(update={"event_id": key})
    message = "the Idempotency-Key header and the body's event_id differ: send one of them, or the same in both"
    raise RequestValidationError([
        {"type": "idempotency_key_conflict", "loc": ("header", "Idempotency-Key"), "msg": message, "input": key},
        {"type": "idempotency_key_conflict", "loc": ("body", "event_id"), "msg": message, "input": body.event_id},
    ])  # fmt: skip


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

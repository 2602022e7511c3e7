"""Customers: create, read, list, update, delete (ingestion, report 4.1.1)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, status
from sqlalchemy import select

from serving.api.auth import AUTH_ERRORS, AdminScope
from serving.api.db import Customer, utc_now
from serving.api.deps import CustomerIdPath, SeenItemsDep, SessionDep
from serving.api.persistence import commit_or_conflict, get_or_404
from serving.api.rate_limit import RATE_LIMITED, RateLimit
from serving.api.schemas import (
    INT64_MAX,
    CustomerCreate,
    CustomerPublic,
    CustomersPublic,
    CustomerUpdate,
    error_responses,
)

# Customers are personal data: every route needs the admin scope.
router = APIRouter(prefix="/customers", tags=["customers"], dependencies=[AdminScope],
                   responses=error_responses(AUTH_ERRORS))  # fmt: skip
NOT_FOUND = error_responses({404: "no customer with this id"})
WRITE_ERRORS = error_responses({404: "no customer with this id", **RATE_LIMITED})


@router.post("", response_model=CustomerPublic, status_code=status.HTTP_201_CREATED, dependencies=[RateLimit],
             responses=error_responses({409: "a customer with this id exists", **RATE_LIMITED}))  # fmt: skip
def create_customer(body: CustomerCreate, session: SessionDep) -> CustomerPublic:
    conflict = f"customer {body.id} already exists"
    if session.get(Customer, body.id) is not None:
        raise HTTPException(status.HTTP_409_CONFLICT, conflict)
    now = utc_now()
    customer = Customer(**body.model_dump(), created_at=now, updated_at=now)
    session.add(customer)
    commit_or_conflict(session, conflict)
    return CustomerPublic.model_validate(customer)


@router.get("", response_model=CustomersPublic)
def list_customers(
    session: SessionDep,
    after_id: Annotated[int, Query(ge=0, le=INT64_MAX, description="last id of the previous page")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> CustomersPublic:
    rows = session.scalars(select(Customer).where(Customer.id > after_id).order_by(Customer.id).limit(limit)).all()
    return CustomersPublic(data=[CustomerPublic.model_validate(row) for row in rows],
                           next_after_id=rows[-1].id if len(rows) == limit else None)  # fmt: skip


@router.get("/{customer_id}", response_model=CustomerPublic, responses=NOT_FOUND)
def read_customer(customer_id: CustomerIdPath, session: SessionDep) -> CustomerPublic:
    return CustomerPublic.model_validate(get_or_404(session, Customer, customer_id, "customer"))


@router.patch("/{customer_id}", response_model=CustomerPublic, responses=WRITE_ERRORS, dependencies=[RateLimit])
def update_customer(customer_id: CustomerIdPath, body: CustomerUpdate, session: SessionDep) -> CustomerPublic:
    customer = get_or_404(session, Customer, customer_id, "customer")
    for name, value in body.changes().items():
        setattr(customer, name, value)
    customer.updated_at = utc_now()
    session.commit()
    return CustomerPublic.model_validate(customer)


@router.delete("/{customer_id}", response_model=None, status_code=status.HTTP_204_NO_CONTENT,
                responses=WRITE_ERRORS, dependencies=[RateLimit])  # fmt: skip
def delete_customer(customer_id: CustomerIdPath, session: SessionDep, seen_items: SeenItemsDep) -> None:
    """Deletes the customer and, with them, their interactions (the database cascades) and the items they
    interacted with since the nightly run."""
    session.delete(get_or_404(session, Customer, customer_id, "customer"))
    session.commit()
    seen_items.forget(customer_id)

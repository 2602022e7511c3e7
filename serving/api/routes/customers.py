"""Customers: create, read, list, update, delete (ingestion, report 4.1.1).

A customer's `attributes` are their profile: the dataset spec's user features, with the names and types of their
columns (`serving.api.schemas.profile_model`), validated strictly and shown in OpenAPI.

Creating or updating a customer writes their encoded profile through to Feast's online store
(serving/live_features.py), so that their next recommendation request gets a personal list from the user tower;
the database row is the truth, and a write-through that fails (no published version, Triton or Feast down) is
logged and leaves the customer with the generic list until the next nightly run.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Annotated

import anyio.from_thread
from fastapi import APIRouter, HTTPException, Query, status
from sqlalchemy import select

from recsys.database import Customer, ForgottenCustomer, utc_now
from recsys.spec import DatasetSpec
from serving.api.auth import AUTH_ERRORS, AdminScope
from serving.api.deps import CustomerIdPath, LiveFeaturesDep, RecommenderDep, SeenItemsDep, SessionDep, SettingsDep
from serving.api.persistence import commit_or_conflict, get_or_404
from serving.api.rate_limit import RATE_LIMITED, RateLimit
from serving.api.schemas import (
    INT64_MAX,
    CustomerCreate,
    CustomerPublic,
    CustomersPublic,
    CustomerUpdate,
    ForgetReport,
    customer_models,
    error_responses,
    stored_attributes,
)
from serving.forget import forget_customers
from serving.live_features import LiveFeatures

log = logging.getLogger(__name__)

# Customers are personal data: every route needs the admin scope. Reading, listing, deleting and forgetting;
# creating and updating take the spec's profile (`profile_router`).
router = APIRouter(prefix="/customers", tags=["customers"], dependencies=[AdminScope],
                   responses=error_responses(AUTH_ERRORS))  # fmt: skip
NOT_FOUND = error_responses({404: "no customer with this id"})
WRITE_ERRORS = error_responses({404: "no customer with this id", **RATE_LIMITED})


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


@router.delete("/{customer_id}", response_model=None, status_code=status.HTTP_204_NO_CONTENT,
                responses=WRITE_ERRORS, dependencies=[RateLimit])  # fmt: skip
def delete_customer(customer_id: CustomerIdPath, session: SessionDep, seen_items: SeenItemsDep,
                    live: LiveFeaturesDep) -> None:  # fmt: skip
    """Deletes the customer and, with them, their interactions (the database cascades), the items they
    interacted with since the nightly run and their cached online answer."""
    session.delete(get_or_404(session, Customer, customer_id, "customer"))
    session.commit()
    seen_items.forget(customer_id)
    if live is not None:
        try:
            anyio.from_thread.run(live.forget, customer_id)
        except Exception as error:  # the row is gone; the cached answer expires with its TTL
            log.warning("forgetting customer %d online failed (%s: %s)", customer_id, type(error).__name__, error)


@router.post("/{customer_id}/forget", response_model=ForgetReport, responses=error_responses(RATE_LIMITED),
             dependencies=[RateLimit])  # fmt: skip
def forget_customer(customer_id: CustomerIdPath, settings: SettingsDep, recommender: RecommenderDep) -> ForgetReport:
    """Erases the customer from every store that holds them (the database with their interactions, the
    landing zone's extracts, the lists and bitmaps of every kept version, Feast's online row, the online caches,
    the impression logs) and records a tombstone, so that neither the next nightly run nor a later extract
    brings them back and their id cannot be created again (serving/forget.py). Idempotent: an id no store
    holds (or one forgotten before) is forgotten again, with nothing left to erase. The answer counts what each
    store gave up."""
    report = forget_customers(settings, [customer_id])
    recommender.forget_customer(customer_id)
    return ForgetReport.model_validate(report)


def profile_router(spec: DatasetSpec) -> APIRouter:
    """Creating and updating customers, whose bodies' `attributes` are the spec's user features (`customer_models`):
    the routes are built per application, for the spec its settings name."""
    create_body, update_body = customer_models(spec)
    profiles = APIRouter(prefix="/customers", tags=["customers"], dependencies=[AdminScope],
                         responses=error_responses(AUTH_ERRORS))  # fmt: skip

    def create_customer(body: CustomerCreate, session: SessionDep, live: LiveFeaturesDep) -> CustomerPublic:
        conflict = f"customer {body.id} already exists"
        if session.get(Customer, body.id) is not None:
            raise HTTPException(status.HTTP_409_CONFLICT, conflict)
        if session.get(ForgottenCustomer, body.id) is not None:  # a tombstone: the id stays forgotten
            raise HTTPException(status.HTTP_410_GONE, f"customer {body.id} was forgotten on request; the id is not "
                                                      "used again")  # fmt: skip
        now = utc_now()
        fields = {**body.model_dump(), "attributes": stored_attributes(body.attributes)}
        customer = Customer(**fields, created_at=now, updated_at=now)
        session.add(customer)
        commit_or_conflict(session, conflict)
        write_through(live, customer)
        return CustomerPublic.model_validate(customer)

    def update_customer(customer_id: CustomerIdPath, body: CustomerUpdate, session: SessionDep,
                        live: LiveFeaturesDep) -> CustomerPublic:  # fmt: skip
        customer = get_or_404(session, Customer, customer_id, "customer")
        changes = body.changes()
        if "attributes" in changes:  # the whole profile is replaced
            changes["attributes"] = stored_attributes(changes["attributes"])
        for name, value in changes.items():
            setattr(customer, name, value)
        customer.updated_at = utc_now()
        session.commit()
        if "attributes" in changes:  # the profile the models see
            write_through(live, customer, changed=True)
        return CustomerPublic.model_validate(customer)

    # FastAPI reads the body's model from the annotation: the spec's, not the free-form base mypy checks against.
    create_customer.__annotations__["body"] = create_body
    update_customer.__annotations__["body"] = update_body
    profiles.post("", response_model=CustomerPublic, status_code=status.HTTP_201_CREATED, dependencies=[RateLimit],
                  responses=error_responses({409: "a customer with this id exists",
                                             410: "the id was forgotten on request", **RATE_LIMITED}))(create_customer)
    profiles.patch("/{customer_id}", response_model=CustomerPublic, responses=WRITE_ERRORS,
                   dependencies=[RateLimit])(update_customer)  # fmt: skip
    return profiles


def write_through(live: LiveFeatures | None, customer: Customer, *, changed: bool = False) -> None:
    """The customer's profile to Feast's online store now (sync routes run in a worker thread: the write runs on
    the event loop, with the gateway's async clients)."""
    if live is None:
        return
    try:
        version = anyio.from_thread.run(partial(live.write_through, changed=changed), customer.id,
                                        dict(customer.attributes or {}))  # fmt: skip
    except Exception as error:  # the database row is the truth; the nightly run encodes it
        log.warning("writing customer %d's features to Feast failed (%s: %s): generic list until the nightly run",
                    customer.id, type(error).__name__, error)  # fmt: skip
        return
    if version is None:
        log.info("customer %d: no profile features or no published version: nothing written to Feast", customer.id)

"""Products: create, read, list, update, delete (ingestion, report 4.1.1).

A product's `attributes` are its features: the dataset spec's item features, with the names and types of their
columns (`serving.api.schemas.product_models`), validated strictly and shown in OpenAPI; the nightly extract copies
them into the interaction rows. `available` and `promoted` feed the recommendations: unavailable products are
filtered out, promoted ones come first. A product that has interactions cannot be deleted (409): set `available` to
false, so the interactions it appears in keep training the models.

Creating or updating a product the served version does not know, with features, writes it through to the online
path (serving/live_features.py, `FreshProducts`): online answers can retrieve and rank it at once. The database row
is the truth; a write-through that fails (no published version, Triton down) is logged and leaves the product to the
next nightly run.
"""

from __future__ import annotations

import logging
from typing import Annotated

import anyio.from_thread
from fastapi import APIRouter, HTTPException, Query, status
from sqlalchemy import exists, select

from recsys.database import Interaction, Product, utc_now
from recsys.spec import DatasetSpec
from serving.api.auth import AUTH_ERRORS, AdminScope, ReadScope
from serving.api.deps import LiveFeaturesDep, ProductIdPath, RecommenderDep, SessionDep
from serving.api.persistence import commit_or_conflict, get_or_404
from serving.api.rate_limit import RATE_LIMITED, RateLimit
from serving.api.schemas import (
    INT64_MAX,
    ProductCreate,
    ProductPublic,
    ProductsPublic,
    ProductUpdate,
    error_responses,
    product_models,
    stored_attributes,
)
from serving.live_features import LiveFeatures

log = logging.getLogger(__name__)

# The catalog is read with the read scope; changing it needs admin. Reading, listing and deleting; creating and
# updating take the spec's item features (`catalog_router`).
router = APIRouter(prefix="/products", tags=["products"], responses=error_responses(AUTH_ERRORS))
NOT_FOUND = error_responses({404: "no product with this id"})


@router.get("", response_model=ProductsPublic, dependencies=[ReadScope])
def list_products(
    session: SessionDep,
    after_id: Annotated[int, Query(ge=0, le=INT64_MAX, description="last id of the previous page")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    available: bool | None = None,
    promoted: bool | None = None,
) -> ProductsPublic:
    query = select(Product).where(Product.id > after_id)
    if available is not None:
        query = query.where(Product.available == available)
    if promoted is not None:
        query = query.where(Product.promoted == promoted)
    rows = session.scalars(query.order_by(Product.id).limit(limit)).all()
    return ProductsPublic(data=[ProductPublic.model_validate(row) for row in rows],
                          next_after_id=rows[-1].id if len(rows) == limit else None)  # fmt: skip


@router.get("/{product_id}", response_model=ProductPublic, responses=NOT_FOUND, dependencies=[ReadScope])
def read_product(product_id: ProductIdPath, session: SessionDep) -> ProductPublic:
    return ProductPublic.model_validate(get_or_404(session, Product, product_id, "product"))


@router.delete(
    "/{product_id}", response_model=None, status_code=status.HTTP_204_NO_CONTENT, dependencies=[AdminScope, RateLimit],
    responses=error_responses({404: "no product with this id", 409: "the product has interactions", **RATE_LIMITED}),
)  # fmt: skip
def delete_product(product_id: ProductIdPath, session: SessionDep, recommender: RecommenderDep,
                   live: LiveFeaturesDep) -> None:  # fmt: skip
    product = get_or_404(session, Product, product_id, "product")
    conflict = f"product {product_id} has interactions: set available to false instead of deleting it"
    if session.scalar(select(exists().where(Interaction.product_id == product_id))):
        raise HTTPException(status.HTTP_409_CONFLICT, conflict)
    session.delete(product)
    commit_or_conflict(session, conflict)  # an interaction added meanwhile: the foreign key refuses
    recommender.forget_product(product_id)
    if live is not None:
        try:
            anyio.from_thread.run(live.products.forget, product_id)
        except Exception as error:  # the row is gone; the next nightly run drops it from the online path too
            log.warning("removing product %d from the online path failed (%s: %s)", product_id,
                        type(error).__name__, error)  # fmt: skip


def catalog_router(spec: DatasetSpec) -> APIRouter:
    """Creating and updating products, whose bodies' `attributes` are the spec's item features (`product_models`):
    the routes are built per application, for the spec its settings name."""
    create_body, update_body = product_models(spec)
    catalog = APIRouter(prefix="/products", tags=["products"], responses=error_responses(AUTH_ERRORS))

    def create_product(body: ProductCreate, session: SessionDep, recommender: RecommenderDep,
                       live: LiveFeaturesDep) -> ProductPublic:  # fmt: skip
        conflict = f"product {body.id} already exists"
        if session.get(Product, body.id) is not None:
            raise HTTPException(status.HTTP_409_CONFLICT, conflict)
        now = utc_now()
        fields = {**body.model_dump(), "attributes": stored_attributes(body.attributes)}
        product = Product(**fields, created_at=now, updated_at=now)
        session.add(product)
        commit_or_conflict(session, conflict)
        recommender.forget_product(body.id)  # the gateway may have cached it as unknown
        write_through(live, product)
        return ProductPublic.model_validate(product)

    def update_product(product_id: ProductIdPath, body: ProductUpdate, session: SessionDep,
                       recommender: RecommenderDep, live: LiveFeaturesDep) -> ProductPublic:  # fmt: skip
        product = get_or_404(session, Product, product_id, "product")
        changes = body.changes()
        if "attributes" in changes:  # the whole set of features is replaced
            changes["attributes"] = stored_attributes(changes["attributes"])
        for name, value in changes.items():
            setattr(product, name, value)
        product.updated_at = utc_now()
        session.commit()
        recommender.forget_product(product_id)  # availability and promotion apply to the next request
        if "attributes" in changes:  # the features the models see
            write_through(live, product)
        return ProductPublic.model_validate(product)

    # FastAPI reads the body's model from the annotation: the spec's, not the free-form base mypy checks against.
    create_product.__annotations__["body"] = create_body
    update_product.__annotations__["body"] = update_body
    catalog.post("", response_model=ProductPublic, status_code=status.HTTP_201_CREATED,
                 dependencies=[AdminScope, RateLimit],
                 responses=error_responses({409: "a product with this id exists", **RATE_LIMITED}))(create_product)
    catalog.patch("/{product_id}", response_model=ProductPublic, dependencies=[AdminScope, RateLimit],
                  responses=error_responses({404: "no product with this id", **RATE_LIMITED}))(update_product)
    return catalog


def write_through(live: LiveFeatures | None, product: Product) -> None:
    """The product's features to the online path now, where the served version does not know it (sync routes run
    in a worker thread: the write runs on the event loop, with the gateway's async clients)."""
    if live is None:
        return
    try:
        version = anyio.from_thread.run(live.products.write_through, product.id, dict(product.attributes or {}))
    except Exception as error:  # the database row is the truth; the nightly run takes the product
        log.warning("writing product %d through to the online path failed (%s: %s): it waits for the nightly run",
                    product.id, type(error).__name__, error)  # fmt: skip
        return
    if version is not None:
        log.info("product %d: retrievable and rankable online under version %s", product.id, version)

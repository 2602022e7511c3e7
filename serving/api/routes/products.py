"""Products: create, read, list, update, delete (ingestion, report 4.1.1).

`available` and `promoted` feed the recommendations: unavailable products are filtered out, promoted
ones come first. A product that has interactions cannot be deleted (409): set `available` to false,
so the interactions it appears in keep training the models.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, status
from sqlalchemy import exists, select

from recsys.database import Interaction, Product, utc_now
from serving.api.auth import AUTH_ERRORS, AdminScope, ReadScope
from serving.api.deps import ProductIdPath, RecommenderDep, SessionDep
from serving.api.persistence import commit_or_conflict, get_or_404
from serving.api.rate_limit import RATE_LIMITED, RateLimit
from serving.api.schemas import (
    INT32_MAX,
    INT64_MAX,
    ProductCreate,
    ProductPublic,
    ProductsPublic,
    ProductUpdate,
    error_responses,
)

# The catalog is read with the read scope; changing it needs admin.
router = APIRouter(prefix="/products", tags=["products"], responses=error_responses(AUTH_ERRORS))
NOT_FOUND = error_responses({404: "no product with this id"})


@router.post("", response_model=ProductPublic, status_code=status.HTTP_201_CREATED,
             dependencies=[AdminScope, RateLimit],
             responses=error_responses({409: "a product with this id exists", **RATE_LIMITED}))  # fmt: skip
def create_product(body: ProductCreate, session: SessionDep, recommender: RecommenderDep) -> ProductPublic:
    conflict = f"product {body.id} already exists"
    if session.get(Product, body.id) is not None:
        raise HTTPException(status.HTTP_409_CONFLICT, conflict)
    now = utc_now()
    product = Product(**body.model_dump(), created_at=now, updated_at=now)
    session.add(product)
    commit_or_conflict(session, conflict)
    recommender.forget_product(body.id)  # the gateway may have cached it as unknown
    return ProductPublic.model_validate(product)


@router.get("", response_model=ProductsPublic, dependencies=[ReadScope])
def list_products(
    session: SessionDep,
    after_id: Annotated[int, Query(ge=0, le=INT64_MAX, description="last id of the previous page")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    available: bool | None = None,
    promoted: bool | None = None,
    category: Annotated[int | None, Query(ge=0, le=INT32_MAX)] = None,
) -> ProductsPublic:
    query = select(Product).where(Product.id > after_id)
    if available is not None:
        query = query.where(Product.available == available)
    if promoted is not None:
        query = query.where(Product.promoted == promoted)
    if category is not None:
        query = query.where(Product.category == category)
    rows = session.scalars(query.order_by(Product.id).limit(limit)).all()
    return ProductsPublic(data=[ProductPublic.model_validate(row) for row in rows],
                          next_after_id=rows[-1].id if len(rows) == limit else None)  # fmt: skip


@router.get("/{product_id}", response_model=ProductPublic, responses=NOT_FOUND, dependencies=[ReadScope])
def read_product(product_id: ProductIdPath, session: SessionDep) -> ProductPublic:
    return ProductPublic.model_validate(get_or_404(session, Product, product_id, "product"))


@router.patch("/{product_id}", response_model=ProductPublic,
              responses=error_responses({404: "no product with this id", **RATE_LIMITED}),
              dependencies=[AdminScope, RateLimit])  # fmt: skip
def update_product(product_id: ProductIdPath, body: ProductUpdate, session: SessionDep,
                   recommender: RecommenderDep) -> ProductPublic:  # fmt: skip
    product = get_or_404(session, Product, product_id, "product")
    for name, value in body.changes().items():
        setattr(product, name, value)
    product.updated_at = utc_now()
    session.commit()
    recommender.forget_product(product_id)  # availability and promotion apply to the next request
    return ProductPublic.model_validate(product)


@router.delete(
    "/{product_id}", response_model=None, status_code=status.HTTP_204_NO_CONTENT, dependencies=[AdminScope, RateLimit],
    responses=error_responses({404: "no product with this id", 409: "the product has interactions", **RATE_LIMITED}),
)  # fmt: skip
def delete_product(product_id: ProductIdPath, session: SessionDep, recommender: RecommenderDep) -> None:
    product = get_or_404(session, Product, product_id, "product")
    conflict = f"product {product_id} has interactions: set available to false instead of deleting it"
    if session.scalar(select(exists().where(Interaction.product_id == product_id))):
        raise HTTPException(status.HTTP_409_CONFLICT, conflict)
    session.delete(product)
    commit_or_conflict(session, conflict)  # an interaction added meanwhile: the foreign key refuses
    recommender.forget_product(product_id)

"""Recommendations for a visitor and similar products (seed 000's three routes; logic in serving.recommender).

The database is read on the request path for two things only, each one indexed query within the
database timeout: the products viewed in the visitor's session (when none are given) and the
current availability and promotion flags of the listed products.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar

import pydantic_core
from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, Field, create_model
from sqlalchemy import bindparam, select
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from recsys.database import SHORT_TEXT, Interaction, InteractionType, Product
from recsys.spec import DatasetSpec, SpecError
from serving.api.auth import AUTH_ERRORS, ReadScope
from serving.api.deps import CustomerIdPath, ProductIdPath, get_recommender
from serving.api.errors import is_database_unavailable
from serving.api.lean_route import LeanReadRoute
from serving.api.rate_limit import RATE_LIMITED
from serving.api.schemas import INT64_MAX, error_responses, integer_range
from serving.product_flags import ProductFlags
from serving.recommender import ContextValue, VisitorQuery

log = logging.getLogger(__name__)

router = APIRouter(tags=["recommendations"], dependencies=[ReadScope], route_class=LeanReadRoute,
                   responses=error_responses({**AUTH_ERRORS, **RATE_LIMITED}))  # fmt: skip

SESSION_VIEWS = 5  # the latest products viewed in a session stand for "browsing now"
MAX_VIEWED = 20


class RecommendedProduct(BaseModel):
    product_id: int
    score: float = Field(description="order score: the ranker's P(click) blended with the retrieval sources' "
                                     "(1.0 when the promotion rule applied)")
    click_probability: float | None = Field(
        None, description="the ranker's P(click), which the promotion rule compares with its threshold (the "
                          "segment's click rate for a generic list; none for similar products)")
    probability: float | None = Field(None, description="softmax sampling probability (temperature > 0)")
    promoted: bool


class RecommendationResponse(BaseModel):
    customer_id: int | None
    route: str = Field(description="browsing_now, precomputed, online, online_cached, generic, or *_local_copy")
    model_version: str | None = Field(description="the published nightly version the list comes from")
    degraded: list[str] = Field(description="what was unavailable, e.g. redis_unavailable, triton_unavailable")
    experiment: str | None = Field(None, description="the running A/B experiment, if any")
    bucket: str | None = Field(None, description="the customer's bucket in it: control (the current version) or "
                                                 "challenger (the experiment's version)")
    items: list[RecommendedProduct]
    request_id: str = Field(description="this answer's X-Request-ID: send it back with the interactions that follow")


# Built once, with the ids as one expanding parameter: building the select per request around a literal list
# of 100 ids cost 0.1-0.2 ms of server CPU per request, 5-15% of a precomputed hit's (benchmarks/serving.py).
_PRODUCT_FLAGS = (select(Product.id, Product.available, Product.promoted)
                  .where(Product.id.in_(bindparam("ids", expanding=True))))  # fmt: skip


def product_flags_reader(sessionmaker):  # type: ignore[no-untyped-def]
    """An async reader of the availability and promotion flags of products, for the Recommender."""

    def read(items: Sequence[int]) -> dict[int, ProductFlags]:
        with sessionmaker() as session:
            rows = session.execute(_PRODUCT_FLAGS, {"ids": list(items)})
            return {row.id: ProductFlags(available=row.available, promoted=row.promoted) for row in rows}

    async def flags(items: Sequence[int]) -> dict[int, ProductFlags]:
        return await run_in_threadpool(read, items)

    return flags


async def _session_views(request: Request, session_id: str) -> tuple[int, ...] | None:
    """The session's latest viewed products; None when the database cannot answer now (the visitor is then
    served without them, and the answer says database_unavailable)."""

    def read() -> tuple[int, ...]:
        with request.app.state.sessionmaker() as session:
            rows = session.execute(
                select(Interaction.product_id).where(Interaction.session_id == session_id,
                                                     Interaction.type == InteractionType.VIEW)
                .order_by(Interaction.timestamp.desc()).limit(SESSION_VIEWS)
            )  # fmt: skip
            return tuple(dict.fromkeys(row.product_id for row in rows))

    try:
        return await run_in_threadpool(read)
    except SQLAlchemyError as error:
        if not is_database_unavailable(error):
            raise
        log.warning("session views unavailable (%s): answering without them", type(error).__name__)
        return None


def _response(request: Request, customer_id: int | None, ranked, probabilities: list[float],  # type: ignore[no-untyped-def]
              promoted: list[bool], temperature: float) -> Response:  # fmt: skip
    """The answer, a `RecommendationResponse` as a dict (tests validate it against the model), serialized by
    pydantic-core: building the model first cost 14 us a request more, on the hot path (timeit, 20 items)."""
    sampled = temperature > 0
    answer = {
        "customer_id": customer_id, "route": ranked.route, "model_version": ranked.model_version,
        "degraded": ranked.degraded, "experiment": ranked.experiment, "bucket": ranked.bucket,
        "items": [{"product_id": item, "score": score, "click_probability": None if math.isnan(click) else click,
                   "probability": probability if sampled else None, "promoted": flag}
                  for item, score, click, probability, flag in zip(ranked.items, ranked.scores,
                                                                    ranked.click_probabilities, probabilities, promoted,
                                                                    strict=True)],
        "request_id": request.state.request_id,
    }  # fmt: skip
    request.state.recommendation = answer  # logged as an impression and counted (serving.api.observability)
    request.state.temperature = temperature  # the policy that chose the list, logged with it
    if ranked.candidate_scores is not None:  # what an off-policy estimate of another temperature needs
        request.state.candidates = (ranked.candidate_scores, ranked.top_candidate)
    return Response(pydantic_core.to_json(answer), media_type="application/json")


class VisitorParameters(BaseModel):
    """The recommendations route's own query parameters; `visitor_parameters` adds the spec's context features."""

    session_id: str | None = Field(None, max_length=128, description="products viewed in it: browsing now")
    viewed: list[Annotated[int, Field(gt=0, le=INT64_MAX)]] | None = Field(
        None, max_length=MAX_VIEWED, description="products on screen now")
    count: int = Field(20, ge=1, le=100)
    temperature: float = Field(0.0, ge=0, le=100, description="softmax sampling; 0 = ranked order")
    seed: int | None = Field(None, ge=0, le=INT64_MAX, description="makes sampling reproducible")

    context_features: ClassVar[tuple[str, ...]] = ()

    def context(self) -> dict[str, ContextValue]:
        """The context features given (an empty value is left out: missing, as in batch scoring)."""
        values = ((name, getattr(self, name)) for name in self.context_features)
        return {name: value for name, value in values if value is not None and value != ""}


# The route's own query parameters: a context feature of the spec may not take one of these names.
VISITOR_PARAMETERS = frozenset(VisitorParameters.model_fields)


def visitor_parameters(spec: DatasetSpec) -> type[VisitorParameters]:
    """The query model of `GET /recommendations/{customer_id}`: its own parameters and each of the spec's context
    features, named and typed as its column (AliCCP: `position`, `location`, `device`; shop_events: `slot`,
    `channel`): the request's context, which the ranker takes as it took each training row's, and whose segment
    features pick a new visitor's list. A feature left out is missing, as in batch scoring (Categorify's null
    code)."""
    clash = VISITOR_PARAMETERS.intersection(spec.context_features)
    if clash:
        raise SpecError(f"{spec.source}: context features {sorted(clash)} clash with the recommendations route's "
                        f"own query parameters")  # fmt: skip
    fields: dict[str, Any] = {name: (_context_type(spec, name), _context_field(spec, name))
                              for name in spec.context_features}  # fmt: skip
    model = create_model("VisitorParameters", __base__=VisitorParameters, **fields)
    model.context_features = tuple(spec.context_features)
    return model


def _context_type(spec: DatasetSpec, name: str) -> Any:
    column_type = spec.columns[name]
    if integer_range(column_type) is not None:
        return int | None
    return float | None if column_type.startswith(("float", "double")) else str | None


def _context_field(spec: DatasetSpec, name: str) -> Any:
    """The query parameter of a context feature: an integer in its column type's range, a finite number, or
    text a segment key can hold (no `:`, which joins a segment's values)."""
    column_type = spec.columns[name]
    description = (f"context feature `{name}` ({column_type}) of the request, which the ranker takes as in training; "
                   "left out: missing, as in batch scoring")
    if (integers := integer_range(column_type)) is not None:
        return Field(None, ge=integers[0], le=integers[1], description=description)
    if column_type.startswith(("float", "double")):
        return Field(None, allow_inf_nan=False, description=description)
    return Field(None, max_length=SHORT_TEXT, pattern=r"^[\w .\-]*$", description=description)


def visitor_router(spec: DatasetSpec) -> APIRouter:
    """`GET /recommendations/{customer_id}`, whose query parameters include the spec's context features
    (`visitor_parameters`): built per application, for the spec its settings name."""
    visitor = APIRouter(tags=["recommendations"], dependencies=[ReadScope], route_class=LeanReadRoute,
                        responses=error_responses({**AUTH_ERRORS, **RATE_LIMITED}))  # fmt: skip
    parameters_model = visitor_parameters(spec)

    async def recommendations(request: Request, customer_id: CustomerIdPath, parameters: VisitorParameters
                              ) -> Response:  # fmt: skip
        seen = tuple(parameters.viewed or ())
        views_unknown = False
        if not seen and parameters.session_id:
            views = await _session_views(request, parameters.session_id)
            views_unknown = views is None
            seen = views or ()
        query = VisitorQuery(customer_id=customer_id, context=parameters.context(), viewed=seen,
                             count=parameters.count, temperature=parameters.temperature, seed=parameters.seed,
                             api_key=request.state.caller.name)  # fmt: skip
        ranked, probabilities, promoted = await get_recommender(request).recommend(query)
        if views_unknown and "database_unavailable" not in ranked.degraded:
            ranked.degraded.append("database_unavailable")
        return _response(request, customer_id, ranked, probabilities, promoted, parameters.temperature)

    # The annotations are strings (`from __future__ import annotations`) that FastAPI resolves in this module's
    # globals, where the spec's model is not: it is given as the object.
    recommendations.__annotations__["parameters"] = Annotated[parameters_model, Query()]
    visitor.add_api_route("/recommendations/{customer_id}", recommendations, methods=["GET"],
                          response_model=RecommendationResponse,
                          responses=error_responses({422: "a bad id or parameter"}))  # fmt: skip
    return visitor


class SimilarParameters(BaseModel):
    count: int = Field(20, ge=1, le=100)


@router.get("/products/{product_id}/similar", response_model=RecommendationResponse)
async def similar_products(
    request: Request, product_id: ProductIdPath, parameters: Annotated[SimilarParameters, Query()]
) -> Response:
    query = VisitorQuery(customer_id=0, context={}, viewed=(product_id,), count=parameters.count,
                         api_key=request.state.caller.name)  # fmt: skip
    ranked, probabilities, promoted = await get_recommender(request).recommend(query)
    return _response(request, None, ranked, probabilities, promoted, 0.0)

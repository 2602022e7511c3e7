"""The read routes' lean handler (serving/api/lean_route.py) answers as FastAPI's own handling of the same route."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import pytest
from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from pydantic import BaseModel, Field

from recsys.spec import SpecError, load_spec
from serving.api.auth import Caller, KeyCache, ReadScope, Scope, hash_secret
from serving.api.deps import CustomerIdPath
from serving.api.lean_route import LeanReadRoute
from serving.api.routes.recommendations import VISITOR_PARAMETERS, visitor_parameters

READER, WRITER, REVOKED = "rk_reader", "rk_writer", "rk_revoked"
ALICCP_SPEC = Path(__file__).resolve().parent.parent / "specs" / "aliccp.yaml"


class Parameters(BaseModel):
    viewed: list[Annotated[int, Field(gt=0)]] | None = Field(None, max_length=3)
    count: int = Field(20, ge=1, le=100)
    name: str | None = Field(None, pattern=r"^\w*$")


async def endpoint(request: Request, customer_id: CustomerIdPath, parameters: Annotated[Parameters, Query()]
                   ) -> Response:  # fmt: skip
    return Response(f"{customer_id} {parameters.model_dump_json()} {request.state.caller.name}")


def app_with(route_class: type[APIRoute]) -> TestClient:
    app = FastAPI()
    router = APIRouter(dependencies=[ReadScope], route_class=route_class)
    router.add_api_route("/things/{customer_id}", endpoint, methods=["GET"])
    app.include_router(router)
    # Keys known to this process (serving.api.auth.KeyCache), so no database is asked.
    app.state.key_cache = KeyCache(ttl_s=3600)
    app.state.key_cache.put(hash_secret(READER), Caller("reader", frozenset({Scope.READ})))
    app.state.key_cache.put(hash_secret(WRITER), Caller("writer", frozenset({Scope.INGEST})))
    app.state.key_cache.put(hash_secret(REVOKED), None)
    return TestClient(app)


@pytest.mark.parametrize("path, params, key", [
    ("/things/7", {}, READER),
    ("/things/7", {"viewed": [1, 2], "count": "5", "name": "a_b", "unknown": "x"}, READER),
    ("/things/0", {"count": 0, "viewed": ["x"]}, READER),  # path and query errors together
    ("/things/x", {}, READER),
    ("/things/7", {"viewed": [1, 2, 3, 4]}, READER),
    ("/things/7", {"name": "a:b", "count": 1000}, READER),
    ("/things/7", {}, WRITER),  # 403
    ("/things/7", {}, None),  # 401
    ("/things/7", {}, REVOKED),  # 401
])  # fmt: skip
def test_the_lean_handler_answers_as_fastapi_does(path: str, params: dict, key: str | None):
    headers = {"X-API-Key": key} if key else {}
    lean = app_with(LeanReadRoute).get(path, params=params, headers=headers)
    fastapi_own = app_with(APIRoute).get(path, params=params, headers=headers)
    assert (lean.status_code, lean.json() if lean.status_code >= 400 else lean.text) == (
        fastapi_own.status_code, fastapi_own.json() if fastapi_own.status_code >= 400 else fastapi_own.text)
    assert lean.headers.get("www-authenticate") == fastapi_own.headers.get("www-authenticate")


def test_the_openapi_document_is_fastapis():
    documents = [app_with(route_class).app.openapi() for route_class in (LeanReadRoute, APIRoute)]  # type: ignore[attr-defined]
    assert documents[0] == documents[1]
    parameters = documents[0]["paths"]["/things/{customer_id}"]["get"]["parameters"]
    assert [parameter["name"] for parameter in parameters] == ["customer_id", "viewed", "count", "name"]


def test_a_route_with_more_than_it_handles_is_refused_when_built():
    async def other(request: Request, customer_id: CustomerIdPath, parameters: Annotated[Parameters, Query()],
                    extra: Annotated[str, Depends(lambda: "x")]) -> Response:  # fmt: skip
        return Response()

    router = APIRouter(dependencies=[ReadScope], route_class=LeanReadRoute)
    with pytest.raises(TypeError, match="LeanReadRoute"):
        router.add_api_route("/other/{customer_id}", other, methods=["GET"])
    unguarded = APIRouter(route_class=LeanReadRoute)
    with pytest.raises(TypeError, match="read scope"):
        unguarded.add_api_route("/things/{customer_id}", endpoint, methods=["GET"])


def test_context_features_are_query_parameters_unless_they_clash(tmp_path):
    spec = load_spec(ALICCP_SPEC)
    model = visitor_parameters(spec)
    assert set(model.model_fields) == VISITOR_PARAMETERS | set(spec.context_features)
    given = model.model_validate({name: "1" for name in spec.context_features} | {"count": "3"})
    assert given.count == 3 and set(given.context()) == set(spec.context_features)
    assert model.model_validate({"location": ""}).context() == {}  # an empty value is missing
    clashing = tmp_path / "spec.yaml"
    text = ALICCP_SPEC.read_text()
    clashing.write_text(text.replace("position", "count"))
    with pytest.raises(SpecError, match="clash"):
        visitor_parameters(load_spec(clashing))


@pytest.mark.parametrize("temperature", [0.0, 0.5])
def test_the_answer_is_the_documented_response_model(temperature: float):
    """`_response` serializes a dict, not the model: it must be exactly what `RecommendationResponse` documents."""
    import json
    import math

    from starlette.requests import Request as StarletteRequest

    from serving.api.routes.recommendations import RecommendationResponse, _response
    from serving.recommender import RankedList

    request = StarletteRequest({"type": "http", "state": {"request_id": "req-1"}})
    ranked = RankedList([7, 3], [0.9, 0.4], [0.8, math.nan], route="precomputed", model_version="v1",
                        degraded=["database_unavailable"], experiment="spring", bucket="control")  # fmt: skip
    body = json.loads(_response(request, 42, ranked, [0.7, 0.3], [True, False], temperature).body)

    strict = type("Strict", (RecommendationResponse,), {"model_config": {"extra": "forbid"}})
    answer = strict.model_validate(body)
    assert set(body) == set(RecommendationResponse.model_fields)
    assert all(set(item) == set(answer.items[0].model_fields) for item in body["items"])
    assert [(item.product_id, item.score, item.click_probability, item.promoted) for item in answer.items] == [
        (7, 0.9, 0.8, True), (3, 0.4, None, False)]
    assert [item.probability for item in answer.items] == ([0.7, 0.3] if temperature else [None, None])
    assert (answer.customer_id, answer.route, answer.request_id, answer.bucket) == (42, "precomputed", "req-1",
                                                                                    "control")

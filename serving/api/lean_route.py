"""The read routes' request handling without FastAPI's per-request dependency and parameter solving.

FastAPI documents these routes as any other (OpenAPI: the path parameter, every field of the query model as a
query parameter, the read scope's security), but solving a route's dependencies and parameters costs it about
0.2 ms of CPU a request in introspection (FastAPI 0.136: `_get_multidict_value` asks of each parameter's
annotation whether it is a sequence, on every request), a third of a precomputed hit's in-process cost
(profiled with cProfile, the app called as ASGI). A `LeanReadRoute`'s handler does the same work directly: the
API key's read scope through `serving.api.auth` (401, 403), the path parameter and the query model validated
with the very pydantic types FastAPI documents (a failure is FastAPI's own `RequestValidationError`, so its
422 body is unchanged), then the endpoint, which returns its `Response`.

The endpoint takes the request, one path parameter and one query model (`Annotated[Model, Query()]`); a route
with anything else, or with a dependency other than the read scope, is refused when the app is built, so
nothing declared on such a route is silently skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any, get_args, get_origin

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, TypeAdapter, ValidationError

from serving.api.auth import ReadScope, Scope, authenticate, check_scope, key_header


class LeanReadRoute(APIRoute):
    """An `APIRoute` for a read endpoint `(request, <path parameter>, <query model>)`: see the module."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        dependant = self.dependant
        calls = [dependency.call for dependency in dependant.dependencies]
        (path_field,) = dependant.path_params
        (query_field,) = dependant.query_params
        model = query_field.field_info.annotation
        if (calls != [ReadScope.dependency] or dependant.header_params or dependant.cookie_params
                or dependant.body_params or dependant.request_param_name is None
                or not (isinstance(model, type) and issubclass(model, BaseModel))):  # fmt: skip
            raise TypeError(f"{self.path}: a LeanReadRoute takes the request, one path parameter and one query "
                            f"model, behind the read scope alone")  # fmt: skip
        path_name, query_name, request_name = path_field.name, query_field.name, dependant.request_param_name
        path_value: TypeAdapter[Any] = TypeAdapter(
            Annotated[path_field.field_info.annotation, path_field.field_info]  # type: ignore[arg-type]
        )
        # Repeated query parameters (`viewed=1&viewed=2`) are lists; every other field takes the last value given.
        repeated = frozenset(name for name, field in model.model_fields.items() if _is_list(field.annotation))
        endpoint = self.endpoint
        key_name = key_header.model.name

        async def handle(request: Request) -> Response:
            check_scope(await authenticate(request, request.headers.get(key_name)), Scope.READ)
            errors: list[Any] = []
            try:
                value = path_value.validate_python(request.path_params[path_name])
            except ValidationError as error:
                errors += _located(error, ("path", path_name))
            query = request.query_params
            given = {name: query.getlist(name) if name in repeated else query[name]
                     for name in model.model_fields if name in query}  # fmt: skip
            try:
                parameters = model.model_validate(given)
            except ValidationError as error:
                errors += _located(error, ("query",))
            if errors:
                raise RequestValidationError(errors)
            response: Response = await endpoint(**{request_name: request, path_name: value, query_name: parameters})
            return response

        return handle


def _located(error: ValidationError, where: tuple[str, ...]) -> list[dict[str, Any]]:
    """Pydantic's errors as FastAPI words them: `loc` starting with where the value came from."""
    return [{**detail, "loc": (*where, *detail["loc"])} for detail in error.errors(include_url=False)]


def _is_list(annotation: Any) -> bool:
    """`list[...]`, optional or not."""
    return get_origin(annotation) is list or any(_is_list(argument) for argument in get_args(annotation))

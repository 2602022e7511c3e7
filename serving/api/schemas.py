"""Request and response bodies of the gateway (pydantic v2), as families `XCreate` / `XUpdate` / `XPublic`.

Requests are validated strictly: unknown fields are refused, integers and booleans must be JSON integers
and booleans (not "5", 5.0 or 1 for true), ids are positive int64 (the pipeline's raw user and item ids),
text is bounded, timestamps are ISO 8601 strings with a time zone. A refused request gets FastAPI's 422
with each field's error. (FastAPI validates bodies already parsed from JSON, so pydantic's strict mode,
which would also refuse enum values and dates written as JSON strings, is applied per type instead.)
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, ClassVar, Self

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    StrictBool,
    StrictFloat,
    StrictInt,
    StringConstraints,
    create_model,
    field_validator,
    model_validator,
)

from recsys.database import CLIENT_ID_TEXT, SHORT_TEXT, InteractionType
from recsys.interactions import event_context_features
from recsys.spec import DatasetSpec

INT64_MAX = 2**63 - 1
MAX_ATTRIBUTES = 64
# Events time-stamped further ahead than this are refused: a client clock that is off, or milliseconds
# sent as seconds, would otherwise land in a partition days or centuries away.
MAX_CLOCK_SKEW = timedelta(hours=1)

EntityId = Annotated[StrictInt, Field(gt=0, le=INT64_MAX, description="positive int64 id, the pipeline's raw id")]
# ':' is refused because it joins context values into segment keys in Redis ("DE:mobile").
ContextValue = Annotated[str, StringConstraints(min_length=1, max_length=SHORT_TEXT, pattern=r"^[\w .\-]+$")]
# Session, cookie and event ids: printable ASCII without spaces.
ClientId = Annotated[str, StringConstraints(min_length=1, max_length=CLIENT_ID_TEXT, pattern=r"^[!-~]+$")]
AttributeName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]
AttributeValue = (
    Annotated[StrictInt, Field(ge=-INT64_MAX - 1, le=INT64_MAX)] | Annotated[str, StringConstraints(max_length=256)]
)
Attributes = Annotated[
    dict[AttributeName, AttributeValue],
    Field(max_length=MAX_ATTRIBUTES, description="attributes (name -> int or string)"),
]
# Money as an exact decimal with cents, written to JSON as a number.
Price = Annotated[
    Decimal, Field(ge=0, max_digits=12, decimal_places=2), PlainSerializer(float, return_type=float, when_used="json")
]


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UpdateModel(RequestModel):
    """A partial update: only the fields sent change; `null` clears a field only where null is allowed."""

    not_nullable: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="after")
    def _refuse_null_for_required_fields(self) -> Self:
        cleared = sorted(name for name in self.model_fields_set & self.not_nullable if getattr(self, name) is None)
        if cleared:
            raise ValueError(f"cannot be null: {', '.join(cleared)}")
        return self

    def changes(self) -> dict[str, Any]:
        return self.model_dump(exclude_unset=True)


class PublicModel(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class ErrorDetail(BaseModel):
    """Every 4xx and 5xx other than 422 has this body."""

    detail: str


# Customers


# The bodies a gateway takes are `customer_models(spec)`'s, whose `attributes` are the spec's user features; these
# are their bases (free-form attributes, name -> int or string).
class CustomerCreate(RequestModel):
    id: EntityId
    location: ContextValue | None = None
    device: ContextValue | None = None
    attributes: Attributes = Field(default_factory=dict)


class CustomerUpdate(UpdateModel):
    not_nullable: ClassVar[frozenset[str]] = frozenset({"attributes"})

    location: ContextValue | None = None
    device: ContextValue | None = None
    attributes: Attributes | None = None


def integer_range(column_type: str) -> tuple[int, int] | None:
    """The values a spec column of an integer type holds (`int32`: -2**31 .. 2**31 - 1), None for another type."""
    if not column_type.startswith(("int", "uint")):
        return None
    bits = int(column_type.removeprefix("u").removeprefix("int") or 64)
    return (0, 2**bits - 1) if column_type.startswith("u") else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def _feature_type(spec: DatasetSpec, name: str) -> Any:
    """A profile attribute's type from its spec column: integers in the column type's range, finite numbers, or
    text (a multi-valued feature's tokens joined by its separator, as in the dataset's files)."""
    column_type = spec.columns[name]
    if (integers := integer_range(column_type)) is not None:
        return Annotated[StrictInt, Field(ge=integers[0], le=integers[1])]
    if column_type.startswith(("float", "double")):
        return Annotated[StrictInt | StrictFloat, Field(allow_inf_nan=False)]
    if column_type == "bool":
        return StrictBool
    return Annotated[str, StringConstraints(max_length=256)]


def features_model(spec: DatasetSpec, names: tuple[str, ...], model_name: str) -> type[BaseModel]:
    """One optional field per spec feature in `names`, named and typed as its column (an unknown name or a wrong
    type is refused with 422 naming it): what the models see of a customer or a product."""
    fields: dict[str, Any] = {
        name: (_feature_type(spec, name) | None,
               Field(default=None, description=f"{spec.feature_kind(name).replace('_', '-')} `{name}` "
                                               f"({spec.columns[name]})"))
        for name in names
    }  # fmt: skip
    return create_model(model_name, __config__=ConfigDict(extra="forbid"), **fields)


def _spec_bodies(spec: DatasetSpec, create_base: type[RequestModel], update_base: type[UpdateModel],
                 features: type[BaseModel], text: str) -> tuple[Any, Any]:  # fmt: skip
    """`create_base` and `update_base` with `attributes` typed as the spec's `features` model."""
    create = create_model(create_base.__name__, __base__=create_base,
                          attributes=(features, Field(default_factory=features, description=text)))  # fmt: skip
    update = create_model(update_base.__name__, __base__=update_base,
                          attributes=(features | None, Field(default=None, description=text)))  # type: ignore[arg-type]  # fmt: skip
    return create, update


def profile_model(spec: DatasetSpec) -> type[BaseModel]:
    """A customer's profile in the dataset `spec`: its user features."""
    return features_model(spec, spec.user_features, "CustomerProfile")


def customer_models(spec: DatasetSpec) -> tuple[type[CustomerCreate], type[CustomerUpdate]]:
    """The customer bodies of the dataset `spec`: `attributes` is its profile (`profile_model`)."""
    return _spec_bodies(spec, CustomerCreate, CustomerUpdate, profile_model(spec),
                        "the customer's profile: the dataset's user features, each optional")  # fmt: skip


def stored_attributes(attributes: Any) -> dict[str, Any]:
    """The attributes to store: those given, without nulls (a missing feature)."""
    values = attributes.model_dump() if isinstance(attributes, BaseModel) else dict(attributes or {})
    return {name: value for name, value in values.items() if value is not None}


class CustomerPublic(PublicModel):
    id: int
    location: str | None
    device: str | None
    attributes: dict[str, int | float | str]
    created_at: datetime
    updated_at: datetime


class CustomersPublic(BaseModel):
    data: list[CustomerPublic]
    # Pass as `after_id` to read the next page; null on the last page.
    next_after_id: int | None


class ForgetReport(BaseModel):
    """What each store gave up when a customer was forgotten (serving/forget.py): the audit record."""

    customer_ids: list[int]
    customers_deleted: int
    interactions_deleted: int
    redis_keys_deleted: int
    feast_rows_deleted: int
    extract_rows_removed: int
    extract_files_rewritten: int
    landing_zone_remote: bool = False  # an s3:// landing zone's extracts are not rewritten (the nightly run drops them)
    impression_lines_removed: int
    impression_files_rewritten: int


# Products


# The bodies a gateway takes are `product_models(spec)`'s, whose `attributes` are the spec's item features; these are
# their bases. `price`, `available` and `promoted` are the shop's, not the models': filtering and ordering use the
# last two.
class ProductCreate(RequestModel):
    id: EntityId
    attributes: Attributes = Field(default_factory=dict)
    price: Price | None = None
    available: StrictBool = True
    promoted: StrictBool = False


class ProductUpdate(UpdateModel):
    not_nullable: ClassVar[frozenset[str]] = frozenset({"attributes", "available", "promoted"})

    attributes: Attributes | None = None
    price: Price | None = None
    available: StrictBool | None = None
    promoted: StrictBool | None = None


def product_models(spec: DatasetSpec) -> tuple[type[ProductCreate], type[ProductUpdate]]:
    """The product bodies of the dataset `spec`: `attributes` are its item features."""
    return _spec_bodies(spec, ProductCreate, ProductUpdate, features_model(spec, spec.item_features, "ProductFeatures"),
                        "the product's features: the dataset's item features, each optional")  # fmt: skip


class ProductPublic(PublicModel):
    id: int
    attributes: dict[str, int | float | str]
    price: Price | None
    available: bool
    promoted: bool
    created_at: datetime
    updated_at: datetime


class ProductsPublic(BaseModel):
    data: list[ProductPublic]
    next_after_id: int | None


# Interactions


# The body a gateway takes is `interaction_model(spec)`'s, whose `context` is the spec's other context features;
# this is its base (a free-form context, name -> int, number or string).
class InteractionCreate(RequestModel):
    type: InteractionType
    customer_id: EntityId
    product_id: EntityId
    session_id: ClientId
    cookie_id: ClientId | None = None
    # Where and on what the event happened; when absent, the extract uses the customer's.
    location: ContextValue | None = None
    device: ContextValue | None = None
    context: Attributes = Field(default_factory=dict)
    timestamp: AwareDatetime = Field(description="when it happened, with a time zone (ISO 8601)")
    event_id: ClientId | None = Field(
        default=None, description="idempotency key: the same event posted again is stored once"
    )
    request_id: ClientId | None = Field(
        default=None, description="the X-Request-ID of the recommendation response this event followed"
    )

    @field_validator("timestamp", mode="before")
    @classmethod
    def _iso_string(cls, value: Any) -> Any:
        # Not a number: seconds and milliseconds since the epoch are too easily confused.
        if not isinstance(value, str | datetime):
            raise ValueError("timestamp must be an ISO 8601 string with a time zone, e.g. 2024-05-01T12:00:00Z")
        return value

    @field_validator("timestamp")
    @classmethod
    def _not_in_the_future(cls, value: datetime) -> datetime:
        if value > datetime.now(UTC) + MAX_CLOCK_SKEW:
            raise ValueError(f"timestamp is more than {MAX_CLOCK_SKEW} in the future")
        if value < datetime(1970, 1, 1, tzinfo=UTC):
            raise ValueError("timestamp is before 1970")
        return value.astimezone(UTC)

    def stored_fields(self) -> dict[str, Any]:
        """The columns an interaction row stores of this body (the context without the features not sent)."""
        return {**self.model_dump(), "context": stored_attributes(self.context)}


def interaction_model(spec: DatasetSpec) -> type[InteractionCreate]:
    """The interaction body of the dataset `spec`: `context` holds its context features that `location` and
    `device` do not fill (`recsys.interactions.event_context_features`), each optional, typed as its column."""
    context = features_model(spec, event_context_features(spec), "InteractionContext")
    text = "the event's context: the dataset's context features other than location and device, each optional"
    return create_model(InteractionCreate.__name__, __base__=InteractionCreate,
                        context=(context, Field(default_factory=context, description=text)))  # type: ignore[call-overload]  # fmt: skip


class InteractionPublic(PublicModel):
    id: int
    event_id: str | None
    type: InteractionType
    customer_id: int
    product_id: int
    session_id: str
    cookie_id: str | None
    location: str | None
    device: str | None
    context: dict[str, int | float | str]
    timestamp: datetime
    received_at: datetime
    request_id: str | None

    def same_event(self, other: InteractionCreate) -> bool:
        """Whether `other` is this stored interaction posted again (same fields, same instant)."""
        return all(getattr(self, name) == value for name, value in other.stored_fields().items())


class InteractionsPublic(BaseModel):
    data: list[InteractionPublic]
    next_after_id: int | None


class HealthPublic(BaseModel):
    status: str
    database: str


def error_responses(descriptions: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI documentation of a route's error statuses, all with the `ErrorDetail` body."""
    return {status: {"model": ErrorDetail, "description": text} for status, text in descriptions.items()}

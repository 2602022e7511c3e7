"""The gateway's main database: typed ORM models and the engine factory (SQLite file or PostgreSQL). Shared
ground: the gateway (`serving/api/`) writes it, the extract and monitoring steps (`tasks/`) read it.

The schema is created and changed only by the Alembic migrations in `serving/migrations/`
(`python -m serving.api.migrate upgrade`); these models must match them, which
`tests/test_ingestion_api.py` checks on both databases with Alembic's own comparison.

Customers and products carry the ids the web tier and the nightly pipeline know (the dataset spec's
raw user and item ids, int64), so they are client-supplied, not generated. Interactions are an
append-only log; deleting a customer erases their interactions with them (ON DELETE CASCADE), while
a product with interactions cannot be deleted (RESTRICT): it is marked unavailable instead, which
keeps the training history whole.
"""

from __future__ import annotations

import enum
import math
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    Engine,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    create_engine,
    event,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from recsys.call_deadline import add_call_deadline

# Names for every constraint and index, so migrations can refer to them on any database.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# A call to the database is cut client-side after this many budgets: later than the server's own timeouts,
# which leave the connection usable, so it only acts when the server cannot; twice the default 200 ms budget
# is still inside the SLA.
CALL_DEADLINE_FACTOR = 2

# Column sizes shared with the request schemas (serving/api/schemas.py).
SHORT_TEXT = 64  # location, device
CLIENT_ID_TEXT = 128  # session id, cookie id, event id


def utc_now() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A point in time, stored in UTC and always read back timezone-aware (UTC).

    PostgreSQL keeps it as `timestamptz`. SQLite has no time zones, so the UTC wall time is stored
    without an offset in one fixed format (ordered like the instants, which range queries rely on).
    A naive datetime is refused rather than guessed at.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: timestamps must carry a time zone")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class InteractionType(enum.StrEnum):
    """What a customer did with a product; the nightly extract derives the training targets from it."""

    VIEW = "view"
    CLICK = "click"
    ADD_TO_CART = "add_to_cart"
    PURCHASE = "purchase"


# JSONB on PostgreSQL (binary, indexable), JSON text on SQLite.
AttributesType = JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime()}  # noqa: RUF012 (SQLAlchemy's documented class attribute)


class Customer(Base):
    __tablename__ = "customers"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    location: Mapped[str | None] = mapped_column(String(SHORT_TEXT))
    device: Mapped[str | None] = mapped_column(String(SHORT_TEXT))
    # The profile: the spec's user features by name (serving.api.schemas.profile_model validates them; rows stored
    # before may hold other names or types, which the extract leaves out); the extract copies them.
    attributes: Mapped[dict[str, Any]] = mapped_column(AttributesType, default=dict)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]

    interactions: Mapped[list[Interaction]] = relationship(
        back_populates="customer", cascade="all, delete-orphan", passive_deletes=True
    )


class Product(Base):
    __tablename__ = "products"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    # The product's features: the spec's item features by name (serving.api.schemas.product_models validates them;
    # rows stored before may hold other names or types, which the extract leaves out); the extract copies them.
    attributes: Mapped[dict[str, Any]] = mapped_column(AttributesType, default=dict)
    price: Mapped[Decimal | None] = mapped_column(Numeric(12, 2))
    # Feed filtering (unavailable products are never recommended) and ordering (promoted ones first).
    available: Mapped[bool] = mapped_column(default=True)
    promoted: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class Interaction(Base):
    __tablename__ = "interactions"
    __table_args__ = (
        Index(None, "timestamp"),  # the nightly extract reads one day at a time
        Index(None, "customer_id"),
        Index(None, "product_id"),  # the RESTRICT check when a product is deleted
    )

    # BIGINT on PostgreSQL; SQLite autoincrements only a column declared exactly INTEGER PRIMARY KEY.
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"), primary_key=True)
    # Optional client-chosen key: posting the same event again returns the stored one instead of a duplicate.
    event_id: Mapped[str | None] = mapped_column(String(CLIENT_ID_TEXT), unique=True)
    customer_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("customers.id", ondelete="CASCADE"))
    product_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("products.id", ondelete="RESTRICT"))
    type: Mapped[InteractionType] = mapped_column(
        Enum(
            InteractionType, native_enum=False, create_constraint=True, length=16, name="interaction_type",
            values_callable=lambda members: [member.value for member in members],
        )
    )  # fmt: skip
    session_id: Mapped[str] = mapped_column(String(CLIENT_ID_TEXT))
    cookie_id: Mapped[str | None] = mapped_column(String(CLIENT_ID_TEXT))
    location: Mapped[str | None] = mapped_column(String(SHORT_TEXT))
    device: Mapped[str | None] = mapped_column(String(SHORT_TEXT))
    # The spec's other context features by name (recsys.interactions.event_context_features; validated by
    # serving.api.schemas.interaction_model); the extract copies them.
    context: Mapped[dict[str, Any]] = mapped_column(AttributesType, default=dict)
    # When it happened (the client's event time, UTC); `received_at` is when the gateway stored it.
    timestamp: Mapped[datetime]
    received_at: Mapped[datetime]
    # The recommendation response (its X-Request-ID) the customer acted on: live accuracy joins on it.
    request_id: Mapped[str | None] = mapped_column(String(CLIENT_ID_TEXT), index=True)

    customer: Mapped[Customer] = relationship(back_populates="interactions")


class ForgottenCustomer(Base):
    """A customer erased on request (serving/forget.py): the tombstone that keeps them from coming back. The id
    alone is kept: the nightly run drops its rows from every input, and the API refuses to create it again."""

    __tablename__ = "forgotten_customers"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    forgotten_at: Mapped[datetime]


def forgotten_customer_ids(url: str) -> list[int]:
    """Every tombstoned customer id (the nightly run reads them before converting its inputs)."""
    from sqlalchemy import select

    engine = create_database_engine(url, timeout_ms=None)  # a batch job: no request budget
    try:
        with engine.connect() as connection:
            return list(connection.scalars(select(ForgottenCustomer.id).order_by(ForgottenCustomer.id)))
    finally:
        engine.dispose()


class ApiKey(Base):
    """A client's key to the gateway. Only the SHA-256 of the secret is kept (the secret is 32 random
    bytes, so a slow password hash would add nothing); `prefix` names the key in listings and logs."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(SHORT_TEXT), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[str] = mapped_column(String(SHORT_TEXT))  # space-separated, as OAuth writes scopes
    created_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]


def database_url(url: str | URL) -> URL:
    """The URL SQLAlchemy connects with: `postgresql://` means psycopg 3 (the driver in the lock)."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def create_database_engine(url: str | URL, *, timeout_ms: int | None) -> Engine:
    """An engine whose calls give up after `timeout_ms` (None: the drivers' own, for batch jobs).

    - PostgreSQL: `statement_timeout` and `lock_timeout` per connection. A server that stops answering
      enforces neither, and psycopg's connect timeout is in whole seconds, at least 2, so each call and each
      new connection also has a client-side deadline of `CALL_DEADLINE_FACTOR` times the budget
      (`recsys/call_deadline.py`).
    - SQLite: the busy timeout (how long a write waits for another writer's lock); foreign keys on
      (SQLite leaves them off) and write-ahead logging, so readers such as the extract never block writers.
    - Both: waiting for a free pooled connection, and a liveness check before a connection is reused.
    """
    parsed = database_url(url)
    backend = parsed.get_backend_name()
    connect_args: dict[str, Any] = {}
    if backend == "sqlite":
        if parsed.database and parsed.database != ":memory:" and not parsed.database.startswith("file:"):
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        connect_args["timeout"] = timeout_ms / 1000 if timeout_ms else 30.0
    elif backend == "postgresql":
        # psycopg's bound on an attempt; with a budget, the call deadline stops waiting for it sooner
        connect_args["connect_timeout"] = max(2, math.ceil(timeout_ms / 1000)) if timeout_ms else 10
        if timeout_ms:
            own = f"-c statement_timeout={timeout_ms} -c lock_timeout={timeout_ms}"
            given = parsed.query.get("options")
            connect_args["options"] = f"{given} {own}" if isinstance(given, str) else own
    pool_args: dict[str, Any] = {"pool_timeout": timeout_ms / 1000} if timeout_ms else {}
    deadline_s = CALL_DEADLINE_FACTOR * timeout_ms / 1000 if backend == "postgresql" and timeout_ms else None
    # With a call deadline, the liveness check is run by it, inside a deadline.
    engine = create_engine(parsed, connect_args=connect_args, pool_pre_ping=deadline_s is None, **pool_args)
    if deadline_s is not None:
        add_call_deadline(engine, deadline_s)
    if backend == "sqlite":
        event.listen(engine, "connect", _sqlite_on_connect)
    return engine


def _sqlite_on_connect(dbapi_connection: Any, connection_record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
    finally:
        cursor.close()

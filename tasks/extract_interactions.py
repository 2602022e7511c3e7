"""Export one day of the gateway's interactions to the landing zone, in the dataset spec's columns.

The API gateway (serving/api/) stores customers, products and interactions in its main database.
`extract_interactions(database_url, landing_dir, day)` writes the interactions whose event time falls
on `day` (UTC, [00:00, 24:00)) to

    <landing_dir>/interactions/day=YYYY-MM-DD/part-00000.parquet

with exactly the spec's columns, types and order, so the nightly run can read it next to the Parquet
that `csv_to_parquet` makes of the raw CSV. The file is written aside and renamed over the old one, so a
reader sees the previous extract or the new one, and a rerun replaces the day instead of adding to it.
The day comes from the caller (the DAG's run), never from the clock: the same database contents give
the same bytes.

How interactions become rows. A row of the spec is an impression, an item shown to a user with what the
user then did (AliCCP's click and conversion labels). The gateway records events instead: a view, then
perhaps a click, an add-to-cart, a purchase. So the events of one (customer, product, session) on the
day make one row:

- user id (the spec's `user_id` role) <- customer id; item id (`item_id` role) <- product id;
- timestamp (`timestamp` role, unix seconds) <- the group's first event;
- targets <- the event types: the primary target (`click`) is 1 if any event was a click, add-to-cart
  or purchase, else 0 (a view alone is a shown, unclicked item); the spec's `purchase_target`
  (`conversion`) is 1 if any event was a purchase. Any other target cannot be derived and is refused;
- location and device <- the first event's, else the customer's (columns `location`, `device`; another spec
  names its own with `IngestionColumns`);
- the spec's other context features (`recsys.interactions.event_context_features`: the default spec's `position`,
  shop_events' `slot` and `channel`) <- the first event's `context`, by name, cast like the attributes below (a
  value that does not fit is left null and counted in `attribute_values_dropped`);
- item features <- the product's attributes named like a spec item feature (`item_category`, ...) as they are
  at extract time, and user features <- the customer's profile attributes named like a spec user feature
  (`user_age`, ...), each cast to the column's type (a value that does not fit is left null and counted);
- every other column (user-item crosses, features nobody sent) is null.

How the nightly run uses them. `csv_to_parquet` reads every day found under `<input>/interactions/` (all
of them, not only the run's) into a split of its own, `gateway` (GATEWAY_SPLIT). `clean_null_rows` drops
the gateway rows with more than 5 null features (its threshold), counted over `extracted_features(spec)`
only, the features an extract can fill: the user and item features, and the context columns that
`IngestionColumns` maps. The user-item crosses are null in every such row, and an event's `context` (the
default spec's position) is sent by few clients, so counting them would drop most rows; a customer without
profile attributes still leaves the spec's 12 user features null, and that row is dropped. The returned metrics
count those rows in advance (`rows_over_5_null_features`, at the default threshold). `resplit`
adds every remaining gateway row to `train` (validation stays the held-out test rows), and `validate`
checks their null fractions over the extracted features only.

`export_unavailable_items` writes the products marked unavailable as the CSV that batch scoring's
`unavailable_items` option reads (one column, the spec's item id): they are never recommended.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import os
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from recsys.interactions import ENGAGED_TYPES, PURCHASE_TYPES, IngestionColumns, event_context_features
from recsys.outputs import atomic_write_text
from recsys.spec import DatasetSpec, SpecError, load_spec

log = logging.getLogger(__name__)

ROWS_PER_ROW_GROUP = 100_000
READ_BATCH_ROWS = 10_000
NULL_FEATURES_KEPT_BY_DEFAULT = 5  # clean_null_rows' default threshold, reported in the metrics
INTERACTIONS_FOLDER = "interactions"  # under the landing zone: day=YYYY-MM-DD/part-00000.parquet
GATEWAY_SPLIT = "gateway"  # the split csv_to_parquet and clean_null_rows give the extracted rows
_INTEGER_RANGES = {f"int{bits}": (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) for bits in (8, 16, 32, 64)}


def partition_path(landing_dir: Path, day: date) -> Path:
    # recsys.locations.INTERACTION_FILES names the same layout, for fetching extracts from an S3 landing zone.
    return Path(landing_dir) / INTERACTIONS_FOLDER / f"day={day.isoformat()}" / "part-00000.parquet"


def extracted_features(spec: DatasetSpec, columns: IngestionColumns | None = None) -> tuple[str, ...]:
    """The spec's features an extract fills when the gateway knows them, in the spec's feature order.

    The user and item features (from customers' and products' attributes) and the context features that
    `columns` maps (default: `IngestionColumns.matching(spec)`). `clean_null_rows` counts a gateway
    row's nulls over these only: the others are null in every row (user-item crosses) or sent by few clients
    (an event's `context`: the default spec's position), and counting them would drop most rows.
    """
    columns = columns or IngestionColumns.matching(spec)
    filled = set(spec.user_features) | set(spec.item_features) | columns.mapped()
    return tuple(name for name in spec.features if name in filled)


def arrow_schema(spec: DatasetSpec) -> pa.Schema:
    """The spec's columns and types, as `csv_to_parquet` writes them."""
    return pa.schema([(name, pa.type_for_alias(type_name)) for name, type_name in spec.columns.items()])


def extract_interactions(database_url: str, landing_dir: Path, day: date, *, spec: DatasetSpec | None = None,
                         columns: IngestionColumns | None = None) -> dict:  # fmt: skip
    """Write the interactions of `day` (UTC) as `<landing_dir>/interactions/day=YYYY-MM-DD/part-00000.parquet`.

    Replaces an earlier extract of the same day atomically; a day without interactions gets a file
    without rows. Returns metrics: the output path, events read, rows written, and more (see the module doc).
    """
    from recsys.database import create_database_engine

    spec = spec or load_spec()
    columns = columns or IngestionColumns.matching(spec)
    columns.check(spec)
    targets = _target_columns(spec)
    schema = arrow_schema(spec)
    start = datetime.combine(day, time(0), tzinfo=UTC)
    output = partition_path(landing_dir, day)
    output.parent.mkdir(parents=True, exist_ok=True)
    for leftover in output.parent.glob(f".{output.name}.*.tmp"):  # of a run killed before its rename
        leftover.unlink(missing_ok=True)
    staging = output.parent / f".{output.name}.{uuid.uuid4().hex[:12]}.tmp"

    builder = _RowBuilder(spec, columns, targets)
    engine = create_database_engine(database_url, timeout_ms=None)  # a batch job: no request budget
    try:
        with engine.connect() as connection, pq.ParquetWriter(staging, schema) as writer:
            for group in _groups(connection, start, start + timedelta(days=1)):
                builder.add(group)
                if builder.pending >= ROWS_PER_ROW_GROUP:
                    writer.write_table(builder.take(schema))
            writer.write_table(builder.take(schema))  # also gives an empty day its schema
        os.replace(staging, output)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    finally:
        engine.dispose()

    never_filled = [name for name in spec.features if name not in builder.filled]
    metrics = {
        "day": day.isoformat(),
        "output": str(output),
        "interactions": builder.events,
        "rows": builder.rows,
        "positive_rows": {name: count for name, count in builder.positives.items()},
        "customers": len(builder.customers),
        "products": len(builder.products),
        "features_never_filled": never_filled,
        f"rows_over_{NULL_FEATURES_KEPT_BY_DEFAULT}_null_features": builder.rows_over_null_limit,
        "attribute_values_dropped": builder.attribute_values_dropped,
    }
    log.info("extract_interactions %s: %d interactions -> %d rows in %s", day, builder.events, builder.rows, output)
    return metrics


def export_unavailable_items(database_url: str, output: Path, *, spec: DatasetSpec | None = None) -> dict:
    """Write the ids of products marked unavailable as a one-column CSV (header: the spec's item id)."""
    from sqlalchemy import select

    from recsys.database import Product, create_database_engine

    spec = spec or load_spec()
    engine = create_database_engine(database_url, timeout_ms=None)
    try:
        with engine.connect() as connection:
            ids = connection.scalars(select(Product.id).where(Product.available.is_(False)).order_by(Product.id)).all()
    finally:
        engine.dispose()
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow([spec.item_id])
    writer.writerows([item_id] for item_id in ids)
    atomic_write_text(Path(output), text.getvalue())
    return {"output": str(output), "unavailable_items": len(ids)}


def _target_columns(spec: DatasetSpec) -> dict[str, str]:
    """Target column -> what sets it: 'engaged' (click, add-to-cart, purchase) or 'purchase'."""
    targets = {spec.primary_target: "engaged"}
    if spec.purchase_target is not None and spec.purchase_target != spec.primary_target:
        targets[spec.purchase_target] = "purchase"
    underivable = [name for name in spec.targets if name not in targets]
    if underivable:
        raise SpecError(f"{spec.source}: targets {', '.join(underivable)} cannot be derived from interaction types "
                        "(only the primary target and the purchase_target can)")  # fmt: skip
    return targets


@dataclasses.dataclass
class _Group:
    """The events of one (customer, product, session) on the day, in time order."""

    customer_id: int
    product_id: int
    first_timestamp: datetime
    location: str | None
    device: str | None
    types: set[str]
    customer_location: str | None
    customer_device: str | None
    attributes: dict[str, Any]
    product_attributes: dict[str, Any]
    context: dict[str, Any]  # the first event's `context`: the spec's other context features by name
    events: int


def _groups(connection: Any, start: datetime, end: datetime) -> Iterator[_Group]:
    from sqlalchemy import select

    from recsys.database import Customer, Interaction, Product

    query = (
        select(Interaction.customer_id, Interaction.product_id, Interaction.session_id, Interaction.type,
               Interaction.timestamp, Interaction.location, Interaction.device, Customer.location, Customer.device,
               Customer.attributes, Product.attributes, Interaction.context)
        .join(Customer, Customer.id == Interaction.customer_id)
        .join(Product, Product.id == Interaction.product_id)
        .where(Interaction.timestamp >= start, Interaction.timestamp < end)
        .order_by(Interaction.customer_id, Interaction.product_id, Interaction.session_id, Interaction.timestamp,
                  Interaction.id)
    )  # fmt: skip
    group: _Group | None = None
    key: tuple[int, int, str] | None = None
    for row in connection.execution_options(yield_per=READ_BATCH_ROWS).execute(query):
        (customer_id, product_id, session_id, kind, timestamp, location, device, customer_location,
         customer_device, attributes, product_attributes, context) = row  # fmt: skip
        if group is not None and key == (customer_id, product_id, session_id):
            group.types.add(str(kind))
            group.events += 1
            continue
        if group is not None:
            yield group
        key = (customer_id, product_id, session_id)
        group = _Group(customer_id, product_id, timestamp, location, device, {str(kind)}, customer_location,
                       customer_device, attributes or {}, product_attributes or {}, context or {},
                       events=1)  # fmt: skip
    if group is not None:
        yield group


class _RowBuilder:
    """Collects groups as spec rows, column by column, and hands them out as Arrow tables."""

    def __init__(self, spec: DatasetSpec, columns: IngestionColumns, targets: dict[str, str]) -> None:
        self.spec, self.columns, self.targets = spec, columns, targets
        self.features = [(name, "attributes") for name in spec.user_features]
        self.features += [(name, "product_attributes") for name in spec.item_features]
        self.features += [(name, "context") for name in event_context_features(spec, columns)]
        self.counted_features = extracted_features(spec, columns)  # as clean_null_rows counts a gateway row's nulls
        self.values: dict[str, list[Any]] = {name: [] for name in spec.columns}
        self.pending = self.rows = self.events = self.rows_over_null_limit = self.attribute_values_dropped = 0
        self.positives = dict.fromkeys(targets, 0)
        self.customers: set[int] = set()
        self.products: set[int] = set()
        self.filled: set[str] = set()

    def add(self, group: _Group) -> None:
        row: dict[str, Any] = {
            self.spec.user_id: group.customer_id,
            self.spec.item_id: group.product_id,
            self.spec.timestamp: int(group.first_timestamp.timestamp()),
        }
        for target, cause in self.targets.items():
            happened = bool(group.types & (ENGAGED_TYPES if cause == "engaged" else PURCHASE_TYPES))
            row[target] = int(happened)
            self.positives[target] += int(happened)
        mapped = {
            self.columns.location: group.location or group.customer_location,
            self.columns.device: group.device or group.customer_device,
        }
        row.update((name, self._cast(name, value)) for name, value in mapped.items() if name is not None)
        for name, owner in self.features:  # the customer's or the product's attributes, the event's context
            attributes = getattr(group, owner)
            if name in attributes:
                value = self._cast(name, attributes[name])
                self.attribute_values_dropped += value is None
                row[name] = value
        for name, values in self.values.items():
            values.append(row.get(name))
        nulls = sum(row.get(name) is None for name in self.counted_features)
        self.rows_over_null_limit += nulls > NULL_FEATURES_KEPT_BY_DEFAULT
        self.filled.update(name for name, value in row.items() if value is not None)
        self.customers.add(group.customer_id)
        self.products.add(group.product_id)
        self.events += group.events
        self.pending += 1
        self.rows += 1

    def _cast(self, column: str, value: Any) -> Any:
        """`value` as the column's type, or None where it does not fit (a string in an int column, a big int)."""
        type_name = self.spec.columns[column]
        if value is None:
            return None
        if type_name == "string":
            return str(value)
        if type_name.startswith("float"):
            return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
        if isinstance(value, bool) or not isinstance(value, int):
            return None
        low, high = _INTEGER_RANGES[type_name]
        return value if low <= value <= high else None

    def take(self, schema: pa.Schema) -> pa.Table:
        table = pa.table({name: pa.array(values, type=schema.field(name).type) for name, values in self.values.items()},
                         schema=schema)  # fmt: skip
        for values in self.values.values():
            values.clear()
        self.pending = 0
        return table

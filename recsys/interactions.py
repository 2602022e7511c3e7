"""The gateway's interactions as the dataset spec sees them: their types and the targets they set, and the spec
columns their context fills. One definition for the nightly extract (`tasks/extract_interactions.py`), the
monitoring (`tasks/monitor.py`), the gateway's seen items (`serving/seen_items.py`) and its interaction bodies
(`serving/api/schemas.py`)."""

from __future__ import annotations

import dataclasses

from recsys.spec import DatasetSpec, SpecError

# Interaction types that make the primary target (`click`) 1; the purchase target comes from purchases alone.
ENGAGED_TYPES = frozenset({"click", "add_to_cart", "purchase"})
PURCHASE_TYPES = frozenset({"purchase"})
EVERY_TYPE = frozenset({"view", *ENGAGED_TYPES})


def types_excluding_seen(spec: DatasetSpec) -> frozenset[str]:
    """The interaction types whose product the spec's `exclude_seen` keeps out of that customer's lists."""
    if spec.excludes_every_interaction:
        return EVERY_TYPE
    types: set[str] = set()
    for target in spec.seen_targets:
        purchase_only = target == spec.purchase_target and target != spec.primary_target
        types |= PURCHASE_TYPES if purchase_only else ENGAGED_TYPES
    return frozenset(types)


@dataclasses.dataclass(frozen=True)
class IngestionColumns:
    """The spec columns that the gateway's fixed context fields (an interaction's or customer's `location` and
    `device`) fill; None: not exported. (Customers' and products' attributes are named after the spec's user and
    item features already; the spec's other context features come in an interaction's `context`.)"""

    location: str | None = "location"
    device: str | None = "device"

    @classmethod
    def matching(cls, spec: DatasetSpec) -> IngestionColumns:
        """The default names, each kept only where the spec has that column."""
        defaults = cls()
        return cls(**{field.name: name if (name := getattr(defaults, field.name)) in spec.columns else None
                      for field in dataclasses.fields(cls)})  # fmt: skip

    def check(self, spec: DatasetSpec) -> None:
        for field in dataclasses.fields(self):
            name = getattr(self, field.name)
            if name is not None and name not in spec.columns:
                raise SpecError(f"{spec.source}: the gateway's {field.name} maps to '{name}', which is not a column")

    def mapped(self) -> set[str]:
        """The spec columns these fields fill."""
        return {name for field in dataclasses.fields(self) if (name := getattr(self, field.name)) is not None}


def event_context_features(spec: DatasetSpec, columns: IngestionColumns | None = None) -> tuple[str, ...]:
    """The spec's context features an interaction carries in its `context` (by name, typed as the spec's
    columns): those the fixed `location` and `device` fields do not fill (`columns`, default
    `IngestionColumns.matching(spec)`). The default spec's `position`; `slot` and `channel` of a spec like
    tests/data/shop_events.yaml."""
    mapped = (columns or IngestionColumns.matching(spec)).mapped()
    return tuple(name for name in spec.context_features if name not in mapped)

"""The gateway's interaction types and the targets they set: one definition for the nightly extract
(`tasks/extract_interactions.py`), the monitoring (`tasks/monitor.py`) and the gateway's seen items
(`serving/seen_items.py`)."""

from __future__ import annotations

from recsys.spec import DatasetSpec

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

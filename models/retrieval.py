"""The two-tower retrieval model, built from the NVTabular output schema (user and item towers by tag)."""

from __future__ import annotations

from typing import Any


def two_tower_schema(schema: Any) -> Any:
    """User and item features and ids only: no context, targets, raw ids or time."""
    from merlin.schema import Tags

    return schema.select_by_tag([Tags.USER, Tags.ITEM]).excluding_by_tag("raw_id")


def build_two_tower(schema: Any, *, tower_layers: tuple[int, ...] = (128, 64)) -> Any:
    """Query (user) and candidate (item) towers scored by dot product, trained with in-batch negatives."""
    import merlin.models.tf as mm
    from merlin.schema import Tags

    schema = two_tower_schema(schema)
    layers = list(tower_layers)
    query = mm.Encoder(schema.select_by_tag(Tags.USER), mm.MLPBlock(layers, no_activation_last_layer=True))
    candidate = mm.Encoder(schema.select_by_tag(Tags.ITEM), mm.MLPBlock(layers, no_activation_last_layer=True))
    return mm.TwoTowerModelV2(query, candidate)

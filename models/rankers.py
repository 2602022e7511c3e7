"""Ranking models built from the NVTabular output schema (columns chosen by tag, not by name).

DLRM is the default (report section 5.3.4); DCN-v2 and an MLP (NCF-style: embeddings of every
feature concatenated into an MLP) are the alternatives the report compared (figure 5.4).
"""

from __future__ import annotations

from typing import Any

RANKERS = ("dlrm", "dcn", "mlp")


def ranker_input_schema(schema: Any, target: str) -> Any:
    """The schema a ranker sees: model features plus its one target (no raw ids, no time, no other targets)."""
    from merlin.schema import Tags

    others = [name for name in schema.select_by_tag(Tags.TARGET).column_names if name != target]
    return schema.excluding_by_tag("raw_id").excluding_by_tag("time").without(others)


def build_ranker(schema: Any, *, model: str, target: str, embedding_dim: int = 32,
                 mlp_layers: tuple[int, ...] = (128, 64)) -> Any:  # fmt: skip
    import merlin.models.tf as mm

    if model not in RANKERS:
        raise ValueError(f"unknown ranker '{model}': one of {', '.join(RANKERS)}")
    schema = ranker_input_schema(schema, target)
    output = mm.BinaryOutput(target)
    if model == "dlrm":
        return mm.DLRMModel(
            schema,
            embedding_dim=embedding_dim,
            bottom_block=mm.MLPBlock([*mlp_layers[1:], embedding_dim]),
            top_block=mm.MLPBlock(list(mlp_layers)),
            prediction_tasks=output,
        )
    if model == "dcn":
        return mm.DCNModel(schema, depth=2, deep_block=mm.MLPBlock(list(mlp_layers)), prediction_tasks=output)
    return mm.Model(
        mm.InputBlockV2(schema, categorical=mm.Embeddings(schema.select_by_tag("categorical"), dim=embedding_dim)),
        mm.MLPBlock(list(mlp_layers)),
        output,
    )

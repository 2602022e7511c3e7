"""Ranking models built from the NVTabular output schema (columns chosen by tag, not by name).

DLRM is the default (report section 5.3.4); DCN-v2 and NCF are the alternatives the report compared (figure
5.4), NCF as Merlin Models builds it (He et al. 2017: a matrix-factorization branch and an MLP branch over the
user and item id embeddings only, concatenated; compared, not served: see COMPARED_RANKERS); the MLP
(embeddings of every feature concatenated into an MLP) is a fourth, the NCF idea given every feature.
"""

from __future__ import annotations

from typing import Any

RANKERS = ("dlrm", "dcn", "mlp")  # the ones a run can serve
# NCF trains and is compared, but is never served: its SavedModel does not load back (Merlin Models 23.08:
# "Unable to find node root.blocks.0.parallel_layers.mf.embeddings.Tags"), so batch scoring and Triton cannot
# use it.
COMPARED_RANKERS = (*RANKERS, "ncf")


def ranker_input_schema(schema: Any, target: str) -> Any:
    """The schema a ranker sees: model features plus its one target (no raw ids, no time, no other targets)."""
    from merlin.schema import Tags

    others = [name for name in schema.select_by_tag(Tags.TARGET).column_names if name != target]
    return schema.excluding_by_tag("raw_id").excluding_by_tag("time").without(others)


def build_ranker(schema: Any, *, model: str, target: str, embedding_dim: int = 32,
                 mlp_layers: tuple[int, ...] = (128, 64)) -> Any:  # fmt: skip
    import merlin.models.tf as mm

    if model not in COMPARED_RANKERS:
        raise ValueError(f"unknown ranker '{model}': one of {', '.join(COMPARED_RANKERS)}")
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
    if model == "ncf":
        return mm.benchmark.NCFModel(schema, embedding_dim=embedding_dim, mlp_block=mm.MLPBlock(list(mlp_layers)),
                                     prediction_tasks=output)  # fmt: skip
    return mm.Model(
        mm.InputBlockV2(schema, categorical=mm.Embeddings(schema.select_by_tag("categorical"), dim=embedding_dim)),
        mm.MLPBlock(list(mlp_layers)),
        output,
    )

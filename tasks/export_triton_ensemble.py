"""Write a run's online pipeline as a Triton model repository (platform environment: it only copies and writes).

Two ensembles over eight Python-backend models (the code in `serving/triton_models/`, which calls the
one pipeline implementation in `models/online_pipeline.py`, as batch scoring does), and two models the gateway
calls on their own: `encode_features`, which encodes what the API receives with the run's fitted NVTabular
workflow, and `item_tower`, which embeds a product added since the run (runs from before the item tower was saved
have none):

    recommend:         query_tower -> faiss_retrieval -> candidate_sources -> filter_candidates -> ranker
                       -> ordering
    similar_products:  item_lookup -> faiss_retrieval -> similar_items

`candidate_sources` adds the item-to-item source's and the most clicked items to the Faiss candidates (as
batch scoring's retrieval), with every candidate's two-tower and item-to-item scores; `ordering` orders by
the ranker's probability blended with those (`retrieval_weight`, `item_to_item_weight`: batch scoring's
`blend_scores` with the weights batch scoring used). Products added since the run, with their embeddings and
encoded columns, may come with a request (`fresh_item_*`, `models.online_pipeline.FreshItems`): retrieval adds them
where Faiss would have found them, the ranker scores them, ordering names them; `similar_products` searches the
similar products of one with its own embedding (`item_lookup`).

The repository is self-contained: each model's version folder `<model>/1/` holds its `model.py` and
copies of what that stage loads (the query tower or ranker SavedModel, the Faiss index, the user or
item feature table, the item embeddings, the item-to-item source and each user's history, each user's seen
items (the spec's `exclude_seen`), the unavailable items, the fitted workflow) and
`pipeline_columns.json`, so it keeps working after the run's folder is gone and each stage process
holds only its own share. `config.pbtxt` files are written from the tensor lists below. The models
run in the trainer environment inside Triton's Python backend (docs/environments.md, "Triton server"), so this
step needs no TensorFlow. `log_triton_repository` records the repository as an MLflow artifact.

Requests and responses (docs/serving.md, "Triton ensemble"): raw ids are `<id>_raw` (the NVTabular output's
name for them), since the models' `<id>` input is the encoded id; lists are padded with item id -1
and score NaN (an unknown user or item gets a padded list and `known_*` False, not an error);
invalid parameters (top_k or top_n below 1, a negative temperature) get HTTP 400 with a message.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from feature_repo.tables import EVENT_TIMESTAMP
from models.blend import DEFAULT_ITEM_TO_ITEM_WEIGHT, DEFAULT_RETRIEVAL_WEIGHT, NO_SOURCE_WEIGHTS, SOURCES
from models.item_to_item import CONFIG_FILE, NEIGHBOURS_FILE
from models.online_pipeline import (
    ITEM_FEATURES_FILE,
    USER_FEATURES_FILE,
    USER_HISTORY_FILE,
    ItemCatalog,
    ItemsByUser,
    PipelineArtifacts,
    PipelineColumns,
)
from models.retrieval_index import INDEX_FILE, ITEM_EMBEDDINGS_FILE
from recsys.device import export_device, triton_instance_kind
from recsys.list_defaults import SIMILAR_N, TOP_K, TOP_N
from recsys.outputs import atomic_output_dir
from recsys.run_layout import RunLayout
from recsys.spec import DatasetSpec
from recsys.triton_repository import (
    ENCODE_FEATURES,
    ITEM_TOWER,
    ITEM_TOWER_DIR,
    MODEL_CODE_DIR,
    QUERY_TOWER_DIR,
    RANKER_DIR,
    RECOMMEND,
    SEEN_ITEMS_FILE,
    SIMILAR_PRODUCTS,
    SNAPSHOT_FILE,
    UNAVAILABLE_FILE,
    VERSION,
    WORKFLOW_DIR,
)
from tasks.nvtabular_fit_transform import RAW_SUFFIX

log = logging.getLogger(__name__)

# Tensor names of the recommend ensemble that are not dataset columns; a spec column named like one is refused.
RESERVED_NAMES = ("top_k", "top_n", "temperature", "seed", "item_ids", "scores", "probabilities",
                  "click_probabilities", "known_users",
                  "query_embeddings", "user_features", "candidates", "candidate_scores", "filtered_candidates",
                  "ranker_scores", "merged_candidates", "retrieval_scores", "item_to_item_scores",
                  "sources", "fresh_item_ids", "fresh_item_features", "fresh_item_embeddings")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class TritonEnsembleConfig:
    # Defaults of a request, which may ask for others: as batch scoring's, so online and offline lists agree.
    top_k: int = TOP_K  # retrieved candidates per user
    top_n: int = TOP_N  # items returned per user
    similar_n: int = SIMILAR_N  # similar products per item
    temperature: float = 0.0  # default softmax sampling temperature (0: the ranked order)
    max_top_k: int = 10_000  # requests asking for more candidates are refused
    # CSV with a column named like the spec's item id: items never recommended nor returned as similar.
    unavailable_items: Path | None = None
    # Weights of the two-tower's P(item | user) and of the item-to-item score next to the ranker's P(click | shown)
    # in the order (models.blend.blend_scores), as batch_score's: the two must agree for online and
    # offline lists to be the same. None: the ones the run's batch scoring used (batch_score/_metrics.json),
    # else the defaults. The returned `scores` are the blend.
    retrieval_weight: float | None = None
    item_to_item_weight: float | None = None
    # Weights of the indicators of the sources that retrieved a candidate (models.blend.SOURCES order); None: as
    # the weights above.
    source_weights: tuple[float, ...] | None = None
    # Where the models that run TensorFlow (the towers, the ranker) are served: "cpu" or "gpu", their Triton
    # instance kind (KIND_CPU, KIND_GPU). None: RECSYS_DEVICE as `recsys.device.export_device` resolves it.
    device: str | None = None
    # Instances of each stage model: processes (or GPU copies) answering its requests side by side, each holding
    # what the stage loads (~0.5 GB for a tower). More than one pays where cores outnumber the requests in flight.
    instances: int = 1

    def __post_init__(self) -> None:
        for name in ("retrieval_weight", "item_to_item_weight"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must not be negative, got {value}")
        if self.source_weights is not None and len(self.source_weights) != len(SOURCES):
            raise ValueError(f"source_weights needs one weight per source ({', '.join(SOURCES)})")
        if self.device not in (None, "cpu", "gpu"):
            raise ValueError(f"device must be cpu or gpu, got {self.device!r}")
        if self.instances < 1:
            raise ValueError(f"instances must be 1 or more, got {self.instances}")

    def with_weights_of(self, batch_score_dir: Path) -> TritonEnsembleConfig:
        """The weights left open filled in from a batch scoring's `_metrics.json`, else the defaults."""
        path = Path(batch_score_dir) / "_metrics.json"
        used = json.loads(path.read_text()).get("blend", {}) if path.exists() else {}
        retrieval = self.retrieval_weight
        item_to_item = self.item_to_item_weight
        return dataclasses.replace(
            self, retrieval_weight=used.get("retrieval_weight", DEFAULT_RETRIEVAL_WEIGHT) if retrieval is None
            else retrieval, item_to_item_weight=used.get("item_to_item_weight", DEFAULT_ITEM_TO_ITEM_WEIGHT)
            if item_to_item is None else item_to_item,
            source_weights=tuple(used.get("source_weights", NO_SOURCE_WEIGHTS)) if self.source_weights is None
            else self.source_weights)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class TensorConfig:
    """One input or output of a model's config.pbtxt."""

    name: str
    data_type: str  # TYPE_INT64, TYPE_FP32, TYPE_INT32, TYPE_BOOL, TYPE_STRING
    dims: tuple[int, ...]
    optional: bool = False

    def pbtxt(self) -> str:
        dims = ", ".join(str(dim) for dim in self.dims)
        optional = " optional: true" if self.optional else ""
        return f'{{ name: "{self.name}" data_type: {self.data_type} dims: [ {dims} ]{optional} }}'


@dataclasses.dataclass(frozen=True)
class StageConfig:
    """A Python-backend model: its tensors and the defaults its model.py reads from `parameters`."""

    name: str
    inputs: tuple[TensorConfig, ...]
    outputs: tuple[TensorConfig, ...]
    parameters: Mapping[str, str] = dataclasses.field(default_factory=dict)
    instance_kind: str = "KIND_CPU"  # KIND_GPU: Triton starts the instance on a GPU (recsys.device)
    instances: int = 1  # TritonEnsembleConfig.instances

    def pbtxt(self) -> str:
        lines = [f'name: "{self.name}"', 'backend: "python"', "max_batch_size: 0", *_tensor_lists(self)]
        # A process per instance (each loads TensorFlow or Faiss: ~0.5 GB for the towers).
        lines.append(f"instance_group [ {{ kind: {self.instance_kind} count: {self.instances} }} ]")
        for key, value in self.parameters.items():
            lines.append(f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}')
        return "\n".join(lines) + "\n"


@dataclasses.dataclass(frozen=True)
class EnsembleStep:
    model: str
    inputs: Mapping[str, str]  # model input -> ensemble tensor
    outputs: Mapping[str, str]  # model output -> ensemble tensor


@dataclasses.dataclass(frozen=True)
class EnsembleConfig:
    name: str
    inputs: tuple[TensorConfig, ...]
    outputs: tuple[TensorConfig, ...]
    steps: tuple[EnsembleStep, ...]

    def pbtxt(self) -> str:
        lines = [f'name: "{self.name}"', 'platform: "ensemble"', "max_batch_size: 0", *_tensor_lists(self)]
        lines.append("ensemble_scheduling {\n  step [")
        steps = []
        for step in self.steps:
            maps = [f'      input_map {{ key: "{key}" value: "{value}" }}' for key, value in step.inputs.items()]
            maps += [f'      output_map {{ key: "{key}" value: "{value}" }}' for key, value in step.outputs.items()]
            steps.append("    {\n" + f'      model_name: "{step.model}"\n      model_version: -1\n'
                         + "\n".join(maps) + "\n    }")  # fmt: skip
        lines.append(",\n".join(steps))
        lines.append("  ]\n}")
        return "\n".join(lines) + "\n"


def _tensor_lists(model: StageConfig | EnsembleConfig) -> list[str]:
    return [
        "input [\n" + ",\n".join(f"  {tensor.pbtxt()}" for tensor in model.inputs) + "\n]",
        "output [\n" + ",\n".join(f"  {tensor.pbtxt()}" for tensor in model.outputs) + "\n]",
    ]


def _ids(name: str, optional: bool = False) -> TensorConfig:
    return TensorConfig(name, "TYPE_INT64", (-1,), optional)


def _feature(columns: PipelineColumns, column: str) -> TensorConfig:
    """An optional input of one encoded feature: a value per user, or a multi-valued feature's padded row."""
    data_type = "TYPE_FP32" if column in columns.continuous else "TYPE_INT64"
    dims = (-1, columns.list_widths[column]) if column in columns.list_widths else (-1,)
    return TensorConfig(column, data_type, dims, optional=True)


def _matrix(name: str, data_type: str) -> TensorConfig:
    return TensorConfig(name, data_type, (-1, -1))


def _one(name: str, data_type: str, optional: bool = True) -> TensorConfig:
    return TensorConfig(name, data_type, (1,), optional)


def raw_id_name(column: str) -> str:
    """The tensor name of raw ids: the NVTabular output's name (the models' `<id>` input is the encoded id)."""
    return column + RAW_SUFFIX


def stage_configs(columns: PipelineColumns, config: TritonEnsembleConfig) -> list[StageConfig]:
    """The stage models; the ones that run TensorFlow (the towers, the ranker) with `config.device`'s instance kind."""
    tensorflow_kind = triton_instance_kind(config.device or "cpu")
    query_inputs = tuple(_feature(columns, column) for column in columns.query_columns)
    context_inputs = tuple(_feature(columns, column) for column in _context_columns(columns))
    candidates, known_users = _matrix("candidates", "TYPE_INT64"), TensorConfig("known_users", "TYPE_BOOL", (-1,))
    query_embeddings, user_features = _matrix("query_embeddings", "TYPE_FP32"), _matrix("user_features", "TYPE_INT64")
    scores, ranker_scores = _matrix("candidate_scores", "TYPE_FP32"), _matrix("ranker_scores", "TYPE_FP32")
    top_n, item_codes = _one("top_n", "TYPE_INT32"), _ids("item_codes")
    item_lists = (_matrix("item_ids", "TYPE_INT64"), _matrix("scores", "TYPE_FP32"))
    query_tower = StageConfig("query_tower", (_ids("raw_user_ids"), *query_inputs),
                              (query_embeddings, user_features, known_users),
                              instance_kind=tensorflow_kind)  # fmt: skip
    retrieval = StageConfig("faiss_retrieval", (query_embeddings, _one("top_k", "TYPE_INT32")), (candidates, scores),
                            {"top_k": str(config.top_k), "max_top_k": str(config.max_top_k)})  # fmt: skip
    retrieval_scores, item_to_item_scores = _matrix("retrieval_scores", "TYPE_FP32"), _matrix("item_to_item_scores",
                                                                                             "TYPE_FP32")
    candidate_source_bits = _matrix("sources", "TYPE_INT32")
    fresh_ids, fresh_features, fresh_embeddings = _fresh_inputs()
    sources = StageConfig("candidate_sources", (_ids("raw_user_ids"), query_embeddings, candidates, fresh_ids,
                                                fresh_features, fresh_embeddings),
                          (_matrix("merged_candidates", "TYPE_INT64"), retrieval_scores, item_to_item_scores,
                           candidate_source_bits))  # fmt: skip
    filtering = StageConfig("filter_candidates", (_ids("raw_user_ids"), candidates, known_users),
                            (_matrix("filtered_candidates", "TYPE_INT64"),))  # fmt: skip
    ranker = StageConfig("ranker", (user_features, candidates, *context_inputs, fresh_ids, fresh_features,
                                    fresh_embeddings), (ranker_scores,), instance_kind=tensorflow_kind)
    ordering = StageConfig(
        "ordering",
        (candidates, ranker_scores, retrieval_scores, item_to_item_scores, candidate_source_bits, top_n,
         _one("temperature", "TYPE_FP32"), _one("seed", "TYPE_INT64"), fresh_ids, fresh_features, fresh_embeddings),
        (*item_lists, _matrix("probabilities", "TYPE_FP32"), _matrix("click_probabilities", "TYPE_FP32")),
        {"top_n": str(config.top_n), "temperature": repr(float(config.temperature)),
         "retrieval_weight": repr(float(config.retrieval_weight or 0.0)),
         "item_to_item_weight": repr(float(config.item_to_item_weight or 0.0)),
         "source_weights": json.dumps([float(weight) for weight in config.source_weights or NO_SOURCE_WEIGHTS])},
    )  # fmt: skip
    item_lookup = StageConfig(
        "item_lookup",
        (_ids("raw_item_ids"), top_n, fresh_ids, fresh_features, fresh_embeddings),
        (item_codes, query_embeddings, _one("search_k", "TYPE_INT32", optional=False),
         TensorConfig("known_items", "TYPE_BOOL", (-1,))),
        {"top_n": str(config.similar_n)},
    )  # fmt: skip
    similar = StageConfig("similar_items", (item_codes, candidates, scores), item_lists)
    # Called by the gateway on its own, not by an ensemble: what the API receives, encoded by the run's workflow.
    text = ("TYPE_STRING", (-1,))
    encode = StageConfig(ENCODE_FEATURES, (TensorConfig("kind", "TYPE_STRING", (1,)), TensorConfig("rows", *text)),
                         (TensorConfig("encoded", *text), _one("snapshot_time", "TYPE_INT64", optional=False)))
    stages = [query_tower, retrieval, sources, filtering, ranker, ordering, item_lookup, similar, encode]
    if columns.item_tower_columns:  # runs from before the item tower was saved have none
        # Called by the gateway after `encode_features`: a product added since the run, embedded and packed.
        stages.append(StageConfig(ITEM_TOWER, (TensorConfig("rows", *text),),
                                  (_matrix("item_embeddings", "TYPE_FP32"), _matrix("item_features", "TYPE_INT64"),
                                   TensorConfig("known_items", "TYPE_BOOL", (-1,))),
                                  instance_kind=tensorflow_kind))  # fmt: skip
    return [dataclasses.replace(stage, instances=config.instances) for stage in stages]


def _fresh_inputs() -> tuple[TensorConfig, ...]:
    """Products added since the run, sent with a request (`models.online_pipeline.FreshItems`): raw ids, the item
    columns packed, item-tower embeddings; all three or none."""
    return (_ids("fresh_item_ids", optional=True), TensorConfig("fresh_item_features", "TYPE_INT64", (-1, -1), True),
            TensorConfig("fresh_item_embeddings", "TYPE_FP32", (-1, -1), True))  # fmt: skip


def _context_columns(columns: PipelineColumns) -> list[str]:
    return [column for column in columns.context_features if column in columns.ranker_columns]


def ensemble_configs(columns: PipelineColumns) -> list[EnsembleConfig]:
    raw_user, raw_item = raw_id_name(columns.user_id), raw_id_name(columns.item_id)
    features = {column: column for column in columns.query_columns}
    context = {column: column for column in _context_columns(columns)}
    fresh = {tensor.name: tensor.name for tensor in _fresh_inputs()}
    recommend = EnsembleConfig(
        RECOMMEND,
        inputs=(
            _ids(raw_user),
            *(_feature(columns, column) for column in [*features, *context]),
            _one("top_k", "TYPE_INT32"), _one("top_n", "TYPE_INT32"), _one("temperature", "TYPE_FP32"),
            _one("seed", "TYPE_INT64"), *_fresh_inputs(),
        ),
        outputs=(_matrix("item_ids", "TYPE_INT64"), _matrix("scores", "TYPE_FP32"),
                 _matrix("probabilities", "TYPE_FP32"), _matrix("click_probabilities", "TYPE_FP32"),
                 TensorConfig("known_users", "TYPE_BOOL", (-1,))),
        steps=(
            EnsembleStep("query_tower", {"raw_user_ids": raw_user, **features},
                         {"query_embeddings": "query_embeddings", "user_features": "user_features",
                          "known_users": "known_users"}),
            # Its scores are left out: `candidate_sources` computes every candidate's inner product, Faiss's too.
            EnsembleStep("faiss_retrieval", {"query_embeddings": "query_embeddings", "top_k": "top_k"},
                         {"candidates": "candidates"}),
            EnsembleStep("candidate_sources", {"raw_user_ids": raw_user, "query_embeddings": "query_embeddings",
                                               "candidates": "candidates", **fresh},
                         {"merged_candidates": "merged_candidates", "retrieval_scores": "retrieval_scores",
                          "item_to_item_scores": "item_to_item_scores", "sources": "sources"}),
            EnsembleStep("filter_candidates", {"raw_user_ids": raw_user, "candidates": "merged_candidates",
                                               "known_users": "known_users"},
                         {"filtered_candidates": "filtered_candidates"}),
            EnsembleStep("ranker", {"user_features": "user_features", "candidates": "filtered_candidates", **context,
                                    **fresh},
                         {"ranker_scores": "ranker_scores"}),
            EnsembleStep("ordering", {"candidates": "filtered_candidates", "ranker_scores": "ranker_scores",
                                      "retrieval_scores": "retrieval_scores",
                                      "item_to_item_scores": "item_to_item_scores", "sources": "sources",
                                      "top_n": "top_n",
                                      "temperature": "temperature", "seed": "seed", **fresh},
                         {"item_ids": "item_ids", "scores": "scores", "probabilities": "probabilities",
                          "click_probabilities": "click_probabilities"}),
        ),
    )  # fmt: skip
    similar = EnsembleConfig(
        SIMILAR_PRODUCTS,
        inputs=(_ids(raw_item), _one("top_n", "TYPE_INT32"), *_fresh_inputs()),
        outputs=(_matrix("item_ids", "TYPE_INT64"), _matrix("scores", "TYPE_FP32"),
                 TensorConfig("known_items", "TYPE_BOOL", (-1,))),
        steps=(
            EnsembleStep("item_lookup", {"raw_item_ids": raw_item, "top_n": "top_n", **fresh},
                         {"item_codes": "item_codes", "query_embeddings": "item_embeddings",
                          "search_k": "search_k", "known_items": "known_items"}),
            EnsembleStep("faiss_retrieval", {"query_embeddings": "item_embeddings", "top_k": "search_k"},
                         {"candidates": "neighbours", "candidate_scores": "neighbour_scores"}),
            EnsembleStep("similar_items", {"item_codes": "item_codes", "candidates": "neighbours",
                                           "candidate_scores": "neighbour_scores"},
                         {"item_ids": "item_ids", "scores": "scores"}),
        ),
    )  # fmt: skip
    return [recommend, similar]


def _check_names(columns: PipelineColumns) -> None:
    clashes = sorted(set(RESERVED_NAMES) & {*columns.query_columns, *_context_columns(columns),
                                             raw_id_name(columns.user_id)})  # fmt: skip
    if clashes:
        raise ValueError(f"dataset columns named like tensors of the recommend ensemble: {', '.join(clashes)}")


def _stage_files(artifacts: PipelineArtifacts) -> dict[str, list[tuple[Path, str]]]:
    """(source in the run, name in the version folder) of what each stage loads, besides generated files."""
    items = (artifacts.nvtabular_dir / ITEM_FEATURES_FILE, ITEM_FEATURES_FILE)
    return {
        "query_tower": [(artifacts.two_tower_dir / "query_tower", QUERY_TOWER_DIR),
                        (artifacts.nvtabular_dir / USER_FEATURES_FILE, USER_FEATURES_FILE)],
        "faiss_retrieval": [(artifacts.faiss_index_dir / INDEX_FILE, INDEX_FILE)],
        # The item-to-item files are absent in runs from before the source: the stage then passes Faiss's on.
        "candidate_sources": [(artifacts.two_tower_dir / ITEM_EMBEDDINGS_FILE, ITEM_EMBEDDINGS_FILE),
                              *((artifacts.faiss_index_dir / name, name)
                                for name in (NEIGHBOURS_FILE, CONFIG_FILE, USER_HISTORY_FILE)
                                if (artifacts.faiss_index_dir / name).exists())],
        "filter_candidates": [],
        "ranker": [(artifacts.ranker_dir / "model", RANKER_DIR), items],
        "ordering": [items],
        "item_lookup": [items, (artifacts.two_tower_dir / ITEM_EMBEDDINGS_FILE, ITEM_EMBEDDINGS_FILE)],
        "similar_items": [items],
        ENCODE_FEATURES: [(artifacts.nvtabular_dir / "workflow", WORKFLOW_DIR)],
        ITEM_TOWER: [(artifacts.two_tower_dir / ITEM_TOWER_DIR, ITEM_TOWER_DIR), items],
    }  # fmt: skip


def feature_snapshot_time(feature_table: Path) -> int:
    """Unix seconds of a feature table's event time (every row of a snapshot has the same, see feature_tables)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    times = pq.read_table(feature_table, columns=[EVENT_TIMESTAMP])[EVENT_TIMESTAMP]
    latest = pc.max(times).as_py()
    return int(latest.timestamp()) if latest is not None else 0


def _copy(source: Path, target: Path) -> None:
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copy2(source, target)


def _size(path: Path) -> int:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file())


def _tensor_summary(tensors: Sequence[TensorConfig]) -> list[dict]:
    return [{"name": tensor.name, "data_type": tensor.data_type.removeprefix("TYPE_"), "dims": list(tensor.dims),
             "optional": tensor.optional} for tensor in tensors]  # fmt: skip


def export_triton_ensemble(run_dir: Path, output_dir: Path, spec: DatasetSpec,
                           config: TritonEnsembleConfig = TritonEnsembleConfig(),
                           model_versions: dict[str, str] | None = None,
                           batch_score_dir: Path | None = None) -> dict:  # fmt: skip
    """Write the run's `recommend` and `similar_products` ensembles into `output_dir` (atomically); return metrics.

    `run_dir` holds nvtabular/, two_tower/, ranker/ and faiss_index/ (`PipelineArtifacts.of_run`).
    """
    import numpy as np
    import pyarrow.parquet as pq

    from tasks.batch_score import read_unavailable, seen_items_by_user

    started = time.perf_counter()
    artifacts = PipelineArtifacts.of_run(Path(run_dir))
    # The blend weights the config leaves open are those of the batch scoring whose lists are published.
    config = config.with_weights_of(batch_score_dir or RunLayout(run_dir).batch_score)
    if config.device is None:
        choice = export_device()
        log.info("export_triton_ensemble: the towers and the ranker on the %s: %s", choice.device.upper(),
                 choice.reason)  # fmt: skip
        config = dataclasses.replace(config, device=choice.device)
    columns = PipelineColumns.of_run(artifacts, spec)
    _check_names(columns)
    catalog = ItemCatalog.read(artifacts.nvtabular_dir / ITEM_FEATURES_FILE, columns)
    unavailable_raw = read_unavailable(config.unavailable_items, spec)
    unavailable = np.zeros(len(catalog), dtype=bool)
    codes = catalog.encode(sorted(unavailable_raw))
    unavailable[codes[codes >= 0]] = True
    seen_items = ItemsByUser.from_mapping(seen_items_by_user(artifacts.nvtabular_dir, spec))
    stages = stage_configs(columns, config)
    ensembles = ensemble_configs(columns)
    files = _stage_files(artifacts)

    with atomic_output_dir(Path(output_dir)) as staging:
        for stage in stages:
            version_dir = staging / stage.name / VERSION
            version_dir.mkdir(parents=True)
            (staging / stage.name / "config.pbtxt").write_text(stage.pbtxt())
            shutil.copy2(MODEL_CODE_DIR / stage.name / "model.py", version_dir / "model.py")
            columns.write(version_dir)
            for source, name in files[stage.name]:
                _copy(source, version_dir / name)
        seen_items.save(staging / "filter_candidates" / VERSION / SEEN_ITEMS_FILE)
        for stage_name in ("filter_candidates", "similar_items"):
            np.save(staging / stage_name / VERSION / UNAVAILABLE_FILE, unavailable)
        snapshot = {"snapshot_time": feature_snapshot_time(artifacts.nvtabular_dir / USER_FEATURES_FILE)}
        (staging / ENCODE_FEATURES / VERSION / SNAPSHOT_FILE).write_text(json.dumps(snapshot) + "\n")
        for ensemble in ensembles:
            (staging / ensemble.name / VERSION).mkdir(parents=True)  # an ensemble needs an (empty) version folder
            (staging / ensemble.name / "config.pbtxt").write_text(ensemble.pbtxt())
        interfaces = {ensemble.name: {"inputs": _tensor_summary(ensemble.inputs),
                                      "outputs": _tensor_summary(ensemble.outputs),
                                      "steps": [step.model for step in ensemble.steps]}
                      for ensemble in ensembles}  # fmt: skip
        metrics = {
            "ensembles": interfaces,
            "models": [stage.name for stage in stages],
            "model_bytes": {stage.name: _size(staging / stage.name) for stage in stages},
            "users": pq.ParquetFile(artifacts.nvtabular_dir / USER_FEATURES_FILE).metadata.num_rows,
            "items": int((catalog.raw_ids >= 0).sum()),
            "users_with_seen_items": len(seen_items.user_ids),
            "unavailable_items": int(unavailable.sum()),
            "config": {**dataclasses.asdict(config), "unavailable_items": str(config.unavailable_items or "")},
            "source_run": str(Path(run_dir).absolute()),
            "model_versions": model_versions or {},
            "seconds": time.perf_counter() - started,
        }
        (staging / "_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("export_triton_ensemble: %s and %s with %d models, %.1f MB, in %.1f s", RECOMMEND, SIMILAR_PRODUCTS,
             len(stages), sum(metrics["model_bytes"].values()) / 1e6, metrics["seconds"])  # fmt: skip
    return metrics


def log_triton_repository(repository_dir: Path, *, tracking_uri: str, run_id: str,
                          artifact_path: str = "triton_repository") -> dict:  # fmt: skip
    """Log the exported repository as artifacts of MLflow run `run_id` (e.g. the two-tower or ranker run)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    # The output is a link to a hidden staging folder: log the folder it points at.
    client.log_artifacts(run_id, str(Path(repository_dir).resolve()), artifact_path=artifact_path)
    artifact_uri = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    log.info("Triton repository %s logged to MLflow run %s at %s", repository_dir, run_id, artifact_uri)
    return {"run_id": run_id, "artifact_uri": artifact_uri}

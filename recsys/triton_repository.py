"""The Triton model repository a run exports: written by `tasks/export_triton_ensemble.py`, loaded by the stage
models in `serving/triton_models/` and called by the gateway (`serving/triton_client.py`,
`serving/model_versions.py`). One place for its model names and for the files in each stage's version folder.
"""

from __future__ import annotations

from pathlib import Path

RECOMMEND = "recommend"
SIMILAR_PRODUCTS = "similar_products"
ENSEMBLES = (RECOMMEND, SIMILAR_PRODUCTS)
# The standalone models the gateway calls: to encode what the API receives, and to embed a product added since the
# run (no ensemble names them).
ENCODE_FEATURES = "encode_features"
ITEM_TOWER = "item_tower"
STANDALONE_MODELS = (ENCODE_FEATURES, ITEM_TOWER)
VERSION = "1"  # each model's one version folder in an exported repository

# The stages' code: files the export copies next to each model's config (`<name>/model.py`), not imports.
# (Not via recsys.settings: the stages import this module in the trainer environment, whose pydantic is older.)
MODEL_CODE_DIR = Path(__file__).resolve().parent.parent / "serving" / "triton_models"

# What the export writes into a stage's version folder besides model.py and `PipelineColumns.FILE`
# (the run's feature tables, `items.faiss` and `item_embeddings.parquet` keep their names).
QUERY_TOWER_DIR = "query_tower"  # SavedModel
ITEM_TOWER_DIR = "item_tower"  # SavedModel; the same name in the run's two_tower folder
RANKER_DIR = "model"  # SavedModel
SEEN_ITEMS_FILE = "seen_items.npz"  # models.online_pipeline.ItemsByUser
UNAVAILABLE_FILE = "unavailable.npy"  # bool mask indexed by encoded item id
WORKFLOW_DIR = "workflow"  # the run's fitted NVTabular workflow (`<run>/nvtabular/workflow`)
SNAPSHOT_FILE = "snapshot.json"  # {"snapshot_time": unix seconds of the run's feature tables' event time}

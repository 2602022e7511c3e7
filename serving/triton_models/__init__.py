"""The Python-backend models of the exported Triton ensembles, one package per model (`<name>/model.py`).

`tasks/export_triton_ensemble.py` copies each `model.py` into `<repository>/<name>/1/` next to the files
that stage loads, and writes the `config.pbtxt` files and the two ensembles that chain them:

    recommend:         query_tower -> faiss_retrieval -> filter_candidates -> ranker -> ordering
    similar_products:  item_lookup -> faiss_retrieval -> similar_items

Every stage calls the one implementation in `models/online_pipeline.py` (batch scoring runs the same
code), so the online and offline answers cannot drift. The models run in the trainer environment
(TensorFlow, Faiss) inside Triton's Python backend stub; see README, "Triton ensemble".
"""

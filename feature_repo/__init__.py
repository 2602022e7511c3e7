"""The Feast repository of the recommender: user and item features, served from Redis.

Every definition is generated from the dataset spec and the Parquet schema of the feature tables
that `nvtabular_fit_transform` writes (`<run>/nvtabular/user_features.parquet`, `item_features.parquet`),
so nothing here knows AliCCP's column names:

- `tables.py`: which feature table holds which entity, join key and features;
- `entities.py`, `sources.py`, `feature_views.py`, `feature_services.py`: the Feast objects;
- `definitions.py`: all of them for one spec and one run's tables;
- `config.py`: the store (Redis online store, file registry) from `recsys.settings`;
- `store.py`: opening the store and reading online features (the serving tier reuses it).

There is deliberately no `feature_store.yaml`: the definitions depend on the spec and on the run, so
they are applied by `tasks/feast_features.py` (`recsys feast-apply`, `recsys feast-materialize`), not by
the `feast` CLI, which would take this folder's module-level objects (there are none) as the whole
desired state of the project.
"""

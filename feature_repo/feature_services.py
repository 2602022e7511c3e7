"""Feast feature services: one per model, named as the model is registered in MLflow.

Online serving and any training retrieval read a model's features through its service, so both
ask for the same set. Context and user-item features come with the request, not from Feast.
"""

from __future__ import annotations

from feast import FeatureService, FeatureView

RANKER_SERVICE = "ranker"
# The query tower's: the gateway's online path reads a customer's features through it (serving/live_features.py).
TWO_TOWER_SERVICE = "two_tower"


def feature_services(user_view: FeatureView, item_view: FeatureView) -> list[FeatureService]:
    return [
        FeatureService(name=RANKER_SERVICE, features=[user_view, item_view],
                       description="user and item features of the ranking model (DLRM / DCN-v2 / MLP)"),
        FeatureService(name=TWO_TOWER_SERVICE, features=[user_view],
                       description="user features of the two-tower model's query tower"),
    ]  # fmt: skip

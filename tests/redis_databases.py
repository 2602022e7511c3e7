"""The tests' Redis databases, numbered in this one place: databases of their own on the server that
RECSYS_TEST_REDIS_SERVER names (default the local one `make setup` starts), never DB 0 (the user's default) nor the
benchmarks' 3, 5, 6 and 9. Tests that share a database keep apart by key prefix; those that flush a database
(Feast's, the end-to-end runs', the publish tests') have one to themselves.

Module constants, not a fixture: test modules need the URLs at import time (in subprocess environments and
module-scoped fixtures)."""

from __future__ import annotations

import os
from typing import Any

from recsys.recommendation_store import RecommendationKeys

SERVER = os.environ.get("RECSYS_TEST_REDIS_SERVER", "redis://127.0.0.1:6379").rstrip("/")

DATABASES = {
    "api_feast": 4,  # test_recommendations_api.py's Feast online store (flushed)
    "gateway": 7,  # served gateways: observability, serving_run, model_versions; airflow_celery's broker (prefixes)
    "demo_page": 8,  # test_demo_page.py (flushed)
    "api": 10,  # in-process gateways: ingestion, security, fuzzing, product flags, recommendations (prefixes)
    "e2e_feast": 11,  # the end-to-end DAG runs' Feast store (flushed)
    "e2e": 12,  # the end-to-end DAG runs' published lists (flushed)
    "feast": 13,  # test_feast_features.py and test_feature_kinds.py (flushed)
    "publish": 14,  # test_publish_recommendations.py (flushed by each test)
    "quality_gate": 15,  # test_quality_gate.py (prefixes)
}
USER_DATABASES = {0}
BENCHMARK_DATABASES = {3, 5, 6, 9}
assert not set(DATABASES.values()) & (USER_DATABASES | BENCHMARK_DATABASES)
assert len(set(DATABASES.values())) == len(DATABASES)


def redis_url(name: str) -> str:
    """The URL of the tests' database named `name` (a key of DATABASES)."""
    return f"{SERVER}/{DATABASES[name]}"


def delete_keys_under(client: Any, prefix: str) -> int:
    """Delete every key a deployment with this key prefix wrote (its control keys too, which start with '{'); return
    how many. A test's cleanup before and after it, on a database other modules share by prefix."""
    keys = [key for pattern in RecommendationKeys(prefix).patterns for key in client.scan_iter(pattern, count=1000)]
    for key in keys:
        client.delete(key)
    return len(keys)

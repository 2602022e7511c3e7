"""The DAG files import cleanly and wire what they promise (Airflow's recommended DAG-integrity tests)."""

import itertools
from pathlib import Path

import pytest
from airflow.dag_processing.dagbag import DagBag

from tasks.pipeline import PipelineConfig
from tasks.train_two_tower import TwoTowerConfig

DAGS = Path(__file__).resolve().parent.parent / "dags"
DATA_STAGE = ["csv_to_parquet", "clean_null_rows", "resplit", "validate", "nvtabular_fit_transform", "train_ranker"]


@pytest.fixture(scope="module")
def dagbag() -> DagBag:
    return DagBag(dag_folder=str(DAGS))


def test_dags_import_without_errors(dagbag: DagBag):
    assert dagbag.import_errors == {}
    assert "recsys_nightly" in dagbag.dags
    assert "recsys_monitoring" in dagbag.dags


def test_nightly_schedule_and_no_catchup(dagbag: DagBag):
    dag = dagbag.dags["recsys_nightly"]
    assert dag.schedule == "0 2 * * *"
    assert dag.catchup is False
    assert dag.max_active_runs == 1
    assert dag.doc_md and "recsys_nightly" in dag.doc_md


def test_data_stage_runs_in_order(dagbag: DagBag):
    dag = dagbag.dags["recsys_nightly"]
    assert set(DATA_STAGE) <= set(dag.task_ids)
    for upstream, downstream in itertools.pairwise(DATA_STAGE):
        assert dag.get_task(downstream).upstream_task_ids == {upstream}


def test_model_stage_wiring(dagbag: DagBag):
    dag = dagbag.dags["recsys_nightly"]
    upstream = {task_id: dag.get_task(task_id).upstream_task_ids for task_id in dag.task_ids}
    assert upstream["csv_to_parquet"] == {"extract_interactions"}  # the gateway's day lands before conversion
    assert upstream["expire_runs"] == set()  # housekeeping runs whatever becomes of the run
    assert upstream["train_two_tower"] == upstream["train_ranker"] == {"nvtabular_fit_transform"}
    assert upstream["feast_apply"] == {"nvtabular_fit_transform"}
    assert upstream["feast_materialize"] == {"feast_apply"}
    assert upstream["build_faiss_index"] == {"train_two_tower"}
    # Batch scores need the index and both models; publishing happens only after scoring succeeded.
    assert upstream["batch_score"] == {"build_faiss_index", "train_two_tower", "train_ranker"}
    # The gate judges the scored models before anything is published.
    assert upstream["quality_gate"] == {"batch_score", "train_two_tower", "train_ranker"}
    assert upstream["publish_recommendations"] == {"quality_gate"}
    assert upstream["evaluate"] == {"batch_score", "train_ranker"}
    assert upstream["compare_rankers"] == {"nvtabular_fit_transform", "train_ranker"}
    assert upstream["demo_data"] == {"build_faiss_index", "train_two_tower", "train_ranker"}
    # The export takes the blend weights batch scoring chose, so online and offline lists agree.
    assert upstream["export_triton_ensemble"] == {"batch_score", "train_two_tower", "train_ranker"}


def test_every_task_retries_with_backoff(dagbag: DagBag):
    from datetime import timedelta

    from airflow.configuration import conf

    configured = timedelta(seconds=conf.getint("core", "default_task_retry_delay"))
    for task in dagbag.dags["recsys_nightly"].tasks:
        assert task.retries >= 1, task.task_id
        assert task.retry_exponential_backoff, task.task_id
        assert task.retry_delay == configured, task.task_id  # Airflow's setting: a test may shorten it
    template = (Path(__file__).parents[1] / "airflow.cfg.template").read_text()
    assert "\ndefault_task_retry_delay = 120\n" in template  # two minutes before the first retry


def test_manual_trigger_params_and_defaults(dagbag: DagBag):
    params = dagbag.dags["recsys_nightly"].params
    assert params["input_dir"] is None and params["spec"] is None
    assert params["max_null_features"] == 5  # the report's threshold
    assert params["resplit_fraction"] == 0.6  # the report's resplit
    assert params["sample_fraction"] == 1.0
    assert 0 < params["max_bad_row_fraction"] < 0.05
    assert params["ranker_model"] == "dlrm"  # the report's choice; dcn and mlp for comparison
    assert params["quality_gate"] == "gate" and params["gate_tolerance"] == 0.005
    assert params["compare_rankers"] is False and params["stage_publish"] is False
    # Empty: batch scoring chooses the blend weights on the validation split.
    assert params["retrieval_weight"] is None and params["item_to_item_weight"] is None
    two_tower = TwoTowerConfig()
    assert (params["two_tower_l2_normalize"], params["two_tower_temperature"]) == (two_tower.l2_normalize,
                                                                                   two_tower.logits_temperature)
    config = PipelineConfig.from_params({**params, "two_tower_l2_normalize": True, "two_tower_temperature": 0.1})
    assert (config.two_tower_l2_normalize, config.two_tower_temperature) == (True, 0.1)


def test_monitoring_runs_hourly_with_alert_params(dagbag: DagBag):
    dag = dagbag.dags["recsys_monitoring"]
    assert dag.schedule == "@hourly" and dag.catchup is False
    assert dag.doc_md and "recsys_monitoring" in dag.doc_md
    assert sorted(dag.task_ids) == ["expire_impressions", "monitor_recommendations"]
    assert not dag.get_task("expire_impressions").upstream_task_ids  # a failed hour still fails the run
    assert all(task.retries >= 1 and task.retry_exponential_backoff for task in dag.tasks)
    params = dag.params
    assert params["hour"] is None and params["attribution_window_minutes"] == 60 and params["k"] == 10
    assert params["min_ctr"] == 0.01 and params["max_psi"] == 0.25 and params["min_precision_at_k"] is None
    assert params["alert_webhook_url"] is None and params["fail_on_alert"] is True

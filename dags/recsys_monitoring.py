"""
### recsys_monitoring

Hourly live monitoring of the served recommendations. This file only wires: the task calls
`tasks.monitor.monitor` (by hand: `recsys monitor-hour --hour 2026-11-26T10:00Z`).

Each run takes one hour of the gateway's impressions (`<RECSYS_IMPRESSIONS_DIR>/date=.../hour=...`, every
served list with its request id) and the interactions posted to the gateway (RECSYS_DATABASE_URL) within
`attribution_window_minutes` after them, joined by request id (and by customer and product when an interaction
carries none), and computes per model version: impressions, click-through rate (impressions with at least one
click / impressions served), precision@k of the served lists and the drift (PSI) of the hour's location,
device and item features against the version's training split. The metrics go to MLflow (experiment
`recsys-monitoring`, one run per hour and version, step = the hour's epoch seconds); rerunning an hour
replaces them, never duplicates them.

Which hour: the latest one whose attribution windows have all closed when the run's data interval ends
(window 60 min, run at 12:00: the hour 10:00-11:00), or the `hour` Param. Alerts (CTR or precision below,
PSI above their thresholds; CTR and precision only on hours with `min_impressions` served lists) are logged as
JSON WARNING lines, POSTed to `alert_webhook_url` when set, and fail the task when `fail_on_alert` is on.

Alongside, a second task removes the impression hours older than `RECSYS_IMPRESSIONS_RETENTION_DAYS` (90 days,
a day at least) at the run's time (`tasks.monitor.remove_expired_impressions`; by hand: `recsys
expire-impressions`). The two are independent: a failed monitoring hour still fails the run, and the hours a
run monitors are far younger than any retention.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Context, Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

# The Params' defaults are the step's own (a quarter of a second to import: no pandas, MLflow or TensorFlow).
from tasks.monitor import AlertThresholds, MonitoringConfig

CONFIG, THRESHOLDS = MonitoringConfig(), AlertThresholds()
WINDOW_MINUTES = int(CONFIG.attribution_window.total_seconds() // 60)


def run_time(context: Context) -> datetime:
    """A scheduled run's data interval end; a manual run has none and takes the time it was triggered for."""
    return context.get("data_interval_end") or context["dag_run"].run_after


@dag(
    dag_id="recsys_monitoring",
    schedule="@hourly",
    start_date=datetime(2024, 1, 1),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["recsys", "monitoring"],
    # The first retry waits Airflow's `[core] default_task_retry_delay` (airflow.cfg: 120 s), then doubles.
    default_args={"retries": 2, "retry_exponential_backoff": True},
    params={
        "hour": Param(None, type=["null", "string"],
                      description="start of the hour to monitor, ISO 8601 with a time zone (default: from the run)"),
        "spec": Param(None, type=["null", "string"],
                      description="dataset spec YAML naming the training split's columns (default: specs/aliccp.yaml)"),
        "attribution_window_minutes": Param(WINDOW_MINUTES, type="integer", minimum=0, maximum=1440,
                                            description="how long after a list was shown a click counts for it"),
        "k": Param(CONFIG.k, type="integer", minimum=1, description="precision@k of the served lists"),
        "match_without_request_id": Param(CONFIG.match_without_request_id, type="boolean",
                                          description="attribute clicks without a request id by customer and "
                                                      "product (the latest list that showed it)"),
        "min_ctr": Param(THRESHOLDS.min_ctr, type=["null", "number"], minimum=0, maximum=1,
                         description="alert when the click-through rate is below (null: off)"),
        "min_precision_at_k": Param(THRESHOLDS.min_precision_at_k, type=["null", "number"], minimum=0, maximum=1,
                                    description="alert when precision@k is below (null: off)"),
        "max_psi": Param(THRESHOLDS.max_psi, type=["null", "number"], minimum=0,
                         description="alert when a feature's PSI against the training data is above (null: off)"),
        "min_impressions": Param(THRESHOLDS.min_impressions, type="integer", minimum=1,
                                 description="served lists an hour needs before CTR and precision alerts apply"),
        "alert_webhook_url": Param(None, type=["null", "string"],
                                   description="POST the alerts here as JSON (e.g. a Slack or Alertmanager hook)"),
        "fail_on_alert": Param(True, type="boolean", description="fail the task when an alert fires"),
    },
)
def recsys_monitoring() -> None:
    @task
    def monitor_recommendations() -> dict:
        from airflow.sdk.exceptions import AirflowSkipException

        from recsys.run_layout import runs_dir
        from recsys.settings import get_settings
        from recsys.spec import load_spec
        from serving.api.migrate import database_is_current
        from tasks.monitor import MonitoringAlertError, hour_to_monitor, monitor

        context, settings = get_current_context(), get_settings()
        params = context["params"]
        config = MonitoringConfig(attribution_window=timedelta(minutes=params["attribution_window_minutes"]),
                                  k=params["k"], match_without_request_id=params["match_without_request_id"])
        hour = datetime.fromisoformat(params["hour"]) if params["hour"] else (
            hour_to_monitor(run_time(context), config.attribution_window))  # fmt: skip
        if not database_is_current(settings.database_url):
            raise AirflowSkipException("no gateway database at the newest migration: nothing to monitor")
        thresholds = AlertThresholds(min_ctr=params["min_ctr"], min_precision_at_k=params["min_precision_at_k"],
                                     max_psi=params["max_psi"], min_impressions=params["min_impressions"])
        try:
            return monitor(hour, impressions_dir=settings.impressions_path, database_url=settings.database_url,
                           runs_dir=runs_dir(settings.data_root), tracking_uri=settings.mlflow_tracking_uri,
                           artifact_root=settings.mlflow_artifact_root, spec=load_spec(params["spec"]), config=config,
                           thresholds=thresholds,
                           webhook_url=params["alert_webhook_url"], fail_on_alert=params["fail_on_alert"])
        except MonitoringAlertError as alert:
            raise AirflowFailException(str(alert)) from alert  # the data will not change with a retry

    @task
    def expire_impressions() -> dict:
        from recsys.settings import get_settings
        from tasks.monitor import remove_expired_impressions

        context, settings = get_current_context(), get_settings()
        return remove_expired_impressions(settings.impressions_path, now=run_time(context),
                                          retention_days=settings.impressions_retention_days)

    monitor_recommendations()
    expire_impressions()


recsys_monitoring()

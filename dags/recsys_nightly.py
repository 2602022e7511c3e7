"""
### recsys_nightly

The nightly training pipeline of the recommender. This file only wires steps together: each task runs one
step as `tasks/pipeline.py` defines it (its arguments from the run's Params, its folder from the run's
`RunLayout`), the same steps `run_pipeline` runs outside Airflow and `recsys <step>` runs by hand.

Data stage: `csv_to_parquet` -> `clean_null_rows` -> `resplit` -> `validate` -> `nvtabular_fit_transform`.
Before it, `extract_interactions` writes the gateway's interactions of the day to
`<landing>/interactions/day=YYYY-MM-DD/`; `csv_to_parquet` reads every day found under the input
location's `interactions/` as a `gateway` split, and `resplit` adds its cleaned rows to train. The customers
forgotten on request (the gateway database's tombstones, serving/forget.py) lose their rows in every input.
Model stage: `train_two_tower` and `train_ranker` (DLRM by default), both after
`nvtabular_fit_transform`, logged and registered in MLflow as `two_tower` and `ranker`;
`build_faiss_index` over the item embeddings (and the item-to-item source from the train split);
`feast_apply` -> `feast_materialize` of the user and item feature tables into the Redis online store;
`batch_score` of every user (plus generic lists per segment and similar items; the blend weights of the
final order chosen on validation); `quality_gate`: the new versions against the MLflow `champion` and the
baselines (publish and move `champion`, or hold them as `challenger` and publish nothing, or forced by the
`quality_gate` Param; the reason is on both MLflow runs); `publish_recommendations` to Redis of what the
gate names, switched atomically; `export_triton_ensemble` of the online pipeline (after batch scoring,
whose weights it takes), logged as an MLflow artifact. With `compare_rankers`, `compare_rankers` also
trains DLRM, DCN-v2, MLP and NCF on the same data and logs their comparison (report figure 5.4) to the
MLflow experiment `recsys_ranker_comparison`.

Housekeeping, on its own so that it runs whatever becomes of the run: `expire_runs` deletes the folders of older
runs that nothing reads any more (`tasks/expire_runs.py`: the `RECSYS_KEEP_RUNS` newest, those of the last two
days, the versions Redis may serve, the quality gate's champion and challenger and Feast's sources are kept).

The tasks whose step runs in the trainer environment (the NVTabular step, training, the index, batch scoring, the
demo data) take the Celery queue `trainer` (`make airflow-celery`; the LocalExecutor ignores queues).

Every output goes to `<RECSYS_DATA_ROOT>/runs/<run id>/<step>` and appears atomically; a rerun of a
task replaces its output. A failed validation fails the run and nothing downstream runs; the report
is in `<run>/validate/report.md` and in the task log.

Manual trigger Params (defaults: `tasks.pipeline.PipelineConfig`, from the steps' own configs): the input
location (raw CSV; default `<RECSYS_DATA_ROOT>/landing`), the dataset spec, the null threshold, the resplit
fraction, the sample fraction, the share of malformed rows tolerated (they are quarantined), the ranker and
both models' epochs, the two-tower's L2 normalization and temperature, TopK and TopN, the blend weights,
unavailable items, the Triton stages' instance count, the gate, the ranker comparison and a staged publish
(the run's lists kept without switching readers to them: an A/B experiment's challenger).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk import Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

# The Params' defaults are the pipeline's own. Both modules import in a third of a second (no pandas, MLflow or
# TensorFlow), which every parse of this file pays.
from tasks.pipeline import TRAINER_QUEUE, PipelineConfig
from tasks.quality_gate import DEFAULT_TOLERANCE, GATE_MODES

if TYPE_CHECKING:
    from recsys.run_layout import RunLayout
    from recsys.settings import Settings

DEFAULTS = PipelineConfig()


def _fail_without_retry(error: Exception) -> AirflowFailException:
    """Bad input data does not get better with retries: fail the task at once, with the readable message."""
    return AirflowFailException(str(error))


def _run() -> tuple[Any, dict[str, Any], Settings, RunLayout, PipelineConfig]:
    """This DagRun's context, Params, settings, folders and pipeline config."""
    from recsys.settings import get_settings

    context, settings = get_current_context(), get_settings()
    params = context["params"]
    return context, params, settings, settings.run_layout(context["run_id"]), PipelineConfig.from_params(params)


def _raw_input(params: dict[str, Any], settings: Settings, layout: RunLayout) -> Path:
    """The run's raw CSV folder: the input location, or its copy in <run>/landing when it is on S3."""
    from recsys.locations import fetched_input_dir

    return fetched_input_dir(params["input_dir"] or settings.landing_location, layout.landing)


def _model_versions(two_tower: dict, ranker: dict) -> dict[str, str]:
    return {"two_tower": two_tower["model_version"], "ranker": ranker["model_version"]}


@dag(
    dag_id="recsys_nightly",
    schedule="0 2 * * *",
    start_date=datetime(2024, 1, 1),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["recsys", "training"],
    # The first retry waits Airflow's `[core] default_task_retry_delay` (airflow.cfg: 120 s), then doubles.
    default_args={"retries": 2, "retry_exponential_backoff": True},
    params={
        "input_dir": Param(None, type=["null", "string"],
                           description="raw CSV folder or s3://bucket/prefix (default: landing zone)"),
        "spec": Param(DEFAULTS.spec, type=["null", "string"],
                      description="dataset spec YAML (default: specs/aliccp.yaml)"),
        "max_null_features": Param(DEFAULTS.max_null_features, type="integer", minimum=0,
                                   description="drop rows with more null features"),
        "resplit_fraction": Param(DEFAULTS.resplit_fraction, type="number", minimum=0, maximum=1,
                                  description="share of test moved to train"),
        "sample_fraction": Param(DEFAULTS.sample_fraction, type="number", exclusiveMinimum=0, maximum=1,
                                 description="share of rows kept"),
        "ranker_model": Param(DEFAULTS.ranker_model, enum=["dlrm", "dcn", "mlp"],
                              description="ranking model (report figure 5.4)"),
        "ranker_epochs": Param(DEFAULTS.ranker_epochs, type="integer", minimum=1,
                               description="most epochs; early stopping on AUC"),
        "two_tower_epochs": Param(DEFAULTS.two_tower_epochs, type="integer", minimum=1,
                                  description="most epochs of the two-tower; early stopping on recall"),
        "two_tower_l2_normalize": Param(DEFAULTS.two_tower_l2_normalize, type="boolean",
                                        description="L2-normalize the two-tower's embeddings (a cosine)"),
        "two_tower_temperature": Param(DEFAULTS.two_tower_temperature, type="number", exclusiveMinimum=0,
                                       description="the two-tower's in-batch softmax temperature "
                                                   "(benchmarks/two_tower_tuning.py chooses it on validation)"),
        "max_bad_row_fraction": Param(DEFAULTS.max_bad_row_fraction, type="number", minimum=0, maximum=1,
                                      description="malformed rows tolerated (quarantined) per file"),
        "extract_day": Param(None, type=["null", "string"], format="date",
                             description="day of gateway interactions to extract (default: the day before the run)"),
        "top_k": Param(DEFAULTS.top_k, type="integer", minimum=1, description="candidates retrieved per user"),
        "top_n": Param(DEFAULTS.top_n, type="integer", minimum=1, description="recommendations kept per user"),
        # Batch scoring chooses both on the validation split unless set; the Triton export takes what batch
        # scoring used, so offline and online lists agree.
        "retrieval_weight": Param(DEFAULTS.retrieval_weight, type=["null", "number"], minimum=0,
                                  description="weight of the two-tower's P(item | user) next to the ranker's "
                                              "probability in the final order (empty: chosen on validation)"),
        "item_to_item_weight": Param(DEFAULTS.item_to_item_weight, type=["null", "number"], minimum=0,
                                     description="weight of the item-to-item source's score in the final order "
                                                 "(empty: chosen on validation)"),
        "unavailable_items": Param(DEFAULTS.unavailable_items, type=["null", "string"],
                                   description="CSV with an item id column: items never recommended"),
        "triton_instances": Param(DEFAULTS.triton_instances, type="integer", minimum=1,
                                  description="instances of each Triton stage model, answering side by side"),
        "quality_gate": Param(GATE_MODES[0], enum=list(GATE_MODES),
                              description="gate: publish only models as good as the champion and better than "
                                          "popularity; force: compare, publish anyway; skip: publish, no comparison"),
        "gate_tolerance": Param(DEFAULT_TOLERANCE, type="number", minimum=0,
                                description="how far below the champion's AUC and recall@100 a new model may be"),
        "compare_rankers": Param(False, type="boolean",
                                 description="also train DLRM, DCN-v2, MLP and NCF and compare them (fig. 5.4)"),
        "stage_publish": Param(False, type="boolean",
                               description="publish the run's lists as a kept version without switching readers "
                                           "to it: the challenger of an A/B experiment (recsys experiment start)"),
    },
)
def recsys_nightly() -> None:
    @task
    def expire_runs() -> dict:
        from tasks.expire_runs import expire_runs as step

        context, _, settings, _, _ = _run()
        # The run's time, not the clock's: a scheduled run's data interval end, else when it was triggered for.
        now = context.get("data_interval_end") or context["dag_run"].run_after
        return step(settings.data_root, redis_url=settings.redis_url, redis_type=settings.redis_type,
                    key_prefix=settings.redis_key_prefix, tracking_uri=settings.mlflow_tracking_uri,
                    keep_runs=settings.keep_runs, now=now)  # fmt: skip

    @task
    def extract_interactions() -> dict:
        """The gateway's interactions of one day into the landing zone (seed 000: replayable inputs)."""
        import logging
        from datetime import date

        from serving.api.migrate import database_is_current
        from tasks.extract_interactions import extract_interactions as step

        context, params, settings, _, config = _run()
        interval_end = context.get("data_interval_end")
        day = date.fromisoformat(params["extract_day"]) if params["extract_day"] else (
            (interval_end - timedelta(days=1)).date() if interval_end else None)  # fmt: skip
        if day is None or not database_is_current(settings.database_url):
            # A manual run names no day; a deployment without the gateway has no database to read.
            logging.getLogger(__name__).info("extract_interactions: nothing to extract (day %s)", day)
            return {"skipped": True}
        return step(settings.database_url, settings.default_landing_dir, day, spec=config.dataset_spec())

    @task
    def csv_to_parquet() -> str:
        from recsys.database import forgotten_customer_ids
        from recsys.errors import InputDataError
        from recsys.locations import fetch_input
        from serving.api.migrate import database_is_current
        from tasks.pipeline import run_step

        _, params, settings, layout, config = _run()
        # Customers forgotten on request (serving/forget.py) lose their rows in every input, the raw CSV included.
        forgotten = forgotten_customer_ids(settings.database_url) if database_is_current(settings.database_url) else []
        try:
            # An s3:// location is copied into <run>/landing first; a local folder is read where it is.
            input_dir = fetch_input(params["input_dir"] or settings.landing_location, layout.landing,
                                    endpoint_url=settings.s3_endpoint_url)  # fmt: skip
            run_step("csv_to_parquet", layout, config, input_dir=input_dir, forgotten_users=forgotten)
        except InputDataError as error:
            raise _fail_without_retry(error) from error
        return str(layout.parquet)

    # Each task below takes its upstream's output folder, which wires the order; the folders themselves come
    # from the run's RunLayout, and each step's arguments from tasks/pipeline.py, as outside Airflow.
    @task
    def clean_null_rows(parquet_dir: str) -> str:
        from tasks.pipeline import run_step

        *_, layout, config = _run()
        run_step("clean_null_rows", layout, config)
        return str(layout.clean)

    @task
    def resplit(clean_dir: str) -> str:
        from tasks.pipeline import run_step

        *_, layout, config = _run()
        run_step("resplit", layout, config)
        return str(layout.resplit)

    @task
    def validate(resplit_dir: str) -> str:
        from tasks.pipeline import run_step
        from tasks.validate import DataValidationError

        *_, layout, config = _run()
        try:
            run_step("validate", layout, config)
        except DataValidationError as error:
            raise _fail_without_retry(error) from error
        return str(layout.resplit)  # downstream reads the validated data, not the report

    @task(queue=TRAINER_QUEUE)
    def nvtabular_fit_transform(validated_dir: str) -> str:
        from tasks.pipeline import run_step

        *_, layout, config = _run()
        run_step("nvtabular_fit_transform", layout, config)
        return str(layout.nvtabular)

    @task(queue=TRAINER_QUEUE)
    def train_ranker(nvtabular_dir: str) -> dict:
        from tasks.pipeline import run_step
        from tasks.track_training import log_ranker_run, oracle_click_probabilities

        context, params, settings, layout, config = _run()
        run_step("train_ranker", layout, config)
        spec = config.dataset_spec()
        return {"output": str(layout.ranker), **log_ranker_run(
            layout.ranker, layout.nvtabular, spec,
            tracking_uri=settings.mlflow_tracking_uri, artifact_root=settings.mlflow_artifact_root,
            run_name=f"{config.ranker_model} {context['run_id']}",
            oracle_probabilities=oracle_click_probabilities(_raw_input(params, settings, layout),
                                                            layout.resplit / "valid", spec),
        )}  # fmt: skip

    @task(queue=TRAINER_QUEUE)
    def train_two_tower(nvtabular_dir: str) -> dict:
        from tasks.pipeline import run_step
        from tasks.track_training import log_two_tower_run

        context, _, settings, layout, config = _run()
        run_step("train_two_tower", layout, config)
        return {"output": str(layout.two_tower), **log_two_tower_run(
            layout.two_tower, layout.nvtabular, config.dataset_spec(),
            tracking_uri=settings.mlflow_tracking_uri, artifact_root=settings.mlflow_artifact_root,
            run_name=f"two_tower {context['run_id']}",
        )}  # fmt: skip

    @task(queue=TRAINER_QUEUE)
    def compare_rankers(nvtabular_dir: str, ranker: dict) -> dict:
        """With the Param `compare_rankers`: DLRM, DCN-v2, MLP and NCF on the same data, compared in MLflow."""
        from airflow.sdk.exceptions import AirflowSkipException

        from tasks.compare_rankers import compare_rankers as step
        from tasks.compare_rankers import train_rankers_for_comparison

        context, params, settings, layout, config = _run()
        if not params["compare_rankers"]:
            raise AirflowSkipException("the compare_rankers Param is off")
        # The run's own ranker was trained on the same data with the same epochs: it is reused.
        folders = train_rankers_for_comparison(
            layout.nvtabular, layout.ranker_comparison, trainer_python=settings.trainer_python,
            epochs=config.ranker_epochs, spec_path=config.spec, trained={config.ranker_model: layout.ranker},
        )  # fmt: skip
        return step(folders, tracking_uri=settings.mlflow_tracking_uri, artifact_root=settings.mlflow_artifact_root,
                    run_name=f"ranker comparison {context['run_id']}", nvtabular_dir=layout.nvtabular,
                    spec=config.dataset_spec())  # fmt: skip

    @task(queue=TRAINER_QUEUE)
    def build_faiss_index(two_tower: dict) -> str:
        from tasks.pipeline import run_step
        from tasks.track_training import log_step_metrics

        *_, settings, layout, config = _run()
        metrics = run_step("build_faiss_index", layout, config)
        # The approximate index's recall against exact search belongs next to the model it serves.
        log_step_metrics(two_tower["run_id"], metrics, tracking_uri=settings.mlflow_tracking_uri, prefix="faiss_")
        return str(layout.faiss_index)

    @task
    def feast_apply(nvtabular_dir: str) -> str:
        from tasks.feast_features import feast_apply as step

        *_, layout, config = _run()
        step(layout.nvtabular, config.dataset_spec())
        return str(layout.nvtabular)

    @task
    def feast_materialize(nvtabular_dir: str) -> dict:
        from tasks.feast_features import feast_materialize as step

        *_, layout, config = _run()
        return step(layout.nvtabular, config.dataset_spec())

    @task(queue=TRAINER_QUEUE)
    def batch_score(faiss_dir: str, two_tower: dict, ranker: dict) -> str:
        from tasks.pipeline import run_step

        *_, layout, config = _run()
        run_step("batch_score", layout, config, model_versions=_model_versions(two_tower, ranker))
        return str(layout.batch_score)

    @task
    def evaluate(batch_dir: str, ranker: dict) -> dict:
        """The whole pipeline and each stage against random, popularity, segment popularity and item-kNN."""
        from tasks.evaluate import evaluate as step
        from tasks.evaluate import log_evaluation

        _, params, settings, layout, config = _run()
        metrics = step(layout.root, layout.evaluate, config.dataset_spec(), batch_score_dir=layout.batch_score,
                       raw_input_dir=_raw_input(params, settings, layout))  # fmt: skip
        log_evaluation(metrics, tracking_uri=settings.mlflow_tracking_uri, run_id=ranker["run_id"],
                       report_dir=layout.evaluate)  # fmt: skip
        return metrics["checks"]

    @task(queue=TRAINER_QUEUE)
    def demo_data(faiss_dir: str, two_tower: dict, ranker: dict) -> str:
        """Validation users' clicks and retrieved candidates for the gateway's demo page (report 5.5)."""
        from tasks.pipeline import run_step

        *_, layout, config = _run()
        run_step("demo_data", layout, config)
        return str(layout.demo)

    @task
    def export_triton_ensemble(batch_dir: str, two_tower: dict, ranker: dict) -> str:
        from tasks.export_triton_ensemble import log_triton_repository
        from tasks.pipeline import run_step

        *_, settings, layout, config = _run()
        # After batch scoring: the weights it chose are the export's.
        run_step("export_triton_ensemble", layout, config, model_versions=_model_versions(two_tower, ranker))
        # The repository is reviewed and fetched with the ranker run it serves.
        log_triton_repository(layout.triton_repository, tracking_uri=settings.mlflow_tracking_uri,
                              run_id=ranker["run_id"])  # fmt: skip
        return str(layout.triton_repository)

    @task
    def quality_gate(batch_dir: str, two_tower: dict, ranker: dict) -> dict:
        """The new versions against the MLflow champion and the baselines: move the aliases, say what to publish."""
        from tasks.quality_gate import published_model_versions
        from tasks.quality_gate import quality_gate as step

        _, params, settings, layout, _ = _run()
        # What readers see now: when this run is held and a reviewer moved `champion`, the champion's lists are
        # named for publishing instead.
        published = published_model_versions(settings.redis_url, settings.redis_key_prefix)
        decision = step({"ranker": ranker, "two_tower": two_tower}, tracking_uri=settings.mlflow_tracking_uri,
                        tolerance=params["gate_tolerance"], mode=params["quality_gate"],
                        batch_dir=str(layout.batch_score), published_versions=published)  # fmt: skip
        return decision.to_dict()

    @task
    def publish_recommendations(decision: dict) -> dict:
        from airflow.sdk.exceptions import AirflowSkipException

        from recsys.errors import InputDataError
        from tasks.publish_recommendations import publish_recommendations as step

        _, params, settings, _, _ = _run()
        if decision["publish_batch_dir"] is None:  # held: readers keep the champion's lists
            raise AirflowSkipException(f"nothing published ({decision['outcome']}): {decision['reason']}")
        try:
            # The run's own batch scores as the run's version, or a reviewer's champion's as its run's version.
            # Staged: complete and kept, readers stay where they are (an A/B experiment's challenger).
            return step(Path(decision["publish_batch_dir"]), redis_url=settings.redis_url,
                        version=decision["publish_version"], key_prefix=settings.redis_key_prefix,
                        progress=False, switch=not params["stage_publish"])  # fmt: skip
        except InputDataError as error:
            raise _fail_without_retry(error) from error

    # Each task returns the path of its output; TaskFlow hands it to the next as an XComArg (a str at run time).
    expire_runs()  # on its own: older runs' folders go whatever becomes of this run
    parquet = csv_to_parquet()
    extract_interactions() >> parquet
    cleaned = clean_null_rows(parquet)  # type: ignore[arg-type]
    validated = validate(resplit(cleaned))  # type: ignore[arg-type]
    nvtabular = nvtabular_fit_transform(validated)  # type: ignore[arg-type]
    two_tower = train_two_tower(nvtabular)  # type: ignore[arg-type]
    ranker = train_ranker(nvtabular)  # type: ignore[arg-type]
    compare_rankers(nvtabular, ranker)  # type: ignore[arg-type]
    feast_materialize(feast_apply(nvtabular))  # type: ignore[arg-type]
    faiss_index = build_faiss_index(two_tower)  # type: ignore[arg-type]
    batch = batch_score(faiss_index, two_tower, ranker)  # type: ignore[arg-type]
    publish_recommendations(quality_gate(batch, two_tower, ranker))  # type: ignore[arg-type]
    evaluate(batch, ranker)  # type: ignore[arg-type]
    export_triton_ensemble(batch, two_tower, ranker)  # type: ignore[arg-type]
    demo_data(faiss_index, two_tower, ranker)  # type: ignore[arg-type]


recsys_nightly()

"""
### recsys_nightly

The nightly training pipeline of the recommender. This file only wires steps together: each task
calls one function in `tasks/` (also runnable by hand as `recsys <step>`).

Data stage: `csv_to_parquet` -> `clean_null_rows` -> `resplit` -> `validate` -> `nvtabular_fit_transform`.
Before it, `extract_interactions` writes the gateway's interactions of the day to
`<landing>/interactions/day=YYYY-MM-DD/`; `csv_to_parquet` reads every day found under the input
location's `interactions/` as a `gateway` split, and `resplit` adds its cleaned rows to train.
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

Every output goes to `<RECSYS_DATA_ROOT>/runs/<run id>/<step>` and appears atomically; a rerun of a
task replaces its output. A failed validation fails the run and nothing downstream runs; the report
is in `<run>/validate/report.md` and in the task log.

Manual trigger Params: the input location (raw CSV; default `<RECSYS_DATA_ROOT>/landing`), the
dataset spec, the null threshold, the resplit fraction, the sample fraction and the share of
malformed rows tolerated (they are quarantined).
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException


def _fail_without_retry(error: Exception) -> AirflowFailException:
    """Bad input data does not get better with retries: fail the task at once, with the readable message."""
    return AirflowFailException(str(error))


@dag(
    dag_id="recsys_nightly",
    schedule="0 2 * * *",
    start_date=datetime(2024, 1, 1),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["recsys", "training"],
    default_args={"retries": 2, "retry_delay": timedelta(minutes=2), "retry_exponential_backoff": True},
    params={
        "input_dir": Param(None, type=["null", "string"],
                           description="raw CSV folder or s3://bucket/prefix (default: landing zone)"),
        "spec": Param(None, type=["null", "string"], description="dataset spec YAML (default: specs/aliccp.yaml)"),
        "max_null_features": Param(5, type="integer", minimum=0, description="drop rows with more null features"),
        "resplit_fraction": Param(0.6, type="number", minimum=0, maximum=1, description="share of test moved to train"),
        "sample_fraction": Param(1.0, type="number", exclusiveMinimum=0, maximum=1, description="share of rows kept"),
        "ranker_model": Param("dlrm", enum=["dlrm", "dcn", "mlp"], description="ranking model (report figure 5.4)"),
        "ranker_epochs": Param(8, type="integer", minimum=1, description="most epochs; early stopping on AUC"),
        "max_bad_row_fraction": Param(0.001, type="number", minimum=0, maximum=1,
                                      description="malformed rows tolerated (quarantined) per file"),
        "extract_day": Param(None, type=["null", "string"], format="date",
                             description="day of gateway interactions to extract (default: the day before the run)"),
        "top_k": Param(500, type="integer", minimum=1, description="candidates retrieved per user"),
        "top_n": Param(100, type="integer", minimum=1, description="recommendations kept per user"),
        # Batch scoring chooses both on the validation split unless set; the Triton export takes what batch
        # scoring used, so offline and online lists agree.
        "retrieval_weight": Param(None, type=["null", "number"], minimum=0,
                                  description="weight of the two-tower's P(item | user) next to the ranker's "
                                              "probability in the final order (empty: chosen on validation)"),
        "item_to_item_weight": Param(None, type=["null", "number"], minimum=0,
                                     description="weight of the item-to-item source's score in the final order "
                                                 "(empty: chosen on validation)"),
        "unavailable_items": Param(None, type=["null", "string"],
                                   description="CSV with an item id column: items never recommended"),
        "quality_gate": Param("gate", enum=["gate", "force", "skip"],
                              description="gate: publish only models as good as the champion and better than "
                                          "popularity; force: compare, publish anyway; skip: publish, no comparison"),
        "gate_tolerance": Param(0.005, type="number", minimum=0,
                                description="how far below the champion's AUC and recall@100 a new model may be"),
        "compare_rankers": Param(False, type="boolean",
                                 description="also train DLRM, DCN-v2, MLP and NCF and compare them (fig. 5.4)"),
    },
)
def recsys_nightly() -> None:
    @task
    def extract_interactions() -> dict:
        """The gateway's interactions of one day into the landing zone (seed 000: replayable inputs)."""
        import logging
        from datetime import date

        from recsys.settings import get_settings
        from recsys.spec import load_spec
        from serving.api.migrate import database_is_current
        from tasks.extract_interactions import extract_interactions as step

        context, settings = get_current_context(), get_settings()
        params = context["params"]
        interval_end = context.get("data_interval_end")
        day = date.fromisoformat(params["extract_day"]) if params["extract_day"] else (
            (interval_end - timedelta(days=1)).date() if interval_end else None)  # fmt: skip
        if day is None or not database_is_current(settings.database_url):
            # A manual run names no day; a deployment without the gateway has no database to read.
            logging.getLogger(__name__).info("extract_interactions: nothing to extract (day %s)", day)
            return {"skipped": True}
        return step(settings.database_url, settings.default_landing_dir, day, spec=load_spec(params["spec"]))

    @task
    def csv_to_parquet() -> str:
        from recsys.errors import InputDataError
        from recsys.locations import fetch_input
        from recsys.settings import get_settings
        from recsys.spec import load_spec
        from tasks.csv_to_parquet import CsvToParquetConfig
        from tasks.csv_to_parquet import csv_to_parquet as step

        context = get_current_context()
        params, settings = context["params"], get_settings()
        run_dir = settings.run_dir(context["run_id"])
        output = run_dir / "parquet"
        config = CsvToParquetConfig(max_bad_row_fraction=params["max_bad_row_fraction"],
                                    sample_fraction=params["sample_fraction"])  # fmt: skip
        try:
            # An s3:// location is copied into <run>/landing first; a local folder is read where it is.
            input_dir = fetch_input(params["input_dir"] or settings.landing_location, run_dir / "landing",
                                    endpoint_url=settings.s3_endpoint_url)  # fmt: skip
            step(input_dir, output, load_spec(params["spec"]), config)
        except InputDataError as error:
            raise _fail_without_retry(error) from error
        return str(output)

    @task
    def clean_null_rows(parquet_dir: str) -> str:
        from recsys.spec import load_spec
        from tasks.clean_null_rows import clean_null_rows as step

        params = get_current_context()["params"]
        output = Path(parquet_dir).parent / "clean"
        step(Path(parquet_dir), output, load_spec(params["spec"]), params["max_null_features"])
        return str(output)

    @task
    def resplit(clean_dir: str) -> str:
        from recsys.spec import load_spec
        from tasks.resplit import resplit as step

        params = get_current_context()["params"]
        output = Path(clean_dir).parent / "resplit"
        step(Path(clean_dir), output, load_spec(params["spec"]), params["resplit_fraction"])
        return str(output)

    @task
    def validate(resplit_dir: str) -> str:
        from recsys.spec import load_spec
        from tasks.validate import DataValidationError
        from tasks.validate import validate as step

        params = get_current_context()["params"]
        try:
            step(Path(resplit_dir), Path(resplit_dir).parent / "validate", load_spec(params["spec"]))
        except DataValidationError as error:
            raise _fail_without_retry(error) from error
        return resplit_dir  # downstream reads the validated data, not the report

    @task
    def nvtabular_fit_transform(validated_dir: str) -> str:
        from recsys.settings import get_settings
        from recsys.trainer_env import run_trainer_step

        params = get_current_context()["params"]
        output = Path(validated_dir).parent / "nvtabular"
        arguments = ["--input", validated_dir, "--output", str(output)]
        if params["spec"]:
            arguments += ["--spec", params["spec"]]
        run_trainer_step(get_settings().trainer_python, "nvtabular-fit-transform", arguments)
        return str(output)

    @task
    def train_ranker(nvtabular_dir: str) -> dict:
        from recsys.locations import fetched_input_dir
        from recsys.settings import get_settings
        from recsys.spec import load_spec
        from recsys.trainer_env import run_trainer_step
        from tasks.track_training import log_ranker_run, oracle_click_probabilities

        context = get_current_context()
        params, settings = context["params"], get_settings()
        run_dir = Path(nvtabular_dir).parent
        output = run_dir / "ranker"
        arguments = ["--input", nvtabular_dir, "--output", str(output), "--model", params["ranker_model"],
                     "--epochs", str(params["ranker_epochs"])]  # fmt: skip
        if params["spec"]:
            arguments += ["--spec", params["spec"]]
        run_trainer_step(settings.trainer_python, "train-ranker", arguments)
        spec = load_spec(params["spec"])
        input_dir = fetched_input_dir(params["input_dir"] or settings.landing_location, run_dir / "landing")
        return {"output": str(output), **log_ranker_run(
            output, Path(nvtabular_dir), spec,
            tracking_uri=settings.mlflow_tracking_uri, artifact_root=settings.mlflow_artifact_root,
            run_name=f"{params['ranker_model']} {context['run_id']}",
            oracle_probabilities=oracle_click_probabilities(input_dir, run_dir / "resplit" / "valid", spec),
        )}  # fmt: skip

    @task
    def train_two_tower(nvtabular_dir: str) -> dict:
        from recsys.settings import get_settings
        from recsys.spec import load_spec
        from recsys.trainer_env import run_trainer_step
        from tasks.track_training import log_two_tower_run

        context = get_current_context()
        params, settings = context["params"], get_settings()
        output = Path(nvtabular_dir).parent / "two_tower"
        arguments = ["--input", nvtabular_dir, "--output", str(output)]
        if params["spec"]:
            arguments += ["--spec", params["spec"]]
        run_trainer_step(settings.trainer_python, "train-two-tower", arguments)
        return {"output": str(output), **log_two_tower_run(
            output, Path(nvtabular_dir), load_spec(params["spec"]),
            tracking_uri=settings.mlflow_tracking_uri, artifact_root=settings.mlflow_artifact_root,
            run_name=f"two_tower {context['run_id']}",
        )}  # fmt: skip

    @task
    def compare_rankers(nvtabular_dir: str, ranker: dict) -> dict:
        """With the Param `compare_rankers`: DLRM, DCN-v2, MLP and NCF on the same data, compared in MLflow."""
        from airflow.sdk.exceptions import AirflowSkipException

        from recsys.settings import get_settings
        from recsys.spec import load_spec
        from tasks.compare_rankers import compare_rankers as step
        from tasks.compare_rankers import train_rankers_for_comparison

        context = get_current_context()
        params, settings = context["params"], get_settings()
        if not params["compare_rankers"]:
            raise AirflowSkipException("the compare_rankers Param is off")
        run_dir = Path(nvtabular_dir).parent
        # The run's own ranker was trained on the same data with the same epochs: it is reused.
        folders = train_rankers_for_comparison(
            Path(nvtabular_dir), run_dir / "ranker_comparison", trainer_python=settings.trainer_python,
            epochs=params["ranker_epochs"], spec_path=params["spec"],
            trained={params["ranker_model"]: Path(ranker["output"])},
        )  # fmt: skip
        return step(folders, tracking_uri=settings.mlflow_tracking_uri, artifact_root=settings.mlflow_artifact_root,
                    run_name=f"ranker comparison {context['run_id']}", nvtabular_dir=Path(nvtabular_dir),
                    spec=load_spec(params["spec"]))  # fmt: skip

    @task
    def build_faiss_index(two_tower: dict) -> str:
        from recsys.settings import get_settings
        from recsys.trainer_env import run_trainer_step
        from tasks.track_training import log_step_metrics

        params, settings = get_current_context()["params"], get_settings()
        run_dir = Path(two_tower["output"]).parent
        output = run_dir / "faiss_index"
        arguments = ["--input", two_tower["output"], "--output", str(output), "--nvtabular", str(run_dir / "nvtabular")]
        if params["spec"]:
            arguments += ["--spec", params["spec"]]
        metrics = run_trainer_step(settings.trainer_python, "build-faiss-index", arguments)
        # The approximate index's recall against exact search belongs next to the model it serves.
        log_step_metrics(two_tower["run_id"], metrics, tracking_uri=settings.mlflow_tracking_uri, prefix="faiss_")
        return str(output)

    @task
    def feast_apply(nvtabular_dir: str) -> str:
        from recsys.spec import load_spec
        from tasks.feast_features import feast_apply as step

        step(Path(nvtabular_dir), load_spec(get_current_context()["params"]["spec"]))
        return nvtabular_dir

    @task
    def feast_materialize(nvtabular_dir: str) -> dict:
        from recsys.spec import load_spec
        from tasks.feast_features import feast_materialize as step

        return step(Path(nvtabular_dir), load_spec(get_current_context()["params"]["spec"]))

    @task
    def batch_score(faiss_dir: str, two_tower: dict, ranker: dict) -> str:
        from recsys.settings import get_settings
        from recsys.trainer_env import run_trainer_step

        params = get_current_context()["params"]
        run_dir = Path(faiss_dir).parent
        output = run_dir / "batch_score"
        versions = {"two_tower": two_tower["model_version"], "ranker": ranker["model_version"]}
        arguments = ["--input", str(run_dir), "--output", str(output), "--top-k", str(params["top_k"]),
                     "--top-n", str(params["top_n"]), "--model-versions", json.dumps(versions)]  # fmt: skip
        for name in ("retrieval_weight", "item_to_item_weight"):
            if params[name] is not None:
                arguments += [f"--{name.replace('_', '-')}", str(params[name])]
        if params["spec"]:
            arguments += ["--spec", params["spec"]]
        if params["unavailable_items"]:
            arguments += ["--unavailable-items", params["unavailable_items"]]
        run_trainer_step(get_settings().trainer_python, "batch-score", arguments)
        return str(output)

    @task
    def evaluate(batch_dir: str, ranker: dict) -> dict:
        """The whole pipeline and each stage against random, popularity, segment popularity and item-kNN."""
        from recsys.locations import fetched_input_dir
        from recsys.settings import get_settings
        from recsys.spec import load_spec
        from tasks.evaluate import evaluate as step
        from tasks.evaluate import log_evaluation

        params, settings = get_current_context()["params"], get_settings()
        run_dir = Path(batch_dir).parent
        output = run_dir / "evaluate"
        raw_input = fetched_input_dir(params["input_dir"] or settings.landing_location, run_dir / "landing")
        metrics = step(run_dir, output, load_spec(params["spec"]), raw_input_dir=raw_input,
                       batch_score_dir=Path(batch_dir))  # fmt: skip
        log_evaluation(metrics, tracking_uri=settings.mlflow_tracking_uri, run_id=ranker["run_id"], report_dir=output)
        return metrics["checks"]

    @task
    def demo_data(faiss_dir: str, two_tower: dict, ranker: dict) -> str:
        """Validation users' clicks and retrieved candidates for the gateway's demo page (report 5.5)."""
        from recsys.settings import get_settings
        from recsys.trainer_env import run_trainer_step

        params = get_current_context()["params"]
        run_dir = Path(faiss_dir).parent
        output = run_dir / "demo"
        arguments = ["--input", str(run_dir), "--output", str(output)]
        if params["spec"]:
            arguments += ["--spec", params["spec"]]
        run_trainer_step(get_settings().trainer_python, "demo-data", arguments)
        return str(output)

    @task
    def export_triton_ensemble(batch_dir: str, two_tower: dict, ranker: dict) -> str:
        from recsys.settings import get_settings
        from recsys.spec import load_spec
        from tasks.export_triton_ensemble import TritonEnsembleConfig, log_triton_repository
        from tasks.export_triton_ensemble import export_triton_ensemble as step

        params, settings = get_current_context()["params"], get_settings()
        run_dir = Path(batch_dir).parent  # after batch scoring: the weights it chose are the export's
        output = run_dir / "triton_repository"
        unavailable = Path(params["unavailable_items"]) if params["unavailable_items"] else None
        config = TritonEnsembleConfig(top_k=params["top_k"], top_n=params["top_n"], unavailable_items=unavailable,
                                      retrieval_weight=params["retrieval_weight"],
                                      item_to_item_weight=params["item_to_item_weight"])  # fmt: skip
        versions = {"two_tower": two_tower["model_version"], "ranker": ranker["model_version"]}
        step(run_dir, output, load_spec(params["spec"]), config, model_versions=versions,
             batch_score_dir=Path(batch_dir))  # fmt: skip
        # The repository is reviewed and fetched with the ranker run it serves.
        log_triton_repository(output, tracking_uri=settings.mlflow_tracking_uri, run_id=ranker["run_id"])
        return str(output)

    @task
    def quality_gate(batch_dir: str, two_tower: dict, ranker: dict) -> dict:
        """The new versions against the MLflow champion and the baselines: move the aliases, say what to publish."""
        from recsys.settings import get_settings
        from tasks.quality_gate import published_model_versions
        from tasks.quality_gate import quality_gate as step

        params, settings = get_current_context()["params"], get_settings()
        # What readers see now: when this run is held and a reviewer moved `champion`, the champion's lists are
        # named for publishing instead.
        published = published_model_versions(settings.redis_url, settings.redis_key_prefix)
        decision = step({"ranker": ranker, "two_tower": two_tower}, tracking_uri=settings.mlflow_tracking_uri,
                        tolerance=params["gate_tolerance"], mode=params["quality_gate"], batch_dir=batch_dir,
                        published_versions=published)  # fmt: skip
        return decision.to_dict()

    @task
    def publish_recommendations(decision: dict) -> dict:
        from airflow.sdk.exceptions import AirflowSkipException

        from recsys.errors import InputDataError
        from recsys.settings import get_settings
        from tasks.publish_recommendations import publish_recommendations as step

        settings = get_settings()
        if decision["publish_batch_dir"] is None:  # held: readers keep the champion's lists
            raise AirflowSkipException(f"nothing published ({decision['outcome']}): {decision['reason']}")
        try:
            # The run's own batch scores as the run's version, or a reviewer's champion's as its run's version.
            return step(Path(decision["publish_batch_dir"]), redis_url=settings.redis_url,
                        version=decision["publish_version"], key_prefix=settings.redis_key_prefix,
                        progress=False)  # fmt: skip
        except InputDataError as error:
            raise _fail_without_retry(error) from error

    # Each task returns the path of its output; TaskFlow hands it to the next as an XComArg (a str at run time).
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

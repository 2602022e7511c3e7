"""
### recsys_nightly

The nightly training pipeline of the recommender. This file only wires steps together: each task
calls one function in `tasks/` (also runnable by hand as `recsys <step>`).

Data stage: `csv_to_parquet` -> `clean_null_rows` -> `resplit` -> `validate` -> `nvtabular_fit_transform`.
Model stage (so far): `train_two_tower` and `train_ranker` (DLRM by default), both after
`nvtabular_fit_transform`, logged and registered in MLflow as `two_tower` and `ranker`.

Every output goes to `<RECSYS_DATA_ROOT>/runs/<run id>/<step>` and appears atomically; a rerun of a
task replaces its output. A failed validation fails the run and nothing downstream runs; the report
is in `<run>/validate/report.md` and in the task log.

Manual trigger Params: the input location (raw CSV; default `<RECSYS_DATA_ROOT>/landing`), the
dataset spec, the null threshold, the resplit fraction, the sample fraction and the share of
malformed rows tolerated (they are quarantined).
"""

from __future__ import annotations

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
        "input_dir": Param(None, type=["null", "string"], description="raw CSV folder (default: landing zone)"),
        "spec": Param(None, type=["null", "string"], description="dataset spec YAML (default: specs/aliccp.yaml)"),
        "max_null_features": Param(5, type="integer", minimum=0, description="drop rows with more null features"),
        "resplit_fraction": Param(0.6, type="number", minimum=0, maximum=1, description="share of test moved to train"),
        "sample_fraction": Param(1.0, type="number", exclusiveMinimum=0, maximum=1, description="share of rows kept"),
        "ranker_model": Param("dlrm", enum=["dlrm", "dcn", "mlp"], description="ranking model (report figure 5.4)"),
        "ranker_epochs": Param(8, type="integer", minimum=1, description="most epochs; early stopping on AUC"),
        "max_bad_row_fraction": Param(0.001, type="number", minimum=0, maximum=1,
                                      description="malformed rows tolerated (quarantined) per file"),
    },
)
def recsys_nightly() -> None:
    @task
    def csv_to_parquet() -> str:
        from recsys.errors import InputDataError
        from recsys.settings import get_settings
        from recsys.spec import load_spec
        from tasks.csv_to_parquet import CsvToParquetConfig
        from tasks.csv_to_parquet import csv_to_parquet as step

        context = get_current_context()
        params, settings = context["params"], get_settings()
        output = settings.run_dir(context["run_id"]) / "parquet"
        config = CsvToParquetConfig(max_bad_row_fraction=params["max_bad_row_fraction"],
                                    sample_fraction=params["sample_fraction"])  # fmt: skip
        input_dir = Path(params["input_dir"]) if params["input_dir"] else settings.default_landing_dir
        try:
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
        input_dir = Path(params["input_dir"]) if params["input_dir"] else settings.default_landing_dir
        return log_ranker_run(
            output, Path(nvtabular_dir), spec,
            tracking_uri=settings.mlflow_tracking_uri, artifact_root=settings.mlflow_artifact_root,
            run_name=f"{params['ranker_model']} {context['run_id']}",
            oracle_probabilities=oracle_click_probabilities(input_dir, run_dir / "resplit" / "valid", spec),
        )  # fmt: skip

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
        return log_two_tower_run(
            output, Path(nvtabular_dir), load_spec(params["spec"]),
            tracking_uri=settings.mlflow_tracking_uri, artifact_root=settings.mlflow_artifact_root,
            run_name=f"two_tower {context['run_id']}",
        )  # fmt: skip

    # Each task returns the path of its output; TaskFlow hands it to the next as an XComArg (a str at run time).
    parquet = csv_to_parquet()
    cleaned = clean_null_rows(parquet)  # type: ignore[arg-type]
    validated = validate(resplit(cleaned))  # type: ignore[arg-type]
    nvtabular = nvtabular_fit_transform(validated)  # type: ignore[arg-type]
    train_two_tower(nvtabular)  # type: ignore[arg-type]
    train_ranker(nvtabular)  # type: ignore[arg-type]


recsys_nightly()

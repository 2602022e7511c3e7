"""S3 as landing zone and MLflow artifact root, against a real S3 endpoint: moto's S3 server on a free
local port, reached over HTTP by boto3 and MLflow exactly as they reach AWS or MinIO (endpoint and
credentials from the standard AWS variables). Local defaults stay local."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from recsys.locations import MANIFEST, LocationError, fetch_input, is_remote
from recsys.settings import PROJECT_ROOT, Settings
from tasks.csv_to_parquet import csv_to_parquet
from tasks.track_training import configure_mlflow


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch):
    """A boto3 client of the endpoint, which the code under test finds the standard way: AWS_ENDPOINT_URL."""
    import boto3

    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return boto3.client("s3")


def _bucket(client, files: dict[str, bytes]) -> str:
    name = f"landing-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    for key, body in files.items():
        client.put_object(Bucket=name, Key=key, Body=body)
    return name


def _identity(path: Path) -> tuple[int, int]:
    """Inode and modification time: a file replaced by a new download changes both."""
    status = path.stat()
    return status.st_ino, status.st_mtime_ns


def test_fetch_of_a_landing_prefix_feeds_csv_to_parquet_and_a_rerun_is_a_no_op(s3, small_raw: Path, tmp_path: Path,
                                                                                 spec):  # fmt: skip
    files = {name: (small_raw / name).read_bytes() for name in ("train.csv", "test.csv")}
    bucket = _bucket(s3, {
        **{f"drops/2024-06-01/{name}": body for name, body in files.items()},
        "drops/2024-06-01/README.txt": b"not a CSV",
        "drops/2024-06-01/older/train.csv": b"a sub-folder is not part of the landing location",
        "drops/2024-05-31/train.csv": b"another prefix",
    })  # fmt: skip
    location = f"s3://{bucket}/drops/2024-06-01"
    destination = tmp_path / "run" / "landing"
    settings = Settings()
    assert is_remote(location) and settings.s3_endpoint_url == s3.meta.endpoint_url

    local = fetch_input(location, destination, endpoint_url=settings.s3_endpoint_url)

    assert local == destination
    assert sorted(path.name for path in local.iterdir() if not path.name.startswith(".")) == ["test.csv", "train.csv"]
    assert all((local / name).read_bytes() == body for name, body in files.items())
    assert [path.name for path in local.iterdir() if path.name.startswith(".")] == [MANIFEST]
    assert csv_to_parquet(local, tmp_path / "run" / "parquet", spec)["rows_out"] == 10_000

    before = {path.name: _identity(path) for path in local.iterdir()}
    assert fetch_input(location, destination) == destination
    assert {path.name: _identity(path) for path in local.iterdir()} == before  # nothing downloaded or rewritten

    # A file replaced in the landing zone is fetched again, alone; one removed there is removed here.
    s3.put_object(Bucket=bucket, Key="drops/2024-06-01/test.csv", Body=files["test.csv"][:-1])
    s3.delete_object(Bucket=bucket, Key="drops/2024-06-01/train.csv")
    fetch_input(location, destination)
    assert (local / "test.csv").read_bytes() == files["test.csv"][:-1]
    assert not (local / "train.csv").exists()


def test_the_gateways_extracts_are_fetched_with_their_folders_and_become_the_gateway_split(
    s3, small_raw: Path, tmp_path: Path, spec
):
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.extract_interactions import arrow_schema

    row = {name: None for name in spec.columns} | {"user_id": 1, "item_id": 2, "event_timestamp": 3, "click": 1,
                                                   "conversion": 0}  # fmt: skip
    extract = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([row], schema=arrow_schema(spec)), extract)
    bucket = _bucket(s3, {
        **{f"landing/{name}": (small_raw / name).read_bytes() for name in ("train.csv", "test.csv")},
        "landing/interactions/day=2024-05-01/part-00000.parquet": extract.getvalue(),
        "landing/interactions/day=2024-05-02/part-00000.parquet": extract.getvalue(),
        "landing/interactions/day=2024-05-02/notes.txt": b"not an extract",
        "landing/interactions/loose.parquet": b"not in a day folder",
        "landing/interactions/day=2024-05-03/deeper/part-00000.parquet": b"a sub-folder of a day",
    })  # fmt: skip
    destination = tmp_path / "run" / "landing"

    local = fetch_input(f"s3://{bucket}/landing", destination)

    fetched = sorted(path.relative_to(local).as_posix() for path in local.rglob("*") if path.is_file())
    assert fetched == [MANIFEST, "interactions/day=2024-05-01/part-00000.parquet",
                       "interactions/day=2024-05-02/part-00000.parquet", "test.csv", "train.csv"]  # fmt: skip
    metrics = csv_to_parquet(local, tmp_path / "run" / "parquet", spec)
    assert metrics["gateway_days"] == ["2024-05-01", "2024-05-02"] and metrics["rows_out_by_split"]["gateway"] == 2

    # A rerun downloads nothing; a day removed from the landing zone is removed here.
    before = {path: _identity(path) for path in local.rglob("*.parquet")}
    fetch_input(f"s3://{bucket}/landing", destination)
    assert {path: _identity(path) for path in local.rglob("*.parquet")} == before
    s3.delete_object(Bucket=bucket, Key="landing/interactions/day=2024-05-01/part-00000.parquet")
    fetch_input(f"s3://{bucket}/landing", destination)
    assert sorted(path.relative_to(local).as_posix() for path in local.rglob("*.parquet")) == [
        "interactions/day=2024-05-02/part-00000.parquet"
    ]
    # Without CSV files the extracts alone are not an input.
    empty = _bucket(s3, {"landing/interactions/day=2024-05-01/part-00000.parquet": extract.getvalue()})
    with pytest.raises(LocationError, match=r"no files matching \*\.csv under key prefix 'landing/'"):
        fetch_input(f"s3://{empty}/landing", tmp_path / "other")


def test_missing_bucket_and_no_matching_files_are_refused_naming_bucket_and_prefix(s3, tmp_path: Path):
    destination = tmp_path / "landing"
    with pytest.raises(LocationError, match=r"bucket no-such-bucket-[0-9a-f]+ does not exist"):
        fetch_input(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/landing", destination)
    bucket = _bucket(s3, {"landing/notes.txt": b"x", "elsewhere/train.csv": b"a,b\n"})
    with pytest.raises(LocationError, match=rf"no files matching \*\.csv under key prefix 'landing/' of bucket "
                                            rf"{bucket} \(it holds notes.txt\)"):  # fmt: skip
        fetch_input(f"s3://{bucket}/landing/", destination)
    with pytest.raises(LocationError, match=rf"'empty/' of bucket {bucket} \(it is empty\)"):
        fetch_input(f"s3://{bucket}/empty", destination)
    assert not destination.exists()


def test_access_denied_names_bucket_and_key(s3, s3_endpoint: str, tmp_path: Path):
    import requests

    bucket = _bucket(s3, {"landing/train.csv": b"a,b\n1,2\n"})
    # From here on the server checks credentials, and ours are no IAM user's.
    previous = requests.post(f"{s3_endpoint}/moto-api/reset-auth", data=b"0", timeout=10).json()
    try:
        with pytest.raises(LocationError, match=rf"access denied to bucket {bucket}, key prefix 'landing/'"):
            fetch_input(f"s3://{bucket}/landing", tmp_path / "landing")
    finally:
        requests.post(f"{s3_endpoint}/moto-api/reset-auth",
                      data=previous["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"].encode(), timeout=10)  # fmt: skip


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A SQLite tracking store; MLflow's process-wide tracking URI, which configure_mlflow sets, is put back."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    previous = tracking_utils._tracking_uri
    yield f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    mlflow.set_tracking_uri(previous)  # None also unsets MLFLOW_TRACKING_URI, which MLflow exported


def test_mlflow_logs_artifacts_to_an_s3_artifact_root_and_reads_them_back(s3, tracking_uri: str, tmp_path: Path):
    import mlflow

    bucket = _bucket(s3, {})
    experiment = f"s3_experiment_{uuid.uuid4().hex[:8]}"
    experiment_id = configure_mlflow(tracking_uri, f"s3://{bucket}/mlflow/", experiment)
    assert mlflow.get_experiment(experiment_id).artifact_location == f"s3://{bucket}/mlflow/{experiment}"
    (tmp_path / "history.json").write_text('{"auc": 0.7}')
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_artifact(str(tmp_path / "history.json"), artifact_path="training")

    key = f"mlflow/{experiment}/{run.info.run_id}/artifacts/training/history.json"
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == b'{"auc": 0.7}'
    downloaded = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="training/history.json",
                                                     dst_path=str(tmp_path / "back"))  # fmt: skip
    assert Path(downloaded).read_text() == '{"auc": 0.7}'
    assert configure_mlflow(tracking_uri, f"s3://{bucket}/mlflow", experiment) == experiment_id


def test_local_defaults_are_unchanged(monkeypatch: pytest.MonkeyPatch, tracking_uri: str, tmp_path: Path):
    for name in ("RECSYS_DATA_ROOT", "RECSYS_LANDING_DIR", "RECSYS_MLFLOW_ARTIFACT_ROOT", "AWS_ENDPOINT_URL",
                 "AWS_ENDPOINT_URL_S3"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert settings.landing_location == str(PROJECT_ROOT / "var" / "data" / "landing")
    assert settings.default_landing_dir == PROJECT_ROOT / "var" / "data" / "landing"
    assert settings.mlflow_artifact_root == str(PROJECT_ROOT / "var" / "mlflow" / "artifacts")
    assert settings.s3_endpoint_url is None

    # A local landing location is read where it is: nothing is copied, the run's folder is not made.
    assert fetch_input(str(tmp_path / "csv"), tmp_path / "run" / "landing") == tmp_path / "csv"
    assert fetch_input((tmp_path / "csv").as_uri(), tmp_path / "run" / "landing") == tmp_path / "csv"
    assert not (tmp_path / "run").exists()

    # A local artifact root still gives each experiment a file:// folder under it.
    experiment_id = configure_mlflow(tracking_uri, tmp_path / "artifacts", "local_experiment")
    import mlflow

    location = mlflow.get_experiment(experiment_id).artifact_location
    assert location == (tmp_path / "artifacts" / "local_experiment").as_uri()


def test_a_remote_landing_zone_is_configuration(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("RECSYS_LANDING_DIR", "s3://shop-landing/aliccp")
    monkeypatch.setenv("RECSYS_MLFLOW_ARTIFACT_ROOT", "s3://shop-mlflow/artifacts")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio.internal:9000")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://minio.internal:9001")  # the S3-specific one wins, as in boto3
    settings = Settings()
    assert settings.landing_location == "s3://shop-landing/aliccp"
    assert settings.mlflow_artifact_root == "s3://shop-mlflow/artifacts"
    assert settings.s3_endpoint_url == "http://minio.internal:9001"
    with pytest.raises(ValueError, match="not a local path"):
        settings.default_landing_dir  # noqa: B018

"""A real Triton server (tritonserver 2.51, installed by `make setup`) runs Python-backend models in the
trainer environment: an ensemble of a NumPy model and a TensorFlow model answers over HTTP, a broken
repository or installation is refused with a clear error, and stopping leaves no process or shared
memory behind."""

from __future__ import annotations

import json
import shutil
import textwrap
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient

from recsys.settings import PROJECT_ROOT, get_settings
from serving.triton_server import (
    TritonInstallation,
    TritonServer,
    TritonServerError,
    python_stub_shm_regions,
    session_processes,
)

pytestmark = pytest.mark.trainer  # a Triton server whose Python stages run in the trainer environment

KERNEL = np.array([[1.0], [2.0], [3.0]], dtype=np.float32)
BIAS = 0.5

PREPARE_CONFIG = """
name: "prepare"
backend: "python"
max_batch_size: 0
input [
  { name: "item_id" data_type: TYPE_INT64 dims: [ -1 ] },
  { name: "features" data_type: TYPE_FP32 dims: [ -1, 3 ] }
]
output [
  { name: "item_key" data_type: TYPE_STRING dims: [ -1 ] },
  { name: "scaled" data_type: TYPE_FP32 dims: [ -1, 3 ] }
]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""

PREPARE_MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            item_ids = pb_utils.get_input_tensor_by_name(request, "item_id").as_numpy()
            features = pb_utils.get_input_tensor_by_name(request, "features").as_numpy()
            keys = np.array([f"item-{item_id}".encode() for item_id in item_ids], dtype=np.object_)
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("item_key", keys),
                pb_utils.Tensor("scaled", (features / 10).astype(np.float32)),
            ]))
        return responses
"""

DENSE_CONFIG = """
name: "dense_score"
backend: "python"
max_batch_size: 0
input [ { name: "scaled" data_type: TYPE_FP32 dims: [ -1, 3 ] } ]
output [
  { name: "score" data_type: TYPE_FP32 dims: [ -1 ] },
  { name: "runtime" data_type: TYPE_STRING dims: [ 1 ] }
]
instance_group [ { kind: KIND_CPU } ]
parameters { key: "bias" value: { string_value: "0.5" } }
"""

# A Keras layer in the trainer environment's TensorFlow, its kernel read from a file in the model's
# version folder and its bias from the config's parameters, as an exported model would be.
DENSE_MODEL = """
import json
import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        import numpy
        import recsys
        import tensorflow as tf

        config = json.loads(args["model_config"])
        kernel = np.load(Path(args["model_repository"]) / args["model_version"] / "kernel.npy")
        bias = float(config["parameters"]["bias"]["string_value"])
        self.tf = tf
        self.dense = tf.keras.layers.Dense(
            1,
            kernel_initializer=tf.keras.initializers.Constant(kernel),
            bias_initializer=tf.keras.initializers.Constant(bias),
        )
        self.dense.build((None, kernel.shape[0]))
        self.runtime = json.dumps({
            "tensorflow": tf.__version__, "numpy": numpy.__version__, "prefix": sys.prefix,
            "recsys": recsys.__file__, "model_repository": args["model_repository"],
            "model_version": args["model_version"], "model_name": args["model_name"],
        }).encode()

    def execute(self, requests):
        responses = []
        for request in requests:
            scaled = pb_utils.get_input_tensor_by_name(request, "scaled").as_numpy()
            scores = self.dense(self.tf.constant(scaled)).numpy()[:, 0]
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("score", scores.astype(np.float32)),
                pb_utils.Tensor("runtime", np.array([self.runtime], dtype=np.object_)),
            ]))
        return responses
"""

ENSEMBLE_CONFIG = """
name: "score_items"
platform: "ensemble"
max_batch_size: 0
input [
  { name: "item_id" data_type: TYPE_INT64 dims: [ -1 ] },
  { name: "features" data_type: TYPE_FP32 dims: [ -1, 3 ] }
]
output [
  { name: "item_key" data_type: TYPE_STRING dims: [ -1 ] },
  { name: "score" data_type: TYPE_FP32 dims: [ -1 ] },
  { name: "runtime" data_type: TYPE_STRING dims: [ 1 ] }
]
ensemble_scheduling {
  step [
    {
      model_name: "prepare"
      model_version: -1
      input_map { key: "item_id" value: "item_id" }
      input_map { key: "features" value: "features" }
      output_map { key: "item_key" value: "item_key" }
      output_map { key: "scaled" value: "scaled_features" }
    },
    {
      model_name: "dense_score"
      model_version: -1
      input_map { key: "scaled" value: "scaled_features" }
      output_map { key: "score" value: "score" }
      output_map { key: "runtime" value: "runtime" }
    }
  ]
}
"""


def write_model(repository: Path, name: str, config: str, model_py: str | None = None) -> Path:
    """`<repository>/<name>/config.pbtxt` and, for a Python-backend model, `<name>/1/model.py`."""
    version_dir = repository / name / "1"
    version_dir.mkdir(parents=True)
    (repository / name / "config.pbtxt").write_text(textwrap.dedent(config))
    if model_py is not None:
        (version_dir / "model.py").write_text(textwrap.dedent(model_py))
    return version_dir


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    repository = tmp_path_factory.mktemp("triton") / "repository"
    write_model(repository, "prepare", PREPARE_CONFIG, PREPARE_MODEL)
    np.save(write_model(repository, "dense_score", DENSE_CONFIG, DENSE_MODEL) / "kernel.npy", KERNEL)
    write_model(repository, "score_items", ENSEMBLE_CONFIG)
    with TritonServer(repository, log_path=repository.parent / "tritonserver.log") as server:
        yield server


def infer_score_items(server: TritonServer, item_ids: np.ndarray, features: np.ndarray) -> httpclient.InferResult:
    inputs = [
        httpclient.InferInput("item_id", list(item_ids.shape), "INT64"),
        httpclient.InferInput("features", list(features.shape), "FP32"),
    ]
    inputs[0].set_data_from_numpy(item_ids)
    inputs[1].set_data_from_numpy(features)
    outputs = [httpclient.InferRequestedOutput(name) for name in ("item_key", "score", "runtime")]
    client = httpclient.InferenceServerClient(server.http_address)
    try:
        return client.infer("score_items", inputs, outputs=outputs)
    finally:
        client.close()


def test_ensemble_runs_tensorflow_in_the_trainer_environment(served: TritonServer):
    item_ids = np.array([3, 14, 159, 2653], dtype=np.int64)
    features = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)

    result = infer_score_items(served, item_ids, features)

    expected = (features / 10) @ KERNEL[:, 0] + BIAS
    np.testing.assert_allclose(result.as_numpy("score"), expected, rtol=1e-5, atol=1e-6)
    assert result.as_numpy("item_key").tolist() == [b"item-3", b"item-14", b"item-159", b"item-2653"]
    runtime = json.loads(result.as_numpy("runtime")[0])
    # The stub's interpreter is the trainer venv itself: its TensorFlow and NumPy, our editable package.
    assert runtime["tensorflow"].startswith("2.12.")
    assert runtime["numpy"] == "1.24.3"
    assert Path(runtime["prefix"]) == Path(get_settings().trainer_python).absolute().parent.parent
    assert Path(runtime["recsys"]) == PROJECT_ROOT / "recsys" / "__init__.py"
    # What model.py's initialize() gets: the model's folder (not the repository root) and version.
    assert Path(runtime["model_repository"]) == served.model_repository / "dense_score"
    assert (runtime["model_name"], runtime["model_version"]) == ("dense_score", "1")


def test_every_model_is_ready_and_metrics_are_served(served: TritonServer):
    client = httpclient.InferenceServerClient(served.http_address)
    try:
        assert client.is_server_ready()
        assert all(client.is_model_ready(name) for name in ("prepare", "dense_score", "score_items"))
    finally:
        client.close()
    with urllib.request.urlopen(served.metrics_url, timeout=5) as response:
        assert b'nv_inference_request_success{model="score_items"' in response.read()


def test_broken_model_repository_fails_with_the_models_error(tmp_path: Path):
    repository = tmp_path / "repository"
    write_model(repository, "prepare", PREPARE_CONFIG, PREPARE_MODEL)
    broken = "import module_that_is_not_installed\n" + PREPARE_MODEL
    write_model(repository, "broken", PREPARE_CONFIG.replace('"prepare"', '"broken"'), broken)

    server = TritonServer(repository, log_path=tmp_path / "tritonserver.log", startup_timeout_s=60)
    with pytest.raises(TritonServerError) as raised:
        server.start()

    message = str(raised.value)
    assert "exited with code" in message
    assert "failed to load 'broken'" in message
    assert "No module named 'module_that_is_not_installed'" in message
    assert server.process is not None and server.process.returncode is not None


def test_missing_installation_says_to_run_setup(tmp_path: Path):
    (tmp_path / "repository").mkdir()
    with pytest.raises(TritonServerError, match="make setup"):
        TritonServer(tmp_path / "repository", triton_env=tmp_path / "no-triton").start()


def test_stub_for_another_python_is_refused(tmp_path: Path):
    """An installation whose backend holds the stub of Python 3.10 while the models' interpreter is 3.11."""
    real = TritonInstallation.locate(get_settings().triton_env)
    fake = tmp_path / "triton-env" / "lib" / "python3.11" / "site-packages" / "pytriton" / "tritonserver"
    (fake / "backends" / "python").mkdir(parents=True)
    (fake / "bin").symlink_to(real.binary.parent)
    (fake / "python_backend_stubs").symlink_to(real.root / "python_backend_stubs")
    python_310_stub = real.root / "python_backend_stubs" / "3.10" / "triton_python_backend_stub"
    shutil.copy2(python_310_stub, fake / "backends" / "python")
    (tmp_path / "repository").mkdir()

    with pytest.raises(TritonServerError, match=r"not the Python backend stub for Python 3\.11.*make setup"):
        TritonServer(tmp_path / "repository", triton_env=tmp_path / "triton-env").start()


# A model that takes longer to unload than the server's exit timeout: Triton gives up on it and exits,
# leaving its stub and shared memory for TritonServer.stop() to clean up.
SLOW_FINALIZE = (
    PREPARE_MODEL
    + """
    def finalize(self):
        import time
        time.sleep(30)
"""
)


@pytest.mark.parametrize(
    ("model_py", "clean_exit"), [(PREPARE_MODEL, True), (SLOW_FINALIZE, False)], ids=["clean", "exit_timeout_expired"]
)
def test_stop_leaves_no_process_or_shared_memory(tmp_path: Path, model_py: str, clean_exit: bool):
    repository = tmp_path / "repository"
    write_model(repository, "prepare", PREPARE_CONFIG, model_py)
    server = TritonServer(repository, log_path=tmp_path / "tritonserver.log", exit_timeout_s=2).start()
    assert server.process is not None
    session = server.process.pid
    regions = python_stub_shm_regions(session)
    assert len(regions) == 1, "the Python backend runs the model's one instance in a stub process"
    assert (Path("/dev/shm") / regions[0]).exists()

    exit_code = server.stop()

    assert (exit_code == 0) is clean_exit
    assert session_processes(session) == []
    assert not (Path("/dev/shm") / regions[0]).exists()
    assert not server.is_ready()

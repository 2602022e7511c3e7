"""RECSYS_DEVICE (recsys/device.py) and the GPU lock's CUDA libraries in trainer processes (recsys/cuda_libraries.py),
on a machine without a GPU: the decision as a function of the GPUs seen, the Triton export's instance kinds, the
environment trainer steps and Triton's stubs start with, and TensorFlow's own check in the trainer environment."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from models.online_pipeline import PipelineColumns
from recsys import device
from recsys.cuda_libraries import XLA_DATA_DIR_FLAG, nvidia_library_dirs, with_cuda_libraries
from recsys.device import DEVICE_VARIABLE, DeviceError, choose_device, requested_device
from recsys.settings import get_settings
from recsys.trainer_env import run_trainer_step
from serving.triton_server import PythonModelEnvironment
from tasks.export_triton_ensemble import TritonEnsembleConfig, stage_configs

COLUMNS = PipelineColumns(
    user_id="user", item_id="item", user_features=("age",), item_features=("shop",), context_features=("device",),
    query_columns=("user", "age"), ranker_columns=("user", "item", "age", "shop", "device"),
    null_codes={"user": 1, "item": 1, "age": 1, "shop": 1, "device": 1}, item_cardinality=6,
    item_tower_columns=("item", "shop"),
)  # fmt: skip
TENSORFLOW_STAGES = {"query_tower", "ranker", "item_tower"}


@pytest.mark.parametrize(("value", "expected"), [(None, "auto"), ("", "auto"), ("auto", "auto"), (" CPU ", "cpu"),
                                                 ("gpu", "gpu")])  # fmt: skip
def test_the_variable_is_read_from_the_environment(value: str | None, expected: str):
    environ = {} if value is None else {DEVICE_VARIABLE: value}

    assert requested_device(environ) == expected


def test_an_invalid_device_is_refused_naming_the_variable():
    with pytest.raises(DeviceError, match=r"RECSYS_DEVICE='cuda' is not a device: use auto, cpu or gpu"):
        requested_device({DEVICE_VARIABLE: "cuda"})


def test_without_a_gpu_cpu_and_auto_resolve_to_the_cpu_and_gpu_fails_at_once():
    assert choose_device("cpu", []).device == "cpu"
    auto = choose_device("auto", [])
    assert auto.device == "cpu" and auto.reason == "RECSYS_DEVICE=auto and TensorFlow sees no GPU"
    with pytest.raises(DeviceError, match=r"RECSYS_DEVICE=gpu but TensorFlow sees no GPU.*RECSYS_DEVICE=auto or cpu"):
        choose_device("gpu", [])


def test_with_a_gpu_auto_and_gpu_take_it_and_cpu_does_not():
    gpus = ["/physical_device:GPU:0"]

    assert choose_device("auto", gpus).device == "gpu"
    assert choose_device("gpu", gpus).reason == "RECSYS_DEVICE=gpu and TensorFlow sees 1 GPU(s): /physical_device:GPU:0"
    assert choose_device("cpu", gpus).device == "cpu"


def test_processes_started_for_cpu_see_no_gpu_at_all():
    """TensorFlow is initialized by importing merlin.models.tf, before a step can hide GPUs itself: the processes we
    start get CUDA_VISIBLE_DEVICES empty for cpu, and the environment as it is otherwise."""
    environ = {"PATH": "/usr/bin", "CUDA_VISIBLE_DEVICES": "0"}

    assert device.process_environment({**environ, DEVICE_VARIABLE: "cpu"})["CUDA_VISIBLE_DEVICES"] == ""
    for value in ("auto", "gpu"):
        assert device.process_environment({**environ, DEVICE_VARIABLE: value}) == {**environ, DEVICE_VARIABLE: value}
    with pytest.raises(DeviceError, match="RECSYS_DEVICE='GPU0' is not a device"):
        device.process_environment({DEVICE_VARIABLE: "GPU0"})


def test_faiss_uses_no_gpu_here_and_gpu_fails_naming_the_variable(monkeypatch: pytest.MonkeyPatch):
    """The platform environment's faiss-cpu (and this machine) has no GPU: auto builds and searches on the CPU."""
    monkeypatch.setenv(DEVICE_VARIABLE, "auto")
    assert device.faiss_gpu_count() == 0
    index = object()
    assert device.index_to_gpus(index) is index and device.index_to_cpu(index) is index
    monkeypatch.setenv(DEVICE_VARIABLE, "gpu")
    with pytest.raises(DeviceError, match="RECSYS_DEVICE=gpu but Faiss sees no GPU"):
        device.faiss_gpu_count()


def _instance_kinds(config: TritonEnsembleConfig) -> dict[str, str]:
    kinds = {}
    for stage in stage_configs(COLUMNS, config):
        [line] = [line for line in stage.pbtxt().splitlines() if line.startswith("instance_group")]
        kinds[stage.name] = line.split("kind: ")[1].split()[0]
    return kinds


def test_the_triton_export_writes_kind_gpu_for_the_tensorflow_stages_only_on_a_gpu():
    on_gpu = _instance_kinds(TritonEnsembleConfig(device="gpu"))
    assert {name for name, kind in on_gpu.items() if kind == "KIND_GPU"} == TENSORFLOW_STAGES
    assert {kind for name, kind in on_gpu.items() if name not in TENSORFLOW_STAGES} == {"KIND_CPU"}
    assert set(_instance_kinds(TritonEnsembleConfig(device="cpu")).values()) == {"KIND_CPU"}
    with pytest.raises(ValueError, match="device must be cpu or gpu"):
        TritonEnsembleConfig(device="tpu")


def test_the_export_resolves_the_device_with_the_cuda_driver(monkeypatch: pytest.MonkeyPatch):
    """The export runs in the platform environment, without TensorFlow: auto asks the CUDA driver."""
    monkeypatch.setattr(device, "driver_gpu_count", lambda: 0)
    assert device.export_device({}).device == "cpu"
    with pytest.raises(DeviceError, match="RECSYS_DEVICE=gpu but the CUDA driver sees no GPU"):
        device.export_device({DEVICE_VARIABLE: "gpu"})
    monkeypatch.setattr(device, "driver_gpu_count", lambda: 2)
    assert device.export_device({}).device == "gpu"
    assert device.export_device({DEVICE_VARIABLE: "cpu"}).device == "cpu"


def _fake_venv(root: Path, *, cuda: bool) -> Path:
    """A venv's layout: bin/python, and with `cuda` the GPU lock's nvidia wheels in site-packages; its python."""
    site_packages = root / "lib" / "python3.11" / "site-packages"
    site_packages.mkdir(parents=True)
    if cuda:
        for wheel, library in [("cublas", "libcublas.so.11"), ("cudnn", "libcudnn.so.8"),
                               ("cuda_runtime", "libcudart.so.11.0")]:  # fmt: skip
            (site_packages / "nvidia" / wheel / "lib").mkdir(parents=True)
            (site_packages / "nvidia" / wheel / "lib" / library).touch()
        (site_packages / "nvidia" / "cuda_nvcc" / "lib").mkdir(parents=True)  # no library: not on the path
        (site_packages / "nvidia" / "cuda_nvcc" / "lib" / "__init__.py").touch()
        (site_packages / "nvidia" / "cuda_nvcc" / "nvvm" / "libdevice").mkdir(parents=True)
    (root / "bin").mkdir()
    python = root / "bin" / "python"
    python.touch()
    return python


def test_the_cuda_wheels_lib_folders_go_first_on_ld_library_path(tmp_path: Path):
    python = _fake_venv(tmp_path / "venv", cuda=True)
    nvidia = tmp_path / "venv" / "lib" / "python3.11" / "site-packages" / "nvidia"
    folders = [str(nvidia / wheel / "lib") for wheel in ("cublas", "cuda_runtime", "cudnn")]

    env = with_cuda_libraries({"LD_LIBRARY_PATH": "/opt/other", "XLA_FLAGS": "--xla_dump_to=/tmp/x"}, python)

    assert env["LD_LIBRARY_PATH"].split(os.pathsep) == [*folders, "/opt/other"]
    assert env["XLA_FLAGS"] == f"--xla_dump_to=/tmp/x {XLA_DATA_DIR_FLAG}={nvidia / 'cuda_nvcc'}"
    assert env["CUDA_MODULE_LOADING"] == "LAZY"
    assert with_cuda_libraries(env, python) == env  # applied twice: nothing repeated


def test_without_the_cuda_wheels_the_environment_is_left_as_it_is(tmp_path: Path):
    python = _fake_venv(tmp_path / "venv", cuda=False)
    environ = {"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/opt/other"}

    assert nvidia_library_dirs(tmp_path / "venv" / "lib" / "python3.11" / "site-packages") == []
    assert with_cuda_libraries(environ, python) == environ
    assert with_cuda_libraries({}, tmp_path / "missing" / "bin" / "python") == {}


def test_triton_stubs_get_the_cuda_libraries_after_libpython(tmp_path: Path):
    python = _fake_venv(tmp_path / "venv", cuda=True)
    models_env = PythonModelEnvironment(bin_dir=python.parent, libpython_dir=Path("/opt/python/lib"),
                                        python_version="3.11")  # fmt: skip

    env = models_env.apply({"PATH": "/usr/bin", DEVICE_VARIABLE: "cpu"})

    library_path = env["LD_LIBRARY_PATH"].split(os.pathsep)
    assert library_path[0] == "/opt/python/lib"
    assert library_path[1:] == [str(folder) for folder in
                                nvidia_library_dirs(tmp_path / "venv" / "lib" / "python3.11" / "site-packages")]
    assert env["CUDA_VISIBLE_DEVICES"] == ""


def test_trainer_steps_start_with_the_cuda_libraries_and_the_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """run_trainer_step's subprocess: a stand-in interpreter that writes what it was given as the step's metrics."""
    python = _fake_venv(tmp_path / "venv", cuda=True)
    python.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, os, sys
        with open(sys.argv[-1], "w") as out:
            json.dump({{"ld_library_path": os.environ.get("LD_LIBRARY_PATH", ""),
                       "xla_flags": os.environ.get("XLA_FLAGS", ""),
                       "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}}, out)
        """))
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv(DEVICE_VARIABLE, "auto")

    metrics = run_trainer_step(python, "train-ranker", [])

    nvidia = tmp_path / "venv" / "lib" / "python3.11" / "site-packages" / "nvidia"
    assert metrics["ld_library_path"].split(os.pathsep)[0] == str(nvidia / "cublas" / "lib")
    assert f"{XLA_DATA_DIR_FLAG}={nvidia / 'cuda_nvcc'}" in metrics["xla_flags"]
    assert metrics["cuda_visible_devices"] is None
    monkeypatch.setenv(DEVICE_VARIABLE, "cpu")
    assert run_trainer_step(python, "train-ranker", [])["cuda_visible_devices"] == ""


# TensorFlow itself, in the trainer environment (one interpreter for the three values: each ends in a decision).
TENSORFLOW_CHECK = """
import json, os, tensorflow as tf
from recsys import device
results = {"gpus": len(tf.config.list_physical_devices("GPU"))}
for value in ("gpu", "auto", "cpu"):
    os.environ["RECSYS_DEVICE"] = value
    device.select_tensorflow_device.cache_clear()
    try:
        results[value] = device.select_tensorflow_device()
    except device.DeviceError as error:
        results[value] = "DeviceError: " + str(error)
print(json.dumps(results))
"""


def test_tensorflow_in_the_trainer_environment_follows_the_variable():
    python = get_settings().trainer_python
    if not Path(python).exists():
        pytest.skip(f"no trainer environment at {python}")
    environ = with_cuda_libraries({**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, Path(python))
    done = subprocess.run([str(python), "-c", TENSORFLOW_CHECK], capture_output=True, text=True, env=environ,
                          timeout=300, check=True)  # fmt: skip
    results = json.loads(done.stdout.strip().splitlines()[-1])
    if results["gpus"]:
        pytest.skip("TensorFlow sees a GPU here: this test is for a machine without one")

    assert results["gpu"].startswith("DeviceError: RECSYS_DEVICE=gpu but TensorFlow sees no GPU")
    assert results["auto"] == "cpu" and results["cpu"] == "cpu"


def test_the_triton_export_writes_the_instance_count_of_every_stage():
    counts = {line.split("count: ")[1].split()[0] for stage in stage_configs(COLUMNS, TritonEnsembleConfig(instances=3))
              for line in stage.pbtxt().splitlines() if line.startswith("instance_group")}  # fmt: skip
    assert counts == {"3"}
    with pytest.raises(ValueError, match="instances must be 1 or more"):
        TritonEnsembleConfig(instances=0)

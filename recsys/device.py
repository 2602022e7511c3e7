"""Where the trainer environment's work runs: `RECSYS_DEVICE=auto|cpu|gpu` (default auto).

- The processes we start in the trainer environment (trainer steps, Triton's stubs): `process_environment`; for
  cpu they start with no GPU visible at all (CUDA_VISIBLE_DEVICES empty), which TensorFlow, Faiss and Merlin honour.
- TensorFlow (training, the towers and the ranker in batch scoring and in Triton's stages):
  `select_tensorflow_device()`, once per process. cpu hides the GPUs from TensorFlow if they are still visible;
  gpu fails at once when TensorFlow sees none; auto takes the GPUs when TensorFlow sees one, else the CPU, and logs
  which and why.
- Merlin and NVTabular: `merlin_cpu()`, whether their datasets and loaders keep data on the CPU: yes unless the
  process runs on a GPU and RAPIDS cudf and dask-cudf import. Neither lock has them (cudf 23.08's wheels are not on
  PyPI), so NVTabular runs on the CPU, also on a GPU machine.
- Faiss: `faiss_gpu_count()`, the GPUs Faiss builds and searches on (none for cpu); `index_to_gpus` copies an
  index there (`faiss.index_cpu_to_all_gpus`), `index_to_cpu` back (what is written to disk is a CPU index).
- Triton: `triton_instance_kind`, KIND_GPU for the towers and the ranker when the device is the GPU
  (`export_device()` decides in the platform environment, which has no TensorFlow: auto there means the CUDA
  driver offers a GPU).

The environment variable is read from `os.environ` here, not through `recsys.settings`: the trainer environment
and Triton's Python-backend stages import this module, and their pydantic is older than the settings need.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import importlib.util
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

log = logging.getLogger(__name__)

DEVICE_VARIABLE = "RECSYS_DEVICE"
DEVICES = ("auto", "cpu", "gpu")
# Faiss's GPU k-selection limit (GPU_MAX_SELECTION_K in faiss 1.8): a search for more neighbours runs on the CPU.
FAISS_GPU_MAX_K = 2048
CUDA_SUCCESS = 0
MINIMUM_DRIVER_VERSION = 11000  # cuDriverGetVersion's 1000 * major + 10 * minor: CUDA 11.8 runs on 11.x drivers


class DeviceError(RuntimeError):
    """RECSYS_DEVICE is not a device, or asks for a GPU that is not there; the message says which."""


@dataclasses.dataclass(frozen=True)
class DeviceChoice:
    device: str  # "cpu" or "gpu"
    reason: str


def requested_device(environ: Mapping[str, str] = os.environ) -> str:
    """RECSYS_DEVICE's value, "auto" when unset or empty; DeviceError for anything but auto, cpu or gpu."""
    value = environ.get(DEVICE_VARIABLE, "").strip().lower() or "auto"
    if value not in DEVICES:
        raise DeviceError(f"{DEVICE_VARIABLE}={environ[DEVICE_VARIABLE]!r} is not a device: use auto, cpu or gpu")
    return value


def choose_device(requested: str, gpus: Sequence[str], *, seen_by: str = "TensorFlow") -> DeviceChoice:
    """The device for `requested` (auto, cpu or gpu) when `seen_by` sees `gpus` (their names), with the reason.

    cpu is the CPU whatever is there; gpu is the GPU, and DeviceError when there is none; auto is the GPU when
    there is one, else the CPU."""
    if requested not in DEVICES:
        raise DeviceError(f"{DEVICE_VARIABLE}={requested!r} is not a device: use auto, cpu or gpu")
    if requested == "cpu":
        return DeviceChoice("cpu", f"{DEVICE_VARIABLE}=cpu")
    if gpus:
        return DeviceChoice("gpu", f"{DEVICE_VARIABLE}={requested} and {seen_by} sees {len(gpus)} GPU(s): "
                                   + ", ".join(gpus))  # fmt: skip
    if requested == "gpu":
        raise DeviceError(
            f"{DEVICE_VARIABLE}=gpu but {seen_by} sees no GPU. A GPU needs the GPU lock (`make setup GPU=1`), an "
            "NVIDIA driver, and the trainer process started by recsys.trainer_env or Triton (they put the CUDA "
            f"wheels on LD_LIBRARY_PATH). Set {DEVICE_VARIABLE}=auto or cpu to run on the CPU."
        )
    return DeviceChoice("cpu", f"{DEVICE_VARIABLE}=auto and {seen_by} sees no GPU")


def process_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` for a process we start in the trainer environment: for RECSYS_DEVICE=cpu with CUDA_VISIBLE_DEVICES
    empty, so that it sees no GPU from its start. TensorFlow's own switch cannot wait for a step to ask: importing
    merlin.models.tf initializes TensorFlow, after which its visible devices are fixed. DeviceError, before anything
    starts, for a RECSYS_DEVICE that is not a device."""
    env = dict(environ)
    if requested_device(env) == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


@functools.cache
def select_tensorflow_device() -> str:
    """Apply RECSYS_DEVICE to TensorFlow in this process and return "cpu" or "gpu" (the first call decides).

    gpu and auto only read which GPUs TensorFlow sees, which works at any time. cpu hides the GPUs if TensorFlow
    still sees them, which works only before TensorFlow initializes (importing merlin.models.tf does): the processes
    we start for cpu see none in the first place (`process_environment`). On the GPU, TensorFlow's memory grows as
    needed rather than taking the whole GPU up front, so Triton's stages, Faiss and a step can share one, where
    TensorFlow is not initialized yet (Merlin's import configures it itself: TF_MEMORY_ALLOCATION)."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    choice = choose_device(requested_device(), [gpu.name for gpu in gpus])
    if choice.device == "cpu" and gpus:
        try:
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError as error:  # TensorFlow is initialized (an op ran, or merlin.models.tf was imported)
            if tf.config.get_visible_devices("GPU"):
                raise DeviceError(f"{DEVICE_VARIABLE}=cpu came too late: TensorFlow had already initialized its GPUs "
                                  "(start the process with CUDA_VISIBLE_DEVICES= empty, as recsys.trainer_env and "
                                  f"Triton do for {DEVICE_VARIABLE}=cpu)") from error  # fmt: skip
    if choice.device == "gpu":
        for gpu in gpus:
            # ValueError: a memory limit (a virtual device) is configured already; RuntimeError: already initialized.
            with contextlib.suppress(ValueError, RuntimeError):
                tf.config.experimental.set_memory_growth(gpu, True)
    log.info("TensorFlow runs on the %s: %s", choice.device.upper(), choice.reason)
    return choice.device


@functools.cache
def rapids_importable() -> bool:
    """Whether cudf and dask_cudf import (RAPIDS, which Merlin needs to keep data on the GPU)."""
    if importlib.util.find_spec("cudf") is None or importlib.util.find_spec("dask_cudf") is None:
        return False
    try:
        import cudf  # noqa: F401
        import dask_cudf  # noqa: F401
    except Exception:  # a RAPIDS install that cannot start here (no GPU, another CUDA) fails in many ways
        return False
    return True


def merlin_cpu() -> bool:
    """The `cpu=` of Merlin's and NVTabular's datasets: True unless this process runs on a GPU and cudf imports.

    It selects TensorFlow's device (`select_tensorflow_device`), which decides the first part: the training and
    NVTabular steps call it where they make their first dataset, so that is where RECSYS_DEVICE takes effect there
    (gpu without a GPU fails there, before any training)."""
    return select_tensorflow_device() == "cpu" or not rapids_importable()


def driver_gpu_count() -> int:
    """GPUs the CUDA driver offers this process (CUDA_VISIBLE_DEVICES applies), asked through libcuda; 0 without a
    driver, or with one older than CUDA 11. Asked before Faiss, whose get_num_gpus() aborts the process when the CUDA
    runtime finds no usable driver."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    version, count = ctypes.c_int(0), ctypes.c_int(0)
    if cuda.cuInit(0) != CUDA_SUCCESS or cuda.cuDriverGetVersion(ctypes.byref(version)) != CUDA_SUCCESS:
        return 0
    if version.value < MINIMUM_DRIVER_VERSION or cuda.cuDeviceGetCount(ctypes.byref(count)) != CUDA_SUCCESS:
        return 0
    return count.value


def faiss_gpu_count() -> int:
    """The GPUs Faiss builds and searches on under RECSYS_DEVICE: none for cpu, Faiss's own count otherwise (0 with
    faiss-cpu); DeviceError for gpu when there is none."""
    requested = requested_device()
    if requested == "cpu":
        return 0
    count = 0
    if driver_gpu_count() > 0:
        import faiss

        count = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    choose_device(requested, [f"GPU {number}" for number in range(count)], seen_by="Faiss")
    return count


def index_to_gpus(index: Any) -> Any:
    """`index` copied onto every GPU Faiss has (`faiss.index_cpu_to_all_gpus`), or `index` itself when it has none."""
    count = faiss_gpu_count()
    if not count:
        return index
    import faiss

    log.info("Faiss index on %d GPU(s)", count)
    return faiss.index_cpu_to_all_gpus(index)


def index_to_cpu(index: Any) -> Any:
    """A CPU copy of an index `index_to_gpus` returned (`faiss.index_gpu_to_cpu`), or `index` when Faiss has no GPU."""
    if not faiss_gpu_count():
        return index
    import faiss

    return faiss.index_gpu_to_cpu(index)


def export_device(environ: Mapping[str, str] = os.environ) -> DeviceChoice:
    """The device the Triton export writes instance kinds for. It runs in the platform environment, which has no
    TensorFlow: auto is the GPU when the CUDA driver offers one (`driver_gpu_count`)."""
    requested = requested_device(environ)
    gpus = [f"GPU {number}" for number in range(driver_gpu_count())] if requested != "cpu" else []
    return choose_device(requested, gpus, seen_by="the CUDA driver")


def triton_instance_kind(device: str) -> str:
    """The `instance_group` kind of a model that runs TensorFlow, for a device "cpu" or "gpu"."""
    return "KIND_GPU" if device == "gpu" else "KIND_CPU"

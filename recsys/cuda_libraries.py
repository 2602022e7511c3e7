"""The CUDA libraries of the GPU lock (`requirements/trainer-gpu.txt`, pip's `nvidia-*-cu11` wheels) in the
environment of every trainer process: the trainer steps (`recsys/trainer_env.py`) and Triton's Python-backend stubs
(`serving/triton_server.py`), one place for both.

TensorFlow 2.12 loads libcudart, libcublas, libcudnn and the rest by name and does not look in site-packages (pip's
`tensorflow[and-cuda]` came with 2.14), and the dynamic loader reads LD_LIBRARY_PATH once, when a process starts:
so the wheels' `site-packages/nvidia/*/lib` folders go on LD_LIBRARY_PATH of the processes we start. Keras 2.12's
optimizers compile their update step with XLA on a GPU, which needs ptxas and libdevice: XLA_FLAGS names the
`nvidia-cuda-nvcc-cu11` wheel's folder, which holds both. In an environment without these wheels (the CPU lock)
nothing changes.

Standard library only: it runs in the platform environment and reads the trainer environment's folders.

A trainer command started by hand gets them from a shell:

    eval "$(.venv/bin/python -m recsys.cuda_libraries .venv-trainer/bin/python)"   # `export` lines (none: CPU lock)
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path

XLA_DATA_DIR_FLAG = "--xla_gpu_cuda_data_dir"
# TensorFlow 2.12's wheel has GPU kernels up to sm_80 and PTX for compute_80: on newer GPUs (H100, H200) the driver
# compiles that PTX when a kernel is first used. Loading modules lazily compiles only the kernels a process uses,
# and a cache larger than the driver's default keeps them for the next process. Set only where the wheels are.
CUDA_DEFAULTS = {"CUDA_MODULE_LOADING": "LAZY", "CUDA_CACHE_MAXSIZE": str(4 * 1024**3)}


def site_packages_of(python: Path) -> list[Path]:
    """The site-packages folders of the venv whose interpreter is `python` (a venv's `bin/python`: a link, not
    followed, since it points at the base interpreter)."""
    venv = Path(python).absolute().parent.parent
    return sorted(path for path in venv.glob("lib/python3*/site-packages") if path.is_dir())


def nvidia_library_dirs(site_packages: Path) -> list[Path]:
    """The `nvidia/<wheel>/lib` folders under `site_packages` that hold a shared library; none without the wheels."""
    folders = sorted(Path(site_packages).glob("nvidia/*/lib"))
    return [folder for folder in folders if folder.is_dir() and any(folder.glob("*.so*"))]


def cuda_data_dir(site_packages: Path) -> Path | None:
    """The folder XLA takes as its CUDA directory (`bin/ptxas`, `nvvm/libdevice`), if the nvcc wheel is there."""
    folder = Path(site_packages) / "nvidia" / "cuda_nvcc"
    return folder if (folder / "nvvm" / "libdevice").is_dir() else None


def with_cuda_libraries(environ: Mapping[str, str], python: Path) -> dict[str, str]:
    """`environ` for a process of interpreter `python`'s venv: its CUDA wheels' lib folders first on LD_LIBRARY_PATH,
    XLA_FLAGS naming their CUDA directory, and `CUDA_DEFAULTS` where not set; `environ` as it is without the wheels."""
    env = dict(environ)
    site_packages = site_packages_of(python)
    folders = [str(folder) for path in site_packages for folder in nvidia_library_dirs(path)]
    if not folders:
        return env
    current = [part for part in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if part and part not in folders]
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*folders, *current])
    data_dirs = [folder for folder in map(cuda_data_dir, site_packages) if folder is not None]
    flags = env.get("XLA_FLAGS", "")
    if data_dirs and XLA_DATA_DIR_FLAG not in flags:
        env["XLA_FLAGS"] = f"{flags} {XLA_DATA_DIR_FLAG}={data_dirs[0]}".strip()
    for name, value in CUDA_DEFAULTS.items():
        env.setdefault(name, value)
    return env


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m recsys.cuda_libraries <a venv's bin/python>   (prints shell `export` lines)")
    changed = with_cuda_libraries(os.environ, Path(sys.argv[1]))
    for name, value in changed.items():
        if os.environ.get(name) != value:
            print(f"export {name}={shlex.quote(value)}")

#!/usr/bin/env bash
# The GPU path on a machine with an NVIDIA GPU (issue 22), in a few minutes: the trainer environment from the GPU
# lock, the GPUs TensorFlow and Faiss see, then small generated data through the project's own steps with
# RECSYS_DEVICE=gpu and again with RECSYS_DEVICE=cpu (scripts/gpu_check.py: the data stage once, NVTabular, one
# epoch of the two-tower and of the DLRM, the Faiss index, batch scoring, and a Faiss index of random items), and
# the seconds side by side.
#
#   scripts/gpu_check.sh          # ROWS=50000 FAISS_ITEMS=500000 DEVICES="gpu cpu" WORK=<a new folder in /tmp>
#
# Needs Python 3.11, PyPI (about 2.5 GB of wheels, unless uv's cache has them), an NVIDIA driver for CUDA 11.8+.
# TRAINER_VENV (default .venv-trainer) is synced from requirements/trainer-gpu.txt with the commands `make setup
# GPU=1` uses (plain `make setup` puts the CPU lock back); the platform environment .venv is made if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
ROWS="${ROWS:-50000}"
FAISS_ITEMS="${FAISS_ITEMS:-500000}"
DEVICES="${DEVICES:-gpu cpu}"
TRAINER_VENV="${TRAINER_VENV:-.venv-trainer}"
WORK="${WORK:-$(mktemp -d /tmp/recsys-gpu-check.XXXXXX)}"
UV_VERSION="0.9.30"

say() { printf '\n==> %s\n' "$*"; }
install_env() {  # venv, lock file: as scripts/setup.sh does
  say "environment $1 from $2"
  [ -x "$1/bin/python" ] || "${UV[@]}" venv --quiet --python "$PYTHON" "$1"
  "${UV[@]}" pip sync --quiet --compile-bytecode --python "$1/bin/python" "$2"
  "${UV[@]}" pip install --quiet --python "$1/bin/python" --no-deps -e .
}

say "the machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi: no NVIDIA driver here"
nproc

if ! .venv-tools/bin/uv --version 2>/dev/null | grep -q "$UV_VERSION"; then
  "$PYTHON" -m venv .venv-tools
  .venv-tools/bin/pip install --quiet "uv==$UV_VERSION"
fi
UV=(.venv-tools/bin/uv)
[ -x .venv/bin/recsys ] || install_env .venv requirements.txt
started=$SECONDS
install_env "$TRAINER_VENV" requirements/trainer-gpu.txt
echo "installed in $((SECONDS - started)) s"

say "what the trainer environment sees (with the CUDA wheels on LD_LIBRARY_PATH, as trainer steps get them)"
(
  eval "$(.venv/bin/python -m recsys.cuda_libraries "$TRAINER_VENV/bin/python")"
  RECSYS_DEVICE=auto TF_CPP_MIN_LOG_LEVEL=2 "$TRAINER_VENV/bin/python" -c '
import tensorflow as tf
from recsys.device import faiss_gpu_count
print("TensorFlow", tf.__version__, "built with CUDA:", tf.test.is_built_with_cuda(),
      "GPUs:", [gpu.name for gpu in tf.config.list_physical_devices("GPU")], "| Faiss GPUs:", faiss_gpu_count())'
)

say "$ROWS generated rows in $WORK/landing"
.venv/bin/recsys generate-data --rows "$ROWS" --out "$WORK/landing" >/dev/null

say "the pipeline's steps with RECSYS_DEVICE in: $DEVICES (log: $WORK/runs/gpu_check.log)"
# shellcheck disable=SC2086  # DEVICES is a list
RECSYS_TRAINER_PYTHON="$TRAINER_VENV/bin/python" .venv/bin/python scripts/gpu_check.py \
  --landing "$WORK/landing" --work "$WORK/runs" --faiss-items "$FAISS_ITEMS" --devices $DEVICES

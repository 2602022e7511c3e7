#!/usr/bin/env bash
# One-command setup on a fresh Debian/Ubuntu machine with Python 3.11 (`make setup` runs this):
# both locked Python environments, Redis, PostgreSQL and Chromium if missing, Airflow's secrets, airflow.cfg and its metadata database.
# GPU=1 (`make setup GPU=1`): the trainer environment from the GPU lock, requirements/trainer-gpu.txt (TensorFlow and
# Faiss for CUDA 11.8 on an NVIDIA GPU; docs/environments.md, "The GPU path"); rerun without it to go back.
# Safe to rerun: every step checks what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PYTHON="${PYTHON:-python3}"
UV_VERSION="0.9.30"
case "${GPU:-}" in
  ""|0) TRAINER_LOCK=requirements/trainer.txt ;;
  1) TRAINER_LOCK=requirements/trainer-gpu.txt ;;
  *) echo "GPU=$GPU: use GPU=1 for the GPU lock, or leave it unset" >&2; exit 2 ;;
esac

say() { printf '\n==> %s\n' "$*"; }

"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' 2>/dev/null || {
  echo "Python 3.11 is required (set PYTHON=/path/to/python3.11); found: $("$PYTHON" --version 2>&1)" >&2
  exit 1
}

say "uv $UV_VERSION (installs the locked environments; pip 24+ refuses merlin-models 23.8.0's metadata)"
# In a small venv of its own: Debian's system Python refuses `pip install --user` (PEP 668).
if ! .venv-tools/bin/uv --version 2>/dev/null | grep -q "$UV_VERSION"; then
  "$PYTHON" -m venv .venv-tools
  .venv-tools/bin/pip install --quiet "uv==$UV_VERSION"
fi
UV=(.venv-tools/bin/uv)

install_env() {  # venv, lock file
  say "environment $1 from $2"
  [ -x "$1/bin/python" ] || "${UV[@]}" venv --quiet --python "$PYTHON" "$1"
  # Byte-compiled at install, so the first import of pandas or TensorFlow in a task does not pay for it.
  "${UV[@]}" pip sync --quiet --compile-bytecode --python "$1/bin/python" "$2"
  # The project itself, so Airflow tasks and the trainer CLI import the same `recsys` and `tasks`.
  "${UV[@]}" pip install --quiet --python "$1/bin/python" --no-deps -e .
}
install_env .venv requirements.txt
install_env .venv-trainer "$TRAINER_LOCK"

say "Triton Inference Server (the tritonserver binary inside PyTriton's wheel) in .venv-triton"
# Its own venv, without dependencies: only the binary and its Python backend are used, and the stub that
# runs Python-backend models executes in the trainer environment (serving/triton_server.py sets that up).
[ -x .venv-triton/bin/python ] || "${UV[@]}" venv --quiet --python "$PYTHON" .venv-triton
"${UV[@]}" pip sync --quiet --require-hashes --python .venv-triton/bin/python requirements/triton.txt
# Located without importing pytriton, whose dependencies are deliberately not installed.
TRITON=$(.venv-triton/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib") + "/pytriton/tritonserver")')
# The Python backend runs models in `backends/python/triton_python_backend_stub`, which the wheel ships
# per Python version elsewhere: copy the one built for the trainer's Python (its RPATH to the wheel's
# bundled libraries is relative, so it must sit at this depth in the wheel).
TRAINER_PY_VERSION=$(.venv-trainer/bin/python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
STUB_SOURCE="$TRITON/python_backend_stubs/$TRAINER_PY_VERSION/triton_python_backend_stub"
cmp -s "$STUB_SOURCE" "$TRITON/backends/python/triton_python_backend_stub" \
  || install -m 755 "$STUB_SOURCE" "$TRITON/backends/python/triton_python_backend_stub"
# The stub links libpython dynamically: the trainer's Python must be a shared build (Debian's python3.11
# with libpython3.11, or pyenv with PYTHON_CONFIGURE_OPTS=--enable-shared).
LIBPYTHON_DIR=$(.venv-trainer/bin/python -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')
if LD_LIBRARY_PATH="$LIBPYTHON_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    ldd "$TRITON/bin/tritonserver" "$TRITON/backends/python/triton_python_backend_stub" | grep 'not found'; then
  echo "tritonserver or its Python stub is missing the shared libraries above (is $PYTHON built with --enable-shared?)" >&2
  exit 1
fi

say "Redis"
if ! command -v redis-server >/dev/null; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server
fi
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  mkdir -p var/redis
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --dir "$ROOT/var/redis" --logfile "$ROOT/var/redis/redis.log"
fi
redis-cli -h 127.0.0.1 -p 6379 ping

say "PostgreSQL (the gateway's tests run every database test on it too; scripts/postgres.sh)"
bash scripts/postgres.sh

say "Chromium and chromedriver (Debian's; the demo page's browser test drives them headless with Selenium)"
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver
fi

say "wrk (Debian's; benchmarks/serving.py's load generator for the gateway's cheap routes)"
if ! command -v wrk >/dev/null; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq wrk
fi

say "Airflow secrets in var/secrets/ (random per installation, owner-only, never committed)"
# Kept when present: a new Fernet key would leave stored connections unreadable. airflow.cfg reads each
# file with a `_cmd` option, so every Airflow process signs and checks with the same value.
new_secret() {  # file name, Python code that prints the secret
  local file="var/secrets/$1"
  if [ ! -s "$file" ]; then
    (umask 077 && .venv/bin/python -c "$2" >"$file.new" && mv "$file.new" "$file")
  fi
  chmod 600 "$file"
}
mkdir -p var/secrets && chmod 700 var/secrets
TOKEN='import secrets, sys; sys.stdout.write(secrets.token_urlsafe(48))'
new_secret airflow_jwt_secret "$TOKEN"
new_secret airflow_api_secret_key "$TOKEN"
new_secret airflow_fernet_key 'import sys; from cryptography.fernet import Fernet; sys.stdout.write(Fernet.generate_key().decode())'
# The UI's admin password, in the simple auth manager's own format.
new_secret airflow_passwords.json 'import json, secrets; print(json.dumps({"admin": secrets.token_urlsafe(16)}))'

say "Airflow: airflow.cfg and the metadata database"
mkdir -p var/airflow var/data/landing
sed "s|@PROJECT_ROOT@|$ROOT|g" airflow.cfg.template > airflow.cfg.new && mv airflow.cfg.new airflow.cfg
AIRFLOW_HOME="$ROOT/var/airflow" AIRFLOW_CONFIG="$ROOT/airflow.cfg" .venv/bin/airflow db migrate >var/airflow/db-migrate.log 2>&1 \
  || { tail -n 30 var/airflow/db-migrate.log; exit 1; }

say "setup done: run 'make test'; 'make airflow' starts the UI on http://127.0.0.1:8080 (user admin, password in var/secrets/airflow_passwords.json)"

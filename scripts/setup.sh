#!/usr/bin/env bash
# One-command setup on a fresh Debian/Ubuntu machine with Python 3.11 (`make setup` runs this):
# both locked Python environments, Redis if missing, airflow.cfg and the Airflow metadata database.
# Safe to rerun: every step checks what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PYTHON="${PYTHON:-python3}"
UV_VERSION="0.9.30"

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
install_env .venv-trainer requirements/trainer.txt

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

say "Airflow: airflow.cfg and the metadata database"
mkdir -p var/airflow var/data/landing
sed "s|@PROJECT_ROOT@|$ROOT|g" airflow.cfg.template > airflow.cfg.new && mv airflow.cfg.new airflow.cfg
AIRFLOW_HOME="$ROOT/var/airflow" AIRFLOW_CONFIG="$ROOT/airflow.cfg" .venv/bin/airflow db migrate >var/airflow/db-migrate.log 2>&1 \
  || { tail -n 30 var/airflow/db-migrate.log; exit 1; }

say "setup done: run 'make test'"

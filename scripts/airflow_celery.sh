#!/usr/bin/env bash
# `make airflow-celery`: Airflow on the CeleryExecutor, each component a process of its own: the scheduler, the DAG
# processor, the triggerer, the API server (UI on http://127.0.0.1:8080) and one Celery worker taking the queues
# `default` and `trainer` (WORKER_QUEUES). Tasks travel through Redis (airflow.cfg's [celery] broker_url, DB 2);
# the metadata database and Celery's result backend are PostgreSQL's database `airflow` (AIRFLOW_POSTGRES names
# the server; `make setup` starts one), created and migrated here when missing. More workers, on this machine or
# others, join with `airflow celery worker` and the same configuration. Ctrl-C (or SIGTERM) stops every process
# this started. AIRFLOW_HOME, AIRFLOW_CONFIG and AIRFLOW__* variables override as for `make airflow`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
export PATH="$ROOT/.venv/bin:$PATH"  # the components start subprocesses named `airflow`
export AIRFLOW_CONFIG="${AIRFLOW_CONFIG:-$ROOT/airflow.cfg}"
export AIRFLOW_HOME="${AIRFLOW_HOME:-$ROOT/var/airflow}"
POSTGRES="${AIRFLOW_POSTGRES:-postgresql+psycopg://postgres@127.0.0.1:5432}"
DATABASE="${AIRFLOW_POSTGRES_DATABASE:-airflow}"
export AIRFLOW__CORE__EXECUTOR=CeleryExecutor
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN="${AIRFLOW__DATABASE__SQL_ALCHEMY_CONN:-$POSTGRES/$DATABASE}"
# Airflow's async engine would take asyncpg for postgresql (not installed): psycopg 3 drives both.
export AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC="${AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC:-${AIRFLOW__DATABASE__SQL_ALCHEMY_CONN/+psycopg:/+psycopg_async:}}"
export AIRFLOW__CELERY__RESULT_BACKEND="${AIRFLOW__CELERY__RESULT_BACKEND:-db+$POSTGRES/$DATABASE}"

[ -f "$AIRFLOW_CONFIG" ] || { echo "$AIRFLOW_CONFIG is missing: run 'make setup' first" >&2; exit 2; }
python - "$POSTGRES" "$DATABASE" <<'PYTHON'
import sys

import sqlalchemy

server, name = sys.argv[1], sys.argv[2]
engine = sqlalchemy.create_engine(f"{server}/postgres", isolation_level="AUTOCOMMIT")
with engine.connect() as connection:
    if connection.scalar(sqlalchemy.text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name}) is None:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
        print(f"created the PostgreSQL database {name}")
PYTHON
mkdir -p "$AIRFLOW_HOME"
airflow db migrate >"$AIRFLOW_HOME/db-migrate.log" 2>&1 || { tail -n 30 "$AIRFLOW_HOME/db-migrate.log"; exit 1; }

pids=()
stop() {
  trap - INT TERM EXIT
  kill -TERM "${pids[@]}" 2>/dev/null || true
  wait || true
}
trap stop INT TERM EXIT
for component in scheduler dag-processor triggerer api-server; do
  airflow "$component" &
  pids+=($!)
done
airflow celery worker --queues "${WORKER_QUEUES:-default,trainer}" &
pids+=($!)
echo "Airflow on Celery: UI on http://127.0.0.1:${AIRFLOW__API__PORT:-8080} (user admin), worker queues ${WORKER_QUEUES:-default,trainer}"
wait  # until Ctrl-C; a component that ends leaves the others running (a lost worker is one of several)

# Run `make` to list the commands.
SHELL := /bin/bash
ROOT := $(CURDIR)
export AIRFLOW_HOME := $(ROOT)/var/airflow
export AIRFLOW_CONFIG := $(ROOT)/airflow.cfg
VENV := $(ROOT)/.venv/bin
ROWS ?= 50000
# Processes `make test` runs the suite on (pytest-xdist): 2 fit this 2-core machine (docs/testing.md).
TEST_WORKERS ?= 2
API_PORT ?= 8100
MLFLOW_PORT ?= 5000
# `make demo ROWS=...` sets the demo's size; generate-data keeps its own default.
DEMO_ROWS := $(if $(filter command line,$(origin ROWS)),$(ROWS),50000)

.DEFAULT_GOAL := help
.PHONY: help setup test test-fast lint unit generate-data airflow airflow-celery benchmark-data benchmark-scale benchmark-model benchmark-quality benchmark-movielens benchmark-ranker-ceiling benchmark-ranker-stacking benchmark-final-order benchmark-off-policy benchmark-serving benchmark-recommender-reads benchmark-call-deadline expectations migrate api api-key forget-customer serve demo mlflow

help:  ## list the commands
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

setup:  ## install both environments, Redis and PostgreSQL if missing, airflow.cfg, Airflow's secrets and database (GPU=1: the GPU trainer lock)
	GPU="$(GPU)" ./scripts/setup.sh

test: lint unit  ## the whole test suite: lint, types, unit, DAG and end-to-end tests

lint:  ## ruff (with Airflow's AIR rules) and mypy
	$(VENV)/ruff check .
	$(VENV)/mypy

unit:  ## pytest only, every tier, on TEST_WORKERS processes (pytest-xdist; a module's tests on one)
	$(VENV)/pytest -n $(TEST_WORKERS) --dist loadscope

test-fast:  ## the unit tier only (no trained model, no DAG run, no Triton): under 3 minutes on 2 cores
	$(VENV)/pytest -m unit

generate-data:  ## generate ROWS rows of AliCCP-format CSV into the landing zone
	$(VENV)/recsys generate-data --rows $(ROWS) --out var/data/landing

airflow:  ## start Airflow (api server, scheduler, dag processor, triggerer) on http://127.0.0.1:8080
	@test -f $(AIRFLOW_CONFIG) || { echo "$(AIRFLOW_CONFIG) is missing: run 'make setup' first"; exit 2; }
	@# standalone starts each component as a subprocess named `airflow`, found on PATH: the platform venv's.
	PATH="$(VENV):$$PATH" $(VENV)/airflow standalone

airflow-celery:  ## Airflow on the CeleryExecutor: scheduler, API server, DAG processor, triggerer and a Celery worker (PostgreSQL, Redis)
	bash scripts/airflow_celery.sh

migrate:  ## create or upgrade the gateway's database (RECSYS_DATABASE_URL, default SQLite in var/serving/)
	$(VENV)/python -m serving.api.migrate upgrade

api: migrate  ## the REST gateway alone (starts neither Redis nor Triton) on http://127.0.0.1:8100 (API_PORT=...), OpenAPI docs at /docs
	$(VENV)/uvicorn serving.api.main:create_app --factory --host 127.0.0.1 --port $(API_PORT)

api-key: migrate  ## create an API key and print it once: make api-key NAME=web-tier SCOPES="read" (read, ingest, admin)
	$(VENV)/python -m serving.api.keys create $(NAME) --scopes $(SCOPES)

forget-customer: migrate  ## erase customers from every store, with a tombstone: make forget-customer ID="42 43" (serving/forget.py)
	$(VENV)/python -m serving.forget $(ID)

demo:  ## the main job in one command: data, the nightly DAG, the serving stack, a read key; Ctrl-C stops it (ROWS=50000)
	$(VENV)/python scripts/demo.py --rows $(DEMO_ROWS) --port $(API_PORT)

mlflow:  ## the MLflow UI on http://127.0.0.1:5000 (MLFLOW_PORT=...): runs, registered models, aliases
	$(VENV)/mlflow ui --host 127.0.0.1 --port $(MLFLOW_PORT) \
	  --backend-store-uri "$$($(VENV)/python -c 'from recsys.settings import get_settings; print(get_settings().mlflow_tracking_uri)')"

serve:  ## serve recommendations: Redis if not running, Triton on the latest published run, migrate, gateway on API_PORT
	$(VENV)/python -m serving.run --port $(API_PORT) $(SERVE_ARGS)

expectations:  ## rewrite the committed expectation suite of the default spec
	$(VENV)/recsys write-expectations --out great_expectations/expectations

benchmark-data:  ## data-stage throughput against pyarrow and pandas references (1M and 4M rows)
	$(VENV)/python benchmarks/data_stage.py

benchmark-scale:  ## data stage and NVTabular at 1M, 4M, 16M rows; batch scoring of 615,599 users (about 2 hours)
	$(VENV)/python benchmarks/scale.py

benchmark-model:  ## training, batch scoring and publish speed against bare Keras, the raw ranker and redis-py
	$(VENV)/python benchmarks/model_stage.py

benchmark-quality:  ## the whole pipeline against baselines on 1M generated rows (NDCG@10, AUC vs the oracle)
	$(VENV)/python benchmarks/quality.py

benchmark-movielens:  ## the pipeline's served lists against popularity, item-kNN and EASE on MovieLens-1M (14 min)
	$(VENV)/python benchmarks/movielens.py

benchmark-ranker-ceiling:  ## how far towards the oracle AUC estimators given more than a ranker get (30 s, no training)
	$(VENV)/python benchmarks/ranker_ceiling.py

benchmark-ranker-stacking:  ## ranker + two-tower score combined, on a quality run: WORK=<benchmarks/quality.py --work DIR>
	@test -n "$(WORK)" || { echo "usage: make benchmark-ranker-stacking WORK=DIR (the --work folder of benchmarks/quality.py)"; exit 2; }
	$(VENV)/python benchmarks/ranker_stacking.py --work $(WORK)

benchmark-final-order:  ## grid blend vs learned orders of the retrieved candidates (DLRM on them too): RUN=<run folder> [SPEC=<its spec>]
	@test -n "$(RUN)" || { echo "usage: make benchmark-final-order RUN=DIR [SPEC=FILE] (e.g. the run of benchmarks/movielens.py --work)"; exit 2; }
	$(VENV)/python benchmarks/final_order.py --run $(RUN) $(if $(SPEC),--spec $(SPEC))

benchmark-off-policy:  ## IPS and SNIPS against known truths: simulated logs, the Open Bandit Dataset sample (fetched)
	$(VENV)/python benchmarks/off_policy.py

benchmark-call-deadline:  ## the database call deadline's cost against a plain pre-ping engine, pooled and new connections
	$(VENV)/python benchmarks/call_deadline.py

benchmark-recommender-reads:  ## the recommender's Redis read per route, in process, against one redis-py GET
	$(VENV)/python benchmarks/recommender_reads.py

benchmark-serving:  ## gateway routes' requests/s and p50/p99 against a bare FastAPI app, redis-py and Triton
	$(VENV)/python benchmarks/serving.py

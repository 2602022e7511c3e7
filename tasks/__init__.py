"""Pipeline steps: plain functions taking input paths, a spec and a config; returning metrics.

The Airflow DAGs in `dags/` only wire these together; `recsys <step>` runs each one by hand.
"""

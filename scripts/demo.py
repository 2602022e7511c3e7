"""`make demo`: the main job on the embedded defaults, in one command after `make setup`.

    python scripts/demo.py [--rows 50000] [--port 8100] [--conf '{"ranker_epochs": 2}']

1. Redis at `RECSYS_REDIS_URL`: started (loopback, files in `var/redis/`) if nothing answers there.
2. Data: `--rows` rows of AliCCP-format CSV generated into the landing zone (`RECSYS_LANDING_DIR`) when it
   holds no CSV file yet; otherwise the files there are used as they are. About 24% clicks (the end-to-end
   tests' size and rate): at the generator's default 9%, 50k rows leave too few positives for the two-tower to
   beat popularity, and the quality gate then rightly publishes nothing.
3. The nightly DAG, `recsys_nightly`, end to end with `airflow dags test` (its log in `var/demo/`), on the
   landing zone with the DAG's default Params (`--conf` adds or overrides some).
4. The serving stack, `python -m serving.run` (`make serve`): Triton on the published run, the gateway.
5. An API key with the read scope, then one request through the gateway, and what to open next.

Ctrl-C stops the gateway and Triton, revokes the demo's key and stops Redis if step 1 started it (its data
saved to `var/redis/`). A rerun reuses the data and runs the DAG again: a new run, a new published version
when the quality gate accepts it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import httpx
import redis

from recsys.datagen import SMALL_DATA_BASE_LOGIT
from recsys.demo_format import read_demo_data
from recsys.recommendation_store import RecommendationKeys, as_text
from recsys.run_layout import RunLayout
from recsys.settings import PROJECT_ROOT, Settings, get_settings
from serving.run import ServeError, ensure_redis

BIN = Path(sys.executable).parent  # the platform environment's commands (recsys, airflow)
LOG_DIR = PROJECT_ROOT / "var" / "demo"  # the default of --log-dir
DAG_TIMEOUT_S = 3600
SERVE_TIMEOUT_S = 600  # Triton loads nine models on 2 cores in about a minute; the first start imports more


class DemoError(Exception):
    pass


def say(message: str) -> None:
    print(f"==> {message}", flush=True)


def airflow_environment() -> dict[str, str]:
    """The Makefile's Airflow home and config unless the caller set their own."""
    env = dict(os.environ)
    env.setdefault("AIRFLOW_HOME", str(PROJECT_ROOT / "var" / "airflow"))
    env.setdefault("AIRFLOW_CONFIG", str(PROJECT_ROOT / "airflow.cfg"))
    if not Path(env["AIRFLOW_CONFIG"]).exists():
        raise DemoError(f"{env['AIRFLOW_CONFIG']} is missing: run `make setup` first")
    return env


def landing_data(settings: Settings, rows: int) -> None:
    if settings.landing_location.startswith("s3://"):
        say(f"landing zone {settings.landing_location}: used as it is")
        return
    landing = settings.default_landing_dir
    existing = sorted(landing.glob("*.csv")) if landing.exists() else []
    if existing:
        say(f"landing zone {landing}: {len(existing)} CSV file(s) already there, used as they are")
        return
    say(f"generating {rows:,} rows of AliCCP-format data into {landing}")
    subprocess.run([str(BIN / "recsys"), "generate-data", "--rows", str(rows),
                    "--base-logit", str(SMALL_DATA_BASE_LOGIT), "--out", str(landing), "--quiet"],
                   check=True)  # fmt: skip


def run_nightly(env: dict[str, str], conf: dict, log_dir: Path) -> Path:
    """`airflow dags test recsys_nightly`; returns its log. A failed task fails the demo with the log's end."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"nightly-{datetime.now(UTC):%Y%m%dT%H%M%S}.log"
    say(f"running the nightly DAG recsys_nightly end to end (a few minutes; log: {log})")
    started = time.monotonic()
    with log.open("w") as output:
        finished = subprocess.run([str(BIN / "airflow"), "dags", "test", "recsys_nightly", "-c", json.dumps(conf)],
                                  env=env, stdout=output, stderr=subprocess.STDOUT, timeout=DAG_TIMEOUT_S)  # fmt: skip
    text = log.read_text(errors="replace")
    failed = [line for line in text.splitlines() if "new_state=failed" in line or "Task failed" in line]
    if finished.returncode != 0 or failed:
        tail = "\n".join(text.splitlines()[-40:])
        raise DemoError(f"the nightly run failed (exit {finished.returncode}); the end of {log}:\n{tail}")
    say(f"nightly run done in {time.monotonic() - started:.0f} s")
    return log


def published_run(settings: Settings, client: redis.Redis) -> tuple[str, Path]:
    version = client.get(RecommendationKeys(settings.redis_key_prefix).current)
    if version is None:
        raise DemoError("the nightly run published nothing to Redis (see its log: the quality gate's line)")
    return as_text(version), RunLayout.of_version(settings.data_root, as_text(version)).root


def start_gateway(port: int, env: dict[str, str], log_dir: Path) -> tuple[subprocess.Popen, Path]:
    log = log_dir / "serve.log"
    say(f"starting the serving stack (Triton and the gateway, `make serve`; log: {log})")
    with log.open("w") as output:
        process = subprocess.Popen([sys.executable, "-m", "serving.run", "--port", str(port), "--no-access-log"],
                                   env=env, stdout=output, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVE_TIMEOUT_S
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, log
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            stop(process)
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            raise DemoError(f"the serving stack did not start; the end of {log}:\n{tail}")
        time.sleep(0.5)


def keys_command(*arguments: str, env: dict[str, str]) -> str:
    finished = subprocess.run([sys.executable, "-m", "serving.api.keys", *arguments], env=env, capture_output=True,
                              text=True, timeout=120)  # fmt: skip
    if finished.returncode != 0:
        raise DemoError(f"python -m serving.api.keys {' '.join(arguments)} failed: {finished.stderr.strip()}")
    return finished.stdout.strip()


def stop(process: subprocess.Popen) -> None:
    """SIGTERM, as Ctrl-C reaches serving.run: it stops the gateway, then Triton."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def demo(args: argparse.Namespace) -> None:
    settings = get_settings()
    env = airflow_environment()
    redis_started = ensure_redis(settings.redis_url)
    client = redis.Redis.from_url(settings.redis_url)
    gateway: subprocess.Popen | None = None
    key_name = f"demo-{datetime.now(UTC):%Y%m%dT%H%M%S}"
    key = None
    try:
        landing_data(settings, args.rows)
        run_nightly(env, json.loads(args.conf), args.log_dir)
        version, run = published_run(settings, client)
        gateway, serve_log = start_gateway(args.port, env, args.log_dir)
        key = keys_command("create", key_name, "--scopes", "read", env=env)
        url = f"http://127.0.0.1:{args.port}"
        customer = next(iter(read_demo_data(RunLayout(run).demo).users))
        answer = httpx.get(f"{url}/recommendations/{customer}", params={"count": 5}, headers={"X-API-Key": key},
                           timeout=30)  # fmt: skip
        answer.raise_for_status()
        body = answer.json()
        products = [item["product_id"] for item in body["items"]]
        print(f"""
==> ready: version {version} is served (run folder {run})

customer {customer}'s top 5 ({body["route"]}): {products}

  demo page   {url}/demo   (sign in with the key below)
  API key     {key}   (read scope, name {key_name}; revoked when the demo stops)
  curl        curl -H 'X-API-Key: {key}' {url}/recommendations/{customer}
  API docs    {url}/docs
  MLflow UI   make mlflow     then http://127.0.0.1:5000 (runs, registered models, the champion alias)
  Airflow UI  make airflow    then http://127.0.0.1:8080 (user admin, password in var/secrets/airflow_passwords.json)
  logs        {serve_log}, {args.log_dir}

Ctrl-C stops the gateway and Triton.""", flush=True)
        while gateway.poll() is None:
            time.sleep(1)
        raise DemoError(f"the serving stack stopped (exit {gateway.returncode}); see {serve_log}")
    finally:
        if gateway is not None:
            say("stopping the gateway and Triton")
            stop(gateway)
        if key is not None:
            keys_command("revoke", key_name, env=env)
            say(f"revoked the demo's key {key_name}")
        if redis_started:
            say("stopping the Redis server the demo started (its data saved in var/redis/)")
            client.shutdown(save=True)
        client.close()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--rows", type=int, default=50_000, help="rows generated into an empty landing zone")
    parser.add_argument("--port", type=int, default=8100, help="the gateway's port (default: %(default)s)")
    parser.add_argument("--log-dir", type=Path, default=LOG_DIR, help="the DAG's and the stack's logs "
                        "(default: var/demo)")
    parser.add_argument("--conf", default="{}", help="JSON of DAG Params to set, e.g. '{\"ranker_epochs\": 2}'")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # a SIGTERM cleans up like Ctrl-C
    # Python leaves SIGINT ignored when it starts so (a shell's background job, or a parent's choice): Ctrl-C
    # must still stop what the demo starts.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        demo(args)
    except KeyboardInterrupt:
        say("stopped")
        return 0
    except (DemoError, ServeError, subprocess.CalledProcessError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

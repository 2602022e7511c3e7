"""Serve recommendations locally with one command: Redis, Triton, the database, then the gateway (`make serve`).

    python -m serving.run [--host 127.0.0.1] [--port 8100] [--workers 1]
                          [--model-repository DIR | --no-triton] [--no-redis-start]

In order, before the first request:

1. **Redis** at `RECSYS_REDIS_URL` must answer PING. If nothing listens there and the URL is local
   (127.0.0.1, localhost, ::1) without a password, `redis-server --port <port> --daemonize yes` starts
   one (files in `var/redis/`); it keeps running after the gateway stops, as a system Redis would.
   Otherwise the start fails, saying what to do.
2. **Triton**, following the version current in Redis (`serving/model_versions.py`): in explicit model
   control on `RECSYS_TRITON_MODELS_DIR` (`var/triton/models`), where the current version's models
   (`<RECSYS_DATA_ROOT>/runs/<run>/triton_repository`: the nightly DAG publishes run `<run>` as version
   `<run>`) are laid out under version names and loaded; a thread loads the next version when publishing
   or a rollback moves the pointer and unloads the older ones after a grace period; the workers call the
   version-named models (`RECSYS_TRITON_VERSIONED_MODELS`, set here). At least one published run must
   have an export. `--model-repository DIR` serves that repository instead, as it is. It listens on
   `RECSYS_TRITON_URL`'s port (gRPC and metrics on the next two) and is stopped when the gateway stops.
   With several URLs (comma-separated), one server is started on each, all following the version the same
   way, and the workers share their requests among them (`serving/triton_client.py`).
   Triton servers that already answer at those URLs (`python -m serving.triton_server` in another
   terminal, or other machines) are used as they are and left running (all of them answer, or none: a mix is
   refused, since the ones started here would follow the version and the others not); `--no-triton` starts
   none (customers without a nightly list then get the generic lists, marked `triton_unavailable`).
3. **The database** at `RECSYS_DATABASE_URL` is migrated to the newest revision (the application itself
   refuses a database that is not; migrating here, once, before the workers start, cannot race).
4. **The gateway**: uvicorn on `serving.api.main:create_app` (factory), `--workers` processes; with more than
   one, Prometheus' multiprocess mode in a temporary folder, so `/metrics` counts every worker's requests.

Ctrl-C or SIGTERM stops the gateway, then Triton. A SIGKILL leaves Triton running in its own session:
stop it by its process id (the log line "Triton at <url> runs as pid <pid>" names it, and its log
`var/triton/tritonserver.log`, or `tritonserver-<port>.log` with several servers).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from recsys.redis_connection import check_redis_type, redis_client
from recsys.run_layout import RunLayout, runs_dir
from recsys.settings import PROJECT_ROOT, Settings, get_settings
from serving.api.metrics import MULTIPROCESS_DIR_ENV, MULTIPROCESS_ON_ENV
from serving.model_versions import VERSIONED_MODELS_ENV, ModelFollower
from serving.triton_server import TritonServer, TritonServerError

log = logging.getLogger("serving.run")

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
FOLLOW_INTERVAL_S = 5.0  # how often the version pointer is read
VERSION_GRACE_S = 60.0  # how long an older version's models stay loaded after the current one's load
REDIS_START_TIMEOUT_S = 10.0


class ServeError(RuntimeError):
    """Something the gateway needs is missing; the message says what to do."""


# -- Redis ----------------------------------------------------------------------------------------------


def _redacted(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _redis_answers(url: str) -> bool:
    """True if Redis at `url` answers PING; False if nothing listens; raises if it answers but refuses us."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError):
        return False
    except redis.RedisError as error:  # e.g. a password is needed or wrong: starting another would not help
        raise ServeError(f"Redis at {_redacted(url)} answers but refuses the gateway: {error}") from error
    finally:
        client.close()


def ensure_redis(url: str, *, allow_start: bool = True, cluster: bool = False) -> bool:
    """Make sure Redis at `url` answers; start a local one if none does (never for a Redis Cluster's node: a single
    server there would not be the cluster). Returns whether one was started."""
    if _redis_answers(url):
        log.info("Redis answers at %s", _redacted(url))
        return False
    parts = urllib.parse.urlsplit(url)
    where = _redacted(url)
    if cluster:
        raise ServeError(f"the Redis Cluster node at {where} (RECSYS_REDIS_URL, RECSYS_REDIS_TYPE=redis_cluster) "
                         "does not answer: start the cluster, this command starts none")  # fmt: skip
    if parts.scheme != "redis" or parts.hostname not in LOCAL_HOSTS or parts.password:
        raise ServeError(f"Redis does not answer at {where} (RECSYS_REDIS_URL), and it is not a local "
                         "password-less redis:// URL this command could start a server for: start it")  # fmt: skip
    if not allow_start:
        raise ServeError(f"Redis does not answer at {where} (RECSYS_REDIS_URL): start it, or drop --no-redis-start")
    server = shutil.which("redis-server")
    if server is None:
        raise ServeError(f"Redis does not answer at {where} and `redis-server` is not on PATH: run `make setup`")
    port = parts.port or 6379
    directory = PROJECT_ROOT / "var" / "redis"
    directory.mkdir(parents=True, exist_ok=True)
    log_file = directory / f"redis-{port}.log"
    # Loopback only; "-::1": IPv6 loopback too where the machine has it (the "-" makes it optional, Redis 6.2+).
    argv = [server, "--port", str(port), "--bind", "127.0.0.1", "-::1", "--daemonize", "yes", "--dir", str(directory),
            "--dbfilename", f"redis-{port}.rdb", "--logfile", str(log_file),
            "--pidfile", str(directory / f"redis-{port}.pid")]  # fmt: skip
    log.info("Redis does not answer at %s: starting %s", where, " ".join(argv))
    finished = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if finished.returncode != 0:
        raise ServeError(f"redis-server failed to start (exit {finished.returncode}): "
                         f"{(finished.stdout + finished.stderr).strip()}")  # fmt: skip
    deadline = time.monotonic() + REDIS_START_TIMEOUT_S
    while not _redis_answers(url):
        if time.monotonic() > deadline:
            raise ServeError(f"redis-server started but {where} did not answer within {REDIS_START_TIMEOUT_S:.0f} s; "
                             f"see {log_file}")  # fmt: skip
        time.sleep(0.1)
    log.info("Redis started on port %d (daemonized; it keeps running; log %s)", port, log_file)
    return True


# -- which model repository -------------------------------------------------------------------------------


def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def latest_published_repository(data_root: Path, redis_client: Any, key_prefix: str) -> Path:
    """The Triton repository of the run whose version is current in Redis, else the newest published one.

    A run `<data_root>/runs/<run>` is published as version `<run>` (the DAG passes the run id made safe,
    which is also the run folder's name), so a version's meta hash says whether its run published.
    """
    from recsys.recommendation_store import RecommendationKeys

    runs = runs_dir(data_root)
    # The newest export first: atomic outputs are links replaced by rename, so the link's own time is the export's.
    exported = sorted((run.triton_repository for run in RunLayout.every_run(data_root)
                       if run.triton_repository.is_dir()),
                      key=lambda path: path.lstat().st_mtime, reverse=True)  # fmt: skip
    if not exported:
        raise ServeError(f"no exported Triton repository under {runs}/*/triton_repository: run the nightly DAG "
                         "(README, 'Running the pipeline'), or pass --model-repository DIR or --no-triton")  # fmt: skip
    keys = RecommendationKeys(key_prefix)
    current = _text(redis_client.get(keys.current))
    for repository in exported:
        if repository.parent.name == current:
            log.info("model repository: %s (run %s, the version current in Redis)", repository, current)
            return repository
    for repository in exported:
        status = _text(redis_client.hget(keys.meta(repository.parent.name), "status"))
        if status == "complete":
            log.warning("model repository: %s, the newest of a published run (%s); the current version %s has "
                        "none, so online answers come from other models than the precomputed lists",
                        repository, repository.parent.name, current)  # fmt: skip
            return repository
    raise ServeError(f"{len(exported)} exported Triton repositories under {runs}, but no run of theirs is published "
                     f"in Redis under prefix {key_prefix!r} (newest: {exported[0]}): publish one "
                     "(recsys publish-recommendations), or pass --model-repository DIR or --no-triton")  # fmt: skip


# -- Triton -------------------------------------------------------------------------------------------------


def _triton_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/v2/health/ready", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@contextlib.contextmanager
def triton_for(settings: Settings, repository: Path | None, *, enabled: bool) -> Iterator[None]:
    """A Triton server at each of settings.triton_urls while the block runs: following the published version, or
    on `repository` as it is (or none, or the ones already running)."""
    if not enabled:
        log.warning("--no-triton: customers without a nightly list get the generic lists (triton_unavailable)")
        yield
        return
    urls = settings.triton_urls
    running = [url for url in urls if _triton_ready(url)]
    if running:
        if len(running) < len(urls):  # the ones started here would follow the published version, the others not
            raise ServeError(f"Triton answers at {', '.join(running)} but not at "
                             f"{', '.join(url for url in urls if url not in running)} (RECSYS_TRITON_URL): start "
                             "them all yourself, or stop those so that all are started here")  # fmt: skip
        log.warning("Triton already answers at %s: used as it is (not started nor stopped here)%s", ", ".join(urls),
                    f"; --model-repository {repository} is ignored" if repository else "")  # fmt: skip
        yield
        return
    remote = [url for url in urls if urllib.parse.urlsplit(url).hostname not in LOCAL_HOSTS]
    if remote:
        raise ServeError(f"Triton does not answer at {', '.join(remote)} (RECSYS_TRITON_URL), which is not local: "
                         "start it there, or pass --no-triton")  # fmt: skip

    def server_on(url: str, models: Path, **options: Any) -> TritonServer:
        http_port = urllib.parse.urlsplit(url).port or 8000
        log_name = "tritonserver.log" if len(urls) == 1 else f"tritonserver-{http_port}.log"
        return TritonServer(models, http_port=http_port, grpc_port=http_port + 1, metrics_port=http_port + 2,
                            startup_timeout_s=300, log_path=PROJECT_ROOT / "var" / "triton" / log_name,
                            **options)  # fmt: skip

    def started(server: TritonServer, url: str) -> None:
        assert server.process is not None
        log.info("Triton at %s runs as pid %d (its own session; log %s)", url, server.process.pid, server.log_path)

    with contextlib.ExitStack() as stack:
        if repository is not None:  # that repository, as it is, until the gateway stops
            log.info("starting %d Triton server(s) on %s (10-30 s: their model processes load TensorFlow and "
                     "Faiss)", len(urls), repository)  # fmt: skip
            for url in urls:
                # Resolved: the next nightly export replaces the link and deletes the folder the server started on.
                started(stack.enter_context(server_on(url, repository.resolve())), url)
        else:
            client = redis_client(settings.redis_url, settings.redis_type, socket_timeout=5)
            stack.callback(client.close)
            latest_published_repository(settings.data_root, client, settings.redis_key_prefix)  # something to serve
            settings.triton_models_dir.mkdir(parents=True, exist_ok=True)
            for url in urls:  # one serving repository for all: each loads the versions it is told to
                started(stack.enter_context(server_on(url, settings.triton_models_dir,
                                                      model_control_mode="explicit")), url)  # fmt: skip
            stack.enter_context(following_versions(settings, client))
            log.info("Triton follows the published version")
        try:
            yield
        finally:
            log.info("stopping Triton")


@contextlib.contextmanager
def following_versions(settings: Settings, client: Any) -> Iterator[None]:
    """Every Triton server loads the current version's models now and follows the pointer in a thread while the
    block runs; the gateway's workers call the version-named models (`serving/model_versions.py`)."""
    import threading

    followers = [ModelFollower(triton_url=url, repository=settings.triton_models_dir, data_root=settings.data_root,
                               redis_client=client, key_prefix=settings.redis_key_prefix, grace_s=VERSION_GRACE_S)
                 for url in settings.triton_urls]  # fmt: skip
    log.info("loading the current version's models into Triton (10-30 s: TensorFlow and Faiss)")
    for follower in followers:
        follower.sync()
    stop = threading.Event()

    def follow() -> None:
        while not stop.wait(FOLLOW_INTERVAL_S):
            for url, follower in zip(settings.triton_urls, followers, strict=True):
                try:
                    follower.sync()
                except Exception:  # a version that fails to load leaves the loaded ones serving; the next try may work
                    log.exception("Triton at %s could not follow the published version", url)

    thread = threading.Thread(target=follow, name="triton-follower", daemon=True)
    os.environ[VERSIONED_MODELS_ENV] = "true"  # read by the workers' settings (triton_versioned_models)
    get_settings.cache_clear()  # one worker runs in this process, whose settings were read before
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)
        del os.environ[VERSIONED_MODELS_ENV]
        get_settings.cache_clear()
        for follower in followers:
            follower.close()


def warm_up(settings: Settings) -> None:
    """One `recommend` and one `similar_products` request before the gateway opens.

    The first request a fresh server answers initializes the TensorFlow models' graphs and took longer
    than the gateway's Triton budget (RECSYS_TRITON_TIMEOUT_MS, 250 ms): the first online visitor got
    the generic list, marked triton_unavailable. A customer and a product of the current version are
    taken from Redis (any id will do when there is none).
    """
    import asyncio

    from recsys.recommendation_store import RecommendationKeys
    from serving.triton_client import TritonEnsembles

    keys = RecommendationKeys(settings.redis_key_prefix)
    client = redis_client(settings.redis_url, settings.redis_type, socket_timeout=5)
    try:
        version = _text(client.get(keys.current))
        ids = {}
        for kind in ("user", "similar"):
            pattern = keys.data(version, kind, "*") if version else None
            found = _text(next(client.scan_iter(pattern, count=1000), None)) if pattern else None
            ids[kind] = int(found.rsplit(":", 1)[1]) if found else 1
    finally:
        client.close()

    async def requests(url: str) -> None:
        triton = TritonEnsembles(url, timeout_s=60, versioned=os.environ.get(VERSIONED_MODELS_ENV) == "true")
        try:
            await triton.recommend(ids["user"], top_k=settings.online_top_k, version=version)
            await triton.similar([ids["similar"]], version=version)
        finally:
            await triton.close()

    for url in settings.triton_urls:  # each server: the gateway's requests take turns among them
        started = time.monotonic()
        try:
            asyncio.run(requests(url))
        except Exception as error:  # a warm-up that fails does not stop serving: the gateway falls back and says so
            log.warning("Triton warm-up request at %s failed: %s", url, error)
            continue
        log.info("Triton at %s warmed up in %.2f s (customer %d, product %d)", url, time.monotonic() - started,
                 ids["user"], ids["similar"])  # fmt: skip


# -- the whole -------------------------------------------------------------------------------------------------


def _terminate(signum: int, frame: FrameType | None) -> None:
    # uvicorn shuts down gracefully on SIGTERM, then raises it again: ending here lets `finally` stop Triton.
    raise SystemExit(128 + signum)


def live_api_keys(database_url: str) -> int:
    from sqlalchemy import func, select

    from recsys.database import ApiKey, create_database_engine

    engine = create_database_engine(database_url, timeout_ms=None)
    try:
        with engine.connect() as connection:
            return int(connection.scalar(select(func.count()).where(ApiKey.revoked_at.is_(None))) or 0)
    finally:
        engine.dispose()


@contextlib.contextmanager
def shared_metrics(workers: int) -> Iterator[None]:
    """With several workers, Prometheus' multiprocess mode in a fresh folder, so `/metrics` counts them all
    (serving/api/metrics.py); a folder the environment already names is used as it is (its owner wipes it)."""
    if workers == 1:
        yield
        return
    given = os.environ.get(MULTIPROCESS_DIR_ENV)
    with tempfile.TemporaryDirectory(prefix="recsys-metrics-") as folder:
        os.environ[MULTIPROCESS_DIR_ENV] = given or folder  # the workers, started after this, inherit it
        os.environ[MULTIPROCESS_ON_ENV] = "1"
        try:
            yield
        finally:
            del os.environ[MULTIPROCESS_ON_ENV]
            if given is None:
                del os.environ[MULTIPROCESS_DIR_ENV]


def serve(args: argparse.Namespace, settings: Settings) -> None:
    import uvicorn

    from serving.api.migrate import upgrade

    ensure_redis(settings.redis_url, allow_start=not args.no_redis_start,
                 cluster=check_redis_type(settings.redis_type))  # fmt: skip
    with triton_for(settings, args.model_repository, enabled=not args.no_triton):
        if not args.no_triton:
            warm_up(settings)
        log.info("migrating the database %s to the newest revision", _redacted(settings.database_url))
        upgrade(settings.database_url)
        if not live_api_keys(settings.database_url):
            log.warning("no API keys yet: every route but /health, /docs and /metrics answers 401; create one with "
                        "`make api-key NAME=web-tier SCOPES=read` (python -m serving.api.keys create ...)")  # fmt: skip
        log.info("gateway on http://%s:%d (docs at /docs), %d worker(s)", args.host, args.port, args.workers)
        with shared_metrics(args.workers):
            uvicorn.run("serving.api.main:create_app", factory=True, host=args.host, port=args.port,
                        workers=args.workers, log_level=args.log_level, access_log=not args.no_access_log)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1", help="address the gateway listens on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8100, help="default: %(default)s")
    parser.add_argument("--workers", type=int, default=1, help="gateway processes (default: %(default)s)")
    repository = parser.add_mutually_exclusive_group()
    repository.add_argument("--model-repository", type=Path, default=None,
                            help="serve this Triton repository (default: the latest exported one of a published run)")
    repository.add_argument("--no-triton", action="store_true", help="start no Triton server")
    parser.add_argument("--no-redis-start", action="store_true", help="fail instead of starting a local Redis")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.add_argument("--no-access-log", action="store_true", help="no line per request")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be 1 or more")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # a line per plugin at every start
    signal.signal(signal.SIGTERM, _terminate)
    try:
        serve(args, get_settings())
    except (ServeError, TritonServerError) as error:
        log.error("%s", error)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

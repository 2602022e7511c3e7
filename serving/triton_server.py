"""Start and stop a real Triton Inference Server on a model repository (platform environment, standard library).

The server is `tritonserver` 2.51 from PyTriton's wheel, which `make setup` installs into `.venv-triton`
(docs/environments.md, "Triton server"). It has the Python backend and ensembles but no TensorFlow backend, so
models run inside Python-backend models, in the trainer environment:

- The Python backend runs every model instance in `triton_python_backend_stub`, which embeds Python in
  isolated mode: PYTHONPATH and PYTHONHOME are ignored. Its interpreter finds its prefix as a `python3`
  found on PATH would, and a `python3` next to a `pyvenv.cfg` is that venv's interpreter. So the
  trainer environment's `bin/` goes first on PATH: models import TensorFlow, Faiss, Merlin and our
  editable packages exactly as `.venv-trainer/bin/python` does (`.pth` files included).
- The stub links `libpython3.X.so`: LD_LIBRARY_PATH names the trainer interpreter's own, not whichever
  the dynamic loader would find first (the system Python's, here a different patch release).
- With the GPU lock, LD_LIBRARY_PATH also names its CUDA wheels' folders, as for every trainer process
  (`recsys/cuda_libraries.py`); with RECSYS_DEVICE=cpu no GPU is visible to it (`recsys/device.py`).

    with TritonServer(repository) as server:        # free ports, waits for /v2/health/ready
        client = tritonclient.http.InferenceServerClient(server.http_address)

`python -m serving.triton_server --model-repository DIR` runs one in the foreground.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import filecmp
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Literal, Self

from recsys.cuda_libraries import with_cuda_libraries
from recsys.device import process_environment

log = logging.getLogger(__name__)

ModelControlMode = Literal["none", "explicit", "poll"]

# What the trainer interpreter reports about itself: its version and where its libpython is.
_TRAINER_PROBE = """
import json, os, sys, sysconfig
libdir = sysconfig.get_config_var("LIBDIR") or ""
multiarch = sysconfig.get_config_var("MULTIARCH") or ""
soname = sysconfig.get_config_var("INSTSONAME") or ""
candidates = [libdir, os.path.join(libdir, multiarch)] if multiarch else [libdir]
found = [d for d in candidates if soname and os.path.exists(os.path.join(d, soname))]
print(json.dumps({"version": "%d.%d" % sys.version_info[:2], "libpython_dir": found[0] if found else None}))
"""

# Error lines that every start on a machine without a GPU logs, whatever the models do.
_CPU_ONLY_NOISE = ("CudaDriverHelper has not been initialized", "CUDA driver version is insufficient")


class TritonServerError(RuntimeError):
    """The server is not installed, could not start, or did not become ready; the message says why."""


@dataclasses.dataclass(frozen=True)
class TritonInstallation:
    """The `tritonserver` binary and backend directory that `make setup` prepared."""

    root: Path  # <site-packages>/pytriton/tritonserver

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def backends_dir(self) -> Path:
        return self.root / "backends"

    @property
    def python_stub(self) -> Path:
        return self.backends_dir / "python" / "triton_python_backend_stub"

    def check_python_stub(self, python_version: str) -> None:
        """Refuse a stub built for another Python than the models' (setup copies the trainer's)."""
        expected = self.root / "python_backend_stubs" / python_version / "triton_python_backend_stub"
        if not expected.exists() or not filecmp.cmp(expected, self.python_stub, shallow=False):
            raise TritonServerError(
                f"{self.python_stub} is not the Python backend stub for Python {python_version}, the models' "
                "interpreter: run `make setup` (it copies the trainer environment's)"
            )

    @classmethod
    def locate(cls, triton_env: Path) -> TritonInstallation:
        roots = sorted(Path(triton_env).glob("lib/python3*/site-packages/pytriton/tritonserver"))
        if not roots:
            raise TritonServerError(f"no Triton server in {triton_env}: run `make setup`")
        installation = cls(roots[-1])
        for required in (installation.binary, installation.python_stub):
            if not os.access(required, os.X_OK):
                raise TritonServerError(f"{required} is missing or not executable: run `make setup`")
        return installation


@dataclasses.dataclass(frozen=True)
class PythonModelEnvironment:
    """The environment Python-backend models run in: a Python environment's `bin/` and its libpython."""

    bin_dir: Path
    libpython_dir: Path | None  # None: the dynamic loader's default search path has it
    python_version: str

    @classmethod
    def of(cls, python: Path) -> PythonModelEnvironment:
        """Describe the environment of interpreter `python` (a venv's `bin/python`: not resolved, it is a link)."""
        python = Path(python).absolute()
        if not python.exists():
            raise TritonServerError(f"the models' interpreter {python} does not exist: run `make setup`")
        if not (python.parent / "python3").exists():
            raise TritonServerError(f"no `python3` next to {python}: the models' environment must be a venv")
        try:
            probe = subprocess.run(
                [str(python), "-c", _TRAINER_PROBE], capture_output=True, text=True, check=True, timeout=60
            )
        except (OSError, subprocess.SubprocessError) as error:
            raise TritonServerError(f"cannot run the models' interpreter {python}: {error}") from error
        facts = json.loads(probe.stdout)
        libpython_dir = Path(facts["libpython_dir"]) if facts["libpython_dir"] else None
        return cls(bin_dir=python.parent, libpython_dir=libpython_dir, python_version=facts["version"])

    def apply(self, environ: Mapping[str, str]) -> dict[str, str]:
        """`environ` with PATH and LD_LIBRARY_PATH set so the Python backend's stub runs in this environment (with
        the GPU lock's CUDA libraries and RECSYS_DEVICE's visible GPUs, as every trainer process gets them)."""
        env = with_cuda_libraries(process_environment(environ), self.bin_dir / "python")
        env["PATH"] = os.pathsep.join(part for part in (str(self.bin_dir), environ.get("PATH", "")) if part)
        if self.libpython_dir is not None:
            library_path = (str(self.libpython_dir), env.get("LD_LIBRARY_PATH", ""))
            env["LD_LIBRARY_PATH"] = os.pathsep.join(part for part in library_path if part)
        # Ignored by the isolated stub anyway; dropped so that nothing suggests it matters.
        env.pop("PYTHONPATH", None)
        env.pop("PYTHONHOME", None)
        # TensorFlow's C++ INFO lines would drown the server log.
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
        return env


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct TCP ports that are free now (another process may take one before the server binds it)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]


def session_processes(session_id: int) -> list[int]:
    """Live processes (zombies left out) of session `session_id`: TritonServer starts the server in its own."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                # /proc/<pid>/stat: "pid (command) state ppid pgrp session ..."; the command may hold spaces.
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[3]) == session_id and fields[0] != "Z":
                    members.append(int(entry.name))
    return members


def python_stub_shm_regions(session_id: int) -> list[str]:
    """Names of the /dev/shm regions of the Python backend stubs in the server's session (argv[2] of each)."""
    regions = []
    for pid in session_processes(session_id):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            is_stub = argv[0].endswith("triton_python_backend_stub") and len(argv) > 2
            if is_stub and argv[2].startswith("triton_python_backend_shm_region_") and "/" not in argv[2]:
                regions.append(argv[2])
    return regions


class TritonServer:
    """One `tritonserver` process serving `model_repository`; a context manager that starts and stops it.

    Ports left as None are chosen free. `model_control_mode="none"` (the default) loads every model at
    start and the server refuses to start if one fails; "explicit" loads only `load_models` (all with
    `["*"]`) and then takes load/unload requests; "poll" follows changes to the repository.
    """

    def __init__(
        self,
        model_repository: Path,
        *,
        host: str = "127.0.0.1",
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        model_control_mode: ModelControlMode = "none",
        load_models: Sequence[str] = (),
        startup_timeout_s: float = 120.0,
        exit_timeout_s: int = 10,
        log_path: Path | None = None,
        triton_env: Path | None = None,
        models_python: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        if load_models and model_control_mode != "explicit":
            raise ValueError("load_models needs model_control_mode='explicit'")
        self.model_repository = Path(model_repository).absolute()
        self.host = host
        chosen = iter(free_ports(3, host))
        self.http_port = http_port or next(chosen)
        self.grpc_port = grpc_port or next(chosen)
        self.metrics_port = metrics_port or next(chosen)
        self.model_control_mode = model_control_mode
        self.load_models = tuple(load_models)
        self.startup_timeout_s = startup_timeout_s
        self.exit_timeout_s = exit_timeout_s
        self.log_path = Path(log_path) if log_path is not None else None
        self._triton_env = triton_env
        self._models_python = models_python
        self.extra_args = tuple(extra_args)
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def http_address(self) -> str:
        """host:port, as `tritonclient.http.InferenceServerClient(url=...)` takes it."""
        return f"{self._client_host}:{self.http_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.http_address}"

    @property
    def grpc_address(self) -> str:
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self._client_host}:{self.metrics_port}/metrics"

    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    def command(self, installation: TritonInstallation) -> list[str]:
        argv = [
            str(installation.binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={installation.backends_dir}",
            f"--model-control-mode={self.model_control_mode}",
            *(f"--load-model={name}" for name in self.load_models),
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            # At shutdown Triton waits this long for in-flight requests and for clients to close their
            # HTTP connections (a client left open delays every stop by the whole timeout); default 30.
            f"--exit-timeout-secs={self.exit_timeout_s}",
        ]
        return argv + list(self.extra_args)

    def start(self) -> Self:
        """Start the server and wait until it is ready; on failure stop it and raise TritonServerError."""
        if self.process is not None:
            raise RuntimeError("this TritonServer was already started")
        if not self.model_repository.is_dir():
            raise TritonServerError(f"model repository {self.model_repository} is not a directory")
        from recsys.settings import get_settings

        settings = get_settings()
        installation = TritonInstallation.locate(self._triton_env or settings.triton_env)
        models_env = PythonModelEnvironment.of(self._models_python or settings.trainer_python)
        installation.check_python_stub(models_env.python_version)
        if self.log_path is None:
            handle, name = tempfile.mkstemp(prefix="tritonserver-", suffix=".log")
            os.close(handle)
            self.log_path = Path(name)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = self.log_path.open("wb")
        argv = self.command(installation)
        log.info("starting Triton (log: %s): %s", self.log_path, " ".join(argv))
        started = time.monotonic()
        # A session of its own, so that stop() can reach the Python backend stubs too.
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=models_env.apply(os.environ),
            start_new_session=True,
        )
        try:
            self._wait_until_ready(started + self.startup_timeout_s)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        log.info("Triton ready at %s after %.1f s", self.http_url, self.startup_seconds)
        return self

    def _wait_until_ready(self, deadline: float) -> None:
        assert self.process is not None
        while True:
            exit_code = self.process.poll()
            if exit_code is not None:
                raise TritonServerError(
                    f"tritonserver exited with code {exit_code} before it was ready "
                    f"(model repository {self.model_repository}).\n{self.failure_report()}"
                )
            if self.is_ready():
                return
            if time.monotonic() > deadline:
                raise TritonServerError(
                    f"tritonserver was not ready after {self.startup_timeout_s:.0f} s "
                    f"(model repository {self.model_repository}).\n{self.failure_report()}"
                )
            time.sleep(0.1)

    def is_ready(self) -> bool:
        """Whether /v2/health/ready answers 200: the server is up and, in mode "none", every model loaded."""
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def log_lines(self) -> list[str]:
        if self.log_path is None or not self.log_path.exists():
            return []
        return self.log_path.read_text(errors="replace").splitlines()

    def failure_report(self, tail_lines: int = 15) -> str:
        """The log's error lines (which model failed and why) and its last lines."""
        lines = self.log_lines()
        errors = [
            line
            for line in lines
            if ((line[:1] == "E" and line[1:5].isdigit()) or line.startswith("error:"))
            and not any(noise in line for noise in _CPU_ONLY_NOISE)
        ]
        # The tables of backends, models and options that Triton prints at start and exit.
        tail = [line for line in lines if not line.startswith(("|", "+"))][-tail_lines:]
        report = []
        if errors:
            # Triton writes a Python traceback inside one line, with escaped newlines.
            report += ["Errors:", *(line.replace("\\n", "\n    ") for line in errors[-15:])]
        report += [f"Last lines of the log ({self.log_path}):", *tail]
        return "\n".join(report)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """Stop the server: SIGTERM (models unload, in-flight requests finish), then SIGKILL for what is left."""
        process = self.process
        if process is None:
            return None
        shm_regions = python_stub_shm_regions(process.pid)
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not stop within %.0f s of SIGTERM: killing it", timeout_s)
        # The whole session: the server if it is still there, and any stub it left behind.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        exit_code = process.wait()
        deadline = time.monotonic() + 10
        while session_processes(process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)  # killed stubs take a moment to exit
        # A server that gave up on its exit timeout, or a killed stub, leaves its shared memory behind.
        for region in shm_regions:
            with contextlib.suppress(FileNotFoundError):
                (Path("/dev/shm") / region).unlink()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return exit_code

    def __enter__(self) -> Self:
        return self.start() if self.process is None else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    from recsys.settings import PROJECT_ROOT, get_settings

    default_http_port = urllib.parse.urlsplit(get_settings().triton_urls[0]).port or 8000
    parser = argparse.ArgumentParser(
        prog="python -m serving.triton_server", description="Run Triton on a model repository until interrupted."
    )
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--http-port", type=int, default=default_http_port,
                        help="default: the port of RECSYS_TRITON_URL's first URL")  # fmt: skip
    parser.add_argument("--grpc-port", type=int, default=default_http_port + 1)
    parser.add_argument("--metrics-port", type=int, default=default_http_port + 2)
    parser.add_argument("--model-control-mode", choices=["none", "explicit", "poll"], default="none")
    parser.add_argument("--load-model", action="append", default=[], help="with explicit mode; repeatable")
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="seconds (default: %(default)s)")
    parser.add_argument("--log-file", type=Path, default=PROJECT_ROOT / "var" / "triton" / "tritonserver.log")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    def terminate(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    server = TritonServer(
        args.model_repository,
        host=args.host,
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        model_control_mode=args.model_control_mode,
        load_models=args.load_model,
        startup_timeout_s=args.startup_timeout,
        log_path=args.log_file,
    )
    try:
        with server:
            print(
                f"Triton ready after {server.startup_seconds:.1f} s: HTTP {server.http_url}, "
                f"gRPC {server.grpc_address}, metrics {server.metrics_url}; log {server.log_path}",
                flush=True,
            )
            assert server.process is not None
            exit_code = server.process.wait()
            print(f"tritonserver exited on its own with code {exit_code}", file=sys.stderr)
            if exit_code:
                print(server.failure_report(), file=sys.stderr)
            return exit_code
    except TritonServerError as error:
        print(error, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

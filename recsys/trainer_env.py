"""Run a step in the trainer environment as a subprocess of the `recsys` CLI.

Airflow and the platform libraries live in one environment and TensorFlow 2.12 / Merlin in another
(their pins conflict, see README). A subprocess of the trainer interpreter keeps the two apart with
nothing pickled between them: arguments are paths, the result is a small JSON file of metrics.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
from collections import deque
from pathlib import Path

from recsys.cuda_libraries import with_cuda_libraries
from recsys.device import process_environment

log = logging.getLogger(__name__)


class TrainerStepError(RuntimeError):
    pass


def run_trainer_step(python: Path, command: str, arguments: list[str]) -> dict:
    """Run `python -m tasks.cli <command> <arguments>`; stream its output to the log; return its metrics."""
    if not Path(python).exists():
        raise TrainerStepError(f"trainer interpreter {python} not found: run the README's setup command")
    with tempfile.TemporaryDirectory(prefix="recsys-trainer-") as scratch:
        metrics_path = Path(scratch) / "metrics.json"
        argv = [str(python), "-m", "tasks.cli", command, *arguments, "--metrics-json", str(metrics_path)]
        log.info("running in the trainer environment: %s", " ".join(argv))
        tail: deque[str] = deque(maxlen=40)
        # TensorFlow's C++ INFO lines (one per graph placeholder) would drown the step's own log. The GPU lock's CUDA
        # libraries on LD_LIBRARY_PATH (recsys.cuda_libraries; nothing changes with the CPU lock), and no GPU visible
        # for RECSYS_DEVICE=cpu (recsys.device).
        env = with_cuda_libraries(process_environment(os.environ), Path(python))
        env["TF_CPP_MIN_LOG_LEVEL"] = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "1")
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as process:
            assert process.stdout is not None
            for line in process.stdout:
                tail.append(line.rstrip())
                log.info("[trainer] %s", line.rstrip())
        if process.returncode != 0:
            raise TrainerStepError(
                f"trainer step '{command}' failed with exit code {process.returncode}:\n" + "\n".join(tail)
            )
        return json.loads(metrics_path.read_text())

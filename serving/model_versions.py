"""Triton follows the published version: each version's models under names of their own, loaded and unloaded
as the version pointer in Redis moves (publish, rollback), without restarting anything.

A published version `v` is the run `<data_root>/runs/<v>` (the nightly DAG publishes a run under its folder's
name), whose export is `<run>/triton_repository`. `stage_version` lays that repository's models into the serving
repository (one Triton runs on it, in explicit model control) as `<model>--<v>`: every file hard-linked, not
copied (a re-export of the run does not pull files from under loaded models), and each `config.pbtxt` rewritten
to the new names, ensemble steps included. `ModelFollower.sync` then loads the current version's two ensembles
(Triton loads the stages they name with them) and `encode_features` (and a running A/B experiment's
challenger's, which serve its bucket) and, once the current version has been
current (and loaded) for `grace_s`, unloads the others: a request already on its way to an older version's
models finishes there. An unloaded version's models then leave the serving repository (`unstage_version`): their
hard links would keep the run's export on disk after `expire_runs` deleted the run. The gateway calls the
ensembles of the version its Redis read returned (`versioned_name`), so the `model_version` of an answer is the
version whose models produced it; in the seconds between a pointer move and the load, such a call fails and the
gateway answers the generic list (`triton_unavailable`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from recsys.run_layout import RunLayout
from recsys.triton_repository import ENSEMBLES, STANDALONE_MODELS

log = logging.getLogger(__name__)

SEPARATOR = "--"
CONFIG_FILE = "config.pbtxt"
# Environment variable `serving.run` sets for its workers: Triton serves version-named models.
VERSIONED_MODELS_ENV = "RECSYS_TRITON_VERSIONED_MODELS"
_UNSAFE = re.compile(r"[^0-9A-Za-z_.+-]")  # the publisher's version characters stay as they are


def versioned_name(model: str, version: str) -> str:
    """The name a version's model has in the serving repository (characters a folder name may not hold become _)."""
    return f"{model}{SEPARATOR}{_UNSAFE.sub('_', version)}"


def _renamed_config(text: str, version: str, models: set[str]) -> str:
    """`config.pbtxt` as the export writes it (`tasks/export_triton_ensemble.py`), with the model's own name and
    the models its ensemble steps call renamed for `version`."""

    def rename(match: re.Match[str]) -> str:
        name = match.group(2)
        return f'{match.group(1)}"{versioned_name(name, version) if name in models else name}"'

    return re.sub(r'(^name: |^\s*model_name: )"([^"]+)"', rename, text, flags=re.MULTILINE)


def _link_or_copy(source: str, target: str) -> None:
    """A hard link (no copy of large feature tables; it outlives a re-export deleting the source), else a copy."""
    try:
        os.link(source, target)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(source, target)


def stage_version(exported: Path, repository: Path, version: str) -> list[str]:
    """Lay the models of `exported` (one run's Triton repository) into `repository` under `version`'s names;
    return those names. A model already laid is kept (idempotent); each is built aside and renamed into place."""
    exported, repository = Path(exported), Path(repository)
    models = sorted(path.name for path in exported.iterdir() if (path / CONFIG_FILE).is_file())
    if not set(ENSEMBLES) <= set(models):
        raise FileNotFoundError(f"{exported}: not an exported Triton repository (no {' or '.join(ENSEMBLES)})")
    repository.mkdir(parents=True, exist_ok=True)
    names = []
    for model in models:
        name = versioned_name(model, version)
        names.append(name)
        target = repository / name
        if target.exists():
            continue
        staging = repository / f".{name}.{uuid.uuid4().hex[:8]}"
        try:
            shutil.copytree(exported / model, staging, copy_function=_link_or_copy)
            config = staging / CONFIG_FILE
            text = config.read_text()
            config.unlink()  # a hard link to the export's own file: written anew, never in place
            config.write_text(_renamed_config(text, version, set(models)))
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return names


def unstage_version(repository: Path, version: str) -> list[str]:
    """Delete `version`'s models from `repository` (Triton has unloaded them); return their names. Their files are
    hard links to the run's export, so they would keep its disk space after `expire_runs` deletes the run; a later
    load (a rollback) lays them out again from the export. Each is renamed aside first, then deleted."""
    repository = Path(repository)
    names = sorted(folder.name for folder in repository.iterdir() if folder.is_dir()
                   and folder.name == versioned_name(folder.name.split(SEPARATOR)[0], version))  # fmt: skip
    for name in names:
        aside = repository / f".{name}.removing-{uuid.uuid4().hex[:8]}"
        (repository / name).rename(aside)
        shutil.rmtree(aside)
    return names


class ModelFollower:
    """Keeps the Triton at `triton_url` (explicit model control on `repository`) serving the current version.

    `sync` is one step; `serving.run` calls it every few seconds in a thread while the gateway runs."""

    def __init__(self, *, triton_url: str, repository: Path, data_root: Path, redis_client: Any, key_prefix: str,
                 grace_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        import tritonclient.http as triton_http

        from recsys.recommendation_store import RecommendationKeys

        # Loading a version starts its model processes (TensorFlow, Faiss): far longer than a request.
        self.triton = triton_http.InferenceServerClient(urlparse(triton_url).netloc or triton_url,
                                                        connection_timeout=600, network_timeout=600)  # fmt: skip
        self.repository = Path(repository)
        self.data_root = Path(data_root)
        self.redis = redis_client
        self.keys = RecommendationKeys(key_prefix)
        self.grace_s = grace_s
        self.clock = clock
        self.loaded: set[str] = set()  # versions whose ensembles are loaded
        self.current: str | None = None  # the version served, and since when its models answer
        self.current_since = 0.0
        self.missing: set[str] = set()  # versions without an exported repository (warned about once)

    def current_version(self) -> str | None:
        value = self.redis.get(self.keys.current)
        return value.decode() if isinstance(value, bytes) else value

    def challenger_version(self) -> str | None:
        """The running A/B experiment's challenger (recsys/experiments.py), whose models serve its bucket."""
        value = self.redis.hget(self.keys.experiment, "challenger")
        return value.decode() if isinstance(value, bytes) else value

    def sync(self) -> str | None:
        """Load the current version's models (and a running A/B experiment's challenger's) if they are not,
        unload the others after the grace; return the current version, or None while there is none (or its run
        exported no repository)."""
        version = self.current_version()
        if version is None or not self._load(version):
            return None
        challenger = self.challenger_version()
        kept = {version} | ({challenger} if challenger is not None and self._load(challenger) else set())
        if version != self.current:  # the grace counts from the move (a rollback may find its models loaded)
            self.current, self.current_since = version, self.clock()
        if self.clock() - self.current_since >= self.grace_s:
            for old in sorted(self.loaded - kept):
                for model in self.served_models(old):
                    self.triton.unload_model(model, unload_dependents=True)
                self.loaded.discard(old)
                unstage_version(self.repository, old)
                log.info("Triton unloaded version %s (current: %s)", old, version)
        return version

    def _load(self, version: str) -> bool:
        """Whether the version's models are loaded (now, if they were not); False when its run exported none."""
        if version in self.loaded:
            return True
        exported = RunLayout.of_version(self.data_root, version).triton_repository
        if not exported.is_dir():
            if version not in self.missing:
                log.warning("version %s is to be served but %s does not exist: Triton keeps the models it has",
                            version, exported)  # fmt: skip
                self.missing.add(version)
            return False
        started = time.perf_counter()
        stage_version(exported, self.repository, version)
        for model in self.served_models(version):
            self.triton.load_model(model)  # an ensemble: and the stages it names
        self.loaded.add(version)
        log.info("Triton serves version %s (%s), loaded in %.1f s", version, exported,
                 time.perf_counter() - started)  # fmt: skip
        return True

    def served_models(self, version: str) -> list[str]:
        """What Triton loads of a version: its ensembles (with the stages they name), and `encode_features` and
        `item_tower` where it has them (runs exported before them lack them)."""
        names = [versioned_name(ensemble, version) for ensemble in ENSEMBLES]
        standalone = [versioned_name(model, version) for model in STANDALONE_MODELS]
        return names + [name for name in standalone if (self.repository / name).is_dir()]

    def close(self) -> None:
        self.triton.close()

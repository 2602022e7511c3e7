"""Atomic, idempotent step outputs: write aside, then swap a pointer.

A step's output `<run>/<step>` is a symbolic link to a hidden staging directory. The step writes
everything into a fresh staging directory; only when it has finished is the link replaced, with one
`rename(2)`, which is atomic on POSIX. A reader therefore sees the previous complete output or the
new complete output, never a half-written one, and a rerun replaces the output instead of adding to it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def _staging_dirs(final: Path) -> list[Path]:
    return [path for path in final.parent.glob(f".{final.name}.*") if path.is_dir() and not path.is_symlink()]


@contextlib.contextmanager
def atomic_output_dir(final: Path) -> Iterator[Path]:
    """Yield an empty staging directory; on success make `final` point at it, on failure delete it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    previous = final.resolve() if final.is_symlink() else None
    # Leftovers of runs killed before their swap: nothing points at them.
    for leftover in _staging_dirs(final):
        if leftover != previous:
            shutil.rmtree(leftover, ignore_errors=True)
    staging = final.parent / f".{final.name}.{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    link = final.parent / f".{final.name}.link-{uuid.uuid4().hex[:12]}"
    os.symlink(staging.name, link)
    if final.exists() and not final.is_symlink():
        shutil.rmtree(final)  # an output written by hand or by an older layout
    os.replace(link, final)
    if previous is not None and previous != staging.resolve():
        shutil.rmtree(previous, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file so that readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}"
    temporary.write_text(text)
    os.replace(temporary, path)

"""The impression log's format: every recommendation list the gateway served (`serving/api/impressions.py` writes
it), as JSON lines in hourly files that `tasks/monitor.py` reads.

    <RECSYS_IMPRESSIONS_DIR>/date=YYYY-MM-DD/hour=HH/<host>-<pid>.jsonl      (default dir: <data_root>/impressions)

One line per answer of `GET /recommendations/{customer_id}` and `GET /products/{product_id}/similar`:

    {"request_id": "9f1c...", "time": "2026-11-26T10:15:02.123456+00:00", "customer_id": 42,
     "handler": "/recommendations/{customer_id}", "route": "precomputed", "model_version": "manual__2026...",
     "degraded": [], "api_key": "web-tier", "temperature": 0.5,
     "items": [{"product_id": 7, "position": 0, "probability": 0.41}, ...]}

`customer_id` is null for similar products; `position` is the 0-based rank shown; `time` is when the answer
was served (UTC), and it names the hour's folder. The policy that chose the list is `model_version` and
`temperature` (0: the ranked order; similar products are always ranked); with a temperature above 0 each item
has its `probability`, the softmax probability it was drawn first with: the propensity with which the top
position showed it, what off-policy estimates (`recsys/off_policy.py`) reweight clicks by. Lines written before
the policy was logged have neither field. While an A/B experiment runs (recsys/experiments.py), a customer's
line also has `experiment` (its name) and `bucket` (`control` or `challenger`). With
`RECSYS_IMPRESSIONS_CANDIDATE_SCORES`, a sampled line also has `candidate_scores` (the order scores, promotion
applied, of every candidate the list was drawn from, in order) and `top_candidate` (the index among them of the
item shown first): softmax(candidate_scores / T) is what any temperature T would have shown first, the target
probability of an off-policy estimate (tasks/monitor.py).

Each process (uvicorn worker) writes files of its own; a reader skips a last line without its newline (a
write in progress). Forgetting a customer (serving/forget.py) rewrites the files that mention them without
their lines, each one aside and renamed over the old; an append holds an exclusive `flock` on the file and
checks that the path still names the file it opened, so it lands in the rewritten file, never in the replaced
one (`append_lines`, `remove_customers`).

The files are kept for `RECSYS_IMPRESSIONS_RETENTION_DAYS` (90): the monitoring DAG removes older hours after
each run (`remove_hours_before`), which also bounds the files a forget rewrites. An hour's folder is renamed aside
first (`hour=HH.removing-<id>`: no reader's hour, still a folder a forget rewrites), then deleted; one left aside
by a removal cut short is deleted by the next.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import re
import shutil
import uuid
from collections.abc import Collection, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any


def partition_dir(root: Path, moment: datetime) -> Path:
    """The folder of the hour (UTC) that `moment` falls in."""
    moment = moment.astimezone(UTC)
    return Path(root) / f"date={moment:%Y-%m-%d}" / f"hour={moment:%H}"


def read_impressions(root: Path, hour: datetime) -> tuple[list[dict[str, Any]], int]:
    """(impressions of the hour starting at `hour`, malformed lines skipped), from every process's file."""
    records, malformed = [], 0
    for path in _files(partition_dir(root, hour), "*.jsonl"):
        try:
            lines = list(_complete_lines(path))
        except FileNotFoundError:  # its hour was removed meanwhile (`remove_hours_before`)
            continue
        for line in lines:
            try:
                record = json.loads(line)
                record["time"] = datetime.fromisoformat(record["time"])
            except (ValueError, KeyError, TypeError):
                malformed += 1
                continue
            records.append(record)
    return records, malformed


def _files(folder: Path, *pattern: str) -> list[Path]:
    """The files under `folder` that `pattern` matches, sorted. The `glob` module's walk skips a folder removed
    while it walks (`remove_hours_before`), where pathlib's raises FileNotFoundError."""
    return [Path(path) for path in sorted(glob.glob(os.path.join(glob.escape(str(folder)), *pattern)))]


def _complete_lines(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as file:
        for line in file:
            if line.endswith("\n"):  # a line without one is being written
                yield line


_encode = json.JSONEncoder(separators=(",", ":")).encode


def impression_line(impression: dict[str, Any], moment: datetime) -> str:
    """The impression as one JSON object, `items` last as [{"product_id": id, "position": rank}, ...]; the
    items are written by hand (ids are ints): about 3 times cheaper than building and encoding 20 small dicts."""
    head = _encode({**{key: value for key, value in impression.items() if key not in ("items", "probabilities")},
                    "time": moment.isoformat(timespec="microseconds")})  # fmt: skip
    probabilities = impression.get("probabilities")
    if probabilities is None:
        items = ",".join([f'{{"product_id":{int(item)},"position":{position}}}'
                          for position, item in enumerate(impression["items"])])  # fmt: skip
    else:
        items = ",".join([f'{{"product_id":{int(item)},"position":{position},"probability":{float(probability)!r}}}'
                          for position, (item, probability) in enumerate(zip(impression["items"], probabilities,
                                                                             strict=True))])  # fmt: skip
    return f'{head[:-1]},"items":[{items}]}}'


def append_lines(path: Path, text: str) -> None:
    """Append whole lines to `path` under an exclusive lock, into the file the path names when the lock is held
    (a rewrite by `remove_customers` may have replaced it while this waited)."""
    while True:
        with path.open("a", encoding="utf-8") as file:
            fcntl.flock(file, fcntl.LOCK_EX)
            try:
                if os.fstat(file.fileno()).st_ino != os.stat(path).st_ino:
                    continue  # replaced meanwhile: open the new file
            except FileNotFoundError:
                continue
            file.write(text)
            return  # closing the file flushes, then releases the lock


def remove_customers(root: Path, customer_ids: Collection[int]) -> tuple[int, int]:
    """Rewrite every impression file under `root` that has lines of these customers without those lines;
    return (lines removed, files rewritten). Each file is locked as `append_lines` locks it, written aside and
    renamed over the old one, so no append is lost and a reader sees the old file or the new one. Files of hours
    being removed (`remove_hours_before`) are rewritten too until they are gone."""
    wanted = {int(customer) for customer in customer_ids}
    removed = rewritten = 0
    for path in _files(Path(root), "date=*", "hour=*", "*.jsonl"):
        try:
            lines_removed = _rewrite_without(path, wanted)
        except FileNotFoundError:  # its hour was removed meanwhile, these customers' lines with it
            continue
        removed += lines_removed
        rewritten += lines_removed > 0
    return removed, rewritten


def _rewrite_without(path: Path, customers: set[int]) -> int:
    """Rewrite `path` without the lines of `customers` (when it has any); return how many lines went."""
    with path.open("r+", encoding="utf-8") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        if os.fstat(file.fileno()).st_ino != os.stat(path).st_ino:
            return 0  # another rewrite replaced it just now: that one already left these customers out
        lines = file.read().splitlines(keepends=True)
        kept = [line for line in lines if _customer_of(line) not in customers]
        if len(kept) == len(lines):
            return 0
        staging = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            with staging.open("w", encoding="utf-8") as out:
                out.writelines(kept)
                out.flush()
                os.fsync(out.fileno())
            os.replace(staging, path)
        except BaseException:
            staging.unlink(missing_ok=True)
            raise
        return len(lines) - len(kept)


_REMOVING = ".removing-"
_HOUR_FOLDER = re.compile(r"hour=([01]\d|2[0-3])")


def remove_hours_before(root: Path, cutoff: datetime) -> tuple[int, int]:
    """Delete the hourly folders under `root` whose hour ended at or before `cutoff`, and the date folders of days
    that ended by then once empty; return (hours, files) removed. Each hour is renamed aside, then deleted, so a
    reader never sees part of one; folders left aside by a removal cut short go too. Idempotent, and safe beside
    another removal. Folders not named as `partition_dir` names them are left alone."""
    cutoff = cutoff.astimezone(UTC)
    hours = files = 0
    for date_folder in _files(Path(root), "date=*"):
        try:
            day = datetime.strptime(date_folder.name, "date=%Y-%m-%d").replace(tzinfo=UTC)
        except ValueError:
            continue
        if date_folder.name != f"date={day:%Y-%m-%d}":
            continue
        for hour_folder in _files(date_folder, "hour=*"):
            hour_name = _HOUR_FOLDER.fullmatch(hour_folder.name)
            if _REMOVING in hour_folder.name:
                aside = hour_folder
            elif hour_name is not None and day + timedelta(hours=int(hour_name.group(1)) + 1) <= cutoff:
                aside = hour_folder.with_name(f"{hour_folder.name}{_REMOVING}{uuid.uuid4().hex[:12]}")
                try:
                    os.rename(hour_folder, aside)
                except FileNotFoundError:  # another removal took it
                    continue
            else:
                continue
            hours += 1
            files += len(_files(aside, "*.jsonl"))
            _delete(aside)
        if day + timedelta(days=1) <= cutoff:
            with contextlib.suppress(OSError):  # not empty: a folder that is not ours
                date_folder.rmdir()
    return hours, files


def _delete(folder: Path) -> None:
    """Delete `folder`; a forget rewriting one of its files meanwhile may put the file back, so try again."""
    for _ in range(4):
        try:
            shutil.rmtree(folder)
            return
        except FileNotFoundError:
            return
        except OSError:
            continue  # "directory not empty": a file rewritten in it after it was listed
    shutil.rmtree(folder)


_CUSTOMER_ID = re.compile(r'"customer_id"\s*:\s*(-?\d+)')


def _customer_of(line: str) -> int | None:
    """The line's customer id, found without parsing the whole line (its items are most of it)."""
    found = _CUSTOMER_ID.search(line)
    return int(found.group(1)) if found else None


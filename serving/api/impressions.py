"""Impressions: every served recommendation list, appended as JSON lines to hourly files that `tasks/monitor.py` reads.

    <RECSYS_IMPRESSIONS_DIR>/date=YYYY-MM-DD/hour=HH/<host>-<pid>.jsonl      (default dir: <data_root>/impressions)

One line per answer of `GET /recommendations/{customer_id}` and `GET /products/{product_id}/similar`:

    {"request_id": "9f1c...", "time": "2026-11-26T10:15:02.123456+00:00", "customer_id": 42,
     "handler": "/recommendations/{customer_id}", "route": "precomputed", "model_version": "manual__2026...",
     "degraded": [], "api_key": "web-tier", "items": [{"product_id": 7, "position": 0}, ...]}

`customer_id` is null for similar products; `position` is the 0-based rank shown; `time` is when the answer
was served (UTC), and it names the hour's folder. The request only puts the record on a queue (a microsecond
or two; no disk I/O on the request path); a writer thread wakes every `flush_interval_s` (0.5 s), formats what
is queued and appends it in batches, one `write` of whole lines per file and batch, the file opened and closed
each time. Each process (uvicorn worker) has files of its own, so lines never interleave; a reader skips a
last line without its newline (a write in progress). When the queue holds `max_pending` records (the disk much
slower than traffic for a while), new impressions are dropped and counted (`recsys_impressions_dropped_total`)
rather than slowing requests or growing memory. A clean shutdown drains the queue; a killed process loses the
last half second or so. With several hosts, the folder is a shared volume (or shipped to one).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import socket
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_PENDING = 100_000
MAX_BATCH = 5_000
FLUSH_INTERVAL_S = 0.5


def partition_dir(root: Path, moment: datetime) -> Path:
    """The folder of the hour (UTC) that `moment` falls in."""
    moment = moment.astimezone(UTC)
    return Path(root) / f"date={moment:%Y-%m-%d}" / f"hour={moment:%H}"


def read_impressions(root: Path, hour: datetime) -> tuple[list[dict[str, Any]], int]:
    """(impressions of the hour starting at `hour`, malformed lines skipped), from every process's file."""
    records, malformed = [], 0
    for path in sorted(partition_dir(root, hour).glob("*.jsonl")):
        for line in _complete_lines(path):
            try:
                record = json.loads(line)
                record["time"] = datetime.fromisoformat(record["time"])
            except (ValueError, KeyError, TypeError):
                malformed += 1
                continue
            records.append(record)
    return records, malformed


def _complete_lines(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as file:
        for line in file:
            if line.endswith("\n"):  # a line without one is being written
                yield line


_encode = json.JSONEncoder(separators=(",", ":")).encode


def _json_line(impression: dict[str, Any], moment: datetime) -> str:
    """The impression as one JSON object, `items` last as [{"product_id": id, "position": rank}, ...]; the
    items are written by hand (ids are ints): about 3 times cheaper than building and encoding 20 small dicts."""
    head = _encode({**{key: value for key, value in impression.items() if key != "items"},
                    "time": moment.isoformat(timespec="microseconds")})  # fmt: skip
    items = ",".join([f'{{"product_id":{int(item)},"position":{position}}}'
                      for position, item in enumerate(impression["items"])])  # fmt: skip
    return f'{head[:-1]},"items":[{items}]}}'


class ImpressionLog:
    """A queue of impressions and the thread that appends them to the hourly files; `start()` and `close()`
    belong to the application's lifespan."""

    def __init__(self, directory: Path, *, on_drop: Callable[[int], None] | None = None,
                 max_pending: int = MAX_PENDING, flush_interval_s: float = FLUSH_INTERVAL_S) -> None:  # fmt: skip
        self.directory = Path(directory)
        self.max_pending = max_pending
        self.flush_interval_s = flush_interval_s
        self._on_drop = on_drop
        # SimpleQueue: the cheapest put; its size bounds the queue (approximately: enough to bound memory).
        self._queue: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._file_name = ""
        self._folders: dict[int, Path] = {}  # hour since the epoch -> its folder (the writer thread's own)

    def start(self) -> None:
        # Named by host and pid when started (in the worker process), so no two processes share a file.
        self._file_name = f"{socket.gethostname()}-{os.getpid()}.jsonl"
        self._closing.clear()
        self._thread = threading.Thread(target=self._write_until_closed, name="impression-writer", daemon=True)
        self._thread.start()

    def record(self, impression: dict[str, Any]) -> None:
        """Queue one impression: `time` as epoch seconds, `items` as product ids in the order shown."""
        if self._queue.qsize() >= self.max_pending:
            self._dropped(1)
            return
        self._queue.put(impression)

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued, then stop the writer."""
        if self._thread is None:
            return
        self._closing.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.error("impression writer still busy after %.0f s; %d impressions may be lost",
                      timeout_s, self._queue.qsize())  # fmt: skip
        self._thread = None

    def _dropped(self, count: int) -> None:
        if self._on_drop is not None:
            self._on_drop(count)

    def _write_until_closed(self) -> None:
        # Woken by the clock, not by each record: a wake-up per request (a blocking get) cost more CPU in thread
        # switches and file opens than the records themselves.
        while True:
            closing = self._closing.wait(self.flush_interval_s)
            self._write_queued()
            if closing:
                return

    def _write_queued(self) -> None:
        while True:
            batch: list[dict[str, Any]] = []
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if not batch:
                return
            try:
                self._write(batch)
            except Exception:  # the writer must outlive any one bad batch
                log.exception("impression writer: a batch of %d impressions was lost", len(batch))
                self._dropped(len(batch))
            if len(batch) < MAX_BATCH:
                return

    def _write(self, batch: list[dict[str, Any]]) -> None:
        lines: dict[Path, list[str]] = {}
        for impression in batch:
            moment = datetime.fromtimestamp(impression["time"], UTC)
            try:
                line = _json_line(impression, moment)
            except (TypeError, ValueError):
                log.exception("impression of request %s cannot be written as JSON", impression.get("request_id"))
                self._dropped(1)
                continue
            hour = int(impression["time"] // 3600)
            folder = self._folders.get(hour)
            if folder is None:
                folder = self._folders[hour] = partition_dir(self.directory, moment)
                if len(self._folders) > 48:  # a couple of days of hours: plenty for a queue's worth of records
                    del self._folders[min(self._folders)]
            lines.setdefault(folder, []).append(line)
        for folder, texts in lines.items():
            try:
                folder.mkdir(parents=True, exist_ok=True)
                with (folder / self._file_name).open("a", encoding="utf-8") as file:
                    file.write("\n".join(texts) + "\n")
            except OSError as error:
                log.error("impressions not written to %s (%s): %d dropped", folder, error, len(texts))
                self._dropped(len(texts))

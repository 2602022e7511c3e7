"""The gateway's impression log: every served recommendation list, appended as JSON lines to hourly files that
`tasks/monitor.py` reads; the files' layout, line format and reader are in `recsys/impression_log.py`.

The request only puts the record on a queue (a microsecond or two; no disk I/O on the request path); a writer
thread wakes every `flush_interval_s` (0.5 s), formats what is queued and appends it in batches, one `write` of
whole lines per file and batch, the file opened and closed each time. Each process (uvicorn worker) has files of
its own, so lines never interleave; a reader skips a last line without its newline (a write in progress). When the
queue holds `max_pending` records (the disk much slower than traffic for a while), new impressions are dropped and
counted (`recsys_impressions_dropped_total`) rather than slowing requests or growing memory. A clean shutdown
drains the queue; a killed process loses the last half second or so. With several hosts, the folder is a shared
volume (or shipped to one).
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from recsys.impression_log import append_lines, impression_line, partition_dir

log = logging.getLogger(__name__)

MAX_PENDING = 100_000
MAX_BATCH = 5_000
FLUSH_INTERVAL_S = 0.5


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
                line = impression_line(impression, moment)
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
                append_lines(folder / self._file_name, "\n".join(texts) + "\n")
            except OSError as error:
                log.error("impressions not written to %s (%s): %d dropped", folder, error, len(texts))
                self._dropped(len(texts))

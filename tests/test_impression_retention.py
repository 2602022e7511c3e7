"""The impression log's retention: hours older than it are removed whole, the others untouched, while the gateway's
writer appends and forgets rewrite; a removal cut short is finished by the next one, and a forget still reaches
its files meanwhile. The monitoring DAG's task that calls it under the real scheduler is in
`tests/test_airflow_scheduler.py`."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from recsys.impression_log import partition_dir, read_impressions, remove_customers
from serving.api.impressions import ImpressionLog
from tasks.cli import main
from tasks.monitor import remove_expired_impressions

NOW = datetime(2026, 12, 5, 14, 20, tzinfo=UTC)


def write(root: Path, moments: list[datetime], *, customer: int = 1) -> None:
    """One impression at each moment, through the gateway's writer."""
    log = ImpressionLog(root, flush_interval_s=0.001)
    log.start()
    try:
        for number, moment in enumerate(moments):
            log.record({"request_id": f"{customer}-{number}", "time": moment.timestamp(), "customer_id": customer,
                        "items": [7, 8]})  # fmt: skip
    finally:
        log.close()


def hours_on_disk(root: Path) -> list[str]:
    return sorted(str(folder.relative_to(root)) for folder in root.glob("date=*/hour=*"))


def test_hours_that_ended_before_the_retention_go_whole_and_the_others_stay(tmp_path: Path):
    # Two days before NOW: 2026-12-03 14:20.
    expired = [datetime(2026, 12, 1, hour, 30, tzinfo=UTC) for hour in range(24)]  # a whole day
    expired += [datetime(2026, 12, 3, 13, 5, tzinfo=UTC)]  # the hour that ended 20 minutes before the cutoff
    kept = [datetime(2026, 12, 3, 14, 10, tzinfo=UTC), datetime(2026, 12, 4, 9, tzinfo=UTC), NOW]
    write(tmp_path, expired + kept)
    (tmp_path / "date=2026-12-01" / "notes").mkdir()  # not the log's: left alone, and so is its day's folder
    (tmp_path / "date=someday" / "hour=01").mkdir(parents=True)

    report = remove_expired_impressions(tmp_path, now=NOW, retention_days=2)
    assert report == {"removed_before": "2026-12-03T14:20:00Z", "hours_removed": 25, "files_removed": 25}
    assert hours_on_disk(tmp_path) == ["date=2026-12-03/hour=14", "date=2026-12-04/hour=09",
                                       "date=2026-12-05/hour=14", "date=someday/hour=01"]  # fmt: skip
    assert [path.name for path in (tmp_path / "date=2026-12-01").iterdir()] == ["notes"]
    assert not (tmp_path / "date=2026-12-02").exists()
    for moment in kept:
        [record], malformed = read_impressions(tmp_path, moment.replace(minute=0))
        assert record["time"] == moment and malformed == 0
    assert read_impressions(tmp_path, expired[-1].replace(minute=0)) == ([], 0)

    again = remove_expired_impressions(tmp_path, now=NOW, retention_days=2)  # idempotent
    assert (again["hours_removed"], again["files_removed"]) == (0, 0)
    (tmp_path / "date=2026-12-01" / "notes").rmdir()
    remove_expired_impressions(tmp_path, now=NOW, retention_days=2)
    assert not (tmp_path / "date=2026-12-01").exists()  # an ended day's folder goes once it is empty


def test_a_removal_cut_short_is_finished_by_the_next_and_a_forget_reaches_it_meanwhile(tmp_path: Path):
    old = datetime(2026, 11, 1, 3, tzinfo=UTC)
    write(tmp_path, [old, old + timedelta(minutes=1)], customer=13)
    write(tmp_path, [old], customer=14)
    hour = partition_dir(tmp_path, old)
    # What a removal killed between its rename and its delete leaves behind.
    aside = hour.rename(hour.with_name("hour=03.removing-0123456789ab"))

    assert read_impressions(tmp_path, old) == ([], 0)  # no reader sees an hour being removed
    assert remove_customers(tmp_path, [13]) == (2, 1)  # but a forget still rewrites it
    assert [json.loads(line)["customer_id"] for line in (aside / next(aside.iterdir()).name).read_text().splitlines()
            ] == [14]  # fmt: skip
    report = remove_expired_impressions(tmp_path, now=NOW, retention_days=90)  # 2026-11-01 is within 90 days
    assert (report["hours_removed"], report["files_removed"]) == (1, 1)
    assert not aside.exists() and hours_on_disk(tmp_path) == []


def recording(errors: list[BaseException], function: Callable[..., Any]) -> Callable[..., None]:
    """`function`, its exception kept in `errors` (a thread's would only be printed)."""

    def run(*args: Any, **kwargs: Any) -> None:
        try:
            function(*args, **kwargs)
        except Exception as error:  # the test's assertion names it
            errors.append(error)

    return run


def test_forgets_and_the_writer_go_on_while_hours_are_removed(tmp_path: Path):
    """A forget rewriting files while their hours are removed (by two removals at once, say the DAG's and one by
    hand) fails on none of them, and the writer's appends to the current hour all land."""
    start = datetime(2026, 10, 30, 8, tzinfo=UTC)  # 300 hours: the first 150 end by the cutoff, 2026-11-05 14:20
    write(tmp_path, [start + timedelta(hours=hour) for hour in range(300)], customer=13)
    write(tmp_path, [start + timedelta(hours=hour, minutes=1) for hour in range(300)], customer=14)
    stop, errors = threading.Event(), list[BaseException]()

    def forget_again_and_again() -> None:
        while not stop.is_set():
            remove_customers(tmp_path, [13])

    forgetter = threading.Thread(target=recording(errors, forget_again_and_again))
    forgetter.start()
    other_removal = threading.Thread(target=recording(errors, remove_expired_impressions), args=(tmp_path,),
                                     kwargs={"now": NOW, "retention_days": 30})  # fmt: skip
    other_removal.start()
    log = ImpressionLog(tmp_path, flush_interval_s=0.001)
    log.start()
    try:
        for number in range(500):
            log.record({"request_id": f"now-{number}", "time": NOW.timestamp(), "customer_id": 100 + number,
                        "items": [7]})  # fmt: skip
        report = remove_expired_impressions(tmp_path, now=NOW, retention_days=30)
    finally:
        log.close()
        stop.set()
        forgetter.join()
        other_removal.join()
    assert errors == []
    assert report["hours_removed"] <= 150 and report["files_removed"] <= 150  # the rest went by the other
    hours = hours_on_disk(tmp_path)
    assert len(hours) == 151 and hours[0] == "date=2026-11-05/hour=14" and hours[-1] == "date=2026-12-05/hour=14"
    remove_customers(tmp_path, [13])
    left = [read_impressions(tmp_path, start + timedelta(hours=hour))[0] for hour in range(150, 300)]
    assert [[record["customer_id"] for record in records] for records in left] == [[14]] * 150
    records, _ = read_impressions(tmp_path, NOW.replace(minute=0))
    assert sorted(record["customer_id"] for record in records) == list(range(100, 600))


def test_the_retention_is_a_day_at_least_and_the_command_takes_it(tmp_path: Path, capsys: pytest.CaptureFixture):
    with pytest.raises(ValueError, match="retention_days=0"):
        remove_expired_impressions(tmp_path, now=NOW, retention_days=0)
    write(tmp_path, [datetime(2020, 1, 1, tzinfo=UTC), datetime.now(UTC)])
    assert main(["expire-impressions", "--impressions-dir", str(tmp_path), "--retention-days", "1"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (report["hours_removed"], report["files_removed"]) == (1, 1)
    assert len(hours_on_disk(tmp_path)) == 1

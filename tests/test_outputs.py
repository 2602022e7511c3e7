from pathlib import Path

import pytest

from recsys.outputs import atomic_output_dir


def test_output_appears_only_when_complete_and_rerun_replaces_it(tmp_path: Path):
    final = tmp_path / "step"
    with atomic_output_dir(final) as staging:
        (staging / "a.txt").write_text("first")
        assert not final.exists()
    assert (final / "a.txt").read_text() == "first"

    with atomic_output_dir(final) as staging:
        (staging / "b.txt").write_text("second")
    assert sorted(path.name for path in final.iterdir()) == ["b.txt"]
    # the previous version's directory is gone: a rerun never accumulates outputs
    assert len([path for path in tmp_path.iterdir() if path.is_dir() and not path.is_symlink()]) == 1


def test_a_failing_step_leaves_the_previous_output(tmp_path: Path):
    final = tmp_path / "step"
    with atomic_output_dir(final) as staging:
        (staging / "a.txt").write_text("good")
    with pytest.raises(RuntimeError), atomic_output_dir(final) as staging:
        (staging / "a.txt").write_text("half")
        raise RuntimeError("killed")
    assert (final / "a.txt").read_text() == "good"
    assert len(list(tmp_path.iterdir())) == 2  # the link and its one target


def test_leftovers_of_a_killed_run_are_removed(tmp_path: Path):
    leftover = tmp_path / ".step.deadbeef0000"
    leftover.mkdir()
    (leftover / "partial.parquet").write_text("x")
    with atomic_output_dir(tmp_path / "step") as staging:
        (staging / "ok").write_text("ok")
    assert not leftover.exists()

"""`exclude_seen: all` in a spec: no item a user interacted with comes back in their batch list or Triton answer.

A briefly trained run (conftest's `trained_run`) is batch-scored and exported again with the default spec plus
`exclude_seen: all` (the nvtabular output is the same: the option only changes the filter). The generated
data logs every impression, clicked or not, so every item shown to a user counts as seen.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from recsys.parquet_io import nvtabular_part_files
from recsys.settings import get_settings
from recsys.spec import DEFAULT_SPEC_PATH, SpecError, load_spec, parse_spec
from recsys.trainer_env import run_trainer_step
from serving.triton_server import TritonServer
from tasks.cli import main as recsys_cli
from tests.test_triton_ensemble import ranked, recommend

TOP_N = 20


def spec_with(tmp_path: Path, exclude_seen: object) -> Path:
    raw = yaml.safe_load(DEFAULT_SPEC_PATH.read_text()) | {"exclude_seen": exclude_seen}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_option_defaults_to_purchases_and_names_targets(tmp_path: Path):
    default = load_spec()
    assert default.exclude_seen is None and default.seen_targets == ("conversion",)
    assert not default.excludes_every_interaction
    every = load_spec(spec_with(tmp_path, "all"))
    assert every.excludes_every_interaction and every.seen_targets == ()
    assert load_spec(spec_with(tmp_path, ["click", "conversion"])).seen_targets == ("click", "conversion")
    assert load_spec(spec_with(tmp_path, [])).seen_targets == ()  # nothing excluded, not even purchases
    with pytest.raises(SpecError, match="exclude_seen names 'rating', which is not one of the targets"):
        load_spec(spec_with(tmp_path, ["rating"]))
    with pytest.raises(SpecError, match="exclude_seen must be 'all' or a list of targets, not 'everything'"):
        parse_spec(yaml.safe_load(spec_with(tmp_path, "everything").read_text()))


def seen_pairs(run: Path) -> pd.DataFrame:
    """Every (raw user, raw item) of the run's train and valid rows."""
    spec = load_spec()
    columns = [spec.user_id + "_raw", spec.item_id + "_raw"]
    parts = [pd.read_parquet(path, columns=columns) for split in ("train", "valid")
             for path in nvtabular_part_files(run / "nvtabular" / split)]  # fmt: skip
    return pd.concat(parts).drop_duplicates().set_axis(["user", "item"], axis=1)


@pytest.mark.e2e
def test_no_seen_item_in_batch_lists_or_triton_answers(trained_run: Path, batch_scored: Path, tmp_path: Path):
    spec_path = spec_with(tmp_path, "all")
    seen = seen_pairs(trained_run)
    seen_by_user = seen.groupby("user")["item"].agg(set)
    batch = tmp_path / "batch_score"
    run_trainer_step(get_settings().trainer_python, "batch-score",
                     ["--input", str(trained_run), "--output", str(batch), "--spec", str(spec_path)])  # fmt: skip
    lists = pd.concat([pd.read_parquet(path, columns=["user_id", "item_ids"])
                       for path in sorted((batch / "users").glob("*.parquet"))])  # fmt: skip
    assert len(lists) == len(seen_by_user)
    for user, items in zip(lists["user_id"], lists["item_ids"], strict=True):
        assert len(items) == 100 and not set(items) & seen_by_user[user], user
    # Without the option the same users get seen items back: the option is what removes them.
    default_lists = pd.concat([pd.read_parquet(path, columns=["user_id", "item_ids"])
                               for path in sorted((batch_scored / "users").glob("*.parquet"))])  # fmt: skip
    assert any(set(items) & seen_by_user[user]
               for user, items in zip(default_lists["user_id"], default_lists["item_ids"], strict=True))  # fmt: skip

    repository = tmp_path / "triton_repository"
    assert recsys_cli(["export-triton-ensemble", "--input", str(trained_run), "--output", str(repository),
                       "--spec", str(spec_path)]) == 0  # fmt: skip
    users = np.array(sorted(seen_by_user.index)[:8], dtype=np.int64)
    with TritonServer(repository, log_path=tmp_path / "tritonserver.log", startup_timeout_s=180) as server:
        answer = recommend(server, users, **ranked(top_k=500, top_n=TOP_N))
    for user, items in zip(users, answer["item_ids"], strict=True):
        assert (items >= 0).all() and not set(items.tolist()) & seen_by_user[user], user

"""`recsys import-atomic` on tiny atomic files written here: ids, the temporal split, features, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recsys.errors import InputDataError
from recsys.spec import load_spec
from tasks.cli import main
from tasks.csv_to_parquet import csv_to_parquet
from tasks.import_atomic import AtomicImportConfig, import_atomic, temporal_split

INTER = """user_id:token\titem_id:token\trating:float\ttimestamp:float
u2\tZeta\t5\t100
u2\tAlpha\t4\t200
u2\tBeta\t2\t250
u2\tGamma\t5\t300
u2\tDelta\t4\t300
u2\tOmega\t1\t400
u1\tAlpha\t1\t50
u1\tBeta\t5\t60.7
u3\tAlpha\t5\t10
"""
USER = """user_id:token\tage:float\tgender:token
u1\t25\tF
u2\t\tM
u4\t30\tF
"""
ITEM = """item_id:token\ttitle:token\tgenre:token_seq\tkeywords:token
Alpha\tA\tComedy  Drama\tfunny sad
Beta\tB\tDrama\tsad
Gamma\tG\t\t
Delta\tD\tAction\tloud
Omega\tO\tComedy\t
Zeta\tZ\tSci-Fi Children's\tspace
"""
CONFIG = AtomicImportConfig(test_positive_share=0.5, sequence_fields=("keywords",), drop_fields=("title",))


def write_atomic(directory: Path, inter: str = INTER, user: str | None = USER, item: str | None = ITEM) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for suffix, text in (("inter", inter), ("user", user), ("item", item)):
        if text is not None:
            (directory / f"tiny.{suffix}").write_text(text)
    return directory


def test_ids_split_features_and_a_spec_the_pipeline_reads(tmp_path: Path):
    metrics = import_atomic(write_atomic(tmp_path / "atomic"), tmp_path / "out", CONFIG)
    out = tmp_path / "out"
    assert metrics["users"] == 4 and metrics["items"] == 6 and metrics["interactions"] == 9  # u4: only in .user
    # ids follow the tokens' sorted order, from 1
    users = pd.read_csv(out / "user_ids.csv")
    assert users.to_dict("list") == {"token": ["u1", "u2", "u3", "u4"], "user_id": [1, 2, 3, 4]}
    items = dict(pd.read_csv(out / "item_ids.csv").itertuples(index=False))
    assert items == {"Alpha": 1, "Beta": 2, "Delta": 3, "Gamma": 4, "Omega": 5, "Zeta": 6}

    train, test = pd.read_csv(out / "train.csv"), pd.read_csv(out / "test.csv")
    # u2's positives in (time, item id) order: Zeta, Alpha, Delta (300, id 3), Gamma (300, id 4); half are test,
    # so every row from Delta on is test, Omega's low rating included; u1 and u3 have one positive: all train.
    assert sorted(zip(test["user_id"], test["item_id"], test["click"], strict=True)) == [(2, 3, 1), (2, 4, 1),
                                                                                        (2, 5, 0)]  # fmt: skip
    assert sorted(zip(train["user_id"], train["item_id"], strict=True)) == [(1, 1), (1, 2), (2, 1), (2, 2), (2, 6),
                                                                          (3, 1)]  # fmt: skip
    assert train.set_index(["user_id", "item_id"])["click"].to_dict()[(1, 1)] == 0  # rating 1 < 4: a negative
    assert train.loc[train["user_id"] == 1, "timestamp"].max() == 60  # seconds, rounded down

    rows = pd.concat([train, test]).set_index(["user_id", "item_id"])
    assert np.isnan(rows.loc[(2, 6), "age"]) and rows.loc[(2, 6), "gender"] == "M"  # an empty field is missing
    assert rows.loc[(3, 1)][["age", "gender"]].isna().all()  # a user without a .user row
    assert rows.loc[(1, 1), "genre"] == "Comedy|Drama" and rows.loc[(2, 6), "genre"] == "Sci-Fi|Children's"
    assert rows.loc[(1, 1), "keywords"] == "funny|sad"  # a token field read as a sequence
    assert pd.isna(rows.loc[(2, 4), "genre"])  # an empty sequence is missing
    assert "title" not in rows.columns

    spec = load_spec(out / "spec.yaml")
    assert (spec.user_features, spec.item_features, spec.targets) == (("age", "gender"), ("genre", "keywords"),
                                                                      ("click",))  # fmt: skip
    assert spec.columns["age"] == "float64" and spec.columns["genre"] == "string" and spec.name == "tiny"
    # A float field is a continuous feature; a sequence is multi-valued, as wide as its longest row.
    assert spec.continuous == ("age",)
    assert {name: (kind.separator, kind.max_tokens) for name, kind in spec.multi_valued.items()} == {
        "genre": ("|", 2), "keywords": ("|", 2)}  # fmt: skip
    parquet = csv_to_parquet(out, tmp_path / "parquet", spec)  # the pipeline's first step takes it as it is
    assert parquet["rows_out"] == 9


def test_every_test_row_comes_after_every_train_row_of_its_user():
    generator = np.random.default_rng(3)
    frame = pd.DataFrame({"user": generator.integers(0, 50, 3000), "item": generator.integers(0, 200, 3000),
                          "time": generator.integers(0, 500, 3000), "click": generator.integers(0, 2, 3000)})
    is_test = temporal_split(frame, user="user", item="item", timestamp="time", positive="click",
                             test_positive_share=0.2)  # fmt: skip
    for _, rows in frame.assign(test=is_test).groupby("user"):
        keys = list(zip(rows["time"], rows["item"], strict=True))
        train_keys = [key for key, test in zip(keys, rows["test"], strict=True) if not test]
        test_keys = [key for key, test in zip(keys, rows["test"], strict=True) if test]
        positives = int(rows["click"].sum())
        expected = max(1, int(np.floor(0.2 * positives + 0.5))) if positives >= 2 else 0
        # test starts at a positive, and holds the expected number of them (more only on an exact tie)
        assert int(rows.loc[rows["test"], "click"].sum()) >= expected
        if test_keys:
            assert max(train_keys, default=(-1, -1)) <= min(test_keys)
            assert rows.loc[rows["test"]].sort_values(["time", "item"])["click"].iloc[0] == 1


@pytest.mark.parametrize(
    ("inter", "message"),
    [
        (INTER.replace("rating:float", "rating"), "tiny.inter line 1 column 3: 'rating' is not field:type"),
        (INTER.replace("u2\tBeta\t2\t250", "u2\tBeta\ttwo\t250"),
         "tiny.inter line 4 field rating: 'two' is not a number"),
        (INTER.replace("u1\tAlpha\t1\t50", "u1\tAlpha\t1\t50\textra"),
         "tiny.inter: .*Expected 4 fields in line 8, saw 5"),
        (INTER.replace("u3\tAlpha\t5\t10", "u3\tAlpha\t5\t"), "tiny.inter line 10 field timestamp: empty"),
        (INTER.replace("item_id:token", "movie:token"), "tiny.inter line 1: no item_id field 'item_id'"),
    ],
)
def test_bad_input_names_the_file_line_and_field(tmp_path: Path, inter: str, message: str):
    with pytest.raises(InputDataError, match=message.replace("(", r"\(")):
        import_atomic(write_atomic(tmp_path / "atomic", inter=inter), tmp_path / "out", CONFIG)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_the_cli_step_without_user_and_item_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    without_rating = ["\t".join(line.split("\t")[:2] + line.split("\t")[3:]) for line in INTER.splitlines()]
    atomic = write_atomic(tmp_path / "atomic", inter="\n".join(without_rating) + "\n", user=None, item=None)
    assert main(["import-atomic", str(atomic), "--out", str(tmp_path / "out"), "--test-positive-share", "0.5"]) == 0
    assert '"interactions": 9' in capsys.readouterr().out
    rows = pd.concat([pd.read_csv(tmp_path / "out" / name) for name in ("train.csv", "test.csv")])
    assert (rows["click"] == 1).all()  # no rating field: every interaction is a positive
    assert list(rows.columns) == ["user_id", "item_id", "timestamp", "click"]
    assert main(["import-atomic", str(tmp_path), "--out", str(tmp_path / "again")]) == 2  # no .inter file there

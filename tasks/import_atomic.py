"""Import a dataset in RecBole's atomic-file format into the pipeline's CSV layout and a dataset spec for it.

RecBole's atomic files (`<name>.inter`, optional `<name>.user` and `<name>.item`) are tab-separated with a
`field:type` header, type one of `token`, `token_seq`, `float`, `float_seq`; dozens of public datasets are
published this way (https://recbole.io/atomic_files.html). This step writes what `csv_to_parquet` reads:

- `train.csv` and `test.csv`: one row per interaction, user and item features joined, integer ids, `click`;
- `spec.yaml`: the dataset spec of those files (user and item fields as features, `click` the target);
- `user_ids.csv`, `item_ids.csv`: the raw token of each integer id (ids follow the tokens' sorted order,
  from 1, so the mapping does not depend on the files' row order).

Positives: a rating at or above `positive_threshold` is a click (1), lower ratings are logged negatives (0);
without a rating field every interaction is a positive. The split is temporal per user: the last
`test_positive_share` of a user's positives by time (ties broken by item id) are the test positives, and every
interaction at or after the first of them, in (time, item id) order, is test; the rest is train
(`temporal_split`, which a benchmark also uses to carve a validation split from train by the same rule).

Feature kinds follow the field types: a `token` field is a category; a `float` field a continuous feature
(`continuous` in the spec: NVTabular fills and normalizes it); a sequence field (`token_seq`, or one named in
`sequence_fields`) a multi-valued feature (`multi_valued`), written as its tokens joined by `|` (ML-1M's genres
"Comedy|Romance") and kept to the most tokens a row has, at most `MAX_TOKENS`. A `float_seq` field is
multi-valued too: its numbers become tokens. Empty fields are missing values.
"""

from __future__ import annotations

import csv
import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from recsys.errors import InputDataError
from recsys.outputs import atomic_output_dir
from recsys.spec import EVERY_INTERACTION, load_spec

ATOMIC_TYPES = ("token", "token_seq", "float", "float_seq")
SEQUENCE_JOIN = "|"
CLICK = "click"
MAX_TOKENS = 16  # a multi-valued feature's width cap: the models see each row's first tokens, padded to the width


@dataclasses.dataclass(frozen=True)
class AtomicImportConfig:
    # The interaction fields that carry the rating and the time; no rating field: every interaction is positive.
    rating_field: str = "rating"
    timestamp_field: str = "timestamp"
    positive_threshold: float = 4.0
    test_positive_share: float = 0.2
    # Fields declared `token` that hold a sequence all the same (ML-1M's `genre:token` "Action Comedy").
    sequence_fields: tuple[str, ...] = ()
    # RecBole's default separator of sequence fields.
    sequence_separator: str = " "
    # Fields of the user and item files left out (e.g. a title that only repeats the item id).
    drop_fields: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0 < self.test_positive_share < 1:
            raise ValueError(f"test_positive_share must be between 0 and 1, not {self.test_positive_share}")
        if not self.sequence_separator:
            raise ValueError("sequence_separator must not be empty")


@dataclasses.dataclass(frozen=True)
class AtomicFile:
    path: Path
    # field name -> atomic type, in the header's order
    fields: dict[str, str]
    frame: pd.DataFrame  # every value a string, "" where empty


def find_atomic_files(directory: Path) -> tuple[str, dict[str, Path]]:
    """The dataset's name and its files by suffix ("inter" always, "user" and "item" when present)."""
    inters = sorted(Path(directory).glob("*.inter"))
    if len(inters) != 1:
        found = ", ".join(path.name for path in inters) or "none"
        raise InputDataError(f"{directory}: expected one <name>.inter file of RecBole's atomic format, found {found}")
    name = inters[0].stem
    files = {suffix: Path(directory) / f"{name}.{suffix}" for suffix in ("inter", "user", "item")}
    return name, {suffix: path for suffix, path in files.items() if path.exists()}


def read_atomic_file(path: Path) -> AtomicFile:
    """One atomic file, header checked; raises InputDataError naming the file, line and column."""
    with path.open(encoding="utf-8", newline="") as handle:
        header = handle.readline().rstrip("\r\n").split("\t")
    fields: dict[str, str] = {}
    for column, entry in enumerate(header, start=1):
        name, _, kind = entry.partition(":")
        if not name or kind not in ATOMIC_TYPES:
            raise InputDataError(f"{path} line 1 column {column}: '{entry}' is not field:type with type one of "
                                 f"{', '.join(ATOMIC_TYPES)}")  # fmt: skip
        if name in fields:
            raise InputDataError(f"{path} line 1 column {column}: field '{name}' appears twice")
        fields[name] = kind
    try:
        frame = pd.read_csv(path, sep="\t", header=0, names=list(fields), dtype=str, keep_default_na=False,
                            quoting=csv.QUOTE_NONE, encoding="utf-8")  # fmt: skip
    except pd.errors.ParserError as error:  # "Expected 4 fields in line 12, saw 5"
        raise InputDataError(f"{path}: {error}") from error
    except UnicodeDecodeError as error:
        raise InputDataError(f"{path}: not UTF-8 text (byte {error.start})") from error
    return AtomicFile(path, fields, frame)


def _numbers(file: AtomicFile, field: str) -> pd.Series:
    """A float field as float64, empty values missing; a value that is not a number fails with its line."""
    text = file.frame[field].str.strip()
    numbers = pd.to_numeric(text.where(text != ""), errors="coerce")
    bad = numbers.isna() & (text != "")
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise InputDataError(f"{file.path} line {row + 2} field {field}: '{text.iloc[row]}' is not a number")
    return numbers.astype("float64")


def _feature_column(file: AtomicFile, field: str, config: AtomicImportConfig) -> tuple[pd.Series, str, int | None]:
    """A user or item field as the CSV column and spec type it becomes, and its most tokens in a row when it is a
    sequence (else None)."""
    kind = file.fields[field]
    if kind == "float":
        return _numbers(file, field), "float64", None
    values = file.frame[field]
    if kind.endswith("_seq") or field in config.sequence_fields:
        tokens = values.str.split(re.escape(config.sequence_separator), regex=True)
        tokens = tokens.map(lambda parts: [part for part in parts if part])
        joined = tokens.map(SEQUENCE_JOIN.join)
        return joined.where(joined != "", None), "string", max(1, int(tokens.map(len).max()) if len(tokens) else 1)
    return values.where(values != "", None), "string", None


def integer_ids(tokens: Sequence[pd.Series]) -> pd.Series:
    """Every distinct token, in sorted order, mapped to 1, 2, ...: independent of the files' row order."""
    distinct = sorted(set().union(*(set(series[series != ""]) for series in tokens)))
    return pd.Series(np.arange(1, len(distinct) + 1, dtype="int64"), index=pd.Index(distinct, name="token"))


def temporal_split(frame: pd.DataFrame, *, user: str, item: str, timestamp: str, positive: str,
                   test_positive_share: float) -> np.ndarray:  # fmt: skip
    """True for the rows that go to test: per user, from the first of the last `test_positive_share` of their
    positives in (time, item id) order on. A user with fewer than two positives keeps every row in train."""
    order = np.lexsort((frame[item].to_numpy(), frame[timestamp].to_numpy(), frame[user].to_numpy()))
    ordered = frame.iloc[order]
    users = ordered[user].to_numpy()
    is_positive = ordered[positive].to_numpy() == 1
    rank_in_user = ordered.groupby(user, sort=False).cumcount().to_numpy()
    positives = pd.Series(is_positive).groupby(users).transform("sum").to_numpy()
    # round half up, at least one test positive once a user has two
    test_positives = np.where(positives >= 2, np.maximum(1, np.floor(test_positive_share * positives + 0.5)), 0)
    positive_rank = pd.Series(is_positive).groupby(users).cumsum().to_numpy()  # 1 at the first positive
    first_test = is_positive & (positive_rank == positives - test_positives + 1) & (test_positives > 0)
    never = np.iinfo(np.int64).max
    first_test_rank = pd.Series(np.where(first_test, rank_in_user, never)).groupby(users).transform("min")
    is_test = np.empty(len(frame), dtype=bool)
    is_test[order] = rank_in_user >= first_test_rank.to_numpy()
    return is_test


def _spec_name(name: str) -> str:
    """A dataset name usable as a Feast project and a file name: letters, digits and underscores."""
    cleaned = re.sub(r"[^0-9A-Za-z_]+", "_", name).strip("_").lower()
    return cleaned if cleaned and not cleaned[0].isdigit() else f"d_{cleaned}"


def import_atomic(input_dir: Path, output_dir: Path, config: AtomicImportConfig = AtomicImportConfig()
                  ) -> dict[str, Any]:  # fmt: skip
    """Write `train.csv`, `test.csv`, `spec.yaml` and the id maps into `output_dir` (atomically); return counts."""
    name, paths = find_atomic_files(input_dir)
    inter = read_atomic_file(paths["inter"])
    for role, field in (("user_id", "user_id"), ("item_id", "item_id"), ("timestamp", config.timestamp_field)):
        if field not in inter.fields:
            raise InputDataError(f"{inter.path} line 1: no {role} field '{field}' (fields: {', '.join(inter.fields)})")
    sides = {suffix: read_atomic_file(paths[suffix]) for suffix in ("user", "item") if suffix in paths}
    for suffix, file in sides.items():
        if f"{suffix}_id" not in file.fields:
            raise InputDataError(f"{file.path} line 1: no {suffix}_id field (fields: {', '.join(file.fields)})")

    ids = {}
    for suffix in ("user", "item"):
        tokens = [inter.frame[f"{suffix}_id"]] + ([sides[suffix].frame[f"{suffix}_id"]] if suffix in sides else [])
        ids[suffix] = integer_ids(tokens)
    for suffix in ("user", "item"):
        empty = inter.frame[f"{suffix}_id"] == ""
        if empty.any():
            row = int(np.flatnonzero(empty.to_numpy())[0])
            raise InputDataError(f"{inter.path} line {row + 2} field {suffix}_id: empty")
    timestamps = _numbers(inter, config.timestamp_field)
    if timestamps.isna().any():
        row = int(np.flatnonzero(timestamps.isna().to_numpy())[0])
        raise InputDataError(f"{inter.path} line {row + 2} field {config.timestamp_field}: empty")
    rows = pd.DataFrame({"user_id": ids["user"].loc[inter.frame["user_id"]].to_numpy(),
                         "item_id": ids["item"].loc[inter.frame["item_id"]].to_numpy()})  # fmt: skip
    if config.rating_field in inter.fields:
        ratings = _numbers(inter, config.rating_field)
        rows[CLICK] = (ratings >= config.positive_threshold).astype("int8").to_numpy()
    else:
        rows[CLICK] = np.ones(len(rows), dtype="int8")

    columns: dict[str, str] = {"user_id": "int64", "item_id": "int64"}
    features: dict[str, list[str]] = {"user": [], "item": []}
    continuous: list[str] = []
    multi_valued: dict[str, dict[str, Any]] = {}
    for suffix, file in sides.items():
        table = pd.DataFrame({f"{suffix}_id": ids[suffix].loc[file.frame[f"{suffix}_id"]].to_numpy()})
        for field in file.fields:
            if field == f"{suffix}_id" or field in config.drop_fields:
                continue
            if field in columns or field in (config.timestamp_field, CLICK):
                raise InputDataError(f"{file.path} line 1: field '{field}' is also a field of another file")
            table[field], columns[field], most_tokens = _feature_column(file, field, config)
            features[suffix].append(field)
            if file.fields[field] == "float":
                continuous.append(field)
            elif most_tokens is not None:
                multi_valued[field] = {"separator": SEQUENCE_JOIN, "max_tokens": min(most_tokens, MAX_TOKENS)}
        table = table.drop_duplicates(f"{suffix}_id", keep="last")  # a repeated id: its last row counts
        rows = rows.merge(table, on=f"{suffix}_id", how="left")
    rows[config.timestamp_field] = np.floor(timestamps.to_numpy()).astype("int64")
    rows = rows[[*columns, config.timestamp_field, CLICK]]
    columns |= {config.timestamp_field: "int64", CLICK: "int8"}

    is_test = temporal_split(rows, user="user_id", item="item_id", timestamp=config.timestamp_field,
                             positive=CLICK, test_positive_share=config.test_positive_share)  # fmt: skip
    spec = {
        "name": _spec_name(name),
        "splits": {"train": "train.csv", "test": "test.csv"},
        "columns": columns,
        "roles": {"user_id": "user_id", "item_id": "item_id", "timestamp": config.timestamp_field,
                  "user_features": features["user"], "item_features": features["item"],
                  "targets": [CLICK]},
        **({"continuous": continuous} if continuous else {}),
        **({"multi_valued": multi_valued} if multi_valued else {}),
        "validation": {"value_ranges": {CLICK: [0, 1]}},
        "exclude_seen": EVERY_INTERACTION,  # a rated item is not recommended to that user again
    }
    ignored = [field for field in inter.fields
               if field not in ("user_id", "item_id", config.timestamp_field, config.rating_field)]  # fmt: skip
    with atomic_output_dir(output_dir) as staging:
        rows[~is_test].to_csv(staging / "train.csv", index=False)
        rows[is_test].to_csv(staging / "test.csv", index=False)
        for suffix in ("user", "item"):
            ids[suffix].rename(f"{suffix}_id").to_csv(staging / f"{suffix}_ids.csv")
        header = (f"# Dataset spec of {name}, written by `recsys import-atomic` from {Path(input_dir).resolve()}\n"
                  f"# (clicks: rating >= {config.positive_threshold:g}; temporal split, the last "
                  f"{config.test_positive_share:g} of each user's positives in test).\n")  # fmt: skip
        (staging / "spec.yaml").write_text(header + yaml.safe_dump(spec, sort_keys=False))
        load_spec(staging / "spec.yaml")  # the spec it writes is one the pipeline accepts
    return {
        "dataset": name,
        "users": len(ids["user"]),
        "items": len(ids["item"]),
        "interactions": len(rows),
        "positives": int(rows[CLICK].sum()),
        "train_rows": int((~is_test).sum()),
        "test_rows": int(is_test.sum()),
        "test_users": int(rows.loc[is_test, "user_id"].nunique()),
        "user_features": features["user"],
        "item_features": features["item"],
        "continuous": continuous,
        "multi_valued": sorted(multi_valued),
        "ignored_interaction_fields": ignored,
        "spec": str(Path(output_dir) / "spec.yaml"),
    }


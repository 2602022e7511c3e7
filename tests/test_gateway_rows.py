"""The gateway's extracted interactions reach training: extract -> csv_to_parquet -> clean_null_rows -> resplit.

The extract is made by the real `extract_interactions` from a migrated SQLite database filled through the
API, next to a small generated CSV data set, as the nightly DAG's landing zone holds them.
"""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from recsys.errors import InputDataError
from recsys.parquet_io import PartitionWriter, count_rows, part_files
from recsys.settings import Settings, get_settings
from recsys.spec import DatasetSpec
from recsys.trainer_env import run_trainer_step
from tasks.clean_null_rows import clean_null_rows, null_feature_counts
from tasks.csv_to_parquet import CsvToParquetConfig, csv_to_parquet
from tasks.extract_interactions import (
    GATEWAY_SPLIT,
    arrow_schema,
    extract_interactions,
    extracted_features,
    partition_path,
)
from tasks.resplit import gateway_row_ranges, resplit
from tasks.validate import DataValidationError, validate
from tests.api_keys import authorized
from tests.redis_databases import redis_url

DAYS = (date(2024, 5, 1), date(2024, 5, 2))
FULL_PROFILE = 900001  # all 12 user features
NO_PROFILE = 900002  # none: its rows miss 12 extracted features and are dropped
PARTIAL_PROFILE = 900003  # 8 of 12: kept with a product that has shop and brand, dropped with one that has neither


def _post(client: TestClient, path: str, body: dict) -> None:
    response = client.post(path, json=body)
    assert response.status_code == 201, response.text


def _fill_gateway(client: TestClient, spec: DatasetSpec) -> None:
    profile = {name: index + 1 for index, name in enumerate(spec.user_features)}
    for body in (
        {"id": FULL_PROFILE, "location": "DE", "device": "mobile", "attributes": profile},
        {"id": NO_PROFILE, "location": "FR", "device": "app"},
        {"id": PARTIAL_PROFILE, "location": "IT", "device": "desktop",
         "attributes": dict(list(profile.items())[:8])},
    ):  # fmt: skip
        _post(client, "/customers", body)
    for body in ({"id": 800001, "attributes": {"item_category": 7, "item_shop": 70, "item_brand": 700,
                                               "item_intention": 1}},
                 {"id": 800002, "attributes": {"item_category": 8, "item_shop": 80, "item_brand": 800,
                                               "item_intention": 2}},
                 {"id": 800003, "attributes": {"item_category": 9}}):  # fmt: skip
        _post(client, "/products", body)
    events = [
        # May 1st: (customer, product, session, types) -> one row each
        (FULL_PROFILE, 800001, "s-a", ("view", "click", "purchase"), "2024-05-01T08:00:00Z"),  # kept, click+conv
        (FULL_PROFILE, 800002, "s-a", ("view",), "2024-05-01T08:05:00Z"),  # kept, a shown, unclicked item
        (NO_PROFILE, 800001, "s-b", ("add_to_cart",), "2024-05-01T09:00:00Z"),  # dropped: 12 null features
        (PARTIAL_PROFILE, 800002, "s-c", ("view", "click"), "2024-05-01T10:00:00Z"),  # kept: 4 null
        # May 2nd
        (PARTIAL_PROFILE, 800003, "s-d", ("purchase",), "2024-05-02T11:00:00Z"),  # dropped: 7 null
        (FULL_PROFILE, 800003, "s-e", ("view",), "2024-05-02T12:00:00Z"),  # kept: 3 null (shop, brand, intention)
    ]
    for customer, product, session, types, timestamp in events:
        for kind in types:
            _post(client, "/interactions", {"type": kind, "customer_id": customer, "product_id": product,
                                            "session_id": session, "timestamp": timestamp})  # fmt: skip


KEPT = {(FULL_PROFILE, 800001, 1, 1), (FULL_PROFILE, 800002, 0, 0), (PARTIAL_PROFILE, 800002, 1, 0),
        (FULL_PROFILE, 800003, 0, 0)}  # fmt: skip


@pytest.fixture(scope="module")
def landing(tmp_path_factory: pytest.TempPathFactory, small_raw: Path, spec: DatasetSpec) -> tuple[Path, list[dict]]:
    """A landing zone: the generated CSV files plus two days extracted from the gateway; and the extract metrics."""
    from serving.api.main import create_app
    from serving.api.migrate import upgrade

    base = tmp_path_factory.mktemp("gateway")
    landing = base / "landing"
    landing.mkdir()
    for name in ("train.csv", "test.csv"):
        shutil.copy(small_raw / name, landing / name)
    database_url = f"sqlite:///{base / 'gateway.db'}"
    upgrade(database_url)
    app = create_app(Settings(database_url=database_url, redis_url=redis_url("api")))
    with authorized(TestClient(app), database_url) as client:
        _fill_gateway(client, spec)
    return landing, [extract_interactions(database_url, landing, day, spec=spec) for day in DAYS]


@pytest.fixture(scope="module")
def stages(landing: tuple[Path, list[dict]], small_raw: Path, tmp_path_factory: pytest.TempPathFactory,
           spec: DatasetSpec) -> dict[str, dict[str, Any]]:  # fmt: skip
    """The data stage with the extracts (`with`) and on the CSV files alone (`without`): its folder, step metrics."""
    base = tmp_path_factory.mktemp("stages")
    runs: dict[str, dict[str, Any]] = {}
    for name, input_dir in (("with", landing[0]), ("without", small_raw)):
        out = base / name
        runs[name] = {
            "out": out,
            "parquet": csv_to_parquet(input_dir, out / "parquet", spec),
            "clean": clean_null_rows(out / "parquet", out / "clean", spec),
            "resplit": resplit(out / "clean", out / "resplit", spec),
        }
    return runs


def _train_rows(resplit_dir: Path, gateway: bool) -> pa.Table:
    """The train rows that came from the gateway (or the others), by the ranges in resplit's metrics."""
    ranges = gateway_row_ranges(resplit_dir)
    pieces = []
    for path in part_files(resplit_dir / "train"):
        table = pq.read_table(path)
        keep = [False] * table.num_rows
        for start, stop in ranges.get(path.name, []):
            keep[start:stop] = [True] * (stop - start)
        pieces.append(table.filter(pa.array(keep) if gateway else pc.invert(pa.array(keep))))
    return pa.concat_tables(pieces)


def _targets_and_ids(table: pa.Table) -> set[tuple[int, int, int, int]]:
    return {(row["user_id"], row["item_id"], row["click"], row["conversion"]) for row in table.to_pylist()}


def test_gateway_rows_reach_train_with_their_ids_and_targets(landing, stages, spec: DatasetSpec):
    _, extracts = landing
    run = stages["with"]
    out = run["out"]
    assert [metrics["rows"] for metrics in extracts] == [4, 2]

    # csv_to_parquet: a gateway split of every extracted row, in the CSV splits' schema, and the days read.
    parquet = run["parquet"]
    assert parquet["rows_out_by_split"] == {"train": 5_000, "test": 5_000, GATEWAY_SPLIT: 6}
    assert parquet["rows_in"] == parquet["rows_out"] == 10_006
    assert parquet["gateway_days"] == ["2024-05-01", "2024-05-02"]
    assert [file["file"] for file in parquet["files"] if file["split"] == GATEWAY_SPLIT] == [
        "day=2024-05-01/part-00000.parquet", "day=2024-05-02/part-00000.parquet",
    ]  # fmt: skip
    gateway = pq.read_table(out / "parquet" / GATEWAY_SPLIT)
    assert gateway.schema == pq.read_schema(part_files(out / "parquet" / "train")[0])
    # The crosses and the position are null in every gateway row: counted over every feature, as for the CSV rows,
    # even a row with every attribute sent would be at the threshold, and one more missing would drop it.
    never_known = len(spec.user_item_features) + 1
    assert pc.min(null_feature_counts(gateway.to_batches()[0], spec.features)).as_py() >= never_known == 5

    # clean_null_rows: the same threshold over the features an extract fills; the counts are in its metrics.
    clean = run["clean"]
    assert clean["rows_before"] == {"train": 5_000, "test": 5_000, GATEWAY_SPLIT: 6}
    assert clean["rows_after"][GATEWAY_SPLIT] == 4
    assert clean["rows_after"][GATEWAY_SPLIT] == 6 - sum(metrics["rows_over_5_null_features"] for metrics in extracts)
    assert clean["gateway_features"] == list(extracted_features(spec))
    assert {"user_item_categories", "position"}.isdisjoint(clean["gateway_features"])
    assert "item_intention" in clean["gateway_features"]  # a product attribute
    assert clean["rows_after"]["train"] == stages["without"]["clean"]["rows_after"]["train"]  # others unchanged

    # resplit: every remaining gateway row in train, none in valid; Table 5.2 has their line.
    result = run["resplit"]
    assert result["gateway_rows_added_to_train"] == 4
    without = stages["without"]["resplit"]["rows"]
    assert result["rows"] == {"train": without["train"] + 4, "valid": without["valid"]}
    assert count_rows(out / "resplit" / "train") == result["rows"]["train"]
    # In train's own file (NVTabular cannot encode a file whose crosses are all null), after train's rows.
    train_rows = clean["rows_after"]["train"]
    assert result["gateway_rows_in_train"] == {"part-00000.parquet": [[train_rows, train_rows + 4]]}
    assert _targets_and_ids(_train_rows(out / "resplit", gateway=True)) == KEPT
    valid = pq.read_table(out / "resplit" / "valid")
    assert not set(valid.column("user_id").to_pylist()) & {FULL_PROFILE, NO_PROFILE, PARTIAL_PROFILE}
    assert "| Train | 5,000 |" in result["table"]
    assert "| Gateway interactions (into Train) | 6 | 4 | 4 |" in result["table"]


def test_without_an_extract_folder_the_output_is_as_before(stages, spec: DatasetSpec):
    without, with_gateway = stages["without"], stages["with"]
    assert without["parquet"]["rows_out_by_split"] == {"train": 5_000, "test": 5_000}
    assert "gateway_days" not in without["parquet"]
    assert set(without["clean"]["rows_before"]) == {"train", "test"} and "gateway_features" not in without["clean"]
    assert "gateway_rows_added_to_train" not in without["resplit"]
    assert "Gateway" not in without["resplit"]["table"]
    assert "gateway_rows_in_train" not in without["resplit"]
    plain, extended = without["out"], with_gateway["out"]
    assert not (plain / "parquet" / GATEWAY_SPLIT).exists() and not (plain / "clean" / GATEWAY_SPLIT).exists()
    # The extracts only add rows of their own: the CSV rows, in their order, and the validation split are the same.
    for name in ("parquet/train", "parquet/test", "clean/train", "clean/test", "resplit/valid"):
        assert pq.read_table(extended / name).equals(pq.read_table(plain / name)), name
    assert _train_rows(extended / "resplit", gateway=False).equals(pq.read_table(plain / "resplit" / "train"))


def test_validation_holds_gateway_rows_to_the_features_an_extract_fills(stages, tmp_path: Path, spec: DatasetSpec):
    resplit_dir = stages["with"]["out"] / "resplit"
    validate(resplit_dir, tmp_path / "validate", spec)  # crosses and position all null in the gateway rows: fine
    files = json.loads((tmp_path / "validate" / "results.json").read_text())["files"]
    train = [file for file in files if file["split"] == "train"]
    assert [(file["file"], file["gateway_rows"]) for file in train] == [("part-00000.parquet", 4)]
    assert train[0]["gateway_statistics"]["evaluated_expectations"] > 0 and train[0]["statistics"]["success_percent"]


def test_gateway_rows_are_sampled_like_the_others_and_deterministically(landing, tmp_path: Path, spec):
    config = CsvToParquetConfig(sample_fraction=0.5)
    first = csv_to_parquet(landing[0], tmp_path / "a", spec, config)
    csv_to_parquet(landing[0], tmp_path / "b", spec, config)
    assert first["rows_out_by_split"][GATEWAY_SPLIT] < 6
    assert pq.read_table(tmp_path / "a" / GATEWAY_SPLIT).equals(pq.read_table(tmp_path / "b" / GATEWAY_SPLIT))


def _landing_with_extract(small_raw: Path, target: Path, table: pa.Table) -> Path:
    target.mkdir()
    for name in ("train.csv", "test.csv"):
        (target / name).symlink_to(small_raw / name)
    path = partition_path(target, DAYS[0])
    path.parent.mkdir(parents=True)
    pq.write_table(table, path)
    return path


def _one_row(spec: DatasetSpec) -> pa.Table:
    row = {name: None for name in spec.columns} | {"user_id": 1, "item_id": 2, "event_timestamp": 3, "click": 1,
                                                   "conversion": 0, "location": "DE"}  # fmt: skip
    return pa.Table.from_pylist([row], schema=arrow_schema(spec))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda table: table.drop_columns(["device"]), r"day=2024-05-01/part-00000.parquet: column device is missing"),
        (lambda table: table.set_column(0, "user_id", pa.array(["1"])),
         r"part-00000.parquet: column user_id is string, which does not cast safely to int64"),
        (lambda table: table.set_column(table.schema.get_field_index("item_category"), "item_category",
                                        pa.array([7], pa.int64())),
         r"part-00000.parquet: column item_category is int64, which does not cast safely to int32"),
        (lambda table: table.set_column(table.schema.get_field_index("click"), "click", pa.array([1.0])),
         r"column click is double, which does not cast safely to int8"),
    ],
)  # fmt: skip
def test_a_bad_extract_fails_naming_the_file_and_the_column(small_raw: Path, tmp_path: Path, spec, change, message):
    _landing_with_extract(small_raw, tmp_path / "landing", change(_one_row(spec)))
    with pytest.raises(InputDataError, match=message):
        csv_to_parquet(tmp_path / "landing", tmp_path / "parquet", spec)
    assert not (tmp_path / "parquet").exists()


def test_an_extract_with_narrower_types_and_extra_columns_is_cast_to_the_spec(small_raw: Path, tmp_path: Path,
                                                                               spec):  # fmt: skip
    table = _one_row(spec)
    table = table.set_column(table.schema.get_field_index("item_category"), "item_category",
                             pa.array([7], pa.int16()))  # widens to int32 without loss: accepted
    table = table.set_column(table.schema.get_field_index("location"), "location",
                             pa.array(["DE"]).dictionary_encode())  # fmt: skip
    table = table.append_column("note", pa.array(["not in the spec"]))
    _landing_with_extract(small_raw, tmp_path / "landing", table)
    metrics = csv_to_parquet(tmp_path / "landing", tmp_path / "parquet", spec)
    gateway = pq.read_table(tmp_path / "parquet" / GATEWAY_SPLIT)
    assert gateway.schema == arrow_schema(spec)
    assert gateway.to_pylist()[0]["item_category"] == 7 and gateway.to_pylist()[0]["location"] == "DE"
    assert metrics["rows_out_by_split"][GATEWAY_SPLIT] == 1


def test_an_empty_interactions_folder_gives_an_empty_gateway_split_and_no_train_file(small_raw: Path, tmp_path: Path,
                                                                                      spec):  # fmt: skip
    landing = tmp_path / "landing"
    (landing / "interactions").mkdir(parents=True)
    for name in ("train.csv", "test.csv"):
        (landing / name).symlink_to(small_raw / name)
    metrics = csv_to_parquet(landing, tmp_path / "parquet", spec)
    assert metrics["rows_out_by_split"][GATEWAY_SPLIT] == 0 and metrics["gateway_days"] == []
    clean_null_rows(tmp_path / "parquet", tmp_path / "clean", spec)
    metrics = resplit(tmp_path / "clean", tmp_path / "resplit", spec)
    assert metrics["gateway_rows_added_to_train"] == 0 and metrics["gateway_rows_in_train"] == {}


def _clean_output(directory: Path, spec: DatasetSpec, gateway_rows: int, **gateway_values: object) -> Path:
    """A clean_null_rows output: 50 train and 10 test rows, every feature filled, and gateway rows without
    crosses and position (as an extract writes them), `gateway_values` set in each."""
    schema = arrow_schema(spec)
    filled = {name: 1 for name in spec.columns} | {"location": "DE", "device": "app"}
    unknown = dict.fromkeys(set(spec.features) - set(extracted_features(spec)))
    rows = {
        "train": [filled | {"user_id": index} for index in range(50)],
        "test": [filled | {"user_id": 100 + index} for index in range(10)],
        GATEWAY_SPLIT: [filled | unknown | gateway_values | {"user_id": 1_000 + row} for row in range(gateway_rows)],
    }
    for split, values in rows.items():
        with PartitionWriter(directory / split, schema) as writer:
            writer.write(pa.Table.from_pylist(values, schema=schema))
    return directory


def test_many_gateway_rows_are_spread_so_that_every_train_file_holds_train_rows(tmp_path: Path, spec, monkeypatch):
    _clean_output(tmp_path / "clean", spec, 1_000)
    monkeypatch.setattr("tasks.resplit.PartitionWriter", functools.partial(PartitionWriter, rows_per_file=100))

    metrics = resplit(tmp_path / "clean", tmp_path / "resplit", spec, fraction=0.5)

    assert metrics["gateway_rows_added_to_train"] == 1_000
    gateway = _train_rows(tmp_path / "resplit", gateway=True)
    assert gateway.column("user_id").to_pylist() == list(range(1_000, 2_000))  # all of them, in order
    assert gateway.column("position").null_count == 1_000
    others = _train_rows(tmp_path / "resplit", gateway=False).column("user_id").to_pylist()
    assert others[:50] == list(range(50)) and set(others[50:]) <= set(range(100, 110))
    files = part_files(tmp_path / "resplit" / "train")
    assert len(files) == 11
    for path in files:  # NVTabular encodes a file at a time: each one has positions that are not null
        assert pq.read_table(path).column("position").null_count < pq.read_metadata(path).num_rows, path.name


@pytest.fixture
def trainer_python() -> Iterator[Path]:
    python = Path(get_settings().trainer_python)
    if not python.exists():
        pytest.skip(f"no trainer environment at {python}")
    yield python


def test_nvtabular_fits_and_transforms_a_train_split_with_gateway_rows(stages, trainer_python: Path, tmp_path: Path,
                                                                        spec: DatasetSpec):  # fmt: skip
    resplit_dir = stages["with"]["out"] / "resplit"
    metrics = run_trainer_step(str(trainer_python), "nvtabular-fit-transform",
                               ["--input", str(resplit_dir), "--output", str(tmp_path / "nvtabular")])  # fmt: skip
    assert metrics["train_rows"] == count_rows(resplit_dir / "train")
    users = pq.read_table(tmp_path / "nvtabular" / "user_features.parquet").column(spec.user_id).to_pylist()
    assert {FULL_PROFILE, PARTIAL_PROFILE} <= set(users) and NO_PROFILE not in users


def test_validation_applies_the_gateway_suite_to_exactly_the_gateway_rows(tmp_path: Path, spec: DatasetSpec):
    # 200 gateway rows next to 55 or so others in one file: crosses and position null in 80% of its rows.
    resplit(_clean_output(tmp_path / "clean", spec, 200), tmp_path / "resplit", spec)
    assert validate(tmp_path / "resplit", tmp_path / "validate", spec)["success"]

    # A feature the extract fills, missing in the gateway rows: their batch fails, naming them.
    resplit(_clean_output(tmp_path / "bad", spec, 200, location=None), tmp_path / "bad_resplit", spec)
    with pytest.raises(DataValidationError) as failure:
        validate(tmp_path / "bad_resplit", tmp_path / "bad_validate", spec)
    assert "train/part-00000.parquet (gateway rows): column location: expect_column_values_to_not_be_null" in str(
        failure.value
    )
    assert "user_item" not in str(failure.value) and "position" not in str(failure.value)

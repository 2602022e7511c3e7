"""Step 4 of the data stage: validate the resplit data with a Great Expectations 1.x suite.

The suite is built from the dataset spec (columns and types, non-null ids, label values, null
fractions, value ranges), so a user's own spec gets its own suite; `great_expectations/expectations/`
holds the suite of the default spec as JSON for review. Each Parquet part file is validated as one
batch (bounded memory). GX does not fail anything by itself: a failed validation writes a readable
report and raises `DataValidationError`, so the DAG stops and nothing downstream runs.

Rows from the gateway's extracts (in train, where resplit's metrics say they are, or a `gateway` split)
are validated apart from the others, each part file's gateway rows as one batch, with the same suite
except that null fractions are checked only for the features an extract fills (`extracted_features`):
their user-item crosses and position are null by design. The other rows keep the full suite, so a few
gateway rows can neither fail a file nor hide nulls among its other rows.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.errors import InputDataError
from recsys.outputs import atomic_output_dir
from recsys.parquet_io import part_files
from recsys.spec import DatasetSpec
from tasks.extract_interactions import GATEWAY_SPLIT, extracted_features
from tasks.resplit import gateway_row_ranges

log = logging.getLogger(__name__)

# pandas nullable dtypes keep integer columns with nulls as integers, so type checks mean something.
PANDAS_DTYPES = {
    "int8": "Int8", "int16": "Int16", "int32": "Int32", "int64": "Int64",
    "float32": "Float32", "float64": "Float64", "string": "string",
}  # fmt: skip
# The names GX compares a pandas column's scalar type with (`dtype.type`): numpy's for numbers, str for strings.
GX_TYPE_NAMES = {name: ("str" if name == "string" else name) for name in PANDAS_DTYPES}


class DataValidationError(InputDataError):
    """The data failed its expectation suite; the message is the readable report."""


def suite_name(spec: DatasetSpec) -> str:
    return f"{spec.name}_dataset"


def build_suite(spec: DatasetSpec, *, gateway: bool = False) -> Any:
    """The expectation suite of a dataset spec; with `gateway`, the one for rows of the gateway's extracts."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    suite = gx.ExpectationSuite(name=suite_name(spec) + ("_gateway" if gateway else ""))
    suite.add_expectation(gxe.ExpectTableRowCountToBeBetween(min_value=1))
    suite.add_expectation(gxe.ExpectTableColumnsToMatchSet(column_set=list(spec.columns), exact_match=True))
    for column, type_name in spec.columns.items():
        suite.add_expectation(gxe.ExpectColumnValuesToBeOfType(column=column, type_=GX_TYPE_NAMES[type_name]))
    for column in (spec.user_id, spec.item_id, spec.timestamp, *spec.targets):
        suite.add_expectation(gxe.ExpectColumnValuesToNotBeNull(column=column))
    for target in spec.targets:
        suite.add_expectation(gxe.ExpectColumnValuesToBeInSet(column=target, value_set=[0, 1]))
    for feature in extracted_features(spec) if gateway else spec.features:
        suite.add_expectation(
            gxe.ExpectColumnValuesToNotBeNull(column=feature, mostly=1.0 - spec.validation.max_null_fraction)
        )
    for column, (low, high) in spec.validation.value_ranges.items():
        suite.add_expectation(gxe.ExpectColumnValuesToBeBetween(column=column, min_value=low, max_value=high))
    return suite


def suite_json(spec: DatasetSpec) -> dict:
    """The suite as the JSON GX stores, without the volatile id fields."""
    import great_expectations as gx

    gx.get_context(mode="ephemeral")  # GX serializes only with an active context
    data = build_suite(spec).to_json_dict()
    data.pop("id", None)
    for expectation in data["expectations"]:
        expectation.pop("id", None)
    return data


def _frame(path: Path, spec: DatasetSpec) -> pd.DataFrame:
    table = pq.read_table(path)
    mapping = {pa.type_for_alias(name): pd.StringDtype() if name == "string" else pd.api.types.pandas_dtype(dtype)
               for name, dtype in PANDAS_DTYPES.items()}  # fmt: skip
    return table.to_pandas(types_mapper=mapping.get)


def _describe_failure(result: dict) -> str:
    config = result["expectation_config"]
    kwargs = {key: value for key, value in config["kwargs"].items() if key not in ("batch_id",)}
    column = kwargs.pop("column", None)
    observed = result.get("result", {})
    details = []
    if "observed_value" in observed:
        details.append(f"observed {observed['observed_value']!r}")
    if observed.get("unexpected_count"):
        details.append(f"{observed['unexpected_count']} unexpected ({observed.get('unexpected_percent', 0):.2f}%)")
    if observed.get("partial_unexpected_list"):
        details.append(f"e.g. {observed['partial_unexpected_list'][:5]}")
    if result.get("exception_info", {}).get("raised_exception"):
        details.append(result["exception_info"]["exception_message"])
    where = f"column {column}: " if column else ""
    return f"{where}{config['type']} {kwargs} -> {'; '.join(details) or 'failed'}"


def validate(input_dir: Path, output_dir: Path, spec: DatasetSpec) -> dict:
    """Validate every part file of every split; write `report.md` and `results.json`; raise on failure.

    Gateway rows (see the module doc) are validated as a batch of their own per part file; `results.json`
    gives each file's `gateway_rows` and, when it has any, their `gateway_statistics`.
    """
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")  # suites come from the spec; nothing is written by GX itself
    context.variables.progress_bars = ProgressBarsConfig(globally=False)  # one bar per part file floods task logs
    asset = context.data_sources.add_pandas("recsys").add_dataframe_asset("rows")
    batch_definition = asset.add_batch_definition_whole_dataframe("part_file")
    suite = context.suites.add(build_suite(spec))
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name="data_stage", data=batch_definition, suite=suite)
    )
    gateway_suite = context.suites.add(build_suite(spec, gateway=True))
    gateway_definition = context.validation_definitions.add(
        gx.ValidationDefinition(name="data_stage_gateway", data=batch_definition, suite=gateway_suite)
    )
    files: list[dict] = []
    failures: list[str] = []
    gateway_ranges = gateway_row_ranges(Path(input_dir))
    splits = sorted(path.name for path in Path(input_dir).iterdir() if path.is_dir())
    for split in splits:
        for path in part_files(Path(input_dir) / split):
            frame = _frame(path, spec)
            from_gateway = np.full(len(frame), split == GATEWAY_SPLIT)
            for start, stop in gateway_ranges.get(path.name, []) if split == "train" else []:
                from_gateway[start:stop] = True
            entry: dict = {"split": split, "file": path.name, "rows": len(frame),
                           "gateway_rows": int(from_gateway.sum()), "success": True}  # fmt: skip
            others, gateway_rows = frame[~from_gateway], frame[from_gateway]
            batches = []
            if len(others) or not len(gateway_rows):  # an empty file is checked (and fails) as one of other rows
                batches.append(("statistics", definition, others, ""))
            if len(gateway_rows):
                batches.append(("gateway_statistics", gateway_definition, gateway_rows, " (gateway rows)"))
            for key, checks, rows, label in batches:
                result = checks.run(batch_parameters={"dataframe": rows.reset_index(drop=True)}).to_json_dict()
                failed = [item for item in result["results"] if not item["success"]]
                entry["success"] = entry["success"] and not failed
                entry[key] = result["statistics"]
                failures += [f"{split}/{path.name}{label}: {_describe_failure(item)}" for item in failed]
            files.append(entry)
    success = not failures
    lines = [f"# Data validation of {input_dir} with suite {suite.name}", "",
             f"Result: {'PASSED' if success else 'FAILED'} ({len(files)} part files, "
             f"{sum(file['rows'] for file in files):,} rows, {len(suite.expectations)} expectations)", ""]  # fmt: skip
    lines += [f"- {failure}" for failure in failures]
    report = "\n".join(lines) + "\n"
    with atomic_output_dir(Path(output_dir)) as staging:
        (staging / "report.md").write_text(report)
        (staging / "results.json").write_text(json.dumps({"success": success, "files": files}, indent=2) + "\n")
    if not success:
        raise DataValidationError(report)
    log.info("validate: %d part files passed %d expectations", len(files), len(suite.expectations))
    return {"success": True, "part_files": len(files), "expectations": len(suite.expectations)}

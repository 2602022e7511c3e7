"""`recsys`: every pipeline step as a command, so anyone can run a step without Airflow.

argparse rather than a CLI framework because the same entry point runs in the trainer environment,
whose TensorFlow pin holds typing-extensions below what modern CLI libraries need.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from recsys.errors import InputDataError
from recsys.spec import SpecError, load_spec


def _generate_data(args: argparse.Namespace) -> dict:
    from recsys.datagen import GeneratorConfig, generate_dataset

    config = GeneratorConfig(rows=args.rows, seed=args.seed, users=args.users, items=args.items,
                             chunk_rows=args.chunk_rows)  # fmt: skip
    return generate_dataset(config, args.out, load_spec(args.spec), progress=not args.quiet)


def _csv_to_parquet(args: argparse.Namespace) -> dict:
    from tasks.csv_to_parquet import CsvToParquetConfig, csv_to_parquet

    config = CsvToParquetConfig(max_bad_row_fraction=args.max_bad_row_fraction, sample_fraction=args.sample_fraction)
    return csv_to_parquet(args.input, args.output, load_spec(args.spec), config)


def _clean_null_rows(args: argparse.Namespace) -> dict:
    from tasks.clean_null_rows import clean_null_rows

    return clean_null_rows(args.input, args.output, load_spec(args.spec), args.max_null_features)


def _resplit(args: argparse.Namespace) -> dict:
    from tasks.resplit import resplit

    return resplit(args.input, args.output, load_spec(args.spec), args.fraction, args.seed)


def _validate(args: argparse.Namespace) -> dict:
    from tasks.validate import validate

    return validate(args.input, args.output, load_spec(args.spec))


def _write_expectations(args: argparse.Namespace) -> dict:
    from tasks.validate import suite_json

    spec = load_spec(args.spec)
    path = args.out / f"{spec.name}.json"
    path.write_text(json.dumps(suite_json(spec), indent=2, sort_keys=True) + "\n")
    return {"suite": str(path)}


def _nvtabular_fit_transform(args: argparse.Namespace) -> dict:
    try:
        from tasks.nvtabular_fit_transform import nvtabular_fit_transform
    except ImportError as error:  # NVTabular lives in the trainer environment only
        raise SystemExit(f"{error}: run this command with .venv-trainer/bin/recsys") from error
    return nvtabular_fit_transform(args.input, args.output, load_spec(args.spec))


def _train_ranker(args: argparse.Namespace) -> dict:
    try:
        from tasks.train_ranker import RankerConfig, train_ranker
    except ImportError as error:  # TensorFlow lives in the trainer environment only
        raise SystemExit(f"{error}: run this command with .venv-trainer/bin/recsys") from error
    config = RankerConfig(
        model=args.model, epochs=args.epochs, patience=args.patience, batch_size=args.batch_size,
        embedding_dim=args.embedding_dim, learning_rate=args.learning_rate, seed=args.seed,
    )  # fmt: skip
    return train_ranker(args.input, args.output, load_spec(args.spec), config)


def _train_two_tower(args: argparse.Namespace) -> dict:
    try:
        from tasks.train_two_tower import TwoTowerConfig, train_two_tower
    except ImportError as error:  # TensorFlow lives in the trainer environment only
        raise SystemExit(f"{error}: run this command with .venv-trainer/bin/recsys") from error
    config = TwoTowerConfig(epochs=args.epochs, patience=args.patience, batch_size=args.batch_size,
                            learning_rate=args.learning_rate, seed=args.seed,
                            logq_sampling_correction=args.logq_correction)  # fmt: skip
    return train_two_tower(args.input, args.output, load_spec(args.spec), config)


def _step_parser(subparsers: argparse._SubParsersAction, name: str, handler: Callable, help_text: str
                 ) -> argparse.ArgumentParser:  # fmt: skip
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    parser.set_defaults(handler=handler)
    parser.add_argument("--spec", type=Path, default=None, help="dataset spec YAML (default: specs/aliccp.yaml)")
    parser.add_argument("--metrics-json", type=Path, default=None, help="also write the step's metrics here")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recsys", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    subparsers = parser.add_subparsers(dest="command", required=True)

    generate = _step_parser(subparsers, "generate-data", _generate_data,
                            "write AliCCP-format train/test CSV with planted signal")  # fmt: skip
    generate.add_argument("--rows", type=int, required=True)
    generate.add_argument("--out", type=Path, required=True)
    generate.add_argument("--seed", type=int, default=42)
    generate.add_argument("--users", type=int, default=None)
    generate.add_argument("--items", type=int, default=None)
    generate.add_argument("--chunk-rows", type=int, default=500_000)
    generate.add_argument("--quiet", action="store_true", help="no progress bar")

    steps: list[tuple[str, Callable, str]] = [
        ("csv-to-parquet", _csv_to_parquet, "raw CSV to typed, partitioned Parquet"),
        ("clean-null-rows", _clean_null_rows, "drop rows with too many null features"),
        ("resplit", _resplit, "move a share of test rows into train"),
        ("validate", _validate, "validate with the Great Expectations suite of the spec"),
        ("nvtabular-fit-transform", _nvtabular_fit_transform, "fit and apply the NVTabular workflow (trainer env)"),
        ("train-ranker", _train_ranker, "train the ranking model: DLRM, DCN-v2 or MLP (trainer env)"),
        ("train-two-tower", _train_two_tower, "train the two-tower retrieval model (trainer env)"),
    ]
    for name, handler, help_text in steps:
        step = _step_parser(subparsers, name, handler, help_text)
        step.add_argument("--input", type=Path, required=True)
        step.add_argument("--output", type=Path, required=True)
        if name == "csv-to-parquet":
            step.add_argument("--max-bad-row-fraction", type=float, default=0.001)
            step.add_argument("--sample-fraction", type=float, default=1.0)
        if name == "clean-null-rows":
            step.add_argument("--max-null-features", type=int, default=5)
        if name == "train-ranker":
            step.add_argument("--model", choices=["dlrm", "dcn", "mlp"], default="dlrm")
            step.add_argument("--epochs", type=int, default=8)
            step.add_argument("--patience", type=int, default=2)
            step.add_argument("--batch-size", type=int, default=1024)
            step.add_argument("--embedding-dim", type=int, default=32)
            step.add_argument("--learning-rate", type=float, default=1e-3)
            step.add_argument("--seed", type=int, default=0)
        if name == "train-two-tower":
            step.add_argument("--epochs", type=int, default=5)
            step.add_argument("--patience", type=int, default=2)
            step.add_argument("--batch-size", type=int, default=512)
            step.add_argument("--learning-rate", type=float, default=3e-3)
            step.add_argument("--logq-correction", action=argparse.BooleanOptionalAction, default=True,
                              help="sampling-bias (logQ) correction of in-batch negatives")  # fmt: skip
            step.add_argument("--seed", type=int, default=0)
        if name == "resplit":
            step.add_argument("--fraction", type=float, default=0.6)
            step.add_argument("--seed", type=int, default=0)

    expectations = _step_parser(subparsers, "write-expectations", _write_expectations,
                                "write the spec's expectation suite as JSON")  # fmt: skip
    expectations.add_argument("--out", type=Path, default=Path("great_expectations/expectations"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    try:
        metrics = args.handler(args)
    except (InputDataError, SpecError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.metrics_json:
        args.metrics_json.write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    print(json.dumps(metrics, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
from datetime import UTC, date, datetime
from pathlib import Path

from models.blend import BLEND_METHODS, SOURCES
from models.rankers import COMPARED_RANKERS
from recsys.dask_cluster import scheduler_from_environment
from recsys.datagen import GeneratorConfig
from recsys.errors import InputDataError
from recsys.list_defaults import SIMILAR_N, TOP_K, TOP_N
from recsys.run_layout import runs_dir
from recsys.spec import SpecError, load_spec
from tasks.batch_score import BatchScoreConfig
from tasks.build_faiss_index import FaissIndexConfig
from tasks.clean_null_rows import DEFAULT_MAX_NULL_FEATURES
from tasks.csv_to_parquet import CsvToParquetConfig
from tasks.demo_data import DemoDataConfig
from tasks.evaluate import EvaluationConfig
from tasks.experiment import ExperimentError
from tasks.import_atomic import AtomicImportConfig
from tasks.monitor import AlertThresholds, MonitoringConfig
from tasks.publish_recommendations import DEFAULT_EXPIRE_AFTER_S, DEFAULT_KEEP_VERSIONS
from tasks.quality_gate import DEFAULT_TOLERANCE
from tasks.resplit import DEFAULT_FRACTION
from tasks.train_ranker import RankerConfig
from tasks.train_two_tower import TwoTowerConfig


def _source_weights(text: str) -> tuple[float, ...]:
    """argparse type of --source-weights: one number per source, comma-separated."""
    try:
        weights = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not numbers: {text!r}") from None
    if len(weights) != len(SOURCES):
        raise argparse.ArgumentTypeError(f"needs {len(SOURCES)} weights ({', '.join(SOURCES)}), got {text!r}")
    return weights


def _generate_data(args: argparse.Namespace) -> dict:
    from recsys.datagen import generate_dataset

    config = GeneratorConfig(rows=args.rows, seed=args.seed, users=args.users, items=args.items,
                             chunk_rows=args.chunk_rows, base_logit=args.base_logit)  # fmt: skip
    return generate_dataset(config, args.out, load_spec(args.spec), progress=not args.quiet)


def _csv_to_parquet(args: argparse.Namespace) -> dict:
    from recsys.database import forgotten_customer_ids
    from tasks.csv_to_parquet import CsvToParquetConfig, csv_to_parquet

    config = CsvToParquetConfig(max_bad_row_fraction=args.max_bad_row_fraction, sample_fraction=args.sample_fraction)
    forgotten = forgotten_customer_ids(args.forgotten_from) if args.forgotten_from else []
    return csv_to_parquet(args.input, args.output, load_spec(args.spec), config, forgotten_users=forgotten)


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
    return nvtabular_fit_transform(args.input, args.output, load_spec(args.spec), dask_scheduler=args.dask_scheduler)


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
                            logq_sampling_correction=args.logq_correction, positives=args.positives,
                            tower_layers=args.tower_layers, l2_normalize=args.l2_normalize,
                            logits_temperature=args.temperature)  # fmt: skip
    return train_two_tower(args.input, args.output, load_spec(args.spec), config)


def _build_faiss_index(args: argparse.Namespace) -> dict:
    from models.item_to_item import ItemToItemConfig
    from tasks.build_faiss_index import FaissIndexConfig, build_faiss_index, user_queries

    config = FaissIndexConfig(exact_max_items=args.exact_max_items, nprobe=args.nprobe)
    queries = None
    if args.nvtabular:
        queries = user_queries(args.nvtabular, args.input, load_spec(args.spec), config.recall_queries)
    item_to_item = ItemToItemConfig(regularization=args.item_to_item_regularization,
                                    recency=args.item_to_item_recency)  # fmt: skip
    return build_faiss_index(args.input, args.output, config, queries=queries, nvtabular_dir=args.nvtabular,
                             spec=load_spec(args.spec), item_to_item=item_to_item)  # fmt: skip


def _batch_score(args: argparse.Namespace) -> dict:
    from tasks.batch_score import batch_score

    config = BatchScoreConfig(top_k=args.top_k, top_n=args.top_n, similar_n=args.similar_n,
                              unavailable_items=args.unavailable_items, retrieval_weight=args.retrieval_weight,
                              item_to_item_weight=args.item_to_item_weight, source_weights=args.source_weights,
                              blend=args.blend, users_per_batch=args.users_per_batch)  # fmt: skip
    versions = json.loads(args.model_versions) if args.model_versions else None
    return batch_score(args.input, args.output, load_spec(args.spec), config, model_versions=versions,
                       dask_scheduler=args.dask_scheduler)  # fmt: skip


def _demo_data(args: argparse.Namespace) -> dict:
    from tasks.demo_data import DemoDataConfig, demo_data

    config = DemoDataConfig(top_k=args.top_k, max_users=args.max_users)
    return demo_data(args.input, args.output, load_spec(args.spec), config)


def _evaluate(args: argparse.Namespace) -> dict:
    from tasks.evaluate import EvaluationConfig, evaluate, log_evaluation

    config = EvaluationConfig(final_k=args.k, knn_neighbours=args.knn_neighbours, seed=args.seed)
    metrics = evaluate(args.input, args.output, load_spec(args.spec), config, raw_input_dir=args.raw_input,
                       batch_score_dir=args.batch_score)  # fmt: skip
    if args.mlflow_run_id:
        from recsys.settings import get_settings

        log_evaluation(metrics, tracking_uri=get_settings().mlflow_tracking_uri, run_id=args.mlflow_run_id,
                       report_dir=args.output)  # fmt: skip
    return metrics


def _export_triton_ensemble(args: argparse.Namespace) -> dict:
    from tasks.export_triton_ensemble import TritonEnsembleConfig, export_triton_ensemble, log_triton_repository

    config = TritonEnsembleConfig(top_k=args.top_k, top_n=args.top_n, similar_n=args.similar_n,
                                  temperature=args.temperature, unavailable_items=args.unavailable_items,
                                  retrieval_weight=args.retrieval_weight,
                                  item_to_item_weight=args.item_to_item_weight,
                                  source_weights=args.source_weights, instances=args.instances)  # fmt: skip
    versions = json.loads(args.model_versions) if args.model_versions else None
    metrics = export_triton_ensemble(args.input, args.output, load_spec(args.spec), config, model_versions=versions,
                                     batch_score_dir=args.batch_score)  # fmt: skip
    if args.mlflow_run_id:
        from recsys.settings import get_settings

        metrics["mlflow"] = log_triton_repository(args.output, tracking_uri=get_settings().mlflow_tracking_uri,
                                                  run_id=args.mlflow_run_id)  # fmt: skip
    return metrics


def _feast_apply(args: argparse.Namespace) -> dict:
    from tasks.feast_features import feast_apply

    return feast_apply(args.input, load_spec(args.spec))


def _feast_materialize(args: argparse.Namespace) -> dict:
    from tasks.feast_features import feast_materialize

    return feast_materialize(args.input, load_spec(args.spec), check_sample=args.check_sample)


def _publish_recommendations(args: argparse.Namespace) -> dict:
    from recsys.settings import get_settings
    from tasks.publish_recommendations import publish_recommendations

    settings = get_settings()
    return publish_recommendations(
        args.input, redis_url=args.redis_url or settings.redis_url, version=args.version,
        key_prefix=args.key_prefix or settings.redis_key_prefix, keep_versions=args.keep_versions,
        expire_after_s=args.expire_after_s, progress=not args.quiet, switch=not args.stage,
        redis_type=settings.redis_type,
    )  # fmt: skip


def _rollback_recommendations(args: argparse.Namespace) -> dict:
    from recsys.settings import get_settings
    from tasks.publish_recommendations import rollback

    settings = get_settings()
    return rollback(args.redis_url or settings.redis_url, args.key_prefix or settings.redis_key_prefix,
                    settings.redis_type)  # fmt: skip


def _experiment(args: argparse.Namespace) -> dict:
    import dataclasses

    from recsys.settings import get_settings
    from tasks.experiment import (
        experiment_totals,
        promote_challenger,
        running_experiment,
        start_experiment,
        stop_experiment,
    )

    settings = get_settings()
    redis = {"redis_url": args.redis_url or settings.redis_url, "redis_type": settings.redis_type,
             "key_prefix": args.key_prefix or settings.redis_key_prefix}
    tracking = {"tracking_uri": settings.mlflow_tracking_uri}
    if args.action == "start":
        experiment = start_experiment(**redis, name=args.name, challenger=args.challenger, share=args.share,
                                      salt=args.salt, artifact_root=settings.mlflow_artifact_root,
                                      **tracking)  # fmt: skip
    elif args.action == "stop":
        experiment = stop_experiment(**redis, **tracking)
    elif args.action == "promote":
        experiment = promote_challenger(**redis, **tracking)
    else:
        running = running_experiment(**redis)
        if running is None:
            return {"running": False}
        totals = experiment_totals(settings.mlflow_tracking_uri, running.name)
        return {"running": True, **dataclasses.asdict(running), "totals": totals}
    return {"action": args.action, **dataclasses.asdict(experiment)}


def _quality_gate(args: argparse.Namespace) -> dict:
    from recsys.settings import get_settings
    from tasks.quality_gate import published_model_versions, quality_gate

    settings = get_settings()
    published = published_model_versions(settings.redis_url, settings.redis_key_prefix, settings.redis_type) \
        if args.check_published else None  # fmt: skip
    decision = quality_gate({"ranker": args.ranker_version, "two_tower": args.two_tower_version},
                            tracking_uri=settings.mlflow_tracking_uri, tolerance=args.tolerance, mode=args.mode,
                            batch_dir=args.batch_score, published_versions=published)  # fmt: skip
    return decision.to_dict()


def _promote_models(args: argparse.Namespace) -> dict:
    from recsys.settings import get_settings
    from tasks.quality_gate import promote_models

    versions = None
    if args.ranker_version or args.two_tower_version:
        versions = {"ranker": args.ranker_version, "two_tower": args.two_tower_version}
    return promote_models(get_settings().mlflow_tracking_uri, versions)


def _compare_rankers(args: argparse.Namespace) -> dict:
    from recsys.settings import get_settings
    from tasks.compare_rankers import compare_rankers

    settings = get_settings()
    folders = {path.name: path for path in sorted(args.input.iterdir()) if (path / "history.json").is_file()}
    return compare_rankers(folders, tracking_uri=settings.mlflow_tracking_uri,
                           artifact_root=settings.mlflow_artifact_root, run_name=args.run_name,
                           nvtabular_dir=args.nvtabular, spec=load_spec(args.spec))  # fmt: skip


def _extract_interactions(args: argparse.Namespace) -> dict:
    from recsys.settings import get_settings
    from tasks.extract_interactions import extract_interactions

    settings = get_settings()
    return extract_interactions(args.database_url or settings.database_url, args.output or settings.default_landing_dir,
                                args.day, spec=load_spec(args.spec))  # fmt: skip


def _export_unavailable_items(args: argparse.Namespace) -> dict:
    from recsys.settings import get_settings
    from tasks.extract_interactions import export_unavailable_items

    return export_unavailable_items(args.database_url or get_settings().database_url, args.output,
                                    spec=load_spec(args.spec))  # fmt: skip


def _monitor_hour(args: argparse.Namespace) -> dict:
    from datetime import timedelta

    from recsys.settings import get_settings
    from tasks.monitor import AlertThresholds, MonitoringConfig, monitor

    settings = get_settings()
    config = MonitoringConfig(attribution_window=timedelta(minutes=args.attribution_window_minutes), k=args.k)
    given = {"min_ctr": args.min_ctr, "max_psi": args.max_psi, "min_impressions": args.min_impressions}
    thresholds = AlertThresholds(**{name: value for name, value in given.items() if value is not None})
    return monitor(args.hour, impressions_dir=args.impressions_dir or settings.impressions_path,
                   database_url=args.database_url or settings.database_url, runs_dir=runs_dir(settings.data_root),
                   tracking_uri=settings.mlflow_tracking_uri, artifact_root=settings.mlflow_artifact_root,
                   spec=load_spec(args.spec), config=config, thresholds=thresholds, webhook_url=args.webhook_url)


def _import_atomic(args: argparse.Namespace) -> dict:
    from tasks.import_atomic import AtomicImportConfig, import_atomic

    config = AtomicImportConfig(rating_field=args.rating_field, timestamp_field=args.timestamp_field,
                                positive_threshold=args.positive_threshold,
                                test_positive_share=args.test_positive_share,
                                sequence_fields=tuple(args.sequence_field), sequence_separator=args.sequence_separator,
                                drop_fields=tuple(args.drop_field))  # fmt: skip
    return import_atomic(args.input, args.out, config)


def _expire_impressions(args: argparse.Namespace) -> dict:
    from recsys.settings import get_settings
    from tasks.monitor import remove_expired_impressions

    settings = get_settings()
    return remove_expired_impressions(args.impressions_dir or settings.impressions_path, now=datetime.now(UTC),
                                      retention_days=settings.impressions_retention_days if args.retention_days is None
                                      else args.retention_days)  # fmt: skip


def _expire_runs(args: argparse.Namespace) -> dict:
    from recsys.settings import get_settings
    from tasks.expire_runs import expire_runs

    settings = get_settings()
    return expire_runs(settings.data_root, redis_url=settings.redis_url, redis_type=settings.redis_type,
                       key_prefix=settings.redis_key_prefix, tracking_uri=settings.mlflow_tracking_uri,
                       keep_runs=settings.keep_runs if args.keep_runs is None else args.keep_runs)  # fmt: skip


def _step_parser(subparsers: argparse._SubParsersAction, name: str, handler: Callable, help_text: str
                 ) -> argparse.ArgumentParser:  # fmt: skip
    parser = _housekeeping_parser(subparsers, name, handler, help_text)
    parser.add_argument("--spec", type=Path, default=None, help="dataset spec YAML (default: specs/aliccp.yaml)")
    return parser


def _housekeeping_parser(subparsers: argparse._SubParsersAction, name: str, handler: Callable, help_text: str
                         ) -> argparse.ArgumentParser:  # fmt: skip
    """A command that reads no dataset (no --spec)."""
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    parser.set_defaults(handler=handler)
    parser.add_argument("--metrics-json", type=Path, default=None, help="also write the step's metrics here")
    return parser


def _layer_widths(text: str) -> tuple[int, ...]:
    """'128,64' -> (128, 64)."""
    try:
        widths = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"layer widths must be comma-separated integers, got {text!r}") from None
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"layer widths must be positive, got {text!r}")
    return widths


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
    generate.add_argument("--base-logit", type=float, default=GeneratorConfig.base_logit,
                          help="click logit offset: higher means more clicks (default: %(default)s, about 9%% clicks)")
    generate.add_argument("--quiet", action="store_true", help="no progress bar")

    steps: list[tuple[str, Callable, str]] = [
        ("csv-to-parquet", _csv_to_parquet, "raw CSV to typed, partitioned Parquet"),
        ("clean-null-rows", _clean_null_rows, "drop rows with too many null features"),
        ("resplit", _resplit, "move a share of test rows into train"),
        ("validate", _validate, "validate with the Great Expectations suite of the spec"),
        ("nvtabular-fit-transform", _nvtabular_fit_transform, "fit and apply the NVTabular workflow (trainer env)"),
        ("train-ranker", _train_ranker, "train the ranking model: DLRM, DCN-v2 or MLP (trainer env)"),
        ("train-two-tower", _train_two_tower, "train the two-tower retrieval model (trainer env)"),
        ("build-faiss-index", _build_faiss_index, "index the two-tower item embeddings (input: two_tower dir)"),
        ("batch-score", _batch_score, "recommendations for every user, segment and item (input: run dir)"),
        ("demo-data", _demo_data,
         "validation clicks and retrieved candidates of the demo page's users (input: run dir; trainer env)"),
        ("evaluate", _evaluate,
         "each stage, the whole pipeline and baselines on the validation split (input: run dir)"),
        ("export-triton-ensemble", _export_triton_ensemble,
         "write the run's online pipeline as a Triton model repository (input: run dir)"),
    ]
    for name, handler, help_text in steps:
        step = _step_parser(subparsers, name, handler, help_text)
        step.add_argument("--input", type=Path, required=True)
        step.add_argument("--output", type=Path, required=True)
        if name in ("nvtabular-fit-transform", "batch-score"):
            work = "NVTabular runs" if name == "nvtabular-fit-transform" else "the users are scored"
            step.add_argument("--dask-scheduler", default=scheduler_from_environment(),
                              help=f"where {work}: a Dask scheduler's address, or 'local' for a LocalCluster "
                                   "(default: RECSYS_DASK_SCHEDULER; unset: this process)")  # fmt: skip
        if name == "csv-to-parquet":
            step.add_argument("--max-bad-row-fraction", type=float, default=CsvToParquetConfig.max_bad_row_fraction)
            step.add_argument("--sample-fraction", type=float, default=CsvToParquetConfig.sample_fraction)
            step.add_argument("--forgotten-from", metavar="DATABASE_URL", default=None,
                              help="drop the rows of the customers forgotten on request in this gateway database "
                                   "(the nightly DAG passes RECSYS_DATABASE_URL's)")  # fmt: skip
        if name == "clean-null-rows":
            step.add_argument("--max-null-features", type=int, default=DEFAULT_MAX_NULL_FEATURES)
        if name == "train-ranker":
            step.add_argument("--model", choices=list(COMPARED_RANKERS), default=RankerConfig.model)
            step.add_argument("--epochs", type=int, default=RankerConfig.epochs)
            step.add_argument("--patience", type=int, default=RankerConfig.patience)
            step.add_argument("--batch-size", type=int, default=RankerConfig.batch_size)
            step.add_argument("--embedding-dim", type=int, default=RankerConfig.embedding_dim)
            step.add_argument("--learning-rate", type=float, default=RankerConfig.learning_rate)
            step.add_argument("--seed", type=int, default=RankerConfig.seed)
        if name == "train-two-tower":
            step.add_argument("--epochs", type=int, default=TwoTowerConfig.epochs)
            step.add_argument("--patience", type=int, default=TwoTowerConfig.patience)
            step.add_argument("--batch-size", type=int, default=TwoTowerConfig.batch_size)
            step.add_argument("--learning-rate", type=float, default=TwoTowerConfig.learning_rate)
            step.add_argument("--logq-correction", action=argparse.BooleanOptionalAction,
                              default=TwoTowerConfig.logq_sampling_correction,
                              help="sampling-bias (logQ) correction of in-batch negatives")  # fmt: skip
            step.add_argument("--positives", choices=("clicked", "shown"), default=TwoTowerConfig.positives,
                              help="train on the clicked rows, or on every shown row (the exposure)")  # fmt: skip
            step.add_argument("--tower-layers", type=_layer_widths,
                              default=",".join(map(str, TwoTowerConfig.tower_layers)),  # argparse converts it
                              help="each tower's layer widths, comma-separated; the last is the embedding's "
                                   "(default: %(default)s)")  # fmt: skip
            step.add_argument("--l2-normalize", action=argparse.BooleanOptionalAction,
                              default=TwoTowerConfig.l2_normalize, help="L2-normalize both towers' outputs")
            step.add_argument("--temperature", type=float, default=TwoTowerConfig.logits_temperature,
                              help="the in-batch softmax's temperature (scores / T)")
            step.add_argument("--seed", type=int, default=TwoTowerConfig.seed)
        if name == "build-faiss-index":
            step.add_argument("--exact-max-items", type=int, default=FaissIndexConfig.exact_max_items,
                              help="larger catalogs get IVF")  # fmt: skip
            step.add_argument("--nprobe", type=int, default=FaissIndexConfig.nprobe)
            step.add_argument("--nvtabular", type=Path, default=None,
                              help="NVTabular output: user queries measure the IVF index's recall, and its train "
                                   "split's positives make the item-to-item source")  # fmt: skip
            step.add_argument("--item-to-item-regularization", type=float, default=None,
                              help="EASE's lambda of the item-to-item source (default: chosen on the validation "
                                   "split among models.item_to_item.REGULARIZATIONS)")  # fmt: skip
            step.add_argument("--item-to-item-recency", type=float, default=None,
                              help="weight of a history item per newer positive, in (0, 1] (default: chosen on "
                                   "the validation split among models.item_to_item.RECENCIES)")  # fmt: skip
        if name == "batch-score":
            step.add_argument("--top-k", type=int, default=TOP_K)
            step.add_argument("--top-n", type=int, default=TOP_N)
            step.add_argument("--similar-n", type=int, default=SIMILAR_N)
            step.add_argument("--users-per-batch", type=int, default=BatchScoreConfig.users_per_batch,
                              help="users scored together (on Dask, a task scores whole batches)")  # fmt: skip
            step.add_argument("--unavailable-items", type=Path, default=None,
                              help="CSV with an item id column: items never recommended")  # fmt: skip
            step.add_argument("--model-versions", default=None, help="JSON: registered versions scored with")
            step.add_argument("--blend", choices=BLEND_METHODS, default=BLEND_METHODS[0],
                              help="how the blend weights left open are chosen on validation: a grid over the "
                                   "retrieval and item-to-item weights, all five learned from the retrieved "
                                   "candidates, or whichever of the two does better on held-out users")  # fmt: skip
        if name in ("batch-score", "export-triton-ensemble"):
            chosen = ("chosen on the validation split" if name == "batch-score"
                      else "the one batch scoring used (batch_score/_metrics.json), else the default")  # fmt: skip
            step.add_argument("--retrieval-weight", type=float, default=None,
                              help="weight of the two-tower's P(item | user) next to the ranker's probability in "
                                   f"the final order (0 and item-to-item 0: the ranker alone; default: {chosen})")
            step.add_argument("--item-to-item-weight", type=float, default=None,
                              help=f"weight of the item-to-item source's score in the final order (default: {chosen})")
            step.add_argument("--source-weights", type=_source_weights, default=None,
                              help="weights of the two-tower, item-to-item and most-clicked sources' indicators in "
                                   f"the final order, comma-separated (default: {chosen})")  # fmt: skip
        if name == "demo-data":
            step.add_argument("--top-k", type=int, default=DemoDataConfig.top_k, help="retrieved candidates per user")
            step.add_argument("--max-users", type=int, default=DemoDataConfig.max_users,
                              help="validation users with the most clicks")  # fmt: skip
        if name == "export-triton-ensemble":
            step.add_argument("--top-k", type=int, default=TOP_K, help="default candidates per request")
            step.add_argument("--top-n", type=int, default=TOP_N, help="default items per user")
            step.add_argument("--similar-n", type=int, default=SIMILAR_N, help="default similar products per item")
            step.add_argument("--temperature", type=float, default=0.0, help="default sampling temperature (the "
                              "ranked order)")  # fmt: skip
            step.add_argument("--unavailable-items", type=Path, default=None,
                              help="CSV with an item id column: items never recommended")  # fmt: skip
            step.add_argument("--instances", type=int, default=1,
                              help="instances of each stage model, answering requests side by side")  # fmt: skip
            step.add_argument("--model-versions", default=None, help="JSON: registered versions exported")
            step.add_argument("--batch-score", type=Path, default=None,
                              help="the batch scoring whose blend weights to take (default: <input>/batch_score)")
            step.add_argument("--mlflow-run-id", default=None, help="also log the repository to this MLflow run")
        if name == "evaluate":
            step.add_argument("--raw-input", type=Path, default=None,
                              help="the run's raw CSV folder, for the generator's oracle (default: <run>/landing)")
            step.add_argument("--batch-score", type=Path, default=None, help="default: <run>/batch_score")
            step.add_argument("--k", type=int, default=EvaluationConfig.final_k, help="length of the final lists "
                              "evaluated")  # fmt: skip
            step.add_argument("--knn-neighbours", type=int, default=EvaluationConfig.knn_neighbours,
                              help="similar items per item (item-kNN)")  # fmt: skip
            step.add_argument("--seed", type=int, default=EvaluationConfig.seed, help="of the random baseline")
            step.add_argument("--mlflow-run-id", default=None, help="also log the metrics and report to this run")
        if name == "resplit":
            step.add_argument("--fraction", type=float, default=DEFAULT_FRACTION)
            step.add_argument("--seed", type=int, default=0)

    feast_steps: list[tuple[str, Callable, str]] = [
        ("feast-apply", _feast_apply, "register the spec's Feast definitions, sources at this run's feature tables"),
        ("feast-materialize", _feast_materialize, "load the feature tables' newer rows into Feast's Redis store"),
    ]
    for name, handler, help_text in feast_steps:
        feast = _step_parser(subparsers, name, handler, help_text)
        feast.add_argument("--input", type=Path, required=True, help="the run's nvtabular output folder")
        if name == "feast-materialize":
            feast.add_argument("--check-sample", type=int, default=1000,
                               help="rows per table read back from the online store and compared")  # fmt: skip

    expectations = _step_parser(subparsers, "write-expectations", _write_expectations,
                                "write the spec's expectation suite as JSON")  # fmt: skip
    expectations.add_argument("--out", type=Path, default=Path("great_expectations/expectations"))

    publish = _step_parser(subparsers, "publish-recommendations", _publish_recommendations,
                           "load a batch_score output into Redis as a new version, switch readers to it")  # fmt: skip
    publish.add_argument("--input", type=Path, required=True, help="batch_score output (users/, segments/, similar/)")
    publish.add_argument("--version", required=True, help="letters, digits and . _ + -, e.g. the run id made safe")
    publish.add_argument("--keep-versions", type=int, default=DEFAULT_KEEP_VERSIONS,
                         help="versions kept, current and previous included")  # fmt: skip
    publish.add_argument("--expire-after-s", type=int, default=DEFAULT_EXPIRE_AFTER_S,
                         help="grace period of retired versions")  # fmt: skip
    publish.add_argument("--quiet", action="store_true", help="no progress bar")
    publish.add_argument("--stage", action="store_true",
                         help="load and keep the version without switching readers to it (an A/B challenger)")
    rollback = _step_parser(subparsers, "rollback-recommendations", _rollback_recommendations,
                            "switch readers back to the previous published version (again: forward)")  # fmt: skip

    experiment = _step_parser(subparsers, "experiment", _experiment,
                              "A/B experiment by model version: start, stop, promote the challenger, status")
    actions = experiment.add_subparsers(dest="action", required=True)
    start = actions.add_parser("start", help="serve a complete (staged) version to a share of customers")
    start.add_argument("name", help="the experiment's name, e.g. spring-ranker")
    start.add_argument("--challenger", required=True, help="the version the challenger bucket is served")
    start.add_argument("--share", type=float, required=True, help="of customers in the challenger bucket, (0, 1)")
    start.add_argument("--salt", default=None, help="of the bucket hash (default: random)")
    stop = actions.add_parser("stop", help="everyone back on the current version")
    promote = actions.add_parser("promote", help="make the challenger current (rollback-recommendations undoes it), "
                                                 "then stop")  # fmt: skip
    status = actions.add_parser("status", help="the running experiment, if any, and its monitored hours summed")
    for command in (publish, rollback, start, stop, promote, status):
        command.add_argument("--redis-url", default=None, help="default: RECSYS_REDIS_URL")
        command.add_argument("--key-prefix", default=None, help="default: RECSYS_REDIS_KEY_PREFIX")

    gate = _step_parser(subparsers, "quality-gate", _quality_gate,
                        "judge new ranker/two_tower versions against the champion; move the aliases")  # fmt: skip
    gate.add_argument("--batch-score", type=Path, default=None, help="the run's batch_score output (tagged)")
    gate.add_argument("--mode", choices=["gate", "force", "skip"], default="gate")
    gate.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, help="how far below the champion passes")
    gate.add_argument("--check-published", action="store_true",
                      help="read what Redis serves: a held run names the champion's batch scores if they differ")
    promote = _step_parser(subparsers, "promote-models", _promote_models,
                           "a reviewer's promotion: move champion (default: to the challenger pair)")  # fmt: skip
    for command in (gate, promote):
        command.add_argument("--ranker-version", required=command is gate, default=None)
        command.add_argument("--two-tower-version", required=command is gate, default=None)
    compare = _step_parser(subparsers, "compare-rankers", _compare_rankers,
                           "log a comparison of train-ranker outputs to MLflow (report figure 5.4)")  # fmt: skip
    compare.add_argument("--input", type=Path, required=True, help="a folder holding one train-ranker output a model")
    compare.add_argument("--nvtabular", type=Path, default=None, help="their NVTabular output (validation fingerprint)")
    compare.add_argument("--run-name", default="ranker comparison")

    atomic = subparsers.add_parser("import-atomic", help="RecBole atomic files to train/test CSV and a dataset spec",
                                   description="RecBole atomic files (<name>.inter, .user, .item) to train.csv, "
                                               "test.csv (temporal split per user) and spec.yaml in --out")  # fmt: skip
    atomic.set_defaults(handler=_import_atomic)
    atomic.add_argument("input", type=Path, help="folder holding <name>.inter (and <name>.user, <name>.item)")
    atomic.add_argument("--out", type=Path, required=True, help="folder to write (replaced atomically)")
    atomic.add_argument("--rating-field", default=AtomicImportConfig.rating_field,
                        help="absent in .inter: every interaction is positive")  # fmt: skip
    atomic.add_argument("--timestamp-field", default=AtomicImportConfig.timestamp_field)
    atomic.add_argument("--positive-threshold", type=float, default=AtomicImportConfig.positive_threshold,
                        help="ratings at or above are clicks")  # fmt: skip
    atomic.add_argument("--test-positive-share", type=float, default=AtomicImportConfig.test_positive_share,
                        help="share of each user's last positives that start the test split")  # fmt: skip
    atomic.add_argument("--sequence-field", action="append", default=[],
                        help="a token field holding a sequence (repeatable), e.g. ML-1M's genre")  # fmt: skip
    atomic.add_argument("--sequence-separator", default=AtomicImportConfig.sequence_separator,
                        help="between a sequence field's tokens")  # fmt: skip
    atomic.add_argument("--drop-field", action="append", default=[], help="a user or item field left out (repeatable)")
    atomic.add_argument("--metrics-json", type=Path, default=None, help="also write the step's metrics here")

    extract = _step_parser(subparsers, "extract-interactions", _extract_interactions,
                           "export one day (UTC) of the gateway's interactions to the landing zone")  # fmt: skip
    extract.add_argument("--day", type=date.fromisoformat, required=True, help="YYYY-MM-DD")
    extract.add_argument("--output", type=Path, default=None,
                         help="landing dir for interactions/day=.../ (default: RECSYS_LANDING_DIR)")  # fmt: skip
    unavailable = _step_parser(subparsers, "export-unavailable-items", _export_unavailable_items,
                               "write unavailable products as batch-score's --unavailable-items CSV")  # fmt: skip
    unavailable.add_argument("--output", type=Path, required=True, help="CSV file to write")
    monitor = _step_parser(subparsers, "monitor-hour", _monitor_hour,
                           "CTR, precision@k and drift of one hour of served recommendations, logged to MLflow")
    monitor.add_argument("--hour", type=datetime.fromisoformat, required=True, help="e.g. 2026-11-26T10:00Z")
    monitor.add_argument("--impressions-dir", type=Path, default=None, help="default: RECSYS_IMPRESSIONS_DIR")
    monitor.add_argument("--attribution-window-minutes", type=int,
                         default=int(MonitoringConfig.attribution_window.total_seconds() // 60))
    monitor.add_argument("-k", type=int, default=MonitoringConfig.k, help="precision@k")
    monitor.add_argument("--min-ctr", type=float, default=None, help=f"alert below (default {AlertThresholds.min_ctr})")
    monitor.add_argument("--max-psi", type=float, default=None, help=f"alert above (default {AlertThresholds.max_psi})")
    monitor.add_argument("--min-impressions", type=int, default=None,
                         help=f"served lists before CTR alerts ({AlertThresholds.min_impressions})")
    monitor.add_argument("--webhook-url", default=None, help="POST alerts here as JSON")
    expire = _housekeeping_parser(subparsers, "expire-impressions", _expire_impressions,
                                  "remove the impression hours older than the retention (the monitoring DAG does it)")
    expire.add_argument("--impressions-dir", type=Path, default=None, help="default: RECSYS_IMPRESSIONS_DIR")
    expire.add_argument("--retention-days", type=int, default=None,
                        help="default: RECSYS_IMPRESSIONS_RETENTION_DAYS (90)")
    expire_runs = _housekeeping_parser(subparsers, "expire-runs", _expire_runs,
                                       "remove the folders of older runs nothing uses (the nightly DAG does it)")
    expire_runs.add_argument("--keep-runs", type=int, default=None, help="default: RECSYS_KEEP_RUNS (7)")
    for command in (extract, unavailable, monitor):
        command.add_argument("--database-url", default=None, help="default: RECSYS_DATABASE_URL")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    try:
        metrics = args.handler(args)
    except (InputDataError, SpecError, ExperimentError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.metrics_json:
        args.metrics_json.write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    print(json.dumps(metrics, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

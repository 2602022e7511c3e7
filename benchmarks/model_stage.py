"""Model-stage benchmark: training, batch scoring and publishing, each against a reference in the same run.

    .venv/bin/python benchmarks/model_stage.py [--rows 200000] [--epochs 3] [--repeats 3] [--publish-repeats 5]
                                               [--redis-url redis://127.0.0.1:6379/6] [--work DIR]

Generates `--rows` rows and runs the real pipeline up to the model stage (csv_to_parquet,
clean_null_rows, resplit, then nvtabular_fit_transform, train_two_tower for one epoch and
build_faiss_index through the `recsys` CLI in the trainer environment, as the DAG runs them). Then,
alternating each measurement with its reference `--repeats` times and keeping the best of each
(this machine's cores are shared; the first run of anything pays more warm-up):

- training: `train_ranker` (DLRM, `--epochs` epochs, patience = epochs so none stops early) reads the
  NVTabular output with Merlin's Loader; its train samples/s count `model.fit` time only (each epoch's
  validation is reported apart). Reference: one bare Keras `model.fit(x, y, batch_size, epochs,
  shuffle=True)` of the same `build_ranker` model (same seed, optimizer, metrics, batch size and
  epochs) on the same training rows loaded beforehand into a dict of in-memory tensors.
  Both include the first epoch's graph tracing.
- batch scoring: `batch_score`'s users/s (the users part: feature lookup, query tower, Faiss top-K,
  filtering, ranker, ordering, writing Parquet). Reference: the same saved ranker, freshly loaded as
  batch_score loads it, called on in-memory tensors of the same number of candidates (users x top_K)
  in calls of the same size, as users/s. Both include the first call's warm-up of a loaded model; the
  reference's second (warm) pass is reported too.
- publish: `publish_recommendations` of that batch_score output, the whole call from Parquet to the
  pointer swap, into a dedicated Redis database (flushed before each measurement; never database 0).
  Reference: redis-py pipelines of plain SETs of the same keys and values, encoded in memory
  beforehand, in chunks of the same size (`benchmarks/publish.py`'s `reference_set`).

Goals (issue): training at 0.9 or better of bare Keras, batch scoring at 0.7 or better of the raw
ranker, publish at 0.8 or better of pipelined SETs. Results go to benchmarks/results/model_stage.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TRAINER_PYTHON = PROJECT_ROOT / ".venv-trainer" / "bin" / "python"
GOALS = {"training": 0.9, "batch_scoring": 0.7, "publish": 0.8}


# -- trainer environment ------------------------------------------------------------------------------


def measure_training(run: Path, epochs: int, repeats: int) -> dict:
    """train_ranker's fit samples/s against a bare Keras fit of the same model on in-memory tensors."""
    import pandas as pd
    import tensorflow as tf
    from merlin.io import Dataset

    from models.rankers import build_ranker, ranker_input_schema
    from recsys.parquet_io import nvtabular_part_files
    from recsys.spec import load_spec
    from tasks.train_ranker import RankerConfig, train_ranker

    spec = load_spec()
    target = spec.primary_target
    config = RankerConfig(epochs=epochs, patience=epochs)  # every epoch runs
    files = nvtabular_part_files(run / "nvtabular" / "train")
    schema = ranker_input_schema(Dataset([str(path) for path in files], engine="parquet", cpu=True).schema, target)
    # What Merlin's Loader yields, in memory: int64 features by name, the target as stored (int8).
    frame = pd.concat([pd.read_parquet(path, columns=schema.column_names) for path in files], ignore_index=True)
    features = {column: tf.constant(frame[column].to_numpy()) for column in schema.without([target]).column_names}
    labels = tf.constant(frame[target].to_numpy())
    rows = len(frame)

    def bare_keras_fit() -> None:
        tf.keras.utils.set_random_seed(config.seed)
        model = build_ranker(schema, model=config.model, target=target, embedding_dim=config.embedding_dim,
                             mlp_layers=config.mlp_layers)  # fmt: skip
        model.compile(optimizer=tf.keras.optimizers.Adam(config.learning_rate),
                      metrics=[tf.keras.metrics.AUC(name="auc")])  # fmt: skip
        started = time.perf_counter()
        model.fit(features, labels, batch_size=config.batch_size, epochs=epochs, shuffle=True, verbose=0)
        bare.append(time.perf_counter() - started)

    ours: list[dict] = []
    bare: list[float] = []

    def train_ranker_run() -> None:
        metrics = train_ranker(run / "nvtabular", run / "ranker", spec, config)
        if metrics["train_rows"] != rows or metrics["epochs_run"] != epochs:
            raise RuntimeError(f"train_ranker trained {metrics['train_rows']} rows x {metrics['epochs_run']} epochs, "
                               f"the reference {rows} x {epochs}")  # fmt: skip
        ours.append({"fit_seconds": sum(row["fit_seconds"] for row in metrics["history"]),
                     "epoch_seconds": sum(row["seconds"] for row in metrics["history"]),
                     "train_samples_per_second": metrics["train_samples_per_second"],
                     "valid_auc": metrics["valid_auc"]})  # fmt: skip

    for repeat in range(repeats):
        # Alternating which goes first: the process's first model pays one-off costs (first graph, kernels).
        for measure in (train_ranker_run, bare_keras_fit) if repeat % 2 == 0 else (bare_keras_fit, train_ranker_run):
            measure()
    best = min(ours, key=lambda run_: run_["fit_seconds"])
    samples = rows * epochs
    return {
        "model": config.model, "rows": rows, "epochs": epochs, "batch_size": config.batch_size,
        "train_ranker_samples_per_s": samples / best["fit_seconds"],
        "train_ranker_with_validation_samples_per_s": samples / min(run_["epoch_seconds"] for run_ in ours),
        "bare_keras_samples_per_s": samples / min(bare),
        "valid_auc": best["valid_auc"],
        "runs": {"train_ranker": ours, "bare_keras_fit_seconds": bare},
    }  # fmt: skip


def measure_scoring(run: Path, repeats: int) -> dict:
    """batch_score's users/s against the loaded ranker's own throughput on as many candidates."""
    import numpy as np
    import pandas as pd
    import tensorflow as tf

    from models.online_pipeline import RANKER_ROWS_PER_CALL
    from recsys.parquet_io import nvtabular_part_files
    from recsys.spec import load_spec
    from tasks.batch_score import BatchScoreConfig, batch_score

    spec = load_spec()
    config = BatchScoreConfig()
    ranker_dir = run / "ranker" / "model"
    columns = json.loads((run / "ranker" / "history.json").read_text())["input_columns"]
    users = len(pd.read_parquet(run / "nvtabular" / "user_features.parquet", columns=[spec.user_id]))
    # The calls batch_score makes: batches of users_per_batch users, each split into calls of at most
    # RANKER_ROWS_PER_CALL rows (whole users), top_k candidates a user.
    users_per_call = min(config.users_per_batch, max(1, RANKER_ROWS_PER_CALL // config.top_k))
    call_users: list[int] = []
    for batch_start in range(0, users, config.users_per_batch):
        batch = min(config.users_per_batch, users - batch_start)
        call_users += [min(users_per_call, batch - start) for start in range(0, batch, users_per_call)]
    # Real (user, item, context) rows of the validation split as candidates, as many as batch_score scores.
    valid_files = nvtabular_part_files(run / "nvtabular" / "valid")
    valid = pd.concat([pd.read_parquet(path, columns=columns) for path in valid_files], ignore_index=True)
    candidates = {column: valid[column].to_numpy(dtype=np.int64) for column in columns}
    positions = np.arange(users * config.top_k) % len(valid)
    calls, offset = [], 0
    for count in call_users:
        rows = positions[offset : offset + count * config.top_k]
        calls.append({column: tf.constant(values[rows]) for column, values in candidates.items()})
        offset += count * config.top_k

    def raw_ranker() -> tuple[float, float]:
        """Seconds of a freshly loaded ranker's first pass over every call, and of a second (warm) pass."""
        model = tf.keras.models.load_model(str(ranker_dir))
        passes = []
        for _ in range(2):
            started = time.perf_counter()
            for inputs in calls:
                model(inputs, training=False).numpy()
            passes.append(time.perf_counter() - started)
        return passes[0], passes[1]

    ours, first, warm = [], [], []
    for _ in range(repeats):
        metrics = batch_score(run, run / "batch", spec, config)
        if metrics["users"] != users:
            raise RuntimeError(f"batch_score scored {metrics['users']} users, the reference {users}")
        ours.append(metrics["users_per_second"])
        first_pass, warm_pass = raw_ranker()
        first.append(first_pass)
        warm.append(warm_pass)
    return {
        "users": users, "top_k": config.top_k, "users_per_batch": config.users_per_batch,
        "candidates": users * config.top_k, "ranker_calls": len(calls),
        "batch_score_users_per_s": max(ours),
        "raw_ranker_users_per_s": users / min(first),
        "raw_ranker_warm_users_per_s": users / min(warm),
        "raw_ranker_rows_per_s": users * config.top_k / min(first),
        "runs": {"batch_score_users_per_s": ours, "raw_ranker_seconds": first, "raw_ranker_warm_seconds": warm},
    }  # fmt: skip


def _run_trainer_part(part: str, run: Path, args: argparse.Namespace) -> dict:
    argv = [str(TRAINER_PYTHON), __file__, "--trainer-part", part, "--run", str(run),
            "--epochs", str(args.epochs), "--repeats", str(args.repeats)]  # fmt: skip
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    process = subprocess.run(argv, capture_output=True, text=True, env=env)
    if process.returncode != 0:
        raise RuntimeError(f"trainer part '{part}' failed:\n" + "\n".join(process.stderr.splitlines()[-40:]))
    return json.loads(process.stdout.strip().splitlines()[-1])


# -- platform environment -----------------------------------------------------------------------------


def prepare_run(rows: int, work: Path) -> Path:
    """Generated data through the real data stage, the two-tower model and the Faiss index, as the DAG runs them
    (tasks/pipeline.py; the index with the item-to-item source); not measured. The ranker is the measured part's."""
    from recsys.datagen import GeneratorConfig, generate_dataset
    from recsys.run_layout import RunLayout
    from tasks.pipeline import PipelineConfig, run_pipeline

    run = work / "run"
    started = time.perf_counter()
    generate_dataset(GeneratorConfig(rows=rows, seed=1), work / "raw", progress=False)
    run_pipeline(work / "raw", RunLayout(run), PipelineConfig(two_tower_epochs=1), until="build_faiss_index",
                 skip=("validate", "train_ranker"))  # fmt: skip
    seconds = time.perf_counter() - started
    print(f"prepared {rows:,} rows through the data stage, two-tower and Faiss in {seconds:.0f} s", flush=True)
    return run


def measure_publish(batch_dir: Path, redis_url: str, repeats: int) -> dict:
    """publish_recommendations of batch_score's output against redis-py pipelined SETs of the same payloads."""
    import redis

    from benchmarks.publish import PREFIX, reference_payloads, reference_set
    from tasks.publish_recommendations import PIPELINE_CHUNK, publish_recommendations

    client = redis.Redis.from_url(redis_url)
    pairs = reference_payloads(batch_dir, "v1", PIPELINE_CHUNK)
    keys = len(pairs)
    publish_s, set_s, execute_command_s = [], [], []
    try:
        for _ in range(repeats):
            client.flushdb()
            started = time.perf_counter()
            metrics = publish_recommendations(batch_dir, redis_url=redis_url, version="v1", key_prefix=PREFIX,
                                              chunk_size=PIPELINE_CHUNK, progress=False)  # fmt: skip
            publish_s.append(time.perf_counter() - started)
            if metrics["keys_total"] != keys:
                raise RuntimeError(f"publish wrote {metrics['keys_total']} keys, the reference {keys}")
            client.flushdb()
            set_s.append(reference_set(client, pairs, PIPELINE_CHUNK))
            client.flushdb()
            execute_command_s.append(reference_set(client, pairs, PIPELINE_CHUNK, raw=True))
    finally:
        client.flushdb()
        client.close()
    return {
        "keys": keys, "value_bytes_mean": sum(len(value) for _, value in pairs) / keys, "chunk_size": PIPELINE_CHUNK,
        "publish_keys_per_s": keys / min(publish_s),
        "pipelined_set_keys_per_s": keys / min(set_s),
        "pipelined_execute_command_keys_per_s": keys / min(execute_command_s),
        "median": {"publish": keys / statistics.median(publish_s), "pipelined_set": keys / statistics.median(set_s),
                   "pipelined_execute_command": keys / statistics.median(execute_command_s)},
        "runs_seconds": {"publish": publish_s, "pipelined_set": set_s, "pipelined_execute_command": execute_command_s},
    }  # fmt: skip


def report(results: dict) -> str:
    """The Markdown table of the three ratios, then the side figures; adds `ratios` and `goals_met` to results."""
    train, score, publish = results["training"], results["batch_scoring"], results["publish"]
    rows = {  # stage: (what, ours, reference)
        "training": (f"training: `train_ranker` DLRM, {train['rows']:,} rows x {train['epochs']} epochs, samples/s "
                     "of `fit`, vs bare Keras `fit` on in-memory tensors",
                     train["train_ranker_samples_per_s"], train["bare_keras_samples_per_s"]),
        "batch_scoring": (f"batch scoring: `batch_score` users/s, {score['users']:,} users x top {score['top_k']}, "
                          "vs the loaded ranker called on as many candidates",
                          score["batch_score_users_per_s"], score["raw_ranker_users_per_s"]),
        "publish": (f"publish: `publish_recommendations` keys/s, {publish['keys']:,} keys of "
                    f"~{publish['value_bytes_mean']:,.0f} B, vs redis-py pipelined `pipe.set`",
                    publish["publish_keys_per_s"], publish["pipelined_set_keys_per_s"]),
    }  # fmt: skip
    results["ratios"] = {stage: round(ours / reference, 3) for stage, (_, ours, reference) in rows.items()}
    results["goals_met"] = {stage: results["ratios"][stage] >= goal for stage, goal in GOALS.items()}
    lines = ["| stage | ours | reference | ratio | goal |", "|---|---:|---:|---:|---|"]
    for stage, (what, ours, reference) in rows.items():
        met = "met" if results["goals_met"][stage] else "MISSED"
        lines.append(f"| {what} | {ours:,.0f} | {reference:,.0f} | {ours / reference:.2f} | {GOALS[stage]} ({met}) |")
    with_validation = train["train_ranker_with_validation_samples_per_s"]
    medians = publish["median"]
    execute_command = publish["pipelined_execute_command_keys_per_s"]
    lines += [
        "",
        f"- training with each epoch's validation counted: {with_validation:,.0f} samples/s "
        f"({with_validation / train['bare_keras_samples_per_s']:.2f} of bare Keras); "
        f"validation AUC {train['valid_auc']:.3f}",
        f"- raw ranker: {score['raw_ranker_rows_per_s']:,.0f} candidates/s on its first pass after loading; warm "
        f"{score['raw_ranker_warm_users_per_s']:,.0f} users/s (batch_score / warm: "
        f"{score['batch_score_users_per_s'] / score['raw_ranker_warm_users_per_s']:.2f})",
        f"- publish vs pipelined `pipe.execute_command('SET', ...)`: {execute_command:,.0f} keys/s "
        f"({publish['publish_keys_per_s'] / execute_command:.2f}); medians: publish {medians['publish']:,.0f}, "
        f"pipe.set {medians['pipelined_set']:,.0f} ({medians['publish'] / medians['pipelined_set']:.2f})",
    ]  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000, help="generated rows (train and test together)")
    parser.add_argument("--epochs", type=int, default=3, help="ranker epochs, ours and the reference's")
    parser.add_argument("--repeats", type=int, default=3, help="alternations of training and of scoring; best kept")
    parser.add_argument("--publish-repeats", type=int, default=5)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/6", help="a database this benchmark flushes")
    parser.add_argument("--work", type=Path, default=None, help="folder for the scratch run (default: temporary)")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "benchmarks" / "results" / "model_stage.json")
    parser.add_argument("--trainer-part", choices=["training", "scoring"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--run", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trainer_part == "training":
        print(json.dumps(measure_training(args.run, args.epochs, args.repeats)))
        return 0
    if args.trainer_part == "scoring":
        print(json.dumps(measure_scoring(args.run, args.repeats)))
        return 0

    import redis

    if redis.Redis.from_url(args.redis_url).connection_pool.connection_kwargs.get("db", 0) == 0:
        parser.error("the benchmark flushes its Redis database: give one other than 0")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.work) as scratch:
        run = prepare_run(args.rows, Path(scratch))
        # The machine's load average (1 minute) before and after: how busy the shared cores were.
        results: dict = {"rows": args.rows, "repeats": args.repeats, "load_average_before": os.getloadavg()[0]}
        results["training"] = _run_trainer_part("training", run, args)
        print(f"training measured ({time.perf_counter() - started:.0f} s so far)", flush=True)
        results["batch_scoring"] = _run_trainer_part("scoring", run, args)
        print(f"batch scoring measured ({time.perf_counter() - started:.0f} s so far)", flush=True)
        results["publish"] = measure_publish(run / "batch", args.redis_url, args.publish_repeats)
    results["seconds"] = time.perf_counter() - started
    results["load_average_after"] = os.getloadavg()[0]
    print()
    print(report(results))
    print(f"\n{results['seconds']:.0f} s in all; load average {results['load_average_before']:.1f} before the "
          f"measurements, {results['load_average_after']:.1f} after, on {os.cpu_count()} cores")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(PROJECT_ROOT))
    sys.exit(main())

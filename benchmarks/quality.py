"""Quality benchmark: the whole pipeline against baselines on generated data with planted signal.

    .venv/bin/python benchmarks/quality.py [--rows 1000000] [--seed 5] [--items N] [--two-tower-epochs 10]
                                           [--ranker-epochs 8] [--ranker-model dlrm] [--work DIR] [--resume]

Generates `--rows` rows with the generator's default parameters (click-through rate about 9%; `--items`
sets the catalog size, by default rows / 17 as AliCCP's, to see how quality moves with the rows per item), runs the
real pipeline as the DAG does (csv_to_parquet, clean_null_rows, resplit in this environment; then
nvtabular_fit_transform, train_two_tower, train_ranker, build_faiss_index and batch_score through the
`recsys` CLI in the trainer environment, both models with early stopping on validation), and evaluates
the run (`tasks/evaluate.py`: each stage, the whole pipeline, and the random, popularity, segment
popularity and item-kNN baselines on the same validation users).

Goals: the whole pipeline's NDCG@10 above every baseline's (issue "Quality you can trust"); the ranker's AUC at
least that of gradient-boosted trees on the same columns and rows (issue "Recommend better than the strong
simple baselines on real data", which replaced "90% of the way from 0.5 to the oracle AUC", measured out of
reach; that share is still printed). Prints the report and the checks, writes
benchmarks/results/quality.json; the exit status is 1 when a goal is missed. `--resume` with `--work`
skips the steps whose output already exists (e.g. to evaluate again after a change).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import tempfile
import time
from pathlib import Path

from pipeline_steps import StepTimes, run_steps

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def run_pipeline(args: argparse.Namespace, work: Path) -> tuple[Path, dict[str, float], list[str]]:
    """Generate the data and run every step up to batch scoring; (run dir, seconds per step, steps kept)."""
    from recsys.datagen import GeneratorConfig, generate_dataset
    from recsys.spec import load_spec

    raw, run = work / "raw", work / "run"
    times = StepTimes()
    # the defaults: nothing tuned for this benchmark (--items only sets the data's size)
    config = GeneratorConfig(rows=args.rows, seed=args.seed, items=args.items)
    times.run("generate_data", raw / "generation.json",
              lambda: generate_dataset(config, raw, load_spec(), progress=False), resume=args.resume)  # fmt: skip
    run_steps(raw, run, None, times, two_tower_epochs=args.two_tower_epochs, ranker_epochs=args.ranker_epochs,
              ranker_model=args.ranker_model, resume=args.resume)  # fmt: skip
    return run, times.seconds, times.kept


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="generated rows (train and test together)")
    parser.add_argument("--seed", type=int, default=5, help="of the generator")
    parser.add_argument("--items", type=int, default=None, help="catalog size (default: rows / 17, AliCCP's)")
    parser.add_argument("--two-tower-epochs", type=int, default=10, help="most epochs (early stopping, patience 2)")
    parser.add_argument("--ranker-epochs", type=int, default=8, help="most epochs (early stopping, patience 2)")
    parser.add_argument("--ranker-model", choices=["dlrm", "dcn", "mlp"], default="dlrm")
    parser.add_argument("--work", type=Path, default=None, help="folder for the run (default: temporary)")
    parser.add_argument("--resume", action="store_true", help="keep the steps whose output exists in --work")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "benchmarks" / "results" / "quality.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from recsys.ranking_metrics import RANKER_GOAL_SHARE
    from recsys.spec import load_spec
    from tasks.evaluate import EvaluationConfig, evaluate, report_markdown

    with tempfile.TemporaryDirectory(prefix="recsys-quality-") as scratch:
        work = args.work or Path(scratch)
        run, seconds, kept = run_pipeline(args, work)
        started = time.perf_counter()
        metrics = evaluate(run, run / "evaluate", load_spec(), EvaluationConfig(), raw_input_dir=work / "raw")
        seconds["evaluate"] = time.perf_counter() - started
        generation = json.loads((work / "raw" / "generation.json").read_text())

    checks = metrics["checks"]
    share = checks.get("ranker_share_of_oracle_auc")
    goals = {
        "pipeline_ndcg_at_10_beats_every_baseline": bool(checks.get("pipeline_beats_every_baseline")),
        "ranker_auc_at_least_boosted_trees": bool(checks.get("ranker_auc_at_least_boosted_trees")),
    }
    command = " ".join([".venv/bin/python", "benchmarks/quality.py", *map(shlex.quote, sys.argv[1:])])
    results = {
        "command": command,
        "rows": args.rows,
        "seed": args.seed,
        "generator": {key: generation.get(key) for key in ("users", "items", "click_through_rate", "oracle_auc_test")},
        "two_tower_epochs": args.two_tower_epochs,
        "ranker_epochs": args.ranker_epochs,
        "ranker_model": args.ranker_model,
        "seconds": seconds,
        "steps_kept_from_an_earlier_run": kept,
        "goals": goals,
        "metrics": metrics,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(report_markdown(metrics))
    print()
    for goal, met in goals.items():
        print(f"{goal}: {'met' if met else 'MISSED'}")
    if share is not None:  # the former goal, kept for comparison with earlier runs
        print(f"(not a goal) ranker's share of the way to the oracle AUC: {share:.3f} "
              f"(the former goal {RANKER_GOAL_SHARE})")  # fmt: skip
    true_clicks = checks.get("pipeline_beats_every_baseline_in_true_clicks")
    if true_clicks is not None:  # not a goal of the issue: how to read the first one
        print(f"(not a goal) pipeline beats every baseline in the generator's true clicks per place: {true_clicks}")
    print(f"results: {args.out}")
    return 0 if all(goals.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

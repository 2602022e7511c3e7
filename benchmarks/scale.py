"""Scale benchmark: the data stage and the NVTabular step at growing sizes, and batch scoring at AliCCP's user count.

    .venv/bin/python benchmarks/scale.py [--rows 1000000 4000000 16000000] [--score-users 615599]
                                         [--score-rows 4000000] [--no-categorify] [--work DIR]

1. For each size of `--rows`, generated data goes through every data-stage step and the NVTabular step, each in a
   fresh process (benchmarks/data_stage.py's measurements: rows/s, peak RSS, Categorify against pandas factorize,
   and where Categorify's time goes). Printed: that table, each step's time ratio from the smallest size to the
   largest with its scaling exponent b (time grows as rows**b; least squares over every size, log-log), and the
   goals: the largest size in at most 18 times the time of the 1M run for 16x the rows (b <= 1.04), peak memory
   at 16M of 8 GiB or less.
2. Batch scoring at AliCCP's 615,599 users: `--score-rows` generated rows over `--score-users` users (the models
   are trained on this sample, one epoch each, not on AliCCP's 85M rows), the pipeline run as the DAG runs it up
   to `batch_score`, which scores every user; printed: its users/s, each step's time and the largest step
   process's peak RSS. `--score-users 0` skips it; `--rows` with no size skips part 1.

Results go to benchmarks/results/scale.json. About 15 minutes for part 1 and 95 for part 2 on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import sys
import tempfile
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from benchmarks import data_stage  # noqa: E402
from benchmarks.pipeline_steps import StepTimes, run_steps  # noqa: E402

ALICCP_USERS = 615_599
DATA_STEPS = ("csv_to_parquet", "clean_null_rows", "resplit", "validate")
TIME_GOAL = 18.0  # 16x the rows in at most 18x the time
MEMORY_GOAL_MB = 8 * 1024


def step_seconds(results: dict) -> dict[str, float]:
    """Seconds of each step of one size's data_stage results."""
    seconds = {step: results[step]["seconds"] for step in DATA_STEPS}
    seconds["nvtabular_fit_transform"] = results["nvtabular"]["step_seconds"]
    if "categorify_seconds" in results["nvtabular"]:
        seconds["Categorify"] = results["nvtabular"]["categorify_seconds"]
    return seconds


def scaling_exponent(rows: list[int], seconds: list[float]) -> float:
    """b of seconds = a * rows**b, by least squares on the logarithms."""
    import numpy as np

    return float(np.polyfit(np.log(rows), np.log(seconds), 1)[0])


def scaling_report(all_results: list[dict]) -> str:
    rows = [results["rows"] for results in all_results]
    times = [step_seconds(results) for results in all_results]
    lines = [f"Scaling {rows[0]:,} -> {rows[-1]:,} rows (goal: 16x the rows in at most {TIME_GOAL:.0f}x the time, "
             f"that is b <= {math.log(TIME_GOAL) / math.log(16):.2f}):",
             "", "| step | " + " | ".join(f"s at {count:,}" for count in rows) + " | time ratio | b |",
             "|---|" + "---:|" * (len(rows) + 2)]  # fmt: skip
    for step in times[0]:
        if any(step not in time for time in times):
            continue
        seconds = [time[step] for time in times]
        lines.append(f"| {step} | " + " | ".join(f"{value:,.1f}" for value in seconds)
                     + f" | {seconds[-1] / seconds[0]:.1f} | {scaling_exponent(rows, seconds):.2f} |")  # fmt: skip
    largest = all_results[-1]
    peak = max([largest[step]["peak_rss_mb"] for step in DATA_STEPS] + [largest["nvtabular"]["peak_rss_mb"]])
    lines.append("")
    lines.append(f"Peak RSS at {rows[-1]:,} rows: {peak:,.0f} MB (goal at 16M: {MEMORY_GOAL_MB:,} MB or less)")
    return "\n".join(lines)


def batch_scoring(users: int, rows: int, work: Path) -> dict:
    """The pipeline up to batch_score on `rows` generated rows over `users` users; batch_score's own users/s."""
    from recsys.datagen import GeneratorConfig, generate_dataset

    raw, run = work / "score-raw", work / "score-run"
    generate_dataset(GeneratorConfig(rows=rows, seed=1, users=users), raw, progress=False)
    times = StepTimes()
    run_steps(raw, run, None, times, two_tower_epochs=1, ranker_epochs=1, ranker_model="dlrm")
    metrics = json.loads((run / "batch_score" / "_metrics.json").read_text())
    return {"users": metrics["users"], "rows": rows, "users_per_second": metrics["users_per_second"],
            "step_seconds": times.seconds, "top_k": metrics["config"]["top_k"],
            # ru_maxrss of the children: the largest step process's peak (the trainer steps, batch_score's own).
            "largest_step_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}  # fmt: skip


def scoring_report(scored: dict) -> str:
    steps = ", ".join(f"{name} {seconds:,.0f} s" for name, seconds in scored["step_seconds"].items())
    minutes = scored["users"] / scored["users_per_second"] / 60
    peak = scored["largest_step_peak_rss_mb"]
    return (f"Batch scoring: {scored['users']:,} users (trained on {scored['rows']:,} generated rows) at "
            f"{scored['users_per_second']:,.0f} users/s, top {scored['top_k']} candidates each ({minutes:,.1f} "
            f"minutes for every user); steps: {steps}; largest step process's peak RSS {peak:,.0f} MB")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="*", default=[1_000_000, 4_000_000, 16_000_000])
    parser.add_argument("--score-users", type=int, default=ALICCP_USERS)
    parser.add_argument("--score-rows", type=int, default=4_000_000)
    parser.add_argument("--no-categorify", action="store_true",
                        help="skip Categorify alone against factorize (two more NVTabular passes; for large sizes)")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    results: dict = {}
    with tempfile.TemporaryDirectory(dir=args.work) as scratch:
        if args.rows:
            results["sizes"] = []
            for rows in sorted(args.rows):
                # One size at a time, each step's input removed once read (lean), the rest after.
                results["sizes"].append(data_stage.run(rows, Path(scratch) / str(rows), repeats=0,
                                                       categorify=not args.no_categorify, lean=True))
                shutil.rmtree(Path(scratch) / str(rows))
                print(f"{rows:,} rows measured", flush=True)
            print(data_stage.report(results["sizes"]))
            if len(args.rows) >= 2:
                print()
                print(scaling_report(results["sizes"]))
        if args.score_users:
            results["batch_scoring"] = batch_scoring(args.score_users, args.score_rows, Path(scratch))
            print()
            print(scoring_report(results["batch_scoring"]))
    results_dir = PROJECT_ROOT / "benchmarks" / "results"
    results_dir.mkdir(exist_ok=True)
    (results_dir / "scale.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

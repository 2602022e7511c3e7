"""Two-tower tuning on a validation split carved from train: L2 normalization with a softmax temperature, the
towers' widths (the embedding's dimension) and the in-batch negatives per positive (the batch size).

    .venv/bin/python benchmarks/two_tower_tuning.py --run DIR [--spec SPEC] [--epochs 10] [--stages 3] [--seeds 1]
                                                    [--resume]

`--run` is a run folder whose `nvtabular/` holds a train split and a validation split carved from train, e.g.
`benchmarks/movielens.py --work W`'s `W/run` (ML-1M's fit and validation parts; its test split is elsewhere). On
generated rows, `benchmarks/quality.py` reports on its run's validation split: tune on a run of another generator
seed (`--seed 6`, as the blend weight was chosen), never on the seed whose numbers are reported.

Each setting trains the real step (`recsys train-two-tower`, trainer environment) into `<run>/two_tower_tuning/<name>`,
with early stopping on the validation split as the nightly step does, and is judged by the step's own validation
metrics at its best epoch (every validation user's query against the whole catalog, the items the spec's
`exclude_seen` rule keeps out of the served lists left out: "unseen" recall and NDCG). The search goes one factor at
a time, each stage keeping the best setting so far by validation unseen recall@100 (the metric that also picks the
epoch):
1. L2 normalization and temperature: off (the dot product, temperature 1), then on with temperatures 1, 0.2, 0.1, 0.05;
2. tower widths: 128,64 (the default), 256,128, 64,32;
3. negatives: the batch size (in-batch negatives per positive) 512 (the default), 2048, 128, and 512 without the
   logQ correction of in-batch negatives' popularity.
Then the defaults and the chosen setting are trained again with `--seeds` more seeds: a difference smaller than the
seeds' own range is not a reason to change a default.
Prints the table and writes `benchmarks/results/two_tower_tuning-<spec name>.json`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

CRITERION = "unseen_recall_at_100"  # the metric that also picks the epoch (tasks/train_two_tower.py)
REPORTED = ("unseen_recall_at_100", "unseen_recall_at_500", "unseen_ndcg_at_10", "recall_at_100", "ndcg_at_10")
# Each stage: the settings tried (TwoTowerConfig fields), each over the best of the stages before.
STAGES: tuple[tuple[str, dict[str, dict[str, object]]], ...] = (
    ("normalization and temperature", {
        "dot": {"l2_normalize": False, "logits_temperature": 1.0},
        "cosine-t1": {"l2_normalize": True, "logits_temperature": 1.0},
        "cosine-t0.2": {"l2_normalize": True, "logits_temperature": 0.2},
        "cosine-t0.1": {"l2_normalize": True, "logits_temperature": 0.1},
        "cosine-t0.05": {"l2_normalize": True, "logits_temperature": 0.05},
    }),
    ("tower widths", {
        "128,64": {"tower_layers": (128, 64)},
        "256,128": {"tower_layers": (256, 128)},
        "64,32": {"tower_layers": (64, 32)},
    }),
    ("negatives", {
        "batch512": {"batch_size": 512}, "batch2048": {"batch_size": 2048}, "batch128": {"batch_size": 128},
        "batch512-no-logq": {"batch_size": 512, "logq_sampling_correction": False},
    }),
)  # fmt: skip


def cli_arguments(setting: dict[str, object]) -> list[str]:
    """`recsys train-two-tower`'s arguments for a setting."""
    arguments: list[str] = []
    for field, value in sorted(setting.items()):
        if field in ("l2_normalize", "logq_sampling_correction"):
            flag = "l2-normalize" if field == "l2_normalize" else "logq-correction"
            arguments.append(f"--{flag}" if value else f"--no-{flag}")
        elif field == "logits_temperature":
            arguments += ["--temperature", f"{value:g}"]
        elif field == "tower_layers":
            arguments += ["--tower-layers", ",".join(map(str, value))]  # type: ignore[call-overload]
        else:
            arguments += [f"--{field.replace('_', '-')}", str(value)]
    return arguments


def without_defaults(setting: dict[str, object]) -> dict[str, object]:
    """The setting's fields whose values are not TwoTowerConfig's defaults: equal settings, equal keys."""
    from tasks.train_two_tower import TwoTowerConfig

    defaults = TwoTowerConfig()
    return {field: value for field, value in setting.items() if getattr(defaults, field) != value}


def train(run: Path, spec: Path | None, setting: dict[str, object], epochs: int, resume: bool) -> dict:
    """One setting, trained by the nightly step into <run>/two_tower_tuning/<its arguments>; its history.json."""
    from recsys.run_layout import RunLayout
    from recsys.settings import get_settings
    from recsys.trainer_env import run_trainer_step

    arguments = cli_arguments(setting)
    output = run / "two_tower_tuning" / "_".join(part.lstrip("-") for part in arguments)
    if resume and (output / "history.json").exists():
        print(f"kept {output}", flush=True)
        return json.loads((output / "history.json").read_text())
    spec_arguments = ["--spec", str(spec)] if spec else []
    run_trainer_step(get_settings().trainer_python, "train-two-tower",
                     ["--input", str(RunLayout(run).nvtabular), "--output", str(output), "--epochs", str(epochs),
                      *arguments, *spec_arguments])  # fmt: skip
    return json.loads((output / "history.json").read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a run folder with nvtabular/train and valid")
    parser.add_argument("--spec", type=Path, default=None, help="the run's dataset spec (default: AliCCP's)")
    parser.add_argument("--epochs", type=int, default=10, help="most epochs per setting (early stopping, patience 2)")
    parser.add_argument("--resume", action="store_true", help="keep settings already trained under --run")
    parser.add_argument("--stages", type=int, default=len(STAGES), choices=range(1, len(STAGES) + 1),
                        help="run the first N stages only (default: all %(default)s)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="train the defaults and the chosen setting again with this many more seeds, to see "
                             "whether their difference is more than a seed's (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON (default: benchmarks/results/two_tower_tuning-<spec name>.json)")
    args = parser.parse_args()

    from recsys.spec import load_spec
    from tasks.train_two_tower import TwoTowerConfig

    spec_name = load_spec(args.spec).name
    started = time.perf_counter()
    chosen: dict[str, object] = {}  # the best setting so far
    names: list[str] = []  # each stage's chosen setting
    histories: dict[str, dict] = {}  # by the setting's arguments: a setting equal to one tried is not trained again
    rows = []
    for stage, settings in STAGES[: args.stages]:
        measured = {}
        for name, change in settings.items():
            setting = {**chosen, **change}
            key = " ".join(cli_arguments(without_defaults(setting))) or "(the defaults)"
            if key not in histories:
                histories[key] = train(args.run, args.spec, setting, args.epochs, args.resume)
            history = histories[key]
            best = history["best"]
            measured[name] = best[CRITERION]
            rows.append({"stage": stage, "setting": name, "arguments": key, "best_epoch": history["best_epoch"],
                         "epochs_run": len(history["history"]), "seconds": history["seconds"],
                         **{metric: best[metric] for metric in REPORTED}})  # fmt: skip
            print(f"{stage}: {key}: {CRITERION} {best[CRITERION]:.4f}, unseen NDCG@10 {best['unseen_ndcg_at_10']:.4f}, "
                  f"epoch {history['best_epoch']}, {history['seconds']:.0f} s", flush=True)  # fmt: skip
        names.append(max(measured, key=lambda name: measured[name]))  # the first of equals: the earlier setting
        chosen |= settings[names[-1]]
    # A single training's number moves with the seed (initialization, batch order): both ends again with other seeds.
    by_seed: dict[str, list[float]] = {}
    for label, setting in (("defaults", {}), ("chosen", chosen)):
        for seed in range(TwoTowerConfig.seed, TwoTowerConfig.seed + args.seeds + 1):
            seeded = without_defaults({**setting, "seed": seed})
            key = " ".join(cli_arguments(seeded)) or "(the defaults)"
            if key not in histories:
                histories[key] = train(args.run, args.spec, seeded, args.epochs, args.resume)
            by_seed.setdefault(label, []).append(histories[key]["best"][CRITERION])
    seconds = time.perf_counter() - started

    table = ["| stage | setting | unseen recall@100 | unseen recall@500 | unseen NDCG@10 | recall@100 | NDCG@10 | "
             "best epoch | seconds |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for row in rows:
        mark = "**" if row["setting"] in names else ""
        metrics = " | ".join(f"{row[metric]:.4f}" for metric in REPORTED)
        table.append(f"| {row['stage']} | {mark}{row['arguments']}{mark} | {metrics} | {row['best_epoch']} of "
                     f"{row['epochs_run']} | {row['seconds']:.0f} |")  # fmt: skip
    print("\n".join(table))
    print(f"chosen on validation ({CRITERION}): recsys train-two-tower {' '.join(cli_arguments(chosen))}; "
          f"{len(histories)} trainings, {seconds / 60:.1f} minutes")  # fmt: skip
    for label, values in by_seed.items():
        print(f"{label}, {len(values)} seeds: {CRITERION} " + ", ".join(f"{value:.4f}" for value in values)
              + f" (mean {sum(values) / len(values):.4f}, range {max(values) - min(values):.4f})")  # fmt: skip
    out = args.out or PROJECT_ROOT / "benchmarks" / "results" / f"two_tower_tuning-{spec_name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join([".venv/bin/python", "benchmarks/two_tower_tuning.py", *map(shlex.quote, sys.argv[1:])])
    out.write_text(json.dumps({"command": command, "spec": spec_name, "criterion": CRITERION, "chosen": chosen,
                               "arguments": cli_arguments(chosen), "rows": rows, "by_seed": by_seed,
                               "seconds": seconds},
                              indent=2) + "\n")  # fmt: skip
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

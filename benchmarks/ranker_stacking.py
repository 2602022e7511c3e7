"""Would the two-tower's score, given to the ranker, reach the ranker goal? Measured on a quality run.

    .venv/bin/python benchmarks/quality.py --work DIR          # a run to measure (about 20 minutes)
    .venv/bin/python benchmarks/ranker_stacking.py --work DIR  # about 1 minute

The ranker (DLRM) stops at about 68% of the way from AUC 0.5 to the oracle's (goal: 90%). The ceiling
estimates (`benchmarks/ranker_ceiling.py`) put the largest piece it leaves in what an item's audience says
about it, which the two-tower learns from every training click. The next modelling step would feed the
two-tower's score to the ranker; this measures what it could bring before it is built. Each validation row
gets the pipeline's own retrieval score, the inner product of the query tower's embedding of the row's user
features and the item's embedding (the trainer environment computes it), and the two scores are combined:

- logistic regression on (ranker logit, inner product, its gap to the user's best and to the user's 500th
  retrieved item), and gradient boosting on the same (scikit-learn);
- both fitted on validation rows and scored out of fold (`--folds`, split by user).

That estimate has it easier than a ranker trained on the training rows in two ways (no shift between the rows
it learns from and those it is scored on; no inner products inflated by the two-tower having trained on those
very clicks) and harder in one (the score is not combined with the raw features). Also printed: the served
blends (`models.blend.blend_scores`, which order each user's candidates; their AUC across users is
given for reference, not as a goal). Writes benchmarks/results/ranker_stacking.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

TRAINER_PYTHON = PROJECT_ROOT / ".venv-trainer" / "bin" / "python"
BLEND_WEIGHTS = (0.25, 0.5, 1.0, 1.5, 4.0)
RETRIEVED = 500  # the batch scoring's top K


def retrieval_scores(run: Path, towers: dict[str, Path], output: Path) -> None:
    """(Trainer environment.) The ranker's validation predictions, with each row's inner product in each of
    `towers` (name -> a train_two_tower output), its user's best over the catalog and its user's 500th."""
    from models.online_pipeline import ItemEmbeddings, PipelineArtifacts, PipelineColumns, Tower
    from recsys.parquet_io import nvtabular_part_files
    from recsys.spec import load_spec

    spec = load_spec()
    target, user, item = spec.primary_target, spec.user_id, spec.item_id
    valid = pd.concat([pd.read_parquet(path) for path in nvtabular_part_files(run / "nvtabular" / "valid")],
                      ignore_index=True)  # fmt: skip
    predictions = pd.read_parquet(run / "ranker" / "valid_predictions.parquet")  # in the same row order
    if not np.array_equal(predictions[target].to_numpy(), valid[target].to_numpy()):
        raise SystemExit(f"{run}/ranker/valid_predictions.parquet does not match {run}/nvtabular/valid row by row")
    columns = PipelineColumns.of_run(PipelineArtifacts.of_run(run), spec)
    users = valid.drop_duplicates(user).reset_index(drop=True)
    row_user = pd.Index(users[user]).get_indexer(valid[user])
    found = pd.DataFrame({"label": valid[target].to_numpy(), "user": valid[user].to_numpy(),
                          "ranker": predictions["score"].to_numpy()})  # fmt: skip
    for name, tower in towers.items():
        query_tower = Tower.query(tower / "query_tower", columns)
        queries = query_tower.embed({column: users[column].to_numpy() for column in columns.query_columns})
        embeddings = ItemEmbeddings.read(tower, 0)
        vectors, found[f"{name}_known_item"] = embeddings.queries(valid[item].to_numpy())
        found[f"{name}_inner_product"] = np.einsum("ij,ij->i", queries[row_user], vectors)
        catalog = embeddings.embeddings[embeddings.retrievable]
        best, last = np.empty(len(users), np.float32), np.empty(len(users), np.float32)
        for start in range(0, len(users), 1024):  # exact, a block of users at a time
            block = queries[start : start + 1024] @ catalog.T
            top = -np.partition(-block, RETRIEVED - 1, axis=1)[:, :RETRIEVED]
            best[start : start + 1024], last[start : start + 1024] = top.max(axis=1), top.min(axis=1)
        found[f"{name}_best"], found[f"{name}_last_retrieved"] = best[row_user], last[row_user]
    found.to_parquet(output)


def stacked(rows: pd.DataFrame, towers: list[str], folds: int) -> dict[str, np.ndarray]:
    """Out-of-fold probabilities of each combiner of the ranker and `towers`' scores, fitted on the rows' labels
    (folds split by user)."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    ranker = np.clip(rows["ranker"].to_numpy(), 1e-6, 1 - 1e-6)
    features = [np.log(ranker / (1 - ranker))]
    for tower in towers:
        inner = rows[f"{tower}_inner_product"].to_numpy()
        best, last = rows[f"{tower}_best"].to_numpy(), rows[f"{tower}_last_retrieved"].to_numpy()
        features += [inner, inner - best, inner - last, rows[f"{tower}_known_item"].to_numpy()]
    inputs, labels = np.column_stack(features), rows["label"].to_numpy()
    combiners = {
        "logistic regression": lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)),
        "gradient boosting": lambda: HistGradientBoostingClassifier(random_state=0),
    }
    found = {name: np.zeros(len(rows)) for name in combiners}
    for fit_rows, score_rows in GroupKFold(n_splits=folds).split(inputs, labels, rows["user"]):
        for name, make in combiners.items():
            model = make().fit(inputs[fit_rows], labels[fit_rows])
            found[name][score_rows] = model.predict_proba(inputs[score_rows])[:, 1]
    return found


def oracle_auc(work: Path) -> float:
    """The generator's true probabilities' AUC on the run's validation rows (as tasks/evaluate.py measures it)."""
    import pyarrow.parquet as pq
    from sklearn.metrics import roc_auc_score

    from recsys.spec import load_spec
    from tasks.track_training import oracle_click_probabilities

    spec = load_spec()
    valid_dir = work / "run" / "resplit" / "valid"
    truth = oracle_click_probabilities(work / "raw", valid_dir, spec)
    if truth is None:
        raise SystemExit(f"{work}/raw has no oracle file: run benchmarks/quality.py --work {work} first")
    files = sorted(valid_dir.glob("part-*.parquet"))
    labels = pd.concat([pq.read_table(path, columns=[spec.primary_target]).to_pandas() for path in files])
    return float(roc_auc_score(labels[spec.primary_target].to_numpy(), truth))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="the --work folder of a benchmarks/quality.py run")
    parser.add_argument("--shown-epochs", type=int, default=4,
                        help="epochs of a two-tower trained on every shown row (kept in WORK/two_tower_shown; 0: none)")
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "benchmarks" / "results" / "ranker_stacking.json")
    parser.add_argument("--retrieval-scores", nargs=2, type=Path, metavar=("RUN", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--tower", action="append", default=[], metavar="NAME=DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.retrieval_scores:  # the part run in the trainer environment
        run, output = args.retrieval_scores
        retrieval_scores(run, dict((name, Path(path)) for name, path in (pair.split("=", 1) for pair in args.tower)),
                         output)  # fmt: skip
        return 0

    from sklearn.metrics import roc_auc_score

    from recsys.ranking_metrics import auc_shares, auc_shares_table
    from recsys.trainer_env import run_trainer_step

    run = args.work / "run"
    towers = {"clicked": run / "two_tower"}
    if args.shown_epochs > 0:
        towers["shown"] = args.work / "two_tower_shown"
        if not towers["shown"].exists():
            print(f"training a two-tower on every shown row: {args.shown_epochs} epochs, about 90 s each", flush=True)
            run_trainer_step(TRAINER_PYTHON, "train-two-tower", [
                "--input", str(run / "nvtabular"), "--output", str(towers["shown"]),
                "--epochs", str(args.shown_epochs), "--positives", "shown",
            ])  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="recsys-stacking-") as scratch:
        scores_file = Path(scratch) / "scores.parquet"
        subprocess.run([str(TRAINER_PYTHON), __file__, "--work", str(args.work), "--retrieval-scores", str(run),
                        str(scores_file), *(f"--tower={name}={path}" for name, path in towers.items())],
                       check=True)  # fmt: skip
        rows = pd.read_parquet(scores_file)
    oracle = oracle_auc(args.work)
    labels = rows["label"].to_numpy()
    scores = {"ranker (DLRM)": rows["ranker"]}
    scores |= {f"two-tower ({name} rows) inner product": rows[f"{name}_inner_product"] for name in towers}
    gap = rows["clicked_inner_product"] - rows["clicked_best"]
    scores |= {f"served blend, retrieval weight {weight}": rows["ranker"] * np.exp(weight * gap)
               for weight in BLEND_WEIGHTS}  # fmt: skip
    combinations = [[name] for name in towers] + ([list(towers)] if len(towers) > 1 else [])
    for combination in combinations:
        for name, found in stacked(rows, combination, args.folds).items():
            scores[f"ranker + two-tower ({' and '.join(combination)}), {name}"] = found
    aucs = {name: float(roc_auc_score(labels, score)) for name, score in scores.items()}
    result = {
        "work": str(args.work), "rows": len(rows), "users": int(rows["user"].nunique()), "folds": args.folds,
        "towers": {name: str(path) for name, path in towers.items()}, "oracle_auc": oracle,
        **auc_shares(aucs, oracle),
    }  # fmt: skip
    print(f"{len(rows):,} validation rows, {result['users']:,} users; oracle AUC {oracle:.4f}; combiners fitted "
          f"out of fold ({args.folds} folds by user)")  # fmt: skip
    print(auc_shares_table(result, "scores"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

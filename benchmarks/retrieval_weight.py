"""Choose the retrieval weight of the final order (`models.blend.blend_scores`) on validation users.

    .venv-trainer/bin/python benchmarks/retrieval_weight.py --run RUN [--raw-input DIR] [--weights 0,0.5,1]
                                                            [--top-k 500] [--out JSON]

`RUN` is a run folder with resplit/, nvtabular/, two_tower/, ranker/ and faiss_index/ (e.g. the `run/` of
`benchmarks/quality.py --work DIR`). For the users the evaluation judges the final lists on
(`tasks/evaluate.py`: validation users with a click left after the business rules), retrieval, the rules
and the ranker run once, as batch scoring runs them; then the same candidates are ordered for each weight
with the pipeline's own `blend_scores` and `order`, and the top 10 measured as the evaluation measures
them: NDCG@10 (with its standard error over users) and recall@10 on logged clicks and, with the
generator's folder (`--raw-input`), the true click rate. Each number is given for all users and for the
two halves by user id parity, so a weight can be chosen on one half (or one seed) and judged on the other.

The choice uses logged clicks only (a live system has no true click rates): the smallest weight whose
NDCG@10 is within one standard error of the best weight's (the one-standard-error rule). NDCG@10 rises
with the weight to a plateau, while the true click rate falls past small weights: the rule takes the
start of the plateau, where the ranker still reorders. Trainer environment (TensorFlow).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))  # run as a script from anywhere

DEFAULT_WEIGHTS = "0,0.1,0.25,0.5,0.75,1,1.5,2,3,4,6,8,1e6"  # 1e6: the retrieval's own order
FINAL_K = 10


def main() -> int:
    from models.blend import blend_scores
    from models.online_pipeline import (
        MISSING,
        PipelineArtifacts,
        RecommendationPipeline,
        filter_candidates,
        order,
    )
    from recsys.ranking_metrics import user_list_metrics
    from recsys.spec import load_spec
    from tasks.baselines import final_list_data, generator_truth, prepare, true_click_rates, users_subset
    from tasks.batch_score import seen_items_by_user
    from tasks.evaluate import read_splits

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--raw-input", type=Path, default=None, help="the generator's folder (true click rates)")
    parser.add_argument("--weights", default=DEFAULT_WEIGHTS, help="comma-separated")
    parser.add_argument("--top-k", type=int, default=500, help="retrieved candidates per user (batch_score's)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table as JSON here")
    args = parser.parse_args()
    weights = [float(value) for value in args.weights.split(",")]

    spec = load_spec()
    train, valid = read_splits(args.run, spec)
    data = prepare(train, valid, spec)  # the benchmark has no unavailable items
    users, _ = final_list_data(data)
    pipeline = RecommendationPipeline(PipelineArtifacts.of_run(args.run), spec)
    seen_items = seen_items_by_user(args.run / "nvtabular", spec)

    # Retrieval, rules and ranker once (the expensive part), for the evaluated users the run knows.
    candidates = np.full((len(users.users), args.top_k), MISSING, dtype=np.int64)
    inner_products = np.zeros(candidates.shape, dtype=np.float32)
    ranker_scores = np.full(candidates.shape, np.nan, dtype=np.float32)
    for start in range(0, len(users.users), 512):
        batch = users.users[start : start + 512]
        features, known = pipeline.user_features(batch)
        rows = np.arange(start, start + len(batch))[known]
        if not len(rows):
            continue
        found, products = pipeline.retrieve(pipeline.embed_users(features), args.top_k)
        excluded = [seen_items.get(int(user), np.empty(0, dtype=np.int64)) for user in batch[known]]
        found = filter_candidates(found, excluded=excluded)
        candidates[rows], inner_products[rows] = found, products
        ranker_scores[rows] = pipeline.score(features, found)

    lists = {}
    for weight in weights:
        blended = blend_scores(candidates, ranker_scores, inner_products, weight)
        lists[str(weight)] = pipeline.raw_items(order(candidates, blended, FINAL_K)[0])
    halves = {"all": np.ones(len(users.users), dtype=bool), "even_ids": users.users % 2 == 0,
              "odd_ids": users.users % 2 == 1}  # fmt: skip
    truth = generator_truth(args.raw_input, data) if args.raw_input else None
    table: dict[str, dict[str, dict[str, float]]] = {name: {} for name in lists}
    for half, mask in halves.items():
        subset = users_subset(users, mask)
        rates = true_click_rates({name: top[mask] for name, top in lists.items()}, subset, FINAL_K, truth)[0] \
            if truth is not None else {}  # fmt: skip
        for name, top in lists.items():
            measured = user_list_metrics(top[mask], subset.relevant, FINAL_K)
            ndcg = measured["ndcg_at_10"]
            row = {"users": int(mask.sum()), "ndcg_at_10": float(ndcg.mean()),
                   "ndcg_at_10_standard_error": float(ndcg.std(ddof=1) / np.sqrt(len(ndcg))),
                   "recall_at_10": float(measured["recall_at_10"].mean())}  # fmt: skip
            if name in rates:
                row["true_click_rate_at_10"] = rates[name]
            table[name][half] = row

    metrics = ("ndcg_at_10", "ndcg_at_10_standard_error", "true_click_rate_at_10")
    columns = [(half, metric) for half in halves for metric in metrics if metric in table[str(weights[0])][half]]
    print(f"{len(users.users):,} users ({int(halves['even_ids'].sum()):,} even ids, "
          f"{int(halves['odd_ids'].sum()):,} odd), top {args.top_k} candidates")  # fmt: skip
    print("| retrieval weight | " + " | ".join(f"{metric} ({half})" for half, metric in columns) + " |")
    print("|---:|" + "---:|" * len(columns))
    for name in lists:
        print(f"| {name} | " + " | ".join(f"{table[name][half][metric]:.4f}" for half, metric in columns) + " |")
    chosen = {}
    for half in halves:
        best = max(lists, key=lambda name: table[name][half]["ndcg_at_10"])
        floor = table[best][half]["ndcg_at_10"] - table[best][half]["ndcg_at_10_standard_error"]
        chosen[half] = min((name for name in lists if table[name][half]["ndcg_at_10"] >= floor), key=float)
        print(f"{half}: best NDCG@10 at weight {best}; one-standard-error choice: weight {chosen[half]}")
    if args.out:
        answer = {"run": str(args.run), "top_k": args.top_k, "chosen": chosen, "table": table}
        args.out.write_text(json.dumps(answer, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The in-process pipeline's answers for given users and items, as JSON (run in the trainer environment).

`tests/test_triton_ensemble.py` compares the Triton ensembles with these. The business rules are the
ones batch scoring applies: each user's seen items and the unavailable items are filtered out
("unfiltered" is the same ranking without them). "recommend" is the ranked order (temperature 0),
with the item-to-item source over each user's history and the weights given as the export's,
"sampled" the order drawn at `--temperature` with `--seed`, "newcomer" the ranked order without seen items
or history (a raw id the run does not know, sent with these users' features). With `--given FILE` (JSON:
"features", encoded user columns -> one value per row, and optionally "context", encoded context columns -> one
value per row), "given" is the ranked order of those rows as newcomers, with that context (and the products of
`--fresh`, if given). With `--fresh FILE`
(JSON: "ids", raw ids of products the run does not know, and "features", their item columns packed), "fresh" is the
ranked order (business rules applied) with those products embedded by the in-process item tower and added
(`FreshItems`), "fresh_embeddings" those embeddings and "fresh_candidates" how many of them each user retrieved.

    .venv-trainer/bin/python tests/in_process_pipeline.py --run RUN --users 1,2 --items 3,4 --output out.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from models.online_pipeline import MISSING, FreshItems, PipelineArtifacts, RecommendationPipeline
from recsys.spec import load_spec
from tasks.batch_score import read_unavailable, seen_items_by_user


def _ids(text: str) -> np.ndarray:
    return np.array([int(value) for value in text.split(",") if value], dtype=np.int64)


def _rows(matrix: np.ndarray) -> list[list]:
    """Rows as lists, NaN as None (JSON has no NaN)."""
    return [[None if isinstance(value, float) and np.isnan(value) else value for value in row]
            for row in matrix.tolist()]  # fmt: skip


def added_candidates(pipeline: RecommendationPipeline, features: dict, histories: list, top_k: int) -> list[list[int]]:
    found = pipeline.candidates(features, top_k=top_k, histories=histories)["candidates"]
    two_tower, _ = pipeline.retrieve(pipeline.embed_users(features), top_k)
    return [sorted(set(pipeline.raw_items(row[row >= 0]).tolist()) - set(pipeline.raw_items(faiss_row).tolist()))
            for row, faiss_row in zip(found, two_tower, strict=True)]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--users", type=_ids, required=True, help="raw user ids, comma-separated (all known)")
    parser.add_argument("--items", type=_ids, required=True, help="raw item ids, comma-separated")
    parser.add_argument("--top-k", type=int, required=True)
    parser.add_argument("--top-n", type=int, required=True)
    parser.add_argument("--similar-n", type=int, required=True)
    parser.add_argument("--temperature", type=float, required=True, help="of the sampled answer")
    parser.add_argument("--seed", type=int, required=True, help="of the sampled answer")
    parser.add_argument("--unavailable-items", type=Path, default=None)
    parser.add_argument("--retrieval-weight", type=float, required=True, help="as exported")
    parser.add_argument("--item-to-item-weight", type=float, required=True, help="as exported")
    parser.add_argument("--source-weights", type=lambda text: [float(part) for part in text.split(",")],
                        required=True, help="as exported, comma-separated")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--spec", type=Path, default=None, help="the run's dataset spec (default: AliCCP's)")
    parser.add_argument("--given", type=Path, default=None, help="encoded features (and context) of newcomers")
    parser.add_argument("--fresh", type=Path, default=None, help="products added since the run (ids, packed columns)")
    args = parser.parse_args()

    spec = load_spec(args.spec)
    pipeline = RecommendationPipeline(PipelineArtifacts.of_run(args.run), spec)
    features, known = pipeline.user_features(args.users)
    if not known.all():
        raise SystemExit(f"unknown users: {args.users[~known].tolist()}")
    unavailable = np.zeros(len(pipeline.item_raw_ids), dtype=bool)
    codes = pipeline.encode_items(sorted(read_unavailable(args.unavailable_items, spec)))
    unavailable[codes[codes >= 0]] = True
    seen_items = seen_items_by_user(args.run / "nvtabular", spec)
    excluded = [seen_items.get(int(user), np.empty(0, dtype=np.int64)) for user in args.users]
    assert pipeline.histories is not None, "the run was built without the item-to-item source"
    histories = pipeline.histories.of_users(args.users)

    def recommend(temperature: float, features: dict = features, fresh: FreshItems | None = None,
                  **rules: object) -> dict:  # fmt: skip
        rules = {"histories": histories, "fresh": fresh, **rules}
        result = pipeline.recommend(features, top_k=args.top_k, top_n=args.top_n, temperature=temperature,
                                    rng=np.random.default_rng(args.seed), retrieval_weight=args.retrieval_weight,
                                    item_to_item_weight=args.item_to_item_weight,
                                    source_weights=args.source_weights, **rules)  # type: ignore[arg-type]  # fmt: skip
        return {"item_ids": pipeline.raw_items(result["items"], fresh).tolist(), "scores": _rows(result["scores"]),
                "probabilities": _rows(result["probabilities"]),
                "click_probabilities": _rows(result["click_probabilities"])}  # fmt: skip

    similar_ids, similarity = pipeline.similar_items(pipeline.encode_items(args.items), args.similar_n,
                                                     unavailable=unavailable)  # fmt: skip
    answer = {
        "recommend": recommend(0.0, excluded=excluded, unavailable=unavailable),
        "sampled": recommend(args.temperature, excluded=excluded, unavailable=unavailable),
        "unfiltered": recommend(0.0),
        # As for a user the run never saw, sent with these users' features: nothing seen, no history.
        "newcomer": recommend(0.0, unavailable=unavailable, histories=[np.empty(0, dtype=np.int64)] * len(args.users)),
        "purchases": [pipeline.raw_items(items).tolist() for items in excluded],
        # The candidates the item-to-item source and popularity added to the two-tower's, before the rules.
        "added_candidates": added_candidates(pipeline, features, histories, args.top_k),
        "similar": {"item_ids": pipeline.raw_items(similar_ids).tolist(), "scores": _rows(similarity)},
    }
    columns = pipeline.columns
    fresh = None
    if args.fresh is not None:
        added = json.loads(args.fresh.read_text())
        packed = np.array(added["features"], dtype=np.int64)
        embeddings = pipeline.embed_items(columns.unpack(packed, columns.item_columns))
        fresh = FreshItems.from_tensors(columns, np.array(added["ids"]), packed, embeddings)
        answer["fresh"] = recommend(0.0, excluded=excluded, unavailable=unavailable, fresh=fresh)
        answer["fresh_embeddings"] = embeddings.tolist()
        found = pipeline.candidates(features, top_k=args.top_k, histories=histories, fresh=fresh)["candidates"]
        answer["fresh_candidates"] = [int(((row >= fresh.offset) & (row != MISSING)).sum()) for row in found]
        # --items may name added products: searched with their own embeddings.
        similar_ids, similarity = pipeline.similar_items(pipeline.encode_items(args.items), args.similar_n,
                                                         unavailable=unavailable, fresh=fresh,
                                                         raw_ids=np.asarray(args.items))  # fmt: skip
        answer["fresh_similar"] = {"item_ids": pipeline.raw_items(similar_ids).tolist(), "scores": _rows(similarity)}
    if args.given is not None:  # with the products added since the run, where --fresh gives them
        given = json.loads(args.given.read_text())
        rows = {name: columns.values(name, values) for name, values in given["features"].items()}
        context = {name: columns.values(name, values) for name, values in given.get("context", {}).items()}
        count = len(next(iter(rows.values())))
        answer["given"] = recommend(0.0, features=rows, unavailable=unavailable, context=context or None,
                                    histories=[np.empty(0, dtype=np.int64)] * count, fresh=fresh)  # fmt: skip
    args.output.write_text(json.dumps(answer))


if __name__ == "__main__":
    main()

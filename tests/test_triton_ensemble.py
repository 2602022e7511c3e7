"""The exported Triton ensembles in a real `tritonserver` answer as the in-process pipeline does.

A small real run (the 50k-row data stage, a two-tower model, a DLRM ranker, the Faiss index) is
exported with `recsys export-triton-ensemble`, the run's own folders are hidden while the server
loads the repository (so it cannot lean on them), and `recommend` and `similar_products` are asked
for users and items whose in-process answers `RecommendationPipeline` gives in the trainer environment
(`tests/in_process_pipeline.py`), with the same seen items and unavailable items filtered out.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from models.online_pipeline import PipelineColumns
from recsys.parquet_io import nvtabular_part_files
from recsys.settings import get_settings
from recsys.spec import DatasetSpec
from serving.triton_server import TritonServer
from tasks.batch_score import seen_items_by_user
from tasks.cli import main as recsys_cli
from tests.conftest import latest_raw_features

pytestmark = pytest.mark.e2e

TOP_K, TOP_N, SIMILAR_N = 200, 20, 10  # the exported defaults
TEMPERATURE, SEED = 0.01, 7
# Exported, so the ordering stage's blend of the item-to-item score and the sources is compared too; no two-tower
# term, which would hold back every candidate the two-tower's top-k lacks (their inner products are below all of its).
RETRIEVAL_WEIGHT, ITEM_TO_ITEM_WEIGHT, SOURCE_WEIGHTS = 0.0, 4.0, "0.5,1.0,-0.5"
UNKNOWN_ID = 10**12
FRESH_IDS = np.array([UNKNOWN_ID + 1, UNKNOWN_ID + 2, UNKNOWN_ID + 3], dtype=np.int64)
RUN_FOLDERS = ("nvtabular", "two_tower", "ranker", "faiss_index")
RECOMMEND_OUTPUTS = ("item_ids", "scores", "probabilities", "click_probabilities", "known_users")
SIMILAR_OUTPUTS = ("item_ids", "scores", "known_items")


@pytest.fixture(scope="module")
def run_dir(trained_run: Path) -> Path:
    return trained_run


def positives(run: Path, spec: DatasetSpec) -> pd.DataFrame:
    columns = [spec.user_id + "_raw", spec.item_id + "_raw", spec.primary_target]
    parts = nvtabular_part_files(run / "nvtabular" / "train")
    frame = pd.concat([pd.read_parquet(path, columns=columns) for path in parts])
    return frame[frame[spec.primary_target] == 1]


@pytest.fixture(scope="module")
def chosen(run_dir: Path, spec: DatasetSpec) -> dict[str, np.ndarray]:
    """Users (half of them buyers), items to find similar ones for, and unavailable items (the most clicked)."""
    users = pd.read_parquet(run_dir / "nvtabular" / "user_features.parquet")[spec.user_id].to_numpy(dtype=np.int64)
    buyers = np.array(sorted(seen_items_by_user(run_dir / "nvtabular", spec)), dtype=np.int64)
    others = np.setdiff1d(users, buyers)
    popular = positives(run_dir, spec)[spec.item_id + "_raw"].value_counts().index.to_numpy(dtype=np.int64)
    return {
        "users": np.concatenate([buyers[:4], others[:4]]),
        "items": popular[3:9],
        "unavailable": popular[:3],
    }


@pytest.fixture(scope="module")
def exported(run_dir: Path, chosen: dict[str, np.ndarray], spec: DatasetSpec) -> tuple[Path, dict]:
    unavailable_csv = run_dir / "unavailable_items.csv"
    pd.DataFrame({spec.item_id: chosen["unavailable"]}).to_csv(unavailable_csv, index=False)
    repository, metrics_json = run_dir / "triton_repository", run_dir / "export_metrics.json"
    exit_code = recsys_cli([
        "export-triton-ensemble", "--input", str(run_dir), "--output", str(repository),
        "--top-k", str(TOP_K), "--top-n", str(TOP_N), "--similar-n", str(SIMILAR_N),
        "--unavailable-items", str(unavailable_csv), "--metrics-json", str(metrics_json),
        "--retrieval-weight", str(RETRIEVAL_WEIGHT), "--item-to-item-weight", str(ITEM_TO_ITEM_WEIGHT),
        f"--source-weights={SOURCE_WEIGHTS}",
    ])  # fmt: skip
    assert exit_code == 0
    return repository, json.loads(metrics_json.read_text())


@contextlib.contextmanager
def run_folders_hidden(run: Path) -> Iterator[None]:
    """The run's model and feature folders renamed away: whatever reads them fails."""
    for name in RUN_FOLDERS:
        (run / name).rename(run / f"{name}.hidden")
    try:
        yield
    finally:
        for name in RUN_FOLDERS:
            (run / f"{name}.hidden").rename(run / name)


@pytest.fixture(scope="module")
def served(exported: tuple[Path, dict], run_dir: Path) -> Iterator[TritonServer]:
    repository, _ = exported
    server = TritonServer(repository, log_path=run_dir / "tritonserver.log", startup_timeout_s=180)
    with run_folders_hidden(run_dir):
        server.start()
    try:
        yield server
    finally:
        server.stop()


def python_value(value: object) -> object:
    return value.tolist() if isinstance(value, np.ndarray | np.generic) else value


@pytest.fixture(scope="module")
def fresh_products(exported: tuple[Path, dict], run_dir: Path, chosen: dict[str, np.ndarray],
                   spec: DatasetSpec) -> dict:  # fmt: skip
    """Three products the run does not know, with the features of three of its items: their encoded rows as
    `encode_features` gives them (the id's code the out-of-vocabulary one, 2), packed as the ensemble takes them."""
    columns = PipelineColumns.read(exported[0] / "ranker" / "1")
    items = pd.read_parquet(run_dir / "nvtabular" / "item_features.parquet").set_index(spec.item_id)
    rows = [{spec.item_id: 2, **{name: python_value(items.loc[raw, name]) for name in columns.item_features}}
            for raw in chosen["items"][:3]]  # fmt: skip
    values = {name: columns.values(name, [row[name] for row in rows]) for name in columns.item_columns}
    known = {spec.item_id: int(items.loc[chosen["items"][0], f"{spec.item_id}_encoded"]),
             **{name: rows[0][name] for name in columns.item_features}}  # fmt: skip
    return {"ids": FRESH_IDS, "rows": rows, "features": columns.pack(values, columns.item_columns), "known": known}


@pytest.fixture(scope="module")
def in_process(exported: tuple[Path, dict], run_dir: Path, chosen: dict[str, np.ndarray],
               fresh_products: dict) -> dict:  # fmt: skip
    """`RecommendationPipeline`'s answers for the chosen users and items (trainer environment)."""
    output = run_dir / "in_process.json"
    fresh = run_dir / "fresh_products.json"
    fresh.write_text(json.dumps({"ids": fresh_products["ids"].tolist(),
                                 "features": fresh_products["features"].tolist()}))  # fmt: skip
    process = subprocess.run([
        str(get_settings().trainer_python), str(Path(__file__).with_name("in_process_pipeline.py")),
        "--run", str(run_dir), "--users", ",".join(map(str, chosen["users"])),
        "--items", ",".join(map(str, chosen["items"])), "--top-k", str(TOP_K), "--top-n", str(TOP_N),
        "--similar-n", str(SIMILAR_N), "--temperature", str(TEMPERATURE), "--seed", str(SEED),
        "--unavailable-items", str(run_dir / "unavailable_items.csv"), "--output", str(output),
        "--retrieval-weight", str(RETRIEVAL_WEIGHT), "--item-to-item-weight", str(ITEM_TO_ITEM_WEIGHT),
        f"--source-weights={SOURCE_WEIGHTS}", "--fresh", str(fresh),
    ], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert process.returncode == 0, process.stderr[-4000:]
    answer = json.loads(output.read_text())
    return {
        name: {key: np.array(values, dtype=np.float32 if key != "item_ids" else np.int64)
               for key, values in answer[name].items()}
        for name in ("recommend", "sampled", "unfiltered", "newcomer", "similar", "fresh")
    } | {"purchases": answer["purchases"], "added_candidates": answer["added_candidates"],
         "fresh_embeddings": np.array(answer["fresh_embeddings"], dtype=np.float32),
         "fresh_candidates": answer["fresh_candidates"]}  # fmt: skip


def infer(server: TritonServer, model: str, inputs: dict[str, np.ndarray], outputs: tuple[str, ...]
          ) -> dict[str, np.ndarray]:  # fmt: skip
    tensors = []
    for name, value in inputs.items():
        tensor = httpclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)
    client = httpclient.InferenceServerClient(server.http_address)
    try:
        result = client.infer(model, tensors, outputs=[httpclient.InferRequestedOutput(name) for name in outputs])
    finally:
        client.close()
    return {name: result.as_numpy(name) for name in outputs}


def recommend(server: TritonServer, users: np.ndarray, **parameters: np.ndarray) -> dict[str, np.ndarray]:
    return infer(server, "recommend", {"user_id_raw": users.astype(np.int64), **parameters}, RECOMMEND_OUTPUTS)


def ranked(top_k: int = TOP_K, top_n: int = TOP_N) -> dict[str, np.ndarray]:
    return {"top_k": np.array([top_k], np.int32), "top_n": np.array([top_n], np.int32),
            "temperature": np.array([0.0], np.float32)}  # fmt: skip


def assert_same_lists(served_answer: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    np.testing.assert_array_equal(served_answer["item_ids"], expected["item_ids"])
    np.testing.assert_allclose(served_answer["scores"], expected["scores"], rtol=1e-5, atol=1e-7)  # NaN == NaN
    for name in ("probabilities", "click_probabilities"):
        if name in expected:
            np.testing.assert_allclose(served_answer[name], expected[name], rtol=1e-4, atol=1e-7)


def test_recommend_matches_the_in_process_pipeline(served: TritonServer, in_process: dict,
                                                   chosen: dict[str, np.ndarray]):  # fmt: skip
    answer = recommend(served, chosen["users"], **ranked())

    assert_same_lists(answer, in_process["recommend"])
    assert answer["known_users"].all()
    assert answer["item_ids"].shape == (len(chosen["users"]), TOP_N)
    assert (answer["item_ids"] >= 0).all(), "200 candidates leave at least 20 per user"
    # Temperature 0: the ranked order, all the probability on the first item; the order score (the blend) never
    # above the ranker's P(click), which the promotion rule reads.
    assert (np.diff(answer["scores"], axis=1) <= 0).all()
    assert (answer["scores"] <= answer["click_probabilities"] + 1e-6).all()
    np.testing.assert_array_equal(answer["probabilities"][:, 0], 1.0)
    # The business rules held, and they mattered: without them some of these lists would differ.
    filtered = [set(chosen["unavailable"]) | set(bought) for bought in in_process["purchases"]]
    assert all(not filtered_items & set(row) for filtered_items, row in zip(filtered, answer["item_ids"], strict=True))
    unfiltered = in_process["unfiltered"]["item_ids"]
    assert any(filtered_items & set(row) for filtered_items, row in zip(filtered, unfiltered, strict=True))
    # Retrieval's other sources mattered too: items the two-tower's top-k lacks are in the served lists.
    added = [set(items) for items in in_process["added_candidates"]]
    assert all(added), "the item-to-item source and popularity add candidates for every user"
    assert any(extra & set(row) for extra, row in zip(added, answer["item_ids"], strict=True))


def test_parameters_left_out_take_the_exported_defaults(served: TritonServer, in_process: dict,
                                                        chosen: dict[str, np.ndarray]):  # fmt: skip
    answer = recommend(served, chosen["users"])

    assert_same_lists(answer, in_process["recommend"])


def test_request_features_are_used_instead_of_the_lookup(served: TritonServer, in_process: dict, run_dir: Path,
                                                         chosen: dict[str, np.ndarray], spec: DatasetSpec):  # fmt: skip
    table = pd.read_parquet(run_dir / "nvtabular" / "user_features.parquet").set_index(spec.user_id)
    rows = table.loc[chosen["users"]]
    query_columns = json.loads((run_dir / "two_tower" / "history.json").read_text())["query_columns"]
    features = {column: rows[column if column != spec.user_id else f"{spec.user_id}_encoded"].to_numpy(np.int64)
                for column in query_columns}  # fmt: skip

    answer = recommend(served, chosen["users"], **features, **ranked())

    assert_same_lists(answer, in_process["recommend"])
    # A user the run has never seen, with the features of a known user: their features count, the known user's
    # history and seen items do not (the item-to-item source has nothing to start from, popularity still adds).
    other = len(chosen["users"]) - 1
    single = {column: values[other : other + 1] for column, values in features.items()}
    newcomer = recommend(served, np.array([UNKNOWN_ID]), **single, **ranked())
    assert newcomer["known_users"].tolist() == [True]
    assert_same_lists({key: values[0] for key, values in newcomer.items()},
                      {key: values[other] for key, values in in_process["newcomer"].items()})  # fmt: skip
    assert newcomer["item_ids"][0].tolist() != in_process["recommend"]["item_ids"][other].tolist()
    with pytest.raises(InferenceServerException, match="give all query-tower features or none"):
        recommend(served, chosen["users"], **{query_columns[0]: features[query_columns[0]]})


def test_sampling_is_reproducible_with_a_seed_and_reorders(served: TritonServer, in_process: dict,
                                                           chosen: dict[str, np.ndarray]):  # fmt: skip
    sampling = {**ranked(), "temperature": np.array([TEMPERATURE], np.float32), "seed": np.array([SEED], np.int64)}

    first = recommend(served, chosen["users"], **sampling)
    again = recommend(served, chosen["users"], **sampling)
    other_seed = recommend(served, chosen["users"], **{**sampling, "seed": np.array([SEED + 1], np.int64)})

    for name in ("item_ids", "scores", "probabilities"):
        np.testing.assert_array_equal(first[name], again[name])
    assert_same_lists(first, in_process["sampled"])  # the same Gumbel draws as in process, for the same seed
    ranked_ids = in_process["recommend"]["item_ids"]
    assert (first["item_ids"] != ranked_ids).any(axis=1).all(), "every list is reordered"
    assert (first["item_ids"] != other_seed["item_ids"]).any()
    # Every list is a permutation-free draw of the same candidates, with proper sampling probabilities.
    assert all(len(set(row)) == TOP_N for row in first["item_ids"])
    assert ((first["probabilities"] > 0) & (first["probabilities"] < 1)).all()


def test_unknown_users_and_items_get_empty_lists(served: TritonServer, in_process: dict,
                                                 chosen: dict[str, np.ndarray]):  # fmt: skip
    users = np.array([chosen["users"][0], UNKNOWN_ID])

    answer = recommend(served, users, **ranked())

    assert answer["known_users"].tolist() == [True, False]
    np.testing.assert_array_equal(answer["item_ids"][0], in_process["recommend"]["item_ids"][0])
    assert (answer["item_ids"][1] == -1).all()
    assert np.isnan(answer["scores"][1]).all()
    assert (answer["probabilities"][1] == 0).all()

    similar = infer(served, "similar_products", {"item_id_raw": np.array([UNKNOWN_ID, chosen["items"][0]])},
                    SIMILAR_OUTPUTS)  # fmt: skip
    assert similar["known_items"].tolist() == [False, True]
    assert (similar["item_ids"][0] == -1).all() and np.isnan(similar["scores"][0]).all()
    np.testing.assert_array_equal(similar["item_ids"][1], in_process["similar"]["item_ids"][0])


def test_similar_products_match_the_in_process_pipeline(served: TritonServer, in_process: dict,
                                                        chosen: dict[str, np.ndarray]):  # fmt: skip
    answer = infer(served, "similar_products", {"item_id_raw": chosen["items"]}, SIMILAR_OUTPUTS)

    assert_same_lists(answer, in_process["similar"])
    assert answer["known_items"].all()
    assert answer["item_ids"].shape == (len(chosen["items"]), SIMILAR_N)
    for item, row in zip(chosen["items"], answer["item_ids"], strict=True):
        assert item not in row
        assert not set(chosen["unavailable"]) & set(row)
    fewer = infer(served, "similar_products", {"item_id_raw": chosen["items"], "top_n": np.array([3], np.int32)},
                  SIMILAR_OUTPUTS)  # fmt: skip
    assert fewer["item_ids"].shape == (len(chosen["items"]), 3)
    for short, full in zip(fewer["item_ids"], answer["item_ids"], strict=True):
        kept = short[short >= 0]  # a shorter search may hold unavailable items that the longer one skips
        np.testing.assert_array_equal(kept, full[: len(kept)])


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"top_k": np.array([0], np.int32)}, "top_k must be between 1 and"),
        ({"top_n": np.array([0], np.int32)}, "top_n must be at least 1"),
        ({"temperature": np.array([-1.0], np.float32)}, "temperature must not be negative"),
    ],
    ids=["top_k", "top_n", "temperature"],
)
def test_invalid_parameters_are_refused_with_a_message(served: TritonServer, chosen: dict[str, np.ndarray],
                                                       parameters: dict[str, np.ndarray], message: str):  # fmt: skip
    with pytest.raises(InferenceServerException, match=message) as raised:
        recommend(served, chosen["users"], **parameters)
    assert raised.value.status() == "400"
    assert recommend(served, chosen["users"][:1])["known_users"].all(), "the server goes on serving"


def encode(served: TritonServer, kind: str, rows: list[dict]) -> tuple[list[dict], int]:
    texts = np.array([json.dumps(row).encode() for row in rows], dtype=object)
    answer = infer(served, "encode_features", {"kind": np.array([kind.encode()], dtype=object), "rows": texts},
                   ("encoded", "snapshot_time"))  # fmt: skip
    return [json.loads(value) for value in answer["encoded"]], int(answer["snapshot_time"][0])


@pytest.mark.parametrize("kind", ["user", "item"])
def test_encode_features_encodes_raw_rows_as_the_run_did(served: TritonServer, run_dir: Path, spec: DatasetSpec,
                                                         kind: str):  # fmt: skip
    """Raw rows as the API receives them, encoded by the exported workflow (the run's folders were hidden when the
    server loaded): the codes of the run's feature table; an id and a value the fit never saw get the
    out-of-vocabulary code, a missing value the null code."""
    id_column, features = (spec.user_id, spec.user_features) if kind == "user" else (spec.item_id, spec.item_features)
    table = pd.read_parquet(run_dir / "nvtabular" / f"{kind}_features.parquet").set_index(id_column)
    raw = latest_raw_features(run_dir, spec, kind)
    ids = [entity for entity in table.index[:5] if len(raw[entity]) == len(features)]
    assert ids
    stranger = {id_column: UNKNOWN_ID, features[0]: 10**6}  # the rest missing
    encoded, snapshot_time = encode(served, kind, [{id_column: entity, **raw[entity]} for entity in ids] + [stranger])
    for entity, row in zip(ids, encoded, strict=False):
        expected = table.loc[entity]
        assert row[id_column] == expected[f"{id_column}_encoded"], entity
        assert {name: row[name] for name in features} == {name: expected[name] for name in features}, entity
    assert encoded[-1][id_column] == encoded[-1][features[0]] == 2  # NVTabular's OOV_OFFSET
    assert {encoded[-1][name] for name in features[1:]} == {1}  # NULL_OFFSET
    assert snapshot_time == int(table["event_timestamp"].max().timestamp())


def test_the_item_tower_embeds_products_the_run_does_not_know(served: TritonServer, in_process: dict,
                                                              fresh_products: dict):  # fmt: skip
    """Encoded rows in: the in-process item tower's embeddings, the rows packed as the ensemble takes them, and
    whether the run's catalog knows each id (a product it knows keeps its own arrays)."""
    rows = [*fresh_products["rows"], fresh_products["known"]]
    answer = infer(served, "item_tower", {"rows": np.array([json.dumps(row).encode() for row in rows], dtype=object)},
                   ("item_embeddings", "item_features", "known_items"))  # fmt: skip
    np.testing.assert_array_equal(answer["item_features"][:3], fresh_products["features"])
    assert answer["known_items"].tolist() == [False, False, False, True]
    np.testing.assert_allclose(answer["item_embeddings"][:3], in_process["fresh_embeddings"], rtol=1e-5, atol=1e-6)
    with pytest.raises(InferenceServerException, match="column 'item_id' is missing"):
        infer(served, "item_tower", {"rows": np.array([b'{"item_category": 3}'], dtype=object)}, ("item_features",))


def test_recommend_retrieves_and_ranks_products_added_since_the_run(served: TritonServer, in_process: dict,
                                                                    chosen: dict[str, np.ndarray],
                                                                    fresh_products: dict):  # fmt: skip
    """Products sent with the request are retrieved where Faiss would have found them, ranked on their features and
    named by id: the in-process pipeline's lists with the same products."""
    fresh = {"fresh_item_ids": fresh_products["ids"], "fresh_item_features": fresh_products["features"],
             "fresh_item_embeddings": in_process["fresh_embeddings"]}  # fmt: skip
    answer = recommend(served, chosen["users"], **ranked(), **fresh)

    assert_same_lists(answer, in_process["fresh"])
    assert sum(in_process["fresh_candidates"]) > 0, "some users retrieve a product added since the run"
    # Every one retrieved is ranked: the whole ranked list of each user holds them (its head is the answer above).
    whole = recommend(served, chosen["users"], **ranked(top_n=1_000), **fresh)["item_ids"]
    np.testing.assert_array_equal(whole[:, :TOP_N], answer["item_ids"])
    assert [len(set(FRESH_IDS.tolist()) & set(row.tolist())) for row in whole] == in_process["fresh_candidates"]
    with pytest.raises(InferenceServerException, match="or none"):
        recommend(served, chosen["users"], **ranked(), fresh_item_ids=FRESH_IDS)


def test_encode_features_refuses_a_column_the_spec_lacks(served: TritonServer):
    with pytest.raises(InferenceServerException, match="no column named bogus") as raised:
        encode(served, "user", [{"user_id": 1, "bogus": 3}])
    assert raised.value.status() == "400"


def test_repository_is_self_contained_and_described(exported: tuple[Path, dict]):
    repository, metrics = exported
    stages = ["query_tower", "faiss_retrieval", "candidate_sources", "filter_candidates", "ranker", "ordering",
              "item_lookup", "similar_items", "encode_features", "item_tower"]  # fmt: skip
    assert metrics["models"] == stages
    assert metrics["ensembles"]["recommend"]["steps"] == stages[:6]
    # The item-to-item source and each user's history travel with the stage that reads them.
    for name in ("item_to_item.npz", "item_to_item.json", "user_history.npz", "item_embeddings.parquet"):
        assert (repository / "candidate_sources" / "1" / name).is_file(), name
    assert metrics["ensembles"]["similar_products"]["steps"] == ["item_lookup", "faiss_retrieval", "similar_items"]
    assert metrics["unavailable_items"] == 3
    for name in stages:
        assert (repository / name / "config.pbtxt").is_file()
        assert (repository / name / "1" / "model.py").is_file()
        assert (repository / name / "1" / "pipeline_columns.json").is_file()
    # Copies, not links into the run (the server loaded it with the run's folders hidden).
    assert not [path for path in repository.rglob("*") if path.is_symlink()]


def test_repository_is_logged_to_mlflow(exported: tuple[Path, dict], tmp_path: Path, mlflow_tracking_uri: str):
    from mlflow.tracking import MlflowClient

    from tasks.export_triton_ensemble import log_triton_repository

    tracking_uri = mlflow_tracking_uri
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.create_experiment("triton", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id

    logged = log_triton_repository(exported[0], tracking_uri=tracking_uri, run_id=run_id)

    assert logged["artifact_uri"].endswith("/triton_repository")
    names = {item.path for item in client.list_artifacts(run_id, "triton_repository/recommend")}
    assert "triton_repository/recommend/config.pbtxt" in names
    ranker_files = {item.path for item in client.list_artifacts(run_id, "triton_repository/ranker/1")}
    assert "triton_repository/ranker/1/model.py" in ranker_files

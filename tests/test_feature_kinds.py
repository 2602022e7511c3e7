"""Continuous and multi-valued features flow through NVTabular, training, Feast, batch scoring and Triton.

A small generated dataset in RecBole's atomic format (users with a float `age` and `tags:token_seq`, items
with a float `price` and a `genre:token_seq`; a user likes the genre of their age group) is imported with
`import_atomic`, which writes a spec with `continuous: [age, price]` and `multi_valued: {genre, tags}`, and the
nightly steps run on it for real.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import redis

from benchmarks.pipeline_steps import StepTimes, run_steps
from feature_repo.config import FeastStoreConfig
from recsys.parquet_io import nvtabular_part_files
from recsys.settings import get_settings
from recsys.spec import DatasetSpec, load_spec
from serving.triton_server import TritonServer
from tasks.feast_features import (
    feast_apply,
    feast_materialize,
    online_item_features,
    online_user_features,
    open_feature_store,
)
from tasks.import_atomic import import_atomic
from tasks.track_training import log_ranker_run
from tests.redis_databases import redis_url
from tests.test_triton_ensemble import assert_same_lists, infer

pytestmark = pytest.mark.e2e

GENRES = ("Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi")
USERS, ITEMS, RATINGS_PER_USER = 300, 240, 40
TEST_REDIS_URL = redis_url("feast")
TOP_K, TOP_N = 100, 10


def write_atomic_dataset(directory: Path, seed: int = 3) -> None:
    """Users rate items whose genres include their age group's genre 4 or 5, other items 1 to 3."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True)
    ages = rng.uniform(18, 66, USERS).round(1)
    favourite = ((ages - 18) // 8).astype(int)  # 6 age groups, one genre each
    genres = [sorted(rng.choice(len(GENRES), rng.integers(1, 4), replace=False)) for _ in range(ITEMS)]
    prices = rng.lognormal(3, 0.5, ITEMS).round(2)
    tags = [" ".join(f"t{tag}" for tag in rng.choice(5, rng.integers(0, 3), replace=False)) for _ in range(USERS)]
    users = ["user_id:token\tage:float\tgender:token\ttags:token_seq"]
    users += [f"u{user}\t{'' if user % 17 == 0 else ages[user]}\t{'MF'[user % 2]}\t{tags[user]}"
              for user in range(USERS)]  # fmt: skip
    items = ["item_id:token\tgenre:token_seq\tprice:float"]
    items += [f"i{item}\t{' '.join(GENRES[g] for g in genres[item]) if item % 13 else ''}\t{prices[item]}"
              for item in range(ITEMS)]  # fmt: skip
    inter = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for user in range(USERS):
        for position, item in enumerate(rng.choice(ITEMS, RATINGS_PER_USER, replace=False)):
            liked = favourite[user] in genres[item]
            rating = rng.integers(4, 6) if liked else rng.integers(1, 4)
            inter.append(f"u{user}\ti{item}\t{rating}\t{1_000_000 + user * 1_000 + position}")
    for name, lines in (("kinds.user", users), ("kinds.item", items), ("kinds.inter", inter)):
        (directory / name).write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, DatasetSpec]:
    base = tmp_path_factory.mktemp("feature_kinds")
    write_atomic_dataset(base / "atomic")
    imported = import_atomic(base / "atomic", base / "imported")
    assert (imported["continuous"], imported["multi_valued"]) == (["age", "price"], ["genre", "tags"])
    spec_path = base / "imported" / "spec.yaml"
    run_dir = base / "run"
    # A few quick ranker epochs at a higher rate: the default rate barely moves in one epoch of 10 batches.
    run_steps(base / "imported", run_dir, spec_path, StepTimes(), two_tower_epochs=2, ranker_epochs=3,
              ranker_model="dlrm", resplit_fraction=0.0,
              extra_arguments={"train-ranker": ["--learning-rate", "0.01", "--batch-size", "256"]})  # fmt: skip
    return run_dir, spec_path, load_spec(spec_path)


def nvtabular_rows(run_dir: Path, split: str = "train") -> pd.DataFrame:
    return pd.concat([pd.read_parquet(path) for path in nvtabular_part_files(run_dir / "nvtabular" / split)])


def test_the_imported_spec_names_each_kind(run: tuple[Path, Path, DatasetSpec]):
    _, _, spec = run

    assert spec.continuous == ("age", "price")
    assert spec.multi_valued["genre"].max_tokens == 3 and spec.multi_valued["genre"].separator == "|"
    assert [spec.feature_kind(name) for name in ("gender", "genre", "age")] == ["categorical", "multi_valued",
                                                                                 "continuous"]  # fmt: skip


def test_nvtabular_normalizes_numbers_and_encodes_token_lists(run: tuple[Path, Path, DatasetSpec]):
    run_dir, _, _ = run
    rows = nvtabular_rows(run_dir)
    schema = pq.read_schema(nvtabular_part_files(run_dir / "nvtabular" / "train")[0])

    assert str(schema.field("age").type) == "float" and str(schema.field("price").type) == "float"
    # Zero mean and unit variance on train; a user without an age got the median, so no value is missing.
    users = rows.drop_duplicates("user_id")
    assert abs(users["age"].mean()) < 0.2 and 0.7 < users["age"].std() < 1.3 and rows["age"].notna().all()
    genre = np.stack(rows["genre"].to_numpy())
    assert genre.shape == (len(rows), 3) and genre.dtype == np.int64
    # Tokens come first, then the padding (0); an item without genres is all padding; codes differ by token.
    assert ((genre[:, 1:] == 0) | (genre[:, :-1] != 0)).all()
    assert (genre == 0).all(axis=1).any() and len(np.unique(genre[genre > 0])) == len(GENRES)
    items = pd.read_parquet(run_dir / "nvtabular" / "item_features.parquet")
    assert {len(codes) for codes in items["genre"]} == {3}


def test_the_models_take_every_kind(run: tuple[Path, Path, DatasetSpec]):
    run_dir, _, _ = run
    two_tower = json.loads((run_dir / "two_tower" / "history.json").read_text())
    ranker = json.loads((run_dir / "ranker" / "history.json").read_text())

    assert {"age", "gender", "tags"} <= set(two_tower["query_columns"])
    assert {"age", "gender", "genre", "price"} <= set(ranker["input_columns"])
    # The planted taste (a user's age group decides the genre they like) is learnt.
    assert ranker["valid_auc"] > 0.9, ranker["valid_auc"]


def test_changing_a_number_or_a_token_list_changes_what_the_models_say(run: tuple[Path, Path, DatasetSpec]):
    """The features are used, not only accepted: in the trainer environment, the query embedding of users moves
    with their age, and the ranker's scores move with the candidates' genres."""
    run_dir, spec_path, _ = run
    script = f"""
import json, numpy as np
from models.online_pipeline import PipelineArtifacts, RecommendationPipeline
from recsys.spec import load_spec
pipeline = RecommendationPipeline(PipelineArtifacts.of_run({str(run_dir)!r}), load_spec({str(spec_path)!r}))
users = pipeline.user_table.raw_user_ids[:20]
features, known = pipeline.user_features(users)
older = dict(features, age=features["age"] + 1.5)
moved = float(np.abs(pipeline.embed_users(features) - pipeline.embed_users(older)).max())
candidates = np.tile(np.arange(2, 40), (len(users), 1))
scores = pipeline.score(features, candidates)
genres = pipeline.catalog.columns["genre"]
pipeline.catalog.columns["genre"] = np.zeros_like(genres)
without_genres = pipeline.score(features, candidates)
print(json.dumps({{"known": bool(known.all()), "moved": moved,
                  "score_change": float(np.nanmax(np.abs(scores - without_genres)))}}))
"""
    process = subprocess.run([str(get_settings().trainer_python), "-c", script], capture_output=True, text=True,
                             timeout=300, cwd=Path(__file__).resolve().parent.parent)  # fmt: skip
    assert process.returncode == 0, process.stderr[-4000:]
    result = json.loads(process.stdout.strip().splitlines()[-1])

    assert result["known"]
    assert result["moved"] > 1e-4 and result["score_change"] > 1e-4, result


def test_batch_scoring_lists_every_user(run: tuple[Path, Path, DatasetSpec]):
    run_dir, _, _ = run
    metrics = json.loads((run_dir / "batch_score" / "_metrics.json").read_text())

    assert metrics["users"] == USERS


def test_the_ranker_is_registered_with_list_and_float_inputs(run: tuple[Path, Path, DatasetSpec], tmp_path: Path):
    run_dir, _, spec = run
    import mlflow

    logged = log_ranker_run(run_dir / "ranker", run_dir / "nvtabular", spec, tracking_uri=f"sqlite:///{tmp_path}/m.db",
                            artifact_root=tmp_path / "artifacts", run_name="kinds")  # fmt: skip
    inputs = {column.name: column for column in mlflow.models.get_model_info(logged["model_uri"]).signature.inputs}

    assert str(inputs["genre"].type) == "Array(long)" and inputs["age"].type.name == "float"
    assert inputs["gender"].type.name == "long"


@pytest.fixture
def feast_redis() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(TEST_REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()


def test_feast_serves_the_lists_and_numbers(run: tuple[Path, Path, DatasetSpec], tmp_path: Path,
                                            feast_redis: redis.Redis):  # fmt: skip
    run_dir, _, spec = run
    config = FeastStoreConfig(redis_url=TEST_REDIS_URL, registry_path=tmp_path / "feast" / "registry.db")
    feast_apply(run_dir / "nvtabular", spec, config)
    materialized = feast_materialize(run_dir / "nvtabular", spec, config)
    items = pd.read_parquet(run_dir / "nvtabular" / "item_features.parquet").head(5)
    users = pd.read_parquet(run_dir / "nvtabular" / "user_features.parquet").head(5)

    for view in materialized["feature_views"].values():
        assert view["checked"] > 0 and view["matching"] == view["checked"], view
    store = open_feature_store(spec, config)
    online_items = online_item_features(store, spec, items["item_id"].tolist())
    assert online_items["genre"] == [list(codes) for codes in items["genre"]]
    online_users = online_user_features(store, spec, users["user_id"].tolist())
    np.testing.assert_allclose(online_users["age"], users["age"], rtol=1e-6)


def test_triton_answers_with_the_features_sent_as_the_in_process_pipeline(run: tuple[Path, Path, DatasetSpec]):
    """The query tower takes a float and a token list, and the ranker gets them back from the packed user features
    (`PipelineColumns.pack`): recommend, given
    each user's features in the request, answers as `RecommendationPipeline` with the same features."""
    from tasks.cli import main as recsys_cli

    run_dir, spec_path, spec = run
    repository = run_dir / "triton_repository"
    assert recsys_cli(["export-triton-ensemble", "--input", str(run_dir), "--output", str(repository),
                       "--top-k", str(TOP_K), "--top-n", str(TOP_N), "--spec", str(spec_path),
                       "--retrieval-weight", "0", "--item-to-item-weight", "0",
                       "--source-weights", "0,0,0"]) == 0  # fmt: skip
    users = pd.read_parquet(run_dir / "nvtabular" / "user_features.parquet").head(6)
    raw = users[spec.user_id].to_numpy(np.int64)
    items = pd.read_parquet(run_dir / "nvtabular" / "item_features.parquet")[spec.item_id].head(2).tolist()
    output = run_dir / "in_process.json"
    process = subprocess.run([
        str(get_settings().trainer_python), str(Path(__file__).with_name("in_process_pipeline.py")),
        "--run", str(run_dir), "--spec", str(spec_path), "--users", ",".join(map(str, raw)),
        "--items", ",".join(map(str, items)),
        "--top-k", str(TOP_K), "--top-n", str(TOP_N), "--similar-n", "5", "--temperature", "0.1", "--seed", "1",
        "--retrieval-weight", "0", "--item-to-item-weight", "0", "--source-weights", "0,0,0",
        "--output", str(output),
    ], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert process.returncode == 0, process.stderr[-4000:]
    expected = {key: np.array(values, dtype=np.float32 if key != "item_ids" else np.int64)
                for key, values in json.loads(output.read_text())["recommend"].items()}  # fmt: skip
    query_columns = json.loads((run_dir / "two_tower" / "history.json").read_text())["query_columns"]
    features = {column: users[f"{column}_encoded" if column == spec.user_id else column].to_numpy()
                for column in query_columns}  # fmt: skip
    features = {column: np.stack(values) if column in spec.multi_valued else
                values.astype(np.float32 if column in spec.continuous else np.int64)
                for column, values in features.items()}  # fmt: skip
    ranked = {"top_k": np.array([TOP_K], np.int32), "top_n": np.array([TOP_N], np.int32),
              "temperature": np.array([0.0], np.float32)}  # fmt: skip

    server = TritonServer(repository, log_path=run_dir / "tritonserver.log", startup_timeout_s=180)
    server.start()
    try:
        outputs = ("item_ids", "scores", "probabilities", "click_probabilities", "known_users")
        looked_up = infer(server, "recommend", {"user_id_raw": raw, **ranked}, outputs)
        sent = infer(server, "recommend", {"user_id_raw": raw, **features, **ranked}, outputs)
        older = infer(server, "recommend", {"user_id_raw": raw, **features, "age": features["age"] + 1.5, **ranked},
                      outputs)  # fmt: skip
    finally:
        server.stop()

    assert looked_up["known_users"].all()
    assert_same_lists(looked_up, expected)
    assert_same_lists(sent, expected)
    # The number sent is the one used, by the query tower and the ranker alike.
    assert not np.allclose(older["scores"], sent["scores"])

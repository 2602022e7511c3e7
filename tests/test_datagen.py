import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import OneHotEncoder

from recsys.datagen import SMALL_DATA_CLICK_THROUGH_RATE, GeneratorConfig, generate_dataset, histogram_auc


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path, spec, small_raw: Path):
    again = tmp_path / "again"
    # Same seed, same chunking as the fixture: identical files.
    generate_dataset(GeneratorConfig(rows=10_000, seed=7), again, spec, progress=False)
    for name in ("train.csv", "test.csv", "oracle_click_probability.csv"):
        assert (again / name).read_bytes() == (small_raw / name).read_bytes()
    other = tmp_path / "other"
    generate_dataset(GeneratorConfig(rows=10_000, seed=8), other, spec, progress=False)
    assert (other / "train.csv").read_bytes() != (small_raw / "train.csv").read_bytes()


def test_files_follow_the_spec_and_the_split(small_raw: Path, spec):
    train = pd.read_csv(small_raw / "train.csv")
    test = pd.read_csv(small_raw / "test.csv")
    assert list(train.columns) == list(spec.columns)
    assert len(train) == len(test) == 5_000
    assert train[spec.timestamp].max() < test[spec.timestamp].min()  # test rows come later, like AliCCP
    truth = pd.read_csv(small_raw / "oracle_click_probability.csv")
    assert len(truth) == len(test)
    assert (truth[spec.user_id].to_numpy() == test[spec.user_id].to_numpy()).all()


def test_a_share_of_rows_has_more_than_five_null_features(small_raw: Path, spec):
    train = pd.read_csv(small_raw / "train.csv")
    nulls = train[list(spec.features)].isna().sum(axis=1)
    assert 0.16 < (nulls > 5).mean() < 0.24  # null_row_fraction = 0.2
    assert ((nulls > 0) & (nulls <= 5)).mean() > 0.05  # light nulls that cleaning keeps
    assert train[[spec.user_id, spec.item_id, *spec.targets]].notna().all().all()


def test_planted_signal_is_learnable_and_oracle_auc_is_reported(medium_raw: Path, spec):
    train = pd.read_csv(medium_raw / "train.csv")
    test = pd.read_csv(medium_raw / "test.csv")
    columns = [spec.user_id, spec.item_id, *spec.features]
    encoder = OneHotEncoder(handle_unknown="ignore", min_frequency=5)
    features = encoder.fit_transform(train[columns].astype(str))
    model = LogisticRegression(C=0.3, max_iter=300).fit(features, train[spec.primary_target])
    predicted = model.predict_proba(encoder.transform(test[columns].astype(str)))[:, 1]
    model_auc = roc_auc_score(test[spec.primary_target], predicted)
    truth = pd.read_csv(medium_raw / "oracle_click_probability.csv")
    oracle_auc = roc_auc_score(test[spec.primary_target], truth["click_probability"])
    report = json.loads((medium_raw / "generation.json").read_text())
    print(f"logistic regression AUC {model_auc:.3f}, oracle AUC {oracle_auc:.3f}")
    assert model_auc > 0.62
    assert oracle_auc > model_auc
    assert report["oracle_auc_test"] == pytest.approx(oracle_auc, abs=0.002)
    assert report["click_through_rate"] == pytest.approx(SMALL_DATA_CLICK_THROUGH_RATE, abs=0.05)


def test_default_click_through_rate_is_a_few_percent(small_raw: Path):
    report = json.loads((small_raw / "generation.json").read_text())
    assert 0.04 < report["click_through_rate"] < 0.14


def test_histogram_auc_matches_pairwise_auc():
    rng = np.random.default_rng(0)
    scores = rng.random(2_000)
    labels = rng.random(2_000) < scores
    bins = (scores * 999).astype(int)
    positives = np.bincount(bins[labels], minlength=1000)
    negatives = np.bincount(bins[~labels], minlength=1000)
    assert histogram_auc(positives, negatives) == pytest.approx(roc_auc_score(labels, scores), abs=0.002)

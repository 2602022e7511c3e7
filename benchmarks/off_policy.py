"""Off-policy estimates (`recsys/off_policy.py`) against a known truth: simulated logs and the Open Bandit Dataset.

    .venv/bin/python benchmarks/off_policy.py [--impressions 200000] [--seed 0]      (make benchmark-off-policy)

1. **Simulated logs, the generator's truth.** The data generator's entities (`recsys/datagen.py`: latent factors,
   biases, the position effect) give every (user, item) pair its true click probability at the top position
   (`click_logit`, as `true_click_probabilities` computes it). Each impression: a user drawn at random, 30
   candidate items drawn at random, a model's scores (the true probability times log-normal noise: a good,
   imperfect ranker), the logging policy draws the top item from softmax(score / T) at T = 0.05, and a click is
   drawn with the true probability. For target policies at other temperatures (0: the ranked order) the true
   click-through is the exact expectation over the same impressions' candidates (sum over items of the target's
   probability times the true click probability), and IPS and SNIPS estimate it from the logged clicks and
   propensities.
2. **The Open Bandit Dataset** (ZOZOTOWN, Saito et al. 2021), the sample the `obp` 0.5.7 sdist ships
   (`obp/dataset/obd/{random,bts}/all/all.csv`, 10,000 impressions each; fetched with pip into the cache,
   `$RECSYS_CACHE_DIR`, and checked against its SHA-256; the CSVs are extracted, obp is not installed: it requires
   Python < 3.11). The uniform random policy's click-through is estimated from the Bernoulli Thompson Sampling
   policy's logs (each logged with its propensity) and compared with the random policy's own logs, its ground
   truth (an on-policy mean with its own 95% interval: 38 clicks in 10,000).

Prints one table per check: the estimate, its 95% interval, whether it covers the truth, and the effective
sample size, without clipping and with clipping.
"""

from __future__ import annotations

import argparse
import sys
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

from benchmarks.movielens import cache_dir, download_verified  # noqa: E402
from recsys.off_policy import Estimate, ips, snips, softmax_propensities  # noqa: E402

OBP = "obp==0.5.7"
OBP_SDIST = "obp-0.5.7.tar.gz"
OBP_SHA256 = "3060d67fedfcfadf1e7a6f2608987f74412b5eb74d2c567edeb147595c68f2a0"
OBD_IN_SDIST = "obp-0.5.7/obp/dataset/obd/"
LOGGING_TEMPERATURE = 0.05
TARGET_TEMPERATURES = (0.0, 0.02, 0.1, 0.5)
CANDIDATES = 30
CLIPS = (None, 100.0)


def fetch_open_bandit_dataset() -> Path:
    """The sample's CSVs, from the obp sdist: downloaded once with pip, verified, the dataset folder extracted."""
    folder = cache_dir() / "obp-0.5.7"
    target = folder / "obd"
    if (target / "random" / "all" / "all.csv").exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    # --ignore-requires-python: only the file is wanted, never installed (obp requires Python < 3.11).
    sdist = download_verified(OBP, OBP_SDIST, OBP_SHA256, folder, "--no-binary", ":all:", "--ignore-requires-python")
    staging = folder / ".obd.staging"
    with tarfile.open(sdist) as archive:
        members = [member for member in archive.getmembers()
                   if member.name.startswith(OBD_IN_SDIST) and member.isfile() and member.name.endswith(".csv")]
        for member in members:
            path = staging / member.name.removeprefix(OBD_IN_SDIST)
            path.parent.mkdir(parents=True, exist_ok=True)
            source = archive.extractfile(member)
            assert source is not None
            path.write_bytes(source.read())
    staging.rename(target)
    return target


def row(name: str, truth: float, estimate: Estimate) -> str:
    covered = "yes" if estimate.covers(truth) else "NO"
    return (f"| {name} | {truth:.5f} | {estimate.value:.5f} | [{estimate.low:.5f}, {estimate.high:.5f}] | {covered} "
            f"| {estimate.effective_samples:,.0f} | {estimate.clipped} |")


HEADER = ("| estimator | truth | estimate | 95% interval | covers | effective samples | weights clipped |\n"
          "|---|---:|---:|---|---|---:|---:|")


def simulated(impressions: int, seed: int) -> None:
    from recsys.datagen import GeneratorConfig, click_logit, make_entities

    config = GeneratorConfig(rows=impressions, seed=seed)
    entities = make_entities(config)
    rng = np.random.default_rng(seed)
    users = rng.integers(1, config.n_users + 1, impressions)
    items = rng.integers(1, config.n_items + 1, (impressions, CANDIDATES))
    # The true click probability of each impression's own candidates at the top position (raw ids are index + 1).
    logits = click_logit(entities, config, np.repeat(users - 1, CANDIDATES), items.ravel() - 1,
                         np.ones(impressions * CANDIDATES, dtype=np.int64))  # fmt: skip
    truth = (1.0 / (1.0 + np.exp(-logits))).reshape(impressions, CANDIDATES)
    scores = truth * rng.lognormal(0.0, 0.5, truth.shape)  # a ranker's estimate: right on average, noisy
    logging = softmax_propensities(scores, LOGGING_TEMPERATURE)
    shown = (logging.cumsum(axis=1) > rng.random((impressions, 1))).argmax(axis=1)
    rows = np.arange(impressions)
    clicks = (rng.random(impressions) < truth[rows, shown]).astype(np.float64)
    print(f"\n### Simulated logs: {impressions:,} impressions of {CANDIDATES} candidates, the generator's entities "
          f"(seed {seed}); logging policy softmax(score / {LOGGING_TEMPERATURE}), its click-through "
          f"{clicks.mean():.5f}\n")
    print(HEADER)
    for temperature in TARGET_TEMPERATURES:
        target = softmax_propensities(scores, temperature)
        expected = float(np.mean(np.sum(target * truth, axis=1)))  # the target policy's true click-through
        for clip in CLIPS:
            suffix = f"T={temperature}" + ("" if clip is None else f", clip {clip:g}")
            for name, estimator in (("IPS", ips), ("SNIPS", snips)):
                estimate = estimator(clicks, logging[rows, shown], target[rows, shown], clip=clip)
                print(row(f"{name}, {suffix}", expected, estimate))


def open_bandit(folder: Path) -> None:
    columns = ["item_id", "position", "click", "propensity_score"]
    random_logs = pd.read_csv(folder / "random" / "all" / "all.csv", usecols=columns)
    bts_logs = pd.read_csv(folder / "bts" / "all" / "all.csv", usecols=columns)
    items = random_logs["item_id"].nunique()
    # The random policy's own logs: its click-through, with a normal interval on the mean, is the ground truth.
    on_policy = ips(random_logs["click"].to_numpy(), random_logs["propensity_score"].to_numpy(),
                    random_logs["propensity_score"].to_numpy())  # fmt: skip
    truth = on_policy.value
    print(f"\n### Open Bandit Dataset sample (obp 0.5.7, campaign 'all'): the uniform random policy's click-through "
          f"estimated from {len(bts_logs):,} Bernoulli TS impressions\n")
    print(f"Ground truth, the random policy's own {len(random_logs):,} impressions: {truth:.5f} "
          f"[{on_policy.low:.5f}, {on_policy.high:.5f}]; Bernoulli TS's own click-through "
          f"{bts_logs['click'].mean():.5f}.\n")
    print(HEADER)
    target = np.full(len(bts_logs), 1.0 / items)  # uniform over the catalog at each position
    for clip in CLIPS:
        for name, estimator in (("IPS", ips), ("SNIPS", snips)):
            estimate = estimator(bts_logs["click"].to_numpy(), bts_logs["propensity_score"].to_numpy(), target,
                                 clip=clip)  # fmt: skip
            print(row(name + ("" if clip is None else f", clip {clip:g}"), truth, estimate))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impressions", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    simulated(args.impressions, args.seed)
    open_bandit(fetch_open_bandit_dataset())
    return 0


if __name__ == "__main__":
    sys.exit(main())

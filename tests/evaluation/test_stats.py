"""Paired bootstrap confidence intervals."""

import numpy as np
import pytest
import torch

from qcorrect.evaluation import paired_bootstrap_ci


def paired(n, diff, seed):
    rng = np.random.default_rng(seed)
    base = rng.normal(1.0, 1.0, n)  # shared per-sample difficulty
    return base + diff + rng.normal(0, 0.2, n), base


def test_deterministic_given_seed():
    a, b = paired(200, 0.1, 0)
    r1 = paired_bootstrap_ci(a, b, n_boot=500, seed=3)
    r2 = paired_bootstrap_ci(a, b, n_boot=500, seed=3)
    r3 = paired_bootstrap_ci(a, b, n_boot=500, seed=4)
    assert r1 == r2 and (r1.low, r1.high) != (r3.low, r3.high)


def test_mean_difference_and_coverage():
    a, b = paired(400, 0.3, 1)
    r = paired_bootstrap_ci(a, b)
    assert r.estimate == pytest.approx(float(np.mean(a - b))) and r.low < r.estimate < r.high
    assert r.contains(0.3) and r.n == 400 and r.n_boot == 1000
    # Pairing removes the shared per-sample term: the interval is about ±2·0.2/√400 wide.
    assert r.high - r.low < 0.06
    hits = sum(paired_bootstrap_ci(*paired(100, 0.3, s), n_boot=400, seed=s).contains(0.3) for s in range(60))
    assert hits >= 52  # nominal 95 % coverage (57 of 60)


def test_single_sample_mean_and_torch_input():
    vals = torch.arange(10, dtype=torch.float32)
    r = paired_bootstrap_ci(vals, n_boot=200)
    assert r.estimate == pytest.approx(4.5) and r.low < 4.5 < r.high and r.stat == "mean"
    assert paired_bootstrap_ci(vals, stat="median", n_boot=200).estimate == pytest.approx(4.5)


def test_ratio_gap_closed():
    rng = np.random.default_rng(2)
    b = rng.uniform(1.0, 2.0, 300)  # uncorrected error
    a = 0.7 * b * rng.uniform(0.9, 1.1, 300)  # corrected error: ~30 % of the gap closed
    r = paired_bootstrap_ci(a, b, stat="ratio", ci=0.9)
    assert r.estimate == pytest.approx(1 - a.mean() / b.mean())
    assert r.contains(0.3) and r.low < r.estimate < r.high and r.ci == 0.9


def test_wider_interval_at_higher_confidence():
    a, b = paired(100, 0.0, 5)
    r90 = paired_bootstrap_ci(a, b, ci=0.9)
    r99 = paired_bootstrap_ci(a, b, ci=0.99)
    assert r99.low <= r90.low and r99.high >= r90.high


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(values_a=[1.0, 2.0], stat="ratio"), "values_b"),
        (dict(values_a=[1.0, 2.0], values_b=[1.0]), "length"),
        (dict(values_a=[1.0, float("inf")]), "non-finite"),
        (dict(values_a=[]), "empty"),
        (dict(values_a=[1.0], stat="max"), "unknown stat"),
        (dict(values_a=[1.0], ci=1.5), "ci"),
    ],
)
def test_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        paired_bootstrap_ci(**kwargs)

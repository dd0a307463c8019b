"""The interval statistics of evaluation, alone (pure functions of arrays): the bootstrap against closed forms
and scipy, and the paired bootstrap."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nemo_logitavg.evaluation import stats


def test_bootstrap_ci_matches_normal_closed_form_for_bernoulli_mean():
    n, p = 4000, 0.3
    values = np.zeros(n)
    values[: int(p * n)] = 1.0
    low, high = stats.bootstrap_ci(values, num_resamples=20_000, seed=1)
    half = 1.96 * math.sqrt(p * (1 - p) / n)
    assert low == pytest.approx(p - half, abs=0.0015)
    assert high == pytest.approx(p + half, abs=0.0015)


def test_bootstrap_ci_matches_scipy_percentile_bootstrap():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    values = rng.integers(0, 5, size=300) / 4.0  # mean pass@1 over k = 4 samples
    low, high = stats.bootstrap_ci(values, num_resamples=20_000, seed=3)
    ref = scipy_stats.bootstrap(
        (values,), np.mean, confidence_level=0.95, n_resamples=20_000, method="percentile", random_state=4
    ).confidence_interval
    assert low == pytest.approx(ref.low, abs=0.005)
    assert high == pytest.approx(ref.high, abs=0.005)


def test_bootstrap_is_seeded_and_chunking_does_not_change_it():
    values = np.random.default_rng(0).random(50)
    a = stats.bootstrap_means(values, 1000, seed=7)
    b = stats.bootstrap_means(values, 1000, seed=7, max_elements=50 * 3)  # chunks of 3 resamples
    # Same generator stream drawn in different chunk shapes gives the same indices row by row.
    np.testing.assert_allclose(a, b)
    assert not np.allclose(a, stats.bootstrap_means(values, 1000, seed=8))


def test_paired_bootstrap_sees_a_small_consistent_gain_that_unpaired_intervals_miss():
    rng = np.random.default_rng(0)
    n = 400
    baseline = (rng.random(n) < 0.5).astype(float)
    better = baseline.copy()
    flip = np.flatnonzero(baseline == 0)[:24]  # 24 more problems solved, none lost: +6 points
    better[flip] = 1.0
    diff, low, high = stats.paired_bootstrap(better, baseline, num_resamples=20_000, seed=0)
    assert diff == pytest.approx(24 / n)
    # The paired difference is a Bernoulli(0.06) mean: closed form 0.06 +- 1.96 sqrt(0.06 * 0.94 / 400).
    half = 1.96 * math.sqrt(0.06 * 0.94 / n)
    assert low == pytest.approx(0.06 - half, abs=0.006) and high == pytest.approx(0.06 + half, abs=0.006)
    assert low > 0
    # Unpaired, the two accuracy intervals overlap: only the paired interval separates them.
    assert stats.bootstrap_ci(better)[0] < stats.bootstrap_ci(baseline)[1]
    # Identical runs: a zero-width interval at 0; a run that loses problems: below.
    assert stats.paired_bootstrap(baseline, baseline) == (0.0, 0.0, 0.0)
    assert stats.paired_bootstrap(baseline, better)[2] < 0


def test_paired_bootstrap_refuses_misaligned_arrays():
    with pytest.raises(ValueError, match="aligned"):
        stats.paired_bootstrap([1.0, 0.0], [1.0])

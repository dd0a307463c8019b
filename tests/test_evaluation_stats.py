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


# --------------------------------------------------------------------------------------------------- across seeds


@pytest.mark.parametrize("dof", [1, 2, 3, 4, 5, 9, 30, 1000])
def test_t_quantile_matches_scipy(dof):
    scipy_stats = pytest.importorskip("scipy.stats")
    for p in (0.001, 0.025, 0.2, 0.5, 0.8, 0.9, 0.975, 0.995):
        assert stats.t_quantile(p, dof) == pytest.approx(scipy_stats.t.ppf(p, dof), rel=1e-11, abs=1e-12)


def test_t_quantile_closed_forms_and_refusals():
    # One degree of freedom is the Cauchy distribution, two have F^-1(p) = (2p - 1) / sqrt(2 p (1 - p)).
    for p in (0.6, 0.9, 0.975, 0.025):
        assert stats.t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-12)
        assert stats.t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-12)
    for p, dof in ((0.0, 3), (1.0, 3), (0.5, 0)):
        with pytest.raises(ValueError):
            stats.t_quantile(p, dof)


def test_seed_t_interval_matches_scipy_t_interval():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 10):
        values = 0.6 + 0.05 * rng.standard_normal(n)
        for confidence in (0.9, 0.95):
            mean, low, high = stats.seed_t_interval(values, confidence)
            ref = scipy_stats.t.interval(confidence, n - 1, loc=values.mean(), scale=scipy_stats.sem(values))
            assert mean == pytest.approx(values.mean(), rel=1e-14)
            assert (low, high) == pytest.approx(ref, rel=1e-11)


def test_seed_t_interval_closed_form_for_two_seeds_and_edge_cases():
    # n = 2: s / sqrt(2) = |a - b| / 2 and t_{0.975, 1} = tan(0.475 pi) = 12.706...
    mean, low, high = stats.seed_t_interval([0.50, 0.60])
    half = math.tan(0.475 * math.pi) * 0.05
    assert mean == pytest.approx(0.55) and (low, high) == pytest.approx((0.55 - half, 0.55 + half), rel=1e-12)
    assert stats.seed_t_interval([0.4, 0.4, 0.4]) == (pytest.approx(0.4), pytest.approx(0.4), pytest.approx(0.4))
    mean, low, high = stats.seed_t_interval([0.7])  # one seed: a mean, no interval
    assert mean == 0.7 and math.isnan(low) and math.isnan(high)
    for bad in ([], [0.1, math.nan]):
        with pytest.raises(ValueError):
            stats.seed_t_interval(bad)
    with pytest.raises(ValueError, match="confidence"):
        stats.seed_t_interval([0.1, 0.2], confidence=95)


def test_paired_seed_difference_matches_ttest_rel_and_pairs_by_seed():
    scipy_stats = pytest.importorskip("scipy.stats")
    # Seeds move both methods together (a shared seed effect); the method gains 0.02 on top of it.
    seed_effect = {0: 0.05, 3: -0.04, 1: 0.01, 7: 0.03, 2: -0.02}
    noise = dict(zip(seed_effect, [0.004, -0.003, 0.001, -0.002, 0.003], strict=True))
    kl = {s: 0.55 + e for s, e in seed_effect.items()}
    la = {s: 0.57 + e + noise[s] for s, e in reversed(seed_effect.items())}  # another order: matched by seed
    diff, low, high = stats.paired_seed_difference(la, kl)
    seeds = sorted(kl)
    a, b = [la[s] for s in seeds], [kl[s] for s in seeds]
    ref = scipy_stats.ttest_rel(a, b).confidence_interval(0.95)
    assert diff == pytest.approx(np.mean(np.subtract(a, b)), rel=1e-12)
    assert (low, high) == pytest.approx((ref.low, ref.high), rel=1e-10)
    assert low > 0  # paired, the gain is clear; unpaired, the seed effect hides it
    assert stats.seed_t_interval(a)[1] < stats.seed_t_interval(b)[2]
    with pytest.raises(ValueError, match=r"only in the first \[7\], only in the second \[9\]"):
        stats.paired_seed_difference(la, {**{s: v for s, v in kl.items() if s != 7}, 9: 0.5})


def test_minimum_detectable_difference_closed_form_and_power():
    scipy_stats = pytest.importorskip("scipy.stats")
    sd, n = 0.02, 5
    t = scipy_stats.t.ppf
    paired = stats.minimum_detectable_difference(sd, n)
    assert paired == pytest.approx((t(0.975, 4) + t(0.8, 4)) * sd / math.sqrt(n), rel=1e-11)
    unpaired = stats.minimum_detectable_difference(sd, n, paired=False)
    assert unpaired == pytest.approx((t(0.975, 8) + t(0.8, 8)) * sd * math.sqrt(2 / n), rel=1e-11)
    # The exact power of the paired t-test at that difference (noncentral t) is close to the asked 0.8.
    crit, delta = t(0.975, n - 1), paired / (sd / math.sqrt(n))
    power = scipy_stats.nct.sf(crit, n - 1, delta) + scipy_stats.nct.cdf(-crit, n - 1, delta)
    assert power == pytest.approx(0.8, abs=0.03)
    # More seeds detect less; one seed detects nothing; no spread detects everything.
    assert stats.minimum_detectable_difference(sd, 10) < paired < stats.minimum_detectable_difference(sd, 2)
    assert stats.minimum_detectable_difference(sd, 1) == math.inf
    assert stats.minimum_detectable_difference(0.0, 3) == 0.0
    for args in ((-0.1, 3), (0.1, 0), (0.1, 3, 0.0), (0.1, 3, 0.05, 1.0)):
        with pytest.raises(ValueError):
            stats.minimum_detectable_difference(*args)


def test_interval_verdict_against_zero():
    cases = [((0.01, 0.2), "above"), ((-0.2, -0.01), "below"), ((-0.1, 0.1), "within CI"), ((0.0, 0.1), "within CI"),
             ((math.nan, math.nan), "no interval")]  # fmt: skip
    for (low, high), verdict in cases:
        assert stats.interval_verdict(low, high) == verdict

"""Interval statistics of evaluation results, pure functions of numbers (no I/O, no model).

Across problems (one training run): a percentile bootstrap of the mean (problems resampled with replacement,
seeded), and the paired bootstrap of a difference (the same resampled problems for both runs).

Across training seeds (the reproduction job, docs/design.md §7b): a training seed sets the GRPO run seed and the rollout
seeds derived from it, not the SFT model. Each seed gives one number per method (e.g. its held-out accuracy);
``seed_t_interval`` is the Student-t interval of their mean, ``paired_seed_difference`` the t-interval of the
per-seed differences of two methods (matched by seed), and ``minimum_detectable_difference`` the smallest true
difference that design detects with the given power. The t quantile is computed here (``t_quantile``: the
regularized incomplete beta function inverted by bisection), since scipy is only a test dependency.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def bootstrap_means(
    values: Sequence[float] | np.ndarray, num_resamples: int = 10_000, seed: int = 0, max_elements: int = 1 << 22
) -> np.ndarray:
    """Means of ``num_resamples`` resamples (with replacement, same size) of ``values`` (1-D, or 2-D ``[n, d]``
    resampled on rows, giving ``[num_resamples, d]``). Vectorised in chunks of at most ``max_elements`` indices."""
    values = np.asarray(values, dtype=np.float64)
    n = values.shape[0]
    if n == 0:
        raise ValueError("cannot bootstrap zero values")
    rng = np.random.default_rng(seed)
    out = np.empty((num_resamples, *values.shape[1:]), dtype=np.float64)
    chunk = max(1, max_elements // n)
    for start in range(0, num_resamples, chunk):
        stop = min(num_resamples, start + chunk)
        index = rng.integers(0, n, size=(stop - start, n))
        out[start:stop] = values[index].mean(axis=1)
    return out


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, confidence: float = 0.95, num_resamples: int = 10_000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (e.g. per-problem scores)."""
    means = bootstrap_means(values, num_resamples, seed)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return float(low), float(high)


def paired_bootstrap(
    values: Sequence[float] | np.ndarray, baseline: Sequence[float] | np.ndarray, confidence: float = 0.95,
    num_resamples: int = 10_000, seed: int = 0,
) -> tuple[float, float, float]:  # fmt: skip
    """``(mean difference, low, high)``: the percentile bootstrap interval of ``mean(values - baseline)`` with the
    same problems resampled for both (the arrays are aligned by problem)."""
    a, b = np.asarray(values, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired bootstrap needs aligned arrays, got shapes {a.shape} and {b.shape}")
    low, high = bootstrap_ci(a - b, confidence, num_resamples, seed)
    return float((a - b).mean()), low, high


# ------------------------------------------------------------------------------------------- across seeds


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified Lentz), which
    converges fast for x < (a + 1) / (a + b + 2); other x use I_x(a, b) = 1 - I_{1-x}(b, a)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _betainc(b, a, 1.0 - x)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 10_000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),  # even step d_{2m}
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),  # odd step d_{2m+1}
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < eps:
            break
    return math.exp(log_front) * fraction / a


def _t_tail(t: float, dof: float) -> float:
    """P(T > t) for t >= 0 under Student's t with ``dof`` degrees of freedom: I_{dof/(dof+t^2)}(dof/2, 1/2) / 2."""
    return 0.5 * _betainc(dof / 2.0, 0.5, dof / (dof + t * t))


def t_quantile(p: float, dof: float) -> float:
    """The ``p`` quantile of Student's t with ``dof`` > 0 degrees of freedom (``scipy.stats.t.ppf(p, dof)``): the
    tail probability min(p, 1 - p) (``_t_tail``) inverted by bisection, with the sign of p - 1/2. Within 1e-12
    relative of scipy for p in [0.001, 0.999] and up to 1000 degrees of freedom. ``p`` in (0, 1)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must lie in (0, 1), got {p}")
    if not dof > 0:
        raise ValueError(f"degrees of freedom must be positive, got {dof}")
    if p == 0.5:
        return 0.0
    tail = min(p, 1.0 - p)  # the tail itself, not 1 - tail: small lower-tail p keep their precision
    low, high = 0.0, 1.0
    while _t_tail(high, dof) > tail:
        low, high = high, 2.0 * high
    for _ in range(2000):  # the bracket halves each time; stop when it no longer shrinks in float64
        mid = 0.5 * (low + high)
        if mid in (low, high):
            break
        low, high = (mid, high) if _t_tail(mid, dof) > tail else (low, mid)
    t = 0.5 * (low + high)
    return t if p > 0.5 else -t


def _check_confidence(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    return confidence


def seed_t_interval(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: the Student-t interval of the mean of per-seed ``values`` (one number per training
    seed),

        mean +- t_{(1 + confidence) / 2, n - 1} * s / sqrt(n),   s the sample standard deviation (ddof 1).

    With one seed there is no spread to estimate: the bounds are NaN (the mean is still returned). Equal values
    give a zero-width interval. Raises ValueError for no values or non-finite ones."""
    _check_confidence(confidence)
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"a t-interval needs a non-empty 1-D sequence of per-seed values, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"per-seed values must be finite, got {x.tolist()}")
    mean, n = float(x.mean()), x.size
    if n == 1:
        return mean, math.nan, math.nan
    half = t_quantile((1.0 + confidence) / 2.0, n - 1) * float(x.std(ddof=1)) / math.sqrt(n)
    return mean, mean - half, mean + half


def paired_seed_difference(
    a_by_seed: Mapping[int, float], b_by_seed: Mapping[int, float], confidence: float = 0.95
) -> tuple[float, float, float]:
    """``(mean, low, high)`` of the per-seed differences ``a[seed] - b[seed]``: their mean and ``seed_t_interval``
    (the paired t-interval, as ``scipy.stats.ttest_rel(a, b).confidence_interval()``). Pairing removes what two
    methods share within a seed. Both mappings must hold the same seeds (ValueError naming the unmatched ones)."""
    only_a, only_b = sorted(set(a_by_seed) - set(b_by_seed)), sorted(set(b_by_seed) - set(a_by_seed))
    if only_a or only_b:
        raise ValueError(f"paired seeds do not match: only in the first {only_a}, only in the second {only_b}")
    return seed_t_interval([a_by_seed[s] - b_by_seed[s] for s in sorted(a_by_seed)], confidence)


def interval_verdict(low: float, high: float) -> str:
    """Where an interval of a difference lies against 0: ``above`` / ``below`` when it excludes 0, ``within CI``
    when it holds 0, ``no interval`` when a bound is NaN (one seed; no common problems)."""
    if math.isnan(low) or math.isnan(high):
        return "no interval"
    return "above" if low > 0 else "below" if high < 0 else "within CI"


def minimum_detectable_difference(
    sd: float, n: int, alpha: float = 0.05, power: float = 0.8, paired: bool = True
) -> float:
    """The smallest true difference of means that a two-sided t-test at level ``alpha`` over ``n`` training seeds
    detects with probability ``power`` (the usual approximation of the noncentral t by a shifted central t):

    - ``paired=True`` (each seed trains both methods; differences matched by seed):
      (t_{1-alpha/2, n-1} + t_{power, n-1}) * sd / sqrt(n), with ``sd`` the across-seed standard deviation (ddof 1)
      of the per-seed differences;
    - ``paired=False`` (two independent groups of ``n`` seeds):
      (t_{1-alpha/2, 2n-2} + t_{power, 2n-2}) * sd * sqrt(2 / n), with ``sd`` the pooled across-seed standard
      deviation of one method's per-seed values.

    With one seed (no degrees of freedom) no difference is detectable: ``inf``. A zero ``sd`` gives 0."""
    if sd < 0 or not math.isfinite(sd):
        raise ValueError(f"sd must be finite and non-negative, got {sd}")
    if n < 1:
        raise ValueError(f"need at least one seed, got n={n}")
    if not 0.0 < alpha < 1.0 or not 0.0 < power < 1.0:
        raise ValueError(f"alpha and power must lie in (0, 1), got {alpha} and {power}")
    dof = n - 1 if paired else 2 * n - 2
    if dof == 0:
        return math.inf
    scale = sd / math.sqrt(n) if paired else sd * math.sqrt(2.0 / n)
    return (t_quantile(1.0 - alpha / 2.0, dof) + t_quantile(power, dof)) * scale


__all__ = [
    "bootstrap_ci",
    "bootstrap_means",
    "interval_verdict",
    "minimum_detectable_difference",
    "paired_bootstrap",
    "paired_seed_difference",
    "seed_t_interval",
    "t_quantile",
]

"""Interval statistics of evaluation results, pure functions of arrays (no I/O, no model).

Across problems: a percentile bootstrap of the mean (problems resampled with replacement, seeded), and the
paired bootstrap of a difference (the same resampled problems for both runs).
"""

from __future__ import annotations

from collections.abc import Sequence

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


__all__ = ["bootstrap_ci", "bootstrap_means", "paired_bootstrap"]

"""Confidence intervals of the benches' scores."""

from __future__ import annotations

import math

import numpy as np
import scipy.stats


def bootstrap_ci(values: list[float], rounds: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean (scipy.stats.bootstrap); a single value
    or identical values are their own interval."""
    if not values:
        return (math.nan, math.nan)
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2 or np.all(x == x[0]):
        return float(x[0]), float(x[0])
    res = scipy.stats.bootstrap((x,), np.mean, n_resamples=rounds, confidence_level=0.95,
                                method="percentile", rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)

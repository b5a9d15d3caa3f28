"""Seed statistics for `compare`: mean, standard deviation, a 95% confidence interval of the
mean, and the paired difference of two methods run on the same seeds with its 95% interval.

Intervals are Student-t intervals, mean +- t(0.975, n - 1) * std / sqrt(n), with the sample
standard deviation (n - 1 in the denominator). A paired difference takes the per-seed differences
(method minus reference, same seed: same data order and the same initial weights where the two
share a model), so the seed-to-seed variation both runs share cancels; its verdict is "better"
when the whole interval lies above 0, "worse" when below, else "indistinguishable". With fewer
than two seeds there is no interval (NaN bounds) and the verdict is "one seed".
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# t(0.975, df) for df = 1..30 (two-sided 95%).
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
         2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
         2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)
_Z975 = 1.959964


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with df >= 1 degrees of freedom (a table to 30, then
    the Cornish-Fisher expansion around the normal quantile, within 1e-4 there)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1; got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass(frozen=True)
class MeanCI:
    """Mean of n values, their sample standard deviation and the 95% interval of the mean."""
    n: int
    mean: float
    std: float
    low: float
    high: float


def mean_ci(values) -> MeanCI:
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_ci needs at least one value")
    if any(not math.isfinite(v) for v in vals):
        raise ValueError(f"mean_ci needs finite values; got {vals}")
    n = len(vals)
    mean = math.fsum(vals) / n
    if n < 2:
        return MeanCI(n, mean, 0.0, math.nan, math.nan)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1))
    half = t975(n - 1) * std / math.sqrt(n)
    return MeanCI(n, mean, std, mean - half, mean + half)


def verdict(ci: MeanCI) -> str:
    """'better' | 'worse' | 'indistinguishable' for an interval of a difference; 'one seed'."""
    if ci.n < 2:
        return "one seed"
    if ci.low > 0:
        return "better"
    if ci.high < 0:
        return "worse"
    return "indistinguishable"


def paired_difference(values, reference) -> MeanCI:
    """The mean of values[i] - reference[i] (same seeds, same order) and its 95% interval."""
    vals, refs = list(values), list(reference)
    if len(vals) != len(refs):
        raise ValueError(f"paired_difference needs one reference value per value; got "
                         f"{len(vals)} and {len(refs)}")
    return mean_ci([a - b for a, b in zip(vals, refs)])

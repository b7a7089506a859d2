"""Means and 95% confidence intervals over seeds (Student t; Welch for differences)."""

from __future__ import annotations

import math
from typing import Sequence

# Two-sided 95% quantiles of Student's t, t_{0.975}(df), df = 1..30 (standard tables).
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042]


def t975(df: float) -> float:
    """t_{0.975}(df); df rounded down (conservative); beyond 120 linear in 1/df towards the normal 1.96."""
    if df < 1:
        return math.nan
    d = int(math.floor(df))
    if d <= 30:
        return _T975[d - 1]
    if d <= 60:  # linear in 1/df between tabled 30 (2.042), 60 (2.000), 120 (1.980)
        return 2.000 + (2.042 - 2.000) * (1 / d - 1 / 60) / (1 / 30 - 1 / 60)
    if d <= 120:
        return 1.980 + (2.000 - 1.980) * (1 / d - 1 / 120) / (1 / 60 - 1 / 120)
    # between tabled 120 (1.980) and infinity (1.960), as the tables interpolate: no step down to 1.96 at 121
    return 1.960 + (1.980 - 1.960) * 120 / d


def mean_ci(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, half-width of the 95% interval, n); half-width is nan for a single value."""
    xs = _present(values)
    n = len(xs)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(xs) / n
    if n == 1:
        return mean, math.nan, 1
    var = sum((x - mean) ** 2 for x in xs) / (n - 1)
    return mean, t975(n - 1) * math.sqrt(var / n), n


def _present(values: Sequence[float]) -> list[float]:
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


def diff_ci(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """mean(a) - mean(b) and the half-width of its 95% interval (Welch); nan when either has < 2 values."""
    a, b = _present(a), _present(b)  # missing values (None, nan) left out of every part, not only the means
    ma, _, na = mean_ci(a)
    mb, _, nb = mean_ci(b)
    if na < 2 or nb < 2:
        return ma - mb, math.nan
    va = sum((x - ma) ** 2 for x in a) / (na - 1) / na
    vb = sum((x - mb) ** 2 for x in b) / (nb - 1) / nb
    se2 = va + vb
    if se2 == 0:  # every seed scored the same on both sides: no spread to build an interval from, not a 0-wide one
        return ma - mb, math.nan
    df = se2**2 / ((va**2) / (na - 1) + (vb**2) / (nb - 1))
    return ma - mb, t975(df) * math.sqrt(se2)

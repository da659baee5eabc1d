"""Small exact statistics for verdicts, without scipy: Student's t, Holm's correction, and a
binomial lower bound.

Student's t uses the closed forms for integer degrees of freedom (Abramowitz & Stegun 26.7.3–4),
exact up to float rounding; seeds give integer degrees of freedom, which is all fastsat needs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["binomial_lower_bound", "holm", "t_cdf", "t_quantile"]


def t_cdf(t: float, df: int) -> float:
    """P(T ≤ t) for Student's t with ``df`` ≥ 1 (integer) degrees of freedom."""
    if df < 1 or int(df) != df:
        raise ValueError(f"df: expected an integer >= 1, got {df!r}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    # A(|t| | df) = P(|T| <= |t|): a finite series in cos²θ.
    if df % 2:
        term, series = 1.0, 1.0 if df > 1 else 0.0
        for k in range(3, df - 1, 2):  # (2·4···(k−1)) / (1·3···k) · cos^(k−1)θ
            term *= c2 * (k - 1) / k
            series += term
        inside = 2 / math.pi * (theta + s * math.cos(theta) * series)
    else:
        term, series = 1.0, 1.0
        for k in range(2, df - 1, 2):  # (1·3···(k−1)) / (2·4···k) · cos^kθ
            term *= c2 * (k - 1) / k
            series += term
        inside = s * series
    return 0.5 + math.copysign(0.5 * inside, t)


def t_quantile(p: float, df: int) -> float:
    """The t with P(T ≤ t) = ``p`` (0 < p < 1), by bisection on :func:`t_cdf` (to ~1e-12)."""
    if not 0 < p < 1:
        raise ValueError(f"p: expected a probability strictly between 0 and 1, got {p!r}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low < 1e-12 * max(1.0, high):
            break
    return (low + high) / 2


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input's order: compare each with the family's
    level (the family-wise error rate it controls); NaN stays NaN and does not count."""
    ranked = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    m, running = len(ranked), 0.0
    adjusted = [math.nan] * len(p_values)
    for rank, (p, i) in enumerate(ranked):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def _binomial_tail(k: int, n: int, p: float) -> float:
    """P(X ≥ k) for X ~ Binomial(n, p)."""
    if p <= 0:
        return 0.0 if k > 0 else 1.0
    if p >= 1:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    return min(1.0, sum(math.exp(math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) + j * log_p
                                 + (n - j) * log_q) for j in range(k, n + 1)))


def binomial_lower_bound(successes: int, n: int, alpha: float = 0.05) -> float:
    """One-sided Clopper–Pearson lower confidence bound (level 1 − ``alpha``) on a binomial
    proportion: the p at which ``successes`` or more of ``n`` has probability ``alpha``.
    0 when there are no successes (or no trials)."""
    if successes <= 0 or n <= 0:
        return 0.0
    low, high = 0.0, successes / n
    for _ in range(100):
        mid = (low + high) / 2
        if _binomial_tail(successes, n, mid) < alpha:
            low = mid
        else:
            high = mid
    return low

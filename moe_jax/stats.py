"""Summaries over seeds: mean, sample standard deviation and a Student-t confidence interval.

One helper for every table that reports a number over seeds (Table 6, the R1 pipeline's seeds,
sweeps). The t quantile is computed here (the regularized incomplete beta function by its
continued fraction, Numerical Recipes §6.4, inverted by bisection) so that no statistics package
is a dependency.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class Summary:
    """`n` finite values: their mean, sample std (ddof 1; 0 for one value) and the two-sided
    t-interval of the mean at `confidence` (NaN bounds for fewer than two values)."""

    mean: float
    std: float
    n: int
    low: float
    high: float


def summarize(values: Sequence[float], confidence: float = 0.95) -> Summary:
    """`Summary` of the finite `values` (NaNs and infinities are left out; none left: all NaN)."""
    finite = [float(v) for v in values if math.isfinite(v)]
    n = len(finite)
    if n == 0:
        return Summary(math.nan, math.nan, 0, math.nan, math.nan)
    mean = math.fsum(finite) / n
    if n == 1:
        return Summary(mean, 0.0, 1, math.nan, math.nan)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in finite) / (n - 1))
    half = t_quantile(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
    return Summary(mean, std, n, mean - half, mean + half)


def mean_std_rows(rows: Sequence[Mapping[str, Any]]) -> dict[str, tuple[float, float]]:
    """Per column of `rows` that holds numbers: (mean, std) over the rows' finite values."""
    summary = {}
    for column in rows[0]:
        values = [float(r[column]) for r in rows if isinstance(r.get(column), (int, float))]
        s = summarize(values)
        if s.n:
            summary[column] = (s.mean, s.std)
    return summary


def paired_difference(values: Sequence[float], baseline: Sequence[float], confidence: float = 0.95
                      ) -> tuple[Summary, float]:
    """`values - baseline`, paired by position (the same seed), as a `Summary` with its t-interval,
    and the two-sided p-value of the paired t-test of a zero mean difference (NaN for fewer than two
    pairs; 0 when every pair differs by the same non-zero amount). Pairs with a NaN are left out."""
    differences = [a - b for a, b in zip(values, baseline) if math.isfinite(a) and math.isfinite(b)]
    summary = summarize(differences, confidence)
    if summary.n < 2:
        return summary, math.nan
    if summary.std == 0:
        return summary, 1.0 if summary.mean == 0 else 0.0
    t = summary.mean / (summary.std / math.sqrt(summary.n))
    return summary, 2 * (1 - t_cdf(abs(t), summary.n - 1))


def t_quantile(p: float, df: int) -> float:
    """The `p` quantile of Student's t with `df` degrees of freedom (p in (0, 1))."""
    if not 0 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df >= 1, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t: 1 - I_x(df/2, 1/2) / 2 with x = df / (df + t²), for t >= 0."""
    tail = 0.5 * _incomplete_beta(df / 2, 0.5, df / (df + t * t))
    return 1 - tail if t >= 0 else tail


def _incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _beta_fraction(a, b, x) / a
    return 1 - front * _beta_fraction(b, a, 1 - x) / b


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) by the modified Lentz method."""
    tiny = 1e-300
    c, d = 1.0, 1 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + numerator * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1) < 1e-15:
            break
    return result

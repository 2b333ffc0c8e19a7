"""`moe_jax.stats` against published Student-t quantiles and hand-computed summaries."""

import math

import pytest

from moe_jax.stats import mean_std_rows, summarize, t_cdf, t_quantile


@pytest.mark.parametrize("p, df, table", [
    (0.975, 1, 12.7062047), (0.975, 2, 4.30265273), (0.975, 4, 2.77644511), (0.975, 30, 2.04227246),
    (0.95, 3, 2.35336343), (0.995, 10, 3.16927267), (0.025, 5, -2.57058184)])
def test_t_quantiles_equal_the_published_table(p, df, table):
    assert t_quantile(p, df) == pytest.approx(table, abs=1e-6)
    assert t_cdf(table, df) == pytest.approx(p, abs=1e-9)


def test_a_summary_by_hand():
    """1, 2, 3 (and a NaN, left out): mean 2, sample std 1, 95% half-width t(0.975, 2) / sqrt(3)."""
    s = summarize([1.0, 2.0, 3.0, math.nan])
    half = 4.30265273 / math.sqrt(3)
    assert (s.mean, s.std, s.n) == (2.0, 1.0, 3)
    assert s.low == pytest.approx(2 - half, abs=1e-7) and s.high == pytest.approx(2 + half, abs=1e-7)
    one = summarize([5.0])
    assert (one.mean, one.std, one.n) == (5.0, 0.0, 1) and math.isnan(one.low)
    assert summarize([]).n == 0 and math.isnan(summarize([math.nan]).mean)
    assert mean_std_rows([{"a": 1.0, "b": "x"}, {"a": 3.0, "b": None}]) == {"a": (2.0, math.sqrt(2.0))}
    with pytest.raises(ValueError, match="0 < p < 1"):
        t_quantile(1.0, 3)

"""A paper's claims as data a sweep carries, and the words its results table says of each: the
claimed ordering *reproduced*, *did not reproduce* (the opposite holds), or is *inside the noise* —
the 95% interval of the paired-by-seed difference decides, not the means.

    Claim("the bias update balances better than the auxiliary loss (Wang et al. 2024, Table 2)",
          metric="eval/maxvio_global/final", a="variant=bias_1e-3", b="variant=aux_1e-2", expect="lower")

`a` and `b` select configurations by values (`path=value`, comma-separated; a bare name is a
variant); each configuration `a` selects is compared with the `b` configuration that agrees with it
on every other axis (a claim over a sweep with a model axis is judged once per model). `b_metric`
compares another column of the same configurations (`final_rl/…` against `r1_zero/…`: R1 against
R1-Zero within each pipeline point); `b` then defaults to `a`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from moe_jax.errors import InputError
from moe_jax.stats import Summary, paired_difference

EXPECTATIONS = ("higher", "lower")
Configuration = tuple[tuple[str, str], ...]


@dataclasses.dataclass(frozen=True)
class Claim:
    """`says` (the claim, with its source), a `metric` column, the configurations `a` and `b`, and
    whether `a`'s value is expected `higher` or `lower` than `b`'s (`b_metric`'s, if given)."""

    says: str
    metric: str
    a: str = ""
    b: str | None = None
    expect: str = "higher"
    b_metric: str | None = None

    def __post_init__(self) -> None:
        if self.expect not in EXPECTATIONS:
            raise InputError(f"claim {self.says!r}: expect={self.expect!r}; use one of {EXPECTATIONS}")
        if self.b is None and self.b_metric is None:
            raise InputError(f"claim {self.says!r}: give b (the configuration compared with) or b_metric")

    def selection(self, side: str) -> dict[str, str]:
        """The values side `a` or `b` selects (`variant` for a bare name)."""
        text = self.a if side == "a" or self.b is None else self.b
        values = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            path, sep, value = part.partition("=")
            values.update({path: value} if sep else {"variant": part})
        return values

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, tree: Mapping[str, Any]) -> Claim:
        known = {f.name for f in dataclasses.fields(cls)}
        if set(tree) - known or not {"says", "metric"} <= set(tree):
            raise InputError(f"sweep claim {dict(tree)}: keys {sorted(known)}, 'says' and 'metric' required")
        return cls(**tree)


def verdict(difference: Summary, expect: str) -> str:
    """What the interval of `a − b` says of a claim that `a` is `expect` (higher/lower) than `b`."""
    if difference.n < 2:
        return "too few paired seeds to say"
    if difference.low <= 0 <= difference.high:
        return "inside the noise (the interval of the difference holds 0)"
    holds = (difference.mean > 0) == (expect == "higher")
    return "reproduced" if holds else "did not reproduce: the opposite holds"


def _matches(configuration: Configuration, values: Mapping[str, str]) -> bool:
    return all(dict(configuration).get(k) == v for k, v in values.items())


def pairs(claim: Claim, configurations: Sequence[Configuration]) -> list[tuple[Configuration, Configuration]]:
    """(a, b) configuration pairs the claim compares: each `a` with the `b` that agrees with it
    on every axis neither selection sets."""
    a_values, b_values = claim.selection("a"), claim.selection("b")
    chosen = set(a_values) | set(b_values)
    found = []
    for a in (c for c in configurations if _matches(c, a_values)):
        rest = {k: v for k, v in a if k not in chosen}
        found += [(a, b) for b in configurations if _matches(b, b_values) and _matches(b, rest)]
    return found


def judge(claim: Claim, a_by_seed: Mapping[str, float], b_by_seed: Mapping[str, float]
          ) -> tuple[Summary, float, str]:
    """(the paired difference a − b over the seeds both have, its t-test p, the verdict)."""
    seeds = [s for s in a_by_seed if s in b_by_seed]
    difference, p = paired_difference([a_by_seed[s] for s in seeds], [b_by_seed[s] for s in seeds])
    return difference, p, verdict(difference, claim.expect)

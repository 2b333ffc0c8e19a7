"""A GRPO run's health checks: stop when the policy diverges, warn loudly when a signal collapses.

Measured after every step (the driver's `RunParts.check`): the parameters' global norm
(`param_norm`, computed inside the step) against its value at the run's first step, and four
shares that a healthy run keeps below 1 — clipped ratios, completions cut at the length limit,
groups without a reward spread, completions with no reward at all. A run whose learning rate
diverges shows all of them (accuracy to 0, every completion at the length limit, weights growing
by orders of magnitude) while its loss stays finite, so the finite-state guard alone misses it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from absl import logging

from moe_jax.train.experiment_config import check_number, check_positive

# metric -> what it means when it sits at 1
COLLAPSE_SIGNALS: Mapping[str, str] = {
    "clip_ratio/region_mean": "every token's ratio is clipped: the policy moved far from the one that sampled",
    "completions/clipped_ratio": "every completion hits the length limit (sampling.max_new_tokens)",
    "frac_reward_zero_std": "every group's rewards are equal: no advantage, no learning signal",
    "frac_reward_zero": "every completion scores 0",
}


class RunHealthError(RuntimeError):
    """A health check stopped the run."""


@dataclasses.dataclass(frozen=True)
class HealthConfig:
    """Thresholds of the health checks."""

    max_param_growth: float = 10.0  # stop when param_norm exceeds this multiple of its first value
    collapse_patience: int = 3  # warn when a signal sits at 1 for this many steps in a row

    def __post_init__(self) -> None:
        check_number(self, "max_param_growth", low=1, low_open=True, fix="use e.g. 10")
        check_positive(self, "collapse_patience")


class HealthMonitor:
    """`monitor(step, host_metrics)`: raises RunHealthError on divergence, logs the collapses."""

    def __init__(self, cfg: HealthConfig):
        self.cfg = cfg
        self.first_norm: float | None = None
        self.streaks = dict.fromkeys(COLLAPSE_SIGNALS, 0)

    def __call__(self, step: int, metrics: Mapping[str, Any]) -> None:
        norm = metrics["param_norm"]
        if self.first_norm is None:
            self.first_norm = norm
        limit = self.cfg.max_param_growth * self.first_norm
        if not math.isfinite(norm) or norm > limit:
            raise RunHealthError(
                f"step {step}: param_norm is {norm:.4g}, more than health.max_param_growth="
                f"{self.cfg.max_param_growth} x its first value {self.first_norm:.4g}: the policy is diverging; "
                "stopping. Fix: continue from the last good checkpoint with a lower learning rate "
                "(--allow_config_change=optimizer --config.optimizer.learning_rate=<lower>), or raise "
                "--config.health.max_param_growth if this growth is expected")
        for signal, meaning in COLLAPSE_SIGNALS.items():
            collapsed = metrics.get(signal, 0.0) >= 1.0
            self.streaks[signal] = self.streaks[signal] + 1 if collapsed else 0
            if self.streaks[signal] == self.cfg.collapse_patience:
                logging.warning("=" * 78 + "\nHEALTH WARNING at step %d: %s = 1 for %d steps in a row — %s.\n"
                                + "=" * 78, step, signal, self.cfg.collapse_patience, meaning)

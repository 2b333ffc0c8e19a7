"""AdamW with linear warmup and cosine decay, global-norm clipping, and weight decay on matrices
only (norm scales and biases are 1-D and left alone; the router bias is not a parameter at all)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import optax

if TYPE_CHECKING:
    from moe_jax.train.experiment_config import RunConfig


def run_schedule(cfg: RunConfig) -> optax.Schedule:
    """A run's schedule over optimizer updates: its warmup and length in steps, times the updates
    each step makes (GRPO's μ × minibatches), so it ends with the run's last update."""
    updates = cfg.updates_per_step
    return learning_rate_schedule(cfg.optimizer.learning_rate, cfg.optimizer.warmup_steps * updates,
                                  cfg.steps * updates)


def learning_rate_schedule(peak: float, warmup_steps: int, total_steps: int,
                           final_fraction: float = 0.1) -> optax.Schedule:
    """0 → `peak` linearly over `warmup_steps`, then cosine down to `final_fraction · peak`."""
    warmup_steps = max(warmup_steps, 1)  # optax needs at least one warmup and one decay step
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, max(total_steps, warmup_steps + 1),
                                              peak * final_fraction)


def decay_mask(params):
    """True for parameters that get weight decay: the matrices (ndim >= 2)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(learning_rate: float | optax.Schedule, *, warmup_steps: int = 0, total_steps: int = 0,
                   weight_decay: float = 0.1, clip_norm: float = 1.0, b1: float = 0.9,
                   b2: float = 0.95) -> optax.GradientTransformation:
    """The optax chain the train step uses (DeepSeek-V3 §4.2 hyper-parameter shape): a peak
    learning rate with its warmup and length, or a ready schedule (`run_schedule`)."""
    schedule = learning_rate if callable(learning_rate) else learning_rate_schedule(
        learning_rate, warmup_steps, total_steps)
    return optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask))

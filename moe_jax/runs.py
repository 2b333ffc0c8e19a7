"""Which runner trains a run config: a table keyed by the config's exact class.

`ExperimentConfig` (pretraining, SFT) → `train`; `GRPOConfig` → `train_grpo`. A config of any
other class — a subclass included, e.g. the student's `KDRunConfig`, which needs its teacher
(`moe_jax.distill.run.train_kd`) — is refused rather than trained with another kind's loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from moe_jax.errors import InputError
from moe_jax.rl.config import GRPOConfig
from moe_jax.rl.trainer import train_grpo
from moe_jax.train.experiment_config import ExperimentConfig, RunConfig
from moe_jax.train.trainer import train

RUNNERS: dict[type[RunConfig], Callable[..., dict[str, Any]]] = {ExperimentConfig: train, GRPOConfig: train_grpo}


def runner_for(cfg: RunConfig) -> Callable[..., dict[str, Any]]:
    """The runner of `cfg`'s exact class (InputError naming the class for any other)."""
    runner = RUNNERS.get(type(cfg))
    if runner is None:
        raise InputError(f"no runner here trains a {type(cfg).__name__} (these do: "
                         f"{', '.join(c.__name__ for c in RUNNERS)}). Fix: call its own runner (a KDRunConfig: "
                         "moe_jax.distill.run.train_kd, which needs the teacher)")
    return runner


def run(cfg: RunConfig, workdir: str, **kwargs: Any) -> dict[str, Any]:
    """Train (or resume) `cfg` in `workdir` with its runner (`driver.run`'s contract and keywords)."""
    return runner_for(cfg)(cfg, workdir, **kwargs)

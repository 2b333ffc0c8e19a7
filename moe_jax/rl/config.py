"""`GRPOConfig`: a run config (`moe_jax.train.experiment_config.RunConfig`) with GRPO's parts —
`sampling` (`SamplingConfig`: G = `samples_per_prompt` completions per prompt), `loss`
(`GRPOLoss`: the objective and its published variants, each one flag away:
`--config.loss.loss_type=dr_grpo`, `--config.loss.importance_sampling_level=sequence`, ...) and
`rewards` (weights of reward-registry entries, `"accuracy=1.0,format=0.1"`).

Per step, `batch_size` completions are sampled: `batch_size / G` prompts, G samples each; every
row holds `seq_len` tokens, the prompt (left-padded) taking `seq_len - max_new_tokens` of them;
each of the `loss.minibatches` updates accumulates its gradient over `microbatches` scans. The run
fields default to GRPO's own values (the `grpo` recipe), not pretraining's: `GRPOConfig()` in a
notebook is a GRPO run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from moe_jax.models.sampler import SamplingConfig
from moe_jax.rl.grpo import ADVANTAGE_SCALES, IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES
from moe_jax.rl.health import HealthConfig
from moe_jax.rl.rewards import parse_reward_weights
from moe_jax.train.experiment_config import (
    LoopConfig,
    OptimizerConfig,
    RunConfig,
    check_number,
    check_positive,
    config_error,
)

MEAN_LENGTH = "completions/mean_length"  # the metric of a step's mean completion length (tokens)


@dataclasses.dataclass(frozen=True)
class GRPOLoss:
    """The policy objective (`moe_jax.rl.grpo.policy_loss`) and how its advantages and masks are
    made: GRPO and its published variants."""

    loss_type: str = "dapo"
    epsilon: float = 0.2
    epsilon_high: float = 0.0  # 0: the same as epsilon (DAPO's clip-higher uses e.g. 0.28)
    beta: float = 0.0  # KL to the frozen initial policy (k3); 0 keeps no reference model
    importance_sampling_level: str = "token"  # "sequence" = GSPO, "sequence_token" = GSPO-token
    scale_rewards: str = "group"  # advantages: / group std, / batch std, or "none" (Dr. GRPO)
    num_iterations: int = 1  # μ: updates per generation batch (old log-probs from the sampler)
    minibatches: int = 1  # optimizer updates per pass over the generation batch
    mask_truncated_completions: bool = False  # DAPO: completions that hit the budget do not count
    overlong_buffer: int = 0  # DAPO soft overlong punishment over the last N tokens (0: off)
    routing_replay: bool = False  # MoE: the μ updates reuse the old policy's expert choices (GSPO)

    def __post_init__(self) -> None:
        for name, allowed in (("loss_type", LOSS_TYPES), ("scale_rewards", ADVANTAGE_SCALES),
                              ("importance_sampling_level", IMPORTANCE_SAMPLING_LEVELS)):
            if getattr(self, name) not in allowed:
                raise config_error(self, name, f"unknown {getattr(self, name)!r}", f"use one of {allowed}")
        check_number(self, "epsilon", low=0, low_open=True, fix="use e.g. 0.2")
        check_number(self, "epsilon_high", low=0, fix="use e.g. 0.28, or 0 for epsilon")
        check_number(self, "beta", low=0, fix="use e.g. 0.04, or 0 for no KL term")
        check_positive(self, "num_iterations", "minibatches")
        if self.overlong_buffer < 0:
            raise config_error(self, "overlong_buffer", f"must be >= 0, got {self.overlong_buffer}", "use 0 for off")


@dataclasses.dataclass(frozen=True)
class GRPOConfig(RunConfig):
    """R1-Zero-style RL from a base model."""

    MOVED_FIELDS: ClassVar[Mapping[str, str]] = {
        **RunConfig.MOVED_FIELDS,
        **{name: f"sampling.{name}" for name in ("temperature", "top_p", "top_k", "max_new_tokens")},
        "group_size": "sampling.samples_per_prompt",
        **{name: f"loss.{name}" for name in (f.name for f in dataclasses.fields(GRPOLoss))},
        "accuracy_weight": "rewards", "format_weight": "rewards"}
    RETIRED_FIELDS: ClassVar[Mapping[str, str]] = {
        **RunConfig.RETIRED_FIELDS,
        **{name: "a GRPO run has no corpus (an R1-Zero base's corpus is the recipe's)"
           for name in ("error_rate", "loss_on_prompt", "eval_batches")}}

    # --- the run fields, at GRPO's values: 16 prompts x 8 samples per step, a gentle schedule ---
    steps: int = 100
    batch_size: int = 128
    optimizer: OptimizerConfig = dataclasses.field(
        default_factory=lambda: OptimizerConfig(learning_rate=1e-4, warmup_steps=5, weight_decay=0.0))
    loop: LoopConfig = dataclasses.field(
        default_factory=lambda: LoopConfig(eval_every=20, checkpoint_every=20, eval_problems=128))
    # --- GRPO ---
    sampling: SamplingConfig = dataclasses.field(default_factory=lambda: SamplingConfig(samples_per_prompt=8))
    loss: GRPOLoss = dataclasses.field(default_factory=GRPOLoss)
    rewards: str = "accuracy=1.0,format=0.1"  # reward-registry names and their weights
    dynamic_sampling: bool = False  # DAPO: train on groups whose rewards differ, sampling more
    max_resamples: int = 3  # extra prompt batches dynamic sampling may draw per step
    health: HealthConfig = dataclasses.field(default_factory=HealthConfig)  # divergence and collapse checks

    def __post_init__(self) -> None:
        super().__post_init__()

        def fail(field: str, problem: str, fix: str) -> None:
            raise config_error(self, field, problem, fix)

        try:
            parse_reward_weights(self.rewards)
        except ValueError as e:
            problem, _, fix = str(e).partition(". Fix: ")
            fail("rewards", problem, fix)
        if self.max_resamples < 0:
            fail("max_resamples", f"must be >= 0, got {self.max_resamples}", "use e.g. 3")
        if self.group_size < 2:
            fail("sampling.samples_per_prompt", "a group needs >= 2 samples for a baseline", "use e.g. 8")
        if self.sampling.temperature <= 0:
            fail("sampling.temperature", f"must be > 0 for sampling, got {self.sampling.temperature}",
                 "use e.g. 1.0")
        if self.batch_size % self.group_size:
            fail("batch_size", f"{self.batch_size} completions do not split into groups of "
                 f"{self.group_size}", "make batch_size a multiple of sampling.samples_per_prompt")
        if self.batch_size % (self.loss.minibatches * self.microbatches):
            fail("microbatches", f"loss.minibatches x microbatches = {self.loss.minibatches} x "
                 f"{self.microbatches} does not divide batch_size={self.batch_size}", "pick divisors of batch_size")
        if self.seq_len <= self.sampling.max_new_tokens:
            fail("seq_len", f"{self.seq_len} leaves no room for a prompt next to sampling.max_new_tokens="
                 f"{self.sampling.max_new_tokens}", "raise seq_len (it is prompt + completion)")
        if self.loss.overlong_buffer >= self.sampling.max_new_tokens:
            fail("loss.overlong_buffer", f"must be < sampling.max_new_tokens, got {self.loss.overlong_buffer}",
                 "use e.g. max_new_tokens // 4, or 0 for off")

    @classmethod
    def migrate(cls, fields: Mapping[str, Any]) -> dict[str, Any]:
        """As `RunConfig.migrate`; the old `accuracy_weight` / `format_weight` become `rewards`."""
        weights = {name: fields[f"{name}_weight"] for name in ("accuracy", "format") if f"{name}_weight" in fields}
        migrated = super().migrate({k: v for k, v in fields.items() if k not in ("accuracy_weight", "format_weight")})
        if weights:
            migrated["rewards"] = ",".join(f"{name}={weight}" for name, weight in {
                **parse_reward_weights(GRPOConfig.rewards), **weights}.items())
        return migrated

    @property
    def updates_per_step(self) -> int:
        return self.loss.num_iterations * self.loss.minibatches

    @property
    def group_size(self) -> int:
        return self.sampling.samples_per_prompt

    @property
    def max_new_tokens(self) -> int:
        return self.sampling.max_new_tokens

    @property
    def prompt_len(self) -> int:
        return self.seq_len - self.sampling.max_new_tokens

    @property
    def prompts_per_step(self) -> int:
        return self.batch_size // self.group_size

    @property
    def prompts_consumed(self) -> int:
        """How many prompts of its stream the run poses at most: every step's batch, and with
        dynamic sampling up to `max_resamples` more batches a step."""
        return self.steps * self.prompts_per_step * (1 + self.max_resamples * self.dynamic_sampling)

    def tokens_processed(self, metrics: Sequence[Mapping[str, Any]]) -> int:
        """The completion tokens the run sampled (its logged mean completion lengths)."""
        return int(sum(r[MEAN_LENGTH] * self.batch_size for r in metrics if MEAN_LENGTH in r))

"""`GRPOConfig`: an `ExperimentConfig` plus the knobs of GRPO and its published variants, each one
flag away (`--config.loss_type=dr_grpo`, `--config.importance_sampling_level=sequence`, ...).

Per step, `batch_size` completions are sampled: `batch_size / group_size` prompts, `group_size`
samples each; every row holds `seq_len` tokens, the prompt (left-padded) taking
`seq_len - max_new_tokens` of them; each of the `minibatches` updates accumulates its gradient
over `microbatches` scans. The corpus fields (`error_rate`, `loss_on_prompt`) play no part in
RL; `r1_zero.py` reads `error_rate` for its base corpus. The run fields default to GRPO's own
values (the `grpo` recipe), not pretraining's: `GRPOConfig()` in a notebook is a GRPO run.
"""

from __future__ import annotations

import dataclasses

from moe_jax.rl.grpo import ADVANTAGE_SCALES, IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES
from moe_jax.train.experiment_config import ExperimentConfig, config_error


@dataclasses.dataclass(frozen=True)
class GRPOConfig(ExperimentConfig):
    """R1-Zero-style RL from a base model."""

    # --- the run fields, at GRPO's values: 16 prompts x 8 samples per step, a gentle schedule ---
    steps: int = 100
    batch_size: int = 128
    learning_rate: float = 1e-4
    warmup_steps: int = 5
    weight_decay: float = 0.0
    eval_every: int = 20
    checkpoint_every: int = 20
    eval_batches: int = 0
    eval_problems: int = 128
    eval_max_new_tokens: int = 64
    # --- GRPO ---
    group_size: int = 8  # G completions per prompt
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    # --- the loss (moe_jax.rl.grpo.policy_loss) ---
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
    dynamic_sampling: bool = False  # DAPO: train on groups whose rewards differ, sampling more
    max_resamples: int = 3  # extra prompt batches dynamic sampling may draw per step
    # --- rewards ---
    accuracy_weight: float = 1.0
    format_weight: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()

        def fail(field: str, problem: str, fix: str) -> None:
            raise config_error(self, field, problem, fix)

        for name, allowed in (("loss_type", LOSS_TYPES), ("scale_rewards", ADVANTAGE_SCALES),
                              ("importance_sampling_level", IMPORTANCE_SAMPLING_LEVELS)):
            if getattr(self, name) not in allowed:
                fail(name, f"unknown {getattr(self, name)!r}", f"use one of {allowed}")
        if self.max_resamples < 0:
            fail("max_resamples", f"must be >= 0, got {self.max_resamples}", "use e.g. 3")
        for name in ("group_size", "max_new_tokens", "num_iterations", "minibatches"):
            if getattr(self, name) < 1:
                fail(name, f"must be >= 1, got {getattr(self, name)}", "use a positive value")
        if self.group_size < 2:
            fail("group_size", "a group needs >= 2 samples for a baseline", "use e.g. 8")
        if self.batch_size % self.group_size:
            fail("batch_size", f"{self.batch_size} completions do not split into groups of "
                 f"{self.group_size}", "make batch_size a multiple of group_size")
        if self.batch_size % (self.minibatches * self.microbatches):
            fail("microbatches", f"minibatches x microbatches = {self.minibatches} x {self.microbatches} "
                 f"does not divide batch_size={self.batch_size}", "pick divisors of batch_size")
        if self.seq_len <= self.max_new_tokens:
            fail("seq_len", f"{self.seq_len} leaves no room for a prompt next to max_new_tokens="
                 f"{self.max_new_tokens}", "raise seq_len (it is prompt + completion)")
        if self.temperature <= 0:
            fail("temperature", f"must be > 0 for sampling, got {self.temperature}", "use e.g. 1.0")
        if not 0 < self.top_p <= 1 or self.top_k < 0:
            fail("top_p", f"need 0 < top_p <= 1 and top_k >= 0, got {self.top_p}, {self.top_k}",
                 "use top_p=1, top_k=0 for plain sampling")
        if self.epsilon <= 0 or self.epsilon_high < 0 or self.beta < 0:
            fail("epsilon", "need epsilon > 0, epsilon_high >= 0, beta >= 0", "use e.g. 0.2, 0.28, 0.0")
        if not 0 <= self.overlong_buffer < self.max_new_tokens:
            fail("overlong_buffer", f"must lie in [0, max_new_tokens), got {self.overlong_buffer}",
                 "use e.g. max_new_tokens // 4, or 0 for off")

    @property
    def prompt_len(self) -> int:
        return self.seq_len - self.max_new_tokens

    @property
    def prompts_per_step(self) -> int:
        return self.batch_size // self.group_size

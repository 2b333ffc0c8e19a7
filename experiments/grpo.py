"""GRPO with rule-based rewards (DeepSeek-R1-Zero's recipe) from a pretrained or SFT'd model.

    python experiments/pretrain.py --workdir=/tmp/base
    python experiments/grpo.py --workdir=/tmp/grpo --init_from=/tmp/base
    python experiments/grpo.py --workdir=/tmp/gspo --init_from=/tmp/base \
        --config.importance_sampling_level=sequence --config.loss_type=grpo

Every GRPO variant is a flag: `loss_type` (grpo | bnpo | dapo | dr_grpo), `scale_rewards`
(group | batch | none), `epsilon_high` (DAPO clip-higher), `beta` (KL), `num_iterations` (μ),
`mask_truncated_completions`, `overlong_buffer`. Rerunning the same command resumes.
"""

from __future__ import annotations

from absl import app

from moe_jax import config_flags
from moe_jax.experiment_main import define_run_flags, run_from_flags
from moe_jax.rl.config import GRPOConfig
from moe_jax.rl.trainer import train_grpo

# 16 prompts × 8 samples per step, completions up to 64 tokens, a gentle constant-ish schedule.
GRPO_DEFAULTS = {"steps": 100, "batch_size": 128, "seq_len": 128, "learning_rate": 1e-4,
                 "warmup_steps": 5, "weight_decay": 0.0, "eval_every": 20, "checkpoint_every": 20,
                 "eval_batches": 0, "eval_problems": 128, "eval_max_new_tokens": 64, "log_every": 5}

config_flags.define_config_flags(config_class=GRPOConfig)
define_run_flags()


def main(argv: list[str]) -> None:
    del argv
    run_from_flags(config_flags.config_from_flags(defaults=GRPO_DEFAULTS, config_class=GRPOConfig),
                   train_fn=train_grpo)


if __name__ == "__main__":
    app.run(main, flags_parser=config_flags.parse_flags)

"""GRPO with rule-based rewards (DeepSeek-R1-Zero's recipe) from a pretrained or SFT'd model.

    python experiments/pretrain.py --workdir=/tmp/base
    python experiments/grpo.py --workdir=/tmp/grpo --init_from=/tmp/base
    python experiments/grpo.py --workdir=/tmp/gspo --init_from=/tmp/base \
        --config.loss.importance_sampling_level=sequence --config.loss.loss_type=grpo

Every GRPO variant is a flag of the `loss` part: `--config.loss.loss_type` (grpo | bnpo | dapo |
dr_grpo), `scale_rewards` (group | batch | none), `epsilon_high` (DAPO clip-higher), `beta` (KL),
`num_iterations` (μ), `mask_truncated_completions`, `overlong_buffer`; sampling is
`--config.sampling.*`. `--init_from` is required. Rerunning the same command resumes.
"""

from __future__ import annotations

from absl import app

from moe_jax import config_flags, experiment_main

experiment_main.define_flags("grpo")

if __name__ == "__main__":
    app.run(experiment_main.main, flags_parser=config_flags.parse_flags)

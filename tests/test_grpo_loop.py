"""The GRPO loop end to end on a tiny model: TRL's metric names, checkpoints, and a rerun that
resumes instead of starting over."""

import dataclasses
import os

import pytest

from moe_jax.configs import get_preset
from moe_jax.rl.config import GRPOConfig
from moe_jax.train.checkpoint import CHECKPOINT_DIR, Checkpointer
from moe_jax.train.metrics import read_metrics

CFG = GRPOConfig(model=dataclasses.replace(get_preset("tiny-moe"), n_layers=2, d_model=32, n_heads=2),
                 steps=2, batch_size=16, group_size=4, seq_len=40, max_new_tokens=16,
                 learning_rate=1e-3, warmup_steps=1, eval_every=2, checkpoint_every=1, eval_batches=0,
                 eval_problems=8, eval_max_new_tokens=16, num_iterations=2, minibatches=2, beta=0.04,
                 epsilon_high=0.28, overlong_buffer=4, mask_truncated_completions=True)

TRL_NAMES = {"reward", "reward_std", "rewards/accuracy/mean", "rewards/format/mean", "frac_reward_zero_std",
             "kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "entropy",
             "completions/mean_length", "completions/clipped_ratio", "time/sampling", "time/scoring",
             "time/training", "tokens_per_s", "loss", "grad_norm"}


def test_grpo_run_logs_trl_metrics_checkpoints_and_resumes(tmp_path):
    from moe_jax.rl.trainer import train_grpo

    workdir = str(tmp_path / "grpo")
    result = train_grpo(CFG, workdir)
    assert (result["status"], result["step"]) == ("finished", 2)
    metrics = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert "eval/accuracy" in metrics[0] and "eval/accuracy" in metrics[2]
    for m in metrics[1:]:
        assert TRL_NAMES <= set(m), TRL_NAMES - set(m)
    assert Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), save_every=1).latest_step() == 2

    longer = dataclasses.replace(CFG, steps=3)  # `steps` is not a cadence field: a conflict
    with pytest.raises(ValueError, match="steps: 2"):
        train_grpo(longer, workdir)
    again = train_grpo(CFG, workdir)  # the same command: it finds the run finished
    assert again["step"] == 2
    assert [m["step"] for m in read_metrics(os.path.join(workdir, "metrics.jsonl"))] == [0, 1, 2]

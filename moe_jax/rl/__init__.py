"""Reinforcement learning from rule-based rewards (DeepSeek-R1-Zero's GRPO and its variants).

- `grpo`: the pure maths — group advantages, every GRPO loss type (token/sequence ratios, k3 KL),
  DAPO overlong shaping, truncation masking, zero-variance groups.
- `rewards`: the reward registry — rule-based accuracy and format rewards per task (model text is
  parsed, never run).
- `sampling`: sample a batch of prompts and score the completions (`sample_and_score`).
- `policy`, `step`, `trainer`, `config`: the log-prob forward, the jitted step, the GRPO run and
  its config parts.

Submodules are imported explicitly (`from moe_jax.rl import grpo`), so importing the pure maths
does not pull in the model or the training loop.
"""

"""Time one GRPO step by phase — sampling (KV-cache generation), scoring (detokenize, rewards,
advantages) and training (the jitted update) — and print one JSON line with the medians.

    python experiments/bench_grpo.py          # 8 prompts × 8 samples, 32 new tokens, 2-layer d_model 128

The default shape is the one TRL's GRPOTrainer is compared at (a 2-layer, d_model 128 model; the
side-by-side figures are in BUILD_NOTES.md); here the policy is an MoE (tiny-moe's routing).
"""

from __future__ import annotations

import json

import jax
import numpy as np
from absl import app, flags

from moe_jax import config_flags, experiment_main
from moe_jax.configs import count_params
from moe_jax.rl.config import GRPOConfig
from moe_jax.rl.trainer import grpo_run
from moe_jax.train.context import make_context

BENCH_DEFAULTS = {"batch_size": 64, "sampling.samples_per_prompt": 8, "sampling.max_new_tokens": 32, "seq_len": 48}
# The model TRL was timed with: 2 layers of d_model 128 (here with tiny-moe's MoE and MLA).
MODEL_DEFAULTS = {"n_layers": 2, "d_model": 128}

config_flags.define_config_flags(config_class=GRPOConfig)
experiment_main.define_bench_flags(warmup=3, repeats=10)
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    cfg = config_flags.config_from_flags(defaults=BENCH_DEFAULTS, config_class=GRPOConfig)
    model_overrides = {k: v for k, v in MODEL_DEFAULTS.items() if not FLAGS[f"config.model.{k}"].present}
    if FLAGS.config == "tiny-moe":
        cfg = cfg.replace_model(**model_overrides)
    parts = grpo_run(cfg)(make_context(cfg, FLAGS.mesh))  # a GRPO run's step, without its workdir
    state, phases = parts.state, []
    for step in range(1, FLAGS.warmup + FLAGS.repeats + 1):
        state, metrics = parts.step(step, state)
        if step > FLAGS.warmup:
            phases.append([metrics["time/sampling"], metrics["time/scoring"], metrics["time/training"]])
    sampling, scoring, training = np.median(np.asarray(phases), axis=0)
    print(json.dumps({
        "platform": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
        "devices": jax.device_count(), "params_total": count_params(cfg.model)["total"],
        "prompts": cfg.prompts_per_step, "group_size": cfg.group_size, "max_new_tokens": cfg.max_new_tokens,
        "n_layers": cfg.model.n_layers, "d_model": cfg.model.d_model,
        "moe": f"{cfg.model.n_routed_experts} routed top-{cfg.model.top_k}" if cfg.model.is_moe else None,
        "median_s": {"sampling": round(sampling, 4), "scoring": round(scoring, 4),
                     "training": round(training, 4), "step": round(sampling + scoring + training, 4)},
        "repeats": FLAGS.repeats}))


if __name__ == "__main__":
    app.run(main, flags_parser=config_flags.parse_flags)

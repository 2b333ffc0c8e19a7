"""Time the jitted training step (forward + backward + AdamW + router-bias update) and print one
JSON line: tokens/s and MFU (model FLOPs per token x tokens/s over the devices' bf16 peak).

    python experiments/bench_train.py                                  # tiny-moe on CPU
    python experiments/bench_train.py --config=small-moe --config.batch_size=32 \
        --config.seq_len=2048                                          # the GPU number
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np
from absl import app, flags

from moe_jax import config_flags, experiment_main
from moe_jax.configs import count_params, flops_per_token
from moe_jax.models.moe import resolve_dispatch
from moe_jax.parallel.distributed import global_batch_array
from moe_jax.train.context import make_context, resolve_compute_dtype
from moe_jax.train.metrics import mfu, peak_flops_per_device
from moe_jax.train.step import make_train_step

config_flags.define_config_flags()
experiment_main.define_bench_flags(warmup=3, repeats=10)
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    cfg = config_flags.config_from_flags()
    run = make_context(cfg, FLAGS.mesh)  # a run's setup, without its workdir
    mesh = run.mesh
    step, state = make_train_step(run.model, run.optimizer, microbatches=cfg.microbatches, mesh=mesh,
                                  rules=run.rules)
    del run
    # Full rows of random tokens: one document per row, every token a target.
    rng = np.random.default_rng(0)
    shape = (cfg.batch_size, cfg.seq_len)
    batch = {"tokens": rng.integers(0, cfg.model.vocab_size, shape, dtype=np.int32),
             "segment_ids": np.ones(shape, np.int32),
             "positions": np.broadcast_to(np.arange(cfg.seq_len, dtype=np.int32), shape).copy(),
             "loss_mask": np.ones(shape, np.int32)}
    batch = {k: global_batch_array(v, mesh) for k, v in batch.items()}
    for _ in range(FLAGS.warmup):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(FLAGS.repeats):
        state, metrics = step(state, batch)
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - start) / FLAGS.repeats

    flops = flops_per_token(cfg.model, cfg.seq_len)
    tokens_per_s = cfg.batch_size * cfg.seq_len / step_s
    device = jax.devices()[0]
    print(json.dumps({
        "platform": jax.default_backend(), "device_kind": device.device_kind,
        "devices": jax.device_count(), "mesh": dict(mesh.shape), "config": cfg.model.name,
        "params_total": count_params(cfg.model)["total"], "params_activated": count_params(cfg.model)["activated"],
        "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "microbatches": cfg.microbatches,
        "param_dtype": cfg.model.param_dtype, "compute_dtype": resolve_compute_dtype(cfg.compute_dtype),
        "moe_dispatch": resolve_dispatch(cfg.model.moe_dispatch),
        "step_ms": round(step_s * 1e3, 2), "tokens_per_s": round(tokens_per_s, 1),
        "model_flops_per_token": flops["total"] + flops["mtp"],
        "peak_flops_per_device": peak_flops_per_device(device),
        "mfu": mfu(flops["total"] + flops["mtp"], tokens_per_s, jax.devices()),
        "loss": float(metrics["loss"])}))


if __name__ == "__main__":
    app.run(main, flags_parser=config_flags.parse_flags)

"""Expert-parallel MoE layer: bytes exchanged per device and step time for EP = 1, 2, 4, 8.

Runs on simulated CPU devices unless real ones exist (set before JAX starts). For each EP size
and send-buffer capacity factor it prints one JSON line: the per-device send/receive bytes of
the two all_to_all exchanges (computed from the buffer shapes, the part a device keeps for
itself excluded), the dropped fraction and the median forward+backward time of one MoE layer.

    python experiments/bench_ep.py
    python experiments/bench_ep.py --ep_sizes=1,2,4,8 --capacity_factors=0,1.25 --tokens=4096
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from moe_jax.configs import ModelConfig
from moe_jax.models.expert_parallel import ep_capacity
from moe_jax.models.moe import MoELayer
from moe_jax.parallel import init_sharded, make_mesh, use_mesh

flags.DEFINE_list("ep_sizes", ["1", "2", "4", "8"], "expert-parallel sizes (devices)")
flags.DEFINE_list("capacity_factors", ["0", "1.25"], "ep_capacity_factor values; 0 = dropless")
flags.DEFINE_integer("tokens", 4096, "global tokens per step")
flags.DEFINE_integer("d_model", 256, "model width")
flags.DEFINE_integer("n_experts", 64, "routed experts")
flags.DEFINE_integer("top_k", 8, "experts per token")
flags.DEFINE_integer("expert_width", 128, "expert SwiGLU width")
flags.DEFINE_integer("repeats", 5, "timed steps")
FLAGS = flags.FLAGS


def exchange_bytes(tokens: int, ep: int, top_k: int, d_model: int, capacity_factor: float,
                   itemsize: int = 4) -> dict[str, int]:
    """Per-device bytes of the dispatch (x + 2 int32 of metadata per slot) and the return (y)
    all_to_all; a device keeps 1/ep of each buffer for itself."""
    capacity = ep_capacity(tokens // ep, top_k, ep, capacity_factor)
    slots = ep * capacity
    remote = slots * (ep - 1) // ep
    dispatch = remote * (d_model * itemsize + 2 * 4)
    combine = remote * d_model * itemsize
    return {"capacity_per_shard": capacity, "buffer_slots": slots,
            "send_bytes": dispatch + combine, "recv_bytes": dispatch + combine}


def _time_layer(cfg: ModelConfig, ep: int) -> tuple[float, float]:
    mesh = make_mesh(f"expert={ep}", devices=jax.devices()[:ep])
    x = jax.random.normal(jax.random.key(0), (1, FLAGS.tokens, cfg.d_model))
    mask = jnp.ones((1, FLAGS.tokens), bool)
    with use_mesh(mesh):
        layer = init_sharded(lambda: MoELayer(cfg, rngs=nnx.Rngs(0)), mesh)
        graphdef, state = nnx.split(layer)

        def loss(state, x):
            y, stats = nnx.merge(graphdef, state)(x, mask)
            return jnp.sum(y.astype(jnp.float32) ** 2), stats["dropped_fraction"]

        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
        (_, dropped), _ = jax.block_until_ready(step(state, x))
        times = []
        for _ in range(FLAGS.repeats):
            start = time.perf_counter()
            jax.block_until_ready(step(state, x))
            times.append(1e3 * (time.perf_counter() - start))
    return float(np.median(times)), float(dropped)


def main(argv: list[str]) -> None:
    del argv
    platform = {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
                "devices": jax.device_count(), "cpu_count": os.cpu_count()}
    shape = {"tokens": FLAGS.tokens, "d_model": FLAGS.d_model, "n_experts": FLAGS.n_experts,
             "top_k": FLAGS.top_k, "expert_width": FLAGS.expert_width}
    for factor in map(float, FLAGS.capacity_factors):
        for ep in map(int, FLAGS.ep_sizes):
            if ep > jax.device_count():
                raise app.UsageError(f"--ep_sizes: {ep} > {jax.device_count()} devices")
            cfg = ModelConfig(d_model=FLAGS.d_model, n_heads=4, n_routed_experts=FLAGS.n_experts,
                              moe_d_ff=FLAGS.expert_width, top_k=FLAGS.top_k, norm_topk_prob=True)
            cfg = dataclasses.replace(cfg, ep_capacity_factor=factor)
            ms, dropped = _time_layer(cfg, ep)
            comm = exchange_bytes(FLAGS.tokens, ep, FLAGS.top_k, FLAGS.d_model, factor) if ep > 1 else {
                "capacity_per_shard": 0, "buffer_slots": 0, "send_bytes": 0, "recv_bytes": 0}
            print(json.dumps({"platform": platform, "shape": shape, "ep": ep,
                              "ep_capacity_factor": factor, **comm,
                              "tokens_topk_dmodel_bytes_per_device":
                                  FLAGS.tokens // ep * FLAGS.top_k * FLAGS.d_model * 4,
                              "dropped_fraction": round(dropped, 4), "ms_fwd_bwd": round(ms, 2)}),
                  flush=True)


if __name__ == "__main__":
    app.run(main)

"""Expert-parallel MoE layer: bytes exchanged per device and step time for EP = 1, 2, 4, 8.

Runs on simulated CPU devices unless real ones exist (set before JAX starts). For each exchange,
EP size and buffer capacity factor it prints one JSON line: the per-device send/receive bytes of
the dispatch and return exchanges (the part a device keeps for itself excluded), the dropped
fraction and the median forward+backward time of one MoE layer. The padded `all_to_all` moves
whole buffers, so its bytes follow from the shapes; the `ragged_all_to_all` moves each copy
once, so its bytes follow from the routing (the largest send and receive over the devices are
reported). XLA:CPU has no ragged-all-to-all: on CPU its bytes are reported and its time is not.

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
from moe_jax.models.ep_traffic import padded_exchange_bytes, ragged_exchange_bytes
from moe_jax.models.expert_parallel import RAGGED_UNSUPPORTED_PLATFORMS
from moe_jax.models.moe import MoELayer
from moe_jax.parallel import init_sharded, make_mesh, use_mesh

flags.DEFINE_list("ep_sizes", ["1", "2", "4", "8"], "expert-parallel sizes (devices)")
flags.DEFINE_list("capacity_factors", ["0", "1.25"], "ep_capacity_factor values; 0 = dropless")
flags.DEFINE_list("exchanges", ["all_to_all", "ragged_all_to_all"], "EP exchanges to measure")
flags.DEFINE_integer("tokens", 4096, "global tokens per step")
flags.DEFINE_integer("d_model", 256, "model width")
flags.DEFINE_integer("n_experts", 64, "routed experts")
flags.DEFINE_integer("top_k", 8, "experts per token")
flags.DEFINE_integer("expert_width", 128, "expert SwiGLU width")
flags.DEFINE_integer("repeats", 5, "timed steps")
FLAGS = flags.FLAGS


def _inputs(cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    x = jax.random.normal(jax.random.key(0), (1, FLAGS.tokens, cfg.d_model))
    return x, jnp.ones((1, FLAGS.tokens), bool)


def _routing(cfg: ModelConfig) -> np.ndarray:
    """The layer's expert choices `[N, K]` (the same on every mesh)."""
    x, mask = _inputs(cfg)
    _, routing = MoELayer(cfg, rngs=nnx.Rngs(0)).mix(x, mask)
    return np.asarray(routing["expert_idx"]).reshape(FLAGS.tokens, -1)


def _time_layer(cfg: ModelConfig, ep: int) -> tuple[float, float]:
    mesh = make_mesh(f"expert={ep}", devices=jax.devices()[:ep])
    x, mask = _inputs(cfg)
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
    base = ModelConfig(d_model=FLAGS.d_model, n_heads=4, n_routed_experts=FLAGS.n_experts,
                       moe_d_ff=FLAGS.expert_width, top_k=FLAGS.top_k, norm_topk_prob=True)
    expert_idx_NxK = _routing(base)
    for exchange in FLAGS.exchanges:
        timed = exchange == "all_to_all" or jax.default_backend() not in RAGGED_UNSUPPORTED_PLATFORMS
        for factor in map(float, FLAGS.capacity_factors):
            for ep in map(int, FLAGS.ep_sizes):
                if ep > jax.device_count():
                    raise app.UsageError(f"--ep_sizes: {ep} > {jax.device_count()} devices")
                if ep == 1 and exchange != FLAGS.exchanges[0]:
                    continue  # no exchange: one line is enough
                cfg = dataclasses.replace(base, ep_capacity_factor=factor, ep_exchange=exchange)
                ms, dropped = _time_layer(cfg, ep) if timed or ep == 1 else (None, None)
                if ep == 1:
                    comm = {"send_bytes": 0, "recv_bytes": 0}
                elif exchange == "all_to_all":
                    comm = padded_exchange_bytes(FLAGS.tokens, ep, FLAGS.top_k, FLAGS.d_model, factor)
                else:
                    comm = ragged_exchange_bytes(expert_idx_NxK, ep, FLAGS.n_experts, FLAGS.d_model, factor)
                    routed_dropped = comm.pop("dropped_fraction")
                    dropped = routed_dropped if dropped is None else dropped
                print(json.dumps({"platform": platform, "shape": shape, "exchange": exchange, "ep": ep,
                                  "ep_capacity_factor": factor, **comm,
                                  "tokens_topk_dmodel_bytes_per_device":
                                      FLAGS.tokens // ep * FLAGS.top_k * FLAGS.d_model * 4,
                                  "dropped_fraction": round(dropped, 4),
                                  "ms_fwd_bwd": None if ms is None else round(ms, 2)}),
                      flush=True)


if __name__ == "__main__":
    app.run(main)

"""Build a model from a preset, print its parameter / FLOP / KV-cache table and run a forward pass.

    python experiments/demo.py                          # tiny-moe on CPU
    python experiments/demo.py --config=deepseek-v3     # real shapes: counted, not allocated
    python experiments/demo.py --config.model.moe_dispatch=capacity --config.model.top_k=4
"""

from __future__ import annotations

import contextlib
import json
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from moe_jax import config_flags
from moe_jax.configs import count_params, flops_per_token
from moe_jax.models import Transformer, cache_bytes_per_token
from moe_jax.models.moe import resolve_dispatch
from moe_jax.parallel import init_sharded, make_mesh, parse_rules, use_mesh
from moe_jax.parallel.distributed import define_distributed_flags, initialize_from_flags

config_flags.define_config_flags()
flags.DEFINE_float("max_forward_params", 2e9, "skip the forward pass above this many parameters")
flags.DEFINE_string("mesh", None, "device mesh, e.g. 'data=2,expert=4' or 'auto'; unset = one device")
define_distributed_flags()
FLAGS = flags.FLAGS


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def main(argv: list[str]) -> None:
    del argv
    initialize_from_flags()
    experiment = config_flags.config_from_flags()
    cfg, seq_len, batch = experiment.model, experiment.seq_len, experiment.batch_size
    params = count_params(cfg)
    flops = flops_per_token(cfg, seq_len)
    print(f"model {cfg.name}: {cfg.attention.upper()} attention, "
          + (f"{cfg.n_routed_experts} routed (top-{cfg.top_k}) + {cfg.n_shared_experts} shared "
             f"experts from layer {cfg.first_k_dense}" if cfg.is_moe else "dense MLP"))
    for name, value in params.items():
        print(f"  params/{name:<24} {_human(value):>10}")
    for name, value in flops.items():
        print(f"  train_flops_per_token/{name:<12} {_human(value):>10}  (seq_len {seq_len})")
    print(f"  kv_cache_bytes_per_token   {cache_bytes_per_token(cfg, jnp.bfloat16):>10,d}  (bf16)")
    if params["total"] + params["mtp"] > FLAGS.max_forward_params:
        print(f"forward pass skipped: {_human(params['total'])} parameters "
              f"> --max_forward_params={_human(FLAGS.max_forward_params)}")
        return

    tokens = jax.random.randint(jax.random.key(1), (batch, seq_len), 0, cfg.vocab_size)
    mesh = make_mesh(FLAGS.mesh) if FLAGS.mesh else None
    rules = parse_rules(experiment.sharding_rules)
    with use_mesh(mesh, rules) if mesh else contextlib.nullcontext():
        def make_model() -> Transformer:  # Rngs made inside, so each trace gets its own
            return Transformer(cfg, rngs=nnx.Rngs(0))

        model = init_sharded(make_model, mesh, rules) if mesh else nnx.jit(make_model)()
        forward = nnx.jit(lambda m, t: m(t))
        jax.block_until_ready(forward(model, tokens))
        start = time.perf_counter()
        logits, aux = jax.block_until_ready(forward(model, tokens))
        elapsed_ms = (time.perf_counter() - start) * 1e3
    log_probs = jax.nn.log_softmax(logits[:, :-1])
    loss = -jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1).mean()
    report = {"platform": jax.default_backend(), "mesh": dict(mesh.shape) if mesh else None,
              "logits_shape": list(logits.shape),
              "next_token_loss": round(float(loss), 4), "uniform_loss": round(float(jnp.log(cfg.vocab_size)), 4),
              "moe_aux_loss": float(aux["moe_aux_loss"]), "forward_ms": round(elapsed_ms, 2)}
    if "router" in aux:
        report["moe_dispatch"] = resolve_dispatch(cfg.moe_dispatch)
        report["max_vio_per_moe_layer"] = [round(float(v), 3) for v in aux["router"]["max_vio"]]
    if "mtp_logits" in aux:
        report["mtp_logits_shape"] = list(aux["mtp_logits"].shape)
    print(json.dumps(report))


if __name__ == "__main__":
    app.run(main, flags_parser=config_flags.parse_flags)

"""Time the KV-cache sampler: prefill tokens/s and decode tokens/s, against a no-cache baseline
that re-runs the full forward over the whole (padded) sequence for every new token. On a GPU/TPU
it also reports the decode step's achieved memory bandwidth (weights + cache read per step)
against the device's peak. Prints one JSON line.

    python experiments/bench_generate.py                              # tiny-moe on CPU
    python experiments/bench_generate.py --config=small-moe --batch=64 --prompt_len=512 --new_tokens=256
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from moe_jax import config_flags
from moe_jax.configs import count_params, decode_weight_params
from moe_jax.models import Transformer, cache_bytes_per_token, init_cache
from moe_jax.models.sampler import jit_generate

config_flags.define_config_flags()
flags.DEFINE_integer("batch", 32, "sequences decoded together")
flags.DEFINE_integer("prompt_len", 32, "prompt tokens per sequence")
flags.DEFINE_integer("new_tokens", 64, "generated tokens per sequence")
flags.DEFINE_integer("repeats", 3, "timed runs (the best is reported)")
FLAGS = flags.FLAGS

# HBM bandwidth in bytes/s (vendor datasheets: NVIDIA H100 SXM / H200 / A100 80GB, Google TPU docs).
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.04e12, "TPU v6 lite": 1.64e12,
                  "TPU v5p": 2.76e12, "TPU v5 lite": 0.82e12, "TPU v4": 1.2e12}


def _best_time(fn: Callable[[], object]) -> float:
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(FLAGS.repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str]) -> None:
    del argv
    cfg = config_flags.config_from_flags().model
    model = nnx.jit(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))()
    b, p, n = FLAGS.batch, FLAGS.prompt_len, FLAGS.new_tokens
    prompt = jax.random.randint(jax.random.key(0), (b, p), 3, cfg.vocab_size)
    segments = jnp.ones_like(prompt)

    prefill = jax.jit(lambda m, t, s: m(t, segment_ids_BxT=s, cache=init_cache(cfg, b, p + n))[0])
    prefill_s = _best_time(lambda: prefill(model, prompt, segments))
    generate_s = _best_time(lambda: jit_generate(model, prompt, segments, max_new_tokens=n, eos_id=-1, pad_id=0))
    decode_s = max(generate_s - prefill_s, 1e-9)

    # No cache: every new token re-reads the whole sequence so far (padded to the final length,
    # so that one compiled forward serves every step).
    full = jax.jit(lambda m, t, s: m(t, segment_ids_BxT=s, mtp=False)[0])

    def no_cache() -> jax.Array:
        tokens = jnp.concatenate([prompt, jnp.zeros((b, n), prompt.dtype)], axis=1)
        valid = jnp.concatenate([segments, jnp.zeros((b, n), segments.dtype)], axis=1)
        for i in range(n):
            next_token = jnp.argmax(full(model, tokens, valid)[:, p + i - 1], axis=-1)
            tokens, valid = tokens.at[:, p + i].set(next_token), valid.at[:, p + i].set(1)
        return tokens

    no_cache_s = _best_time(no_cache)
    device = jax.devices()[0]
    counts = count_params(cfg)
    # The weights a decode step of b sequences reads (the experts b tokens touch, b embedding rows).
    param_bytes = decode_weight_params(cfg, b) * jnp.dtype(cfg.param_dtype).itemsize
    mean_context = p + n / 2
    bytes_per_step = param_bytes + b * mean_context * cache_bytes_per_token(cfg)
    achieved = bytes_per_step / (decode_s / n)
    peak = next((v for k, v in PEAK_BANDWIDTH.items() if k in device.device_kind), None)
    print(json.dumps({
        "platform": jax.default_backend(), "device_kind": device.device_kind, "config": cfg.name,
        "params_total": counts["total"], "batch": b, "prompt_len": p, "new_tokens": n,
        "prefill_tokens_per_s": round(b * p / prefill_s, 1),
        "decode_tokens_per_s": round(b * n / decode_s, 1),
        "no_cache_decode_tokens_per_s": round(b * n / no_cache_s, 1),
        "cache_speedup": round(no_cache_s / decode_s, 2),
        "decode_bandwidth_bytes_per_s": round(achieved), "peak_bandwidth_bytes_per_s": peak,
        "bandwidth_fraction": round(achieved / peak, 3) if peak and jax.default_backend() != "cpu" else None}))


if __name__ == "__main__":
    app.run(main, flags_parser=config_flags.parse_flags)

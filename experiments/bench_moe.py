"""Benchmark the MoE dispatch backends against an "ideal" dense MLP of equal activated FLOPs.

For each shape and mode ("fwd": y only; "fwd_bwd": value_and_grad of sum(y**2) w.r.t. x and
the expert weights), every backend is jitted, warmed up, then timed `--repeats` times with
block_until_ready. The runs are interleaved round-robin (ideal, backend 1, backend 2, ...) so
that slow drifts of a shared machine hit all backends alike. Prints one JSON object per line:

  ms              median wall time of the timed runs
  ratio_to_ideal  median over rounds of (backend time / ideal time in the same round)

"ideal" is a single SwiGLU MLP of width top_k * expert_width over the same tokens: the time a
perfect dispatch would take. Routing: random router logits -> softmax -> top-k, renormalised,
fixed seed (roughly balanced, as with a trained router plus load balancing).

  PYTHONPATH=. python experiments/bench_moe.py        # or after `pip install -e .`
  PYTHONPATH=. python experiments/bench_moe.py --backends=blocked --shapes=fine --repeats=10
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from moe_jax.models.dispatch import BACKENDS, DEFAULT_BLOCK_SIZE, dispatch_experts

# Both shapes activate the same FLOPs per token: top_k * expert_width = 1024.
SHAPES = {
    "fine": {"d_model": 256, "n_experts": 64, "top_k": 8, "expert_width": 128},  # DeepSeek-like
    "coarse": {"d_model": 256, "n_experts": 8, "top_k": 2, "expert_width": 512},  # Mixtral-like
}
MODES = ("fwd", "fwd_bwd")

FLAGS = flags.FLAGS
flags.DEFINE_list("backends", list(BACKENDS), f"Dispatch backends to time, from {BACKENDS}.")
flags.DEFINE_list("shapes", list(SHAPES), f"Shapes to time, from {list(SHAPES)}.")
flags.DEFINE_list("modes", list(MODES), f"Modes to time, from {MODES}.")
flags.DEFINE_integer("tokens", 4096, "Tokens per batch (N).")
flags.DEFINE_integer("repeats", 5, "Timed runs per measurement (after one warmup run).")
flags.DEFINE_integer("block_size", DEFAULT_BLOCK_SIZE, "block_size of the blocked backend.")
flags.DEFINE_float("capacity_factor", 1.25, "capacity_factor of the capacity backend.")
flags.DEFINE_float("max_seconds", 30.0,
                   "Skip (with a 'skipped' reason) a backend whose warmup run times --repeats exceeds "
                   "this; 0 times everything. By default this skips ragged fwd_bwd at the fine shape on "
                   "CPU, where XLA lowers ragged_dot to a masked dense loop (~8 s per step).")
flags.DEFINE_integer("seed", 0, "Seed for inputs, weights and router logits.")


def _platform() -> dict:
    return {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "cpu_count": os.cpu_count()}


def _ideal(x_NxD, w_gate_DxH, w_up_DxH, w_down_HxD):
    return (jax.nn.silu(x_NxD @ w_gate_DxH) * (x_NxD @ w_up_DxH)) @ w_down_HxD


def _make_inputs(n_tokens: int, d_model: int, n_experts: int, top_k: int, expert_width: int,
                 seed: int) -> dict:
    keys = jax.random.split(jax.random.PRNGKey(seed), 8)
    x = jax.random.normal(keys[0], (n_tokens, d_model), jnp.float32)
    logits = jax.random.normal(keys[1], (n_tokens, n_experts), jnp.float32)
    probs, expert_idx = jax.lax.top_k(jax.nn.softmax(logits), top_k)
    routing = {"expert_idx": expert_idx.astype(jnp.int32),
               "weights": probs / jnp.sum(probs, axis=-1, keepdims=True)}

    def init(key, shape, fan_in):
        return jax.random.normal(key, shape, jnp.float32) / math.sqrt(fan_in)

    e, d, f, h = n_experts, d_model, expert_width, top_k * expert_width
    experts = (init(keys[2], (e, d, f), d), init(keys[3], (e, d, f), d), init(keys[4], (e, f, d), f))
    ideal = (init(keys[5], (d, h), d), init(keys[6], (d, h), d), init(keys[7], (h, d), h))
    return {"x": x, "routing": routing, "experts": experts, "ideal": ideal}


def _timed_fn(fn, mode: str):
    """jit(fn) for fwd, or jit(value_and_grad(sum(fn**2))) w.r.t. x and the weights for fwd_bwd."""
    if mode == "fwd":
        return jax.jit(fn)

    def loss(x, w_gate, w_up, w_down):
        return jnp.sum(jnp.square(fn(x, w_gate, w_up, w_down).astype(jnp.float32)))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))


def _time_ms(fn, args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return 1e3 * (time.perf_counter() - start)


def _measure(candidates: dict, repeats: int, max_seconds: float) -> tuple[dict, dict]:
    """Compiles and warms up each candidate, then times them round-robin.

    Returns ({name: [ms, ...]}, {name: skip reason}) for candidates whose warmup run
    projects past max_seconds (never "ideal").
    """
    skipped = {}
    for name, (fn, args) in candidates.items():
        jax.block_until_ready(fn(*args))  # compile
        warmup_ms = _time_ms(fn, args)
        if name != "ideal" and max_seconds > 0 and warmup_ms * repeats > 1e3 * max_seconds:
            skipped[name] = (f"one run took {warmup_ms / 1e3:.1f} s; {repeats} repeats would exceed "
                             f"--max_seconds={max_seconds:g} (pass --max_seconds=0 to time it)")
    times = {name: [] for name in candidates if name not in skipped}
    for _ in range(repeats):
        for name, runs_ms in times.items():
            runs_ms.append(_time_ms(*candidates[name]))
    return times, skipped


def _bench_shape(shape_name: str, mode: str) -> None:
    shape = {"tokens": FLAGS.tokens, **SHAPES[shape_name]}
    inputs = _make_inputs(FLAGS.tokens, shape["d_model"], shape["n_experts"], shape["top_k"],
                             shape["expert_width"], FLAGS.seed)
    x, routing = inputs["x"], inputs["routing"]
    base = {"platform": _platform(), "shape": shape, "mode": mode}

    candidates = {"ideal": (_timed_fn(_ideal, mode), (x, *inputs["ideal"]))}
    extra = {"ideal": {}}
    for backend in FLAGS.backends:
        static = {"backend": backend}
        if backend == "capacity":
            static["capacity_factor"] = FLAGS.capacity_factor
        if backend == "blocked":
            static["block_size"] = FLAGS.block_size

        def moe(x, w_gate, w_up, w_down, static=static):
            return dispatch_experts(x, routing["expert_idx"], routing["weights"], w_gate, w_up, w_down,
                                    **static)[0]

        candidates[backend] = (_timed_fn(moe, mode), (x, *inputs["experts"]))
        extra[backend] = {k: v for k, v in static.items() if k != "backend"}
        if backend == "capacity":
            dropped = jax.jit(lambda x, *w, static=static: dispatch_experts(
                x, routing["expert_idx"], routing["weights"], *w, **static)[1])(x, *inputs["experts"])
            extra[backend]["dropped_fraction"] = round(float(dropped), 4)

    times, skipped = _measure(candidates, FLAGS.repeats, FLAGS.max_seconds)
    for name, reason in skipped.items():
        print(json.dumps({**base, "backend": name, "skipped": reason, **extra[name]}), flush=True)
    ideal_ms = np.asarray(times["ideal"])
    for name, ms in times.items():
        ms = np.asarray(ms)
        print(json.dumps({**base, "backend": name, "ms": round(float(np.median(ms)), 2),
                          "min_ms": round(float(np.min(ms)), 2),
                          "ratio_to_ideal": round(float(np.median(ms / ideal_ms)), 3),
                          "repeats": len(ms), **extra[name]}), flush=True)


def main(argv: list[str]) -> None:
    del argv
    for name in FLAGS.backends:
        if name not in BACKENDS:
            raise app.UsageError(f"--backends: unknown {name!r}; choose from {BACKENDS}")
    for name in FLAGS.shapes:
        if name not in SHAPES:
            raise app.UsageError(f"--shapes: unknown {name!r}; choose from {list(SHAPES)}")
    for mode in FLAGS.modes:
        if mode not in MODES:
            raise app.UsageError(f"--modes: unknown {mode!r}; choose from {MODES}")
    for shape_name in FLAGS.shapes:
        for mode in FLAGS.modes:
            _bench_shape(shape_name, mode)


if __name__ == "__main__":
    app.run(main)

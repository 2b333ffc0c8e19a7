"""Building blocks shared by every model: parameters with logical axes, RMSNorm, SwiGLU, embeddings.

Every parameter is an `nnx.Param` carrying `logical_axes` metadata (one name per dimension, e.g.
`("embed", "mlp")`); `moe_jax.parallel` maps these names to mesh axes. Parameters live in
`param_dtype` (fp32); each layer casts them to the compute dtype at use.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[..., jax.Array]

default_kernel_init: Initializer = nnx.initializers.lecun_normal()
default_embed_init: Initializer = nnx.initializers.normal(stddev=0.02)


def make_param(
    rngs: nnx.Rngs,
    shape: Sequence[int],
    logical_axes: Sequence[str | None],
    *,
    init: Initializer = default_kernel_init,
    dtype: jnp.dtype = jnp.float32,
) -> nnx.Param:
    """A parameter of `shape` initialised by `init`, annotated with one logical name per axis."""
    if len(shape) != len(logical_axes):
        raise ValueError(f"shape {tuple(shape)} and logical_axes {tuple(logical_axes)} differ in rank")
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), logical_axes=tuple(logical_axes))


def project(x: jax.Array, w: jax.Array, in_axes: int = 1) -> jax.Array:
    """Contract the last `in_axes` axes of `x` with the first `in_axes` of `w` (cast to x's dtype):
    `[..., *w.shape[:in_axes]] -> [..., *w.shape[in_axes:]]`, e.g. `btd,dhk->bthk` or
    `bthk,hkd->btd`.

    Computed as one 2-D matmul over the flattened tokens. The maths is the einsum's; the reason is
    the backward pass: XLA:CPU lowers the weight gradient of a contraction over several token
    axes (b, t) through a transposing copy fused into the cotangent's producer, which made the
    model's backward ~2x slower than with 2-D operands (BUILD_NOTES.md, "GRPO step speed").
    """
    in_shape, out_shape = w.shape[:in_axes], w.shape[in_axes:]
    lead = x.shape[: x.ndim - in_axes]
    x_NxI = x.reshape(math.prod(lead), math.prod(in_shape))
    y_NxO = x_NxI @ w.astype(x.dtype).reshape(math.prod(in_shape), math.prod(out_shape))
    return y_NxO.reshape(*lead, *out_shape)


class RMSNorm(nnx.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019): `x / sqrt(mean(x^2) + eps) * scale`.

    Computed in fp32 whatever the input dtype, then cast back.
    """

    def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs, axis_name: str = "norm",
                 param_dtype: jnp.dtype = jnp.float32):
        self.eps = eps
        self.scale = make_param(rngs, (dim,), (axis_name,), init=nnx.initializers.ones,
                                dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x_f32 = x.astype(jnp.float32)
        inv_rms = jax.lax.rsqrt(jnp.mean(x_f32 * x_f32, axis=-1, keepdims=True) + self.eps)
        return (x_f32 * inv_rms * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class Linear(nnx.Module):
    """`x @ kernel (+ bias)` over the last axis, kernel shaped `[d_in, d_out]`."""

    def __init__(self, d_in: int, d_out: int, *, logical_axes: tuple[str, str], rngs: nnx.Rngs,
                 use_bias: bool = False, param_dtype: jnp.dtype = jnp.float32):
        self.kernel = make_param(rngs, (d_in, d_out), logical_axes, dtype=param_dtype)
        self.bias = (make_param(rngs, (d_out,), logical_axes[1:], init=nnx.initializers.zeros,
                                dtype=param_dtype) if use_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = project(x, self.kernel[...])
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y


def swiglu(x: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """SwiGLU feed-forward (Shazeer 2020): `(silu(x W_gate) * (x W_up)) W_down`, with W_gate and
    W_up side by side as one matmul (one op fewer forward and backward: on CPU, per-op cost is
    what small models pay)."""
    gate, up = jnp.split(project(x, jnp.concatenate([w_gate, w_up], axis=-1)), 2, axis=-1)
    return project(jax.nn.silu(gate) * up, w_down)


class MLP(nnx.Module):
    """A SwiGLU MLP; also the shared experts of an MoE layer (width = n_shared * moe_d_ff)."""

    def __init__(self, d_model: int, d_ff: int, *, rngs: nnx.Rngs,
                 param_dtype: jnp.dtype = jnp.float32):
        self.w_gate = make_param(rngs, (d_model, d_ff), ("embed", "mlp"), dtype=param_dtype)
        self.w_up = make_param(rngs, (d_model, d_ff), ("embed", "mlp"), dtype=param_dtype)
        self.w_down = make_param(rngs, (d_ff, d_model), ("mlp", "embed"), dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return swiglu(x, self.w_gate[...], self.w_up[...], self.w_down[...])


class Embedding(nnx.Module):
    """Token embedding table `[vocab, d_model]`; `attend` reuses it as a tied LM head."""

    def __init__(self, vocab_size: int, d_model: int, *, rngs: nnx.Rngs,
                 param_dtype: jnp.dtype = jnp.float32):
        self.table = make_param(rngs, (vocab_size, d_model), ("vocab", "embed"),
                                init=default_embed_init, dtype=param_dtype)

    def __call__(self, tokens: jax.Array, dtype: jnp.dtype) -> jax.Array:
        return jnp.take(self.table[...], tokens, axis=0).astype(dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        return project(x, self.table[...].T)

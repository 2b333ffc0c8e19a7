"""Token -> expert dispatch backends for a Mixture-of-Experts SwiGLU layer.

Pure functions (no Flax). The router has already chosen `K` distinct experts per
token (`expert_idx_NxK`) and their combine weights (`weights_NxK`); this module
evaluates

    y_n = sum_k weights[n, k] * expert_{idx[n, k]}(x_n),
    expert_e(x) = (silu(x @ w_gate[e]) * (x @ w_up[e])) @ w_down[e].

Backends (`dispatch_experts(..., backend=...)`):

* ``dense``: every expert on every token, combined with a dense [N, E] weight
  matrix. E/K times the necessary FLOPs; it is the obviously-correct reference.
* ``capacity``: GShard (Lepikhin et al., 2020, "GShard: Scaling Giant Models with
  Conditional Computation and Automatic Sharding") / Switch Transformer (Fedus et
  al., 2021, "Switch Transformers: Scaling to Trillion Parameter Models with
  Simple and Efficient Sparsity") capacity-factor dispatch. Every expert has a
  static buffer of C = ceil(capacity_factor * N * K / E) slots; token copies
  claim slots in GShard priority order (all k=0 choices in token order, then
  all k=1 choices, ...) and copies that find their expert full are dropped.
  Implemented with index gathers/scatters into an [E, C, D] buffer rather than
  one-hot [N, E, C] einsums, which cost O(N * E * C) memory and time.
* ``ragged``: dropless. Token copies are sorted by expert and the three matmuls
  are `jax.lax.ragged_dot` grouped GEMMs. Fast on GPU/TPU; on CPU XLA lowers
  ragged_dot to a masked dense computation (roughly E times the FLOPs).
* ``blocked``: dropless and fast on CPU: expert groups padded to whole blocks, each
  expert's SwiGLU run over its own windows of rows, with a hand-written VJP
  (`blocked_experts.py`).

All backends return `(y_NxD, dropped_fraction)`, where dropped_fraction is
(dropped token copies) / (valid token copies); it is 0 for the dropless ones.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from moe_jax.models.blocked_experts import DEFAULT_BLOCK_SIZE, blocked_experts
from moe_jax.models.expert_rows import (
    SortedCopies,
    combine_rows,
    gather_rows,
    place_rows,
    row_tokens_and_weights,
    sort_copies,
)

BACKENDS = ("dense", "capacity", "ragged", "blocked")


def _dense(
    x_NxD: jax.Array,
    expert_idx_NxK: jax.Array,
    weights_NxK: jax.Array,
    token_mask_N: jax.Array,
    w_gate_ExDxF: jax.Array,
    w_up_ExDxF: jax.Array,
    w_down_ExFxD: jax.Array,
) -> jax.Array:
    """Reference: all experts on all tokens, combined with a dense [N, E] weight matrix.

    The E experts run side by side as one [D, 2*E*F] gate-and-up matmul, and the combine
    weights scale each expert's hidden units before one [E*F, D] down matmul (the down projection
    is linear, so sum_e c_e * (h_e @ W_down[e]) == (c * h) @ stack_e(W_down[e])): two plain 2-D
    matmuls, which make this backend the fastest for the few tokens of a decode step
    (`moe.resolve_dispatch`).
    """
    n_tokens, _ = x_NxD.shape
    n_experts, d_model, width = w_gate_ExDxF.shape

    def side_by_side(w_ExDxF: jax.Array) -> jax.Array:
        return jnp.swapaxes(w_ExDxF, 0, 1).reshape(d_model, n_experts * width)

    gate_up_Nx2EF = x_NxD @ jnp.concatenate([side_by_side(w_gate_ExDxF), side_by_side(w_up_ExDxF)], axis=1)
    gate_NxExF, up_NxExF = (h.reshape(n_tokens, n_experts, width) for h in jnp.split(gate_up_Nx2EF, 2, axis=1))
    # `where` (not a multiply) so padding tokens also get no gradient w.r.t. weights.
    weights_NxK = jnp.where(token_mask_N[:, None], weights_NxK.astype(jnp.float32), 0.0)
    onehot_NxKxE = jax.nn.one_hot(expert_idx_NxK, n_experts, dtype=jnp.float32)
    combine_NxE = jnp.einsum("nk,nke->ne", weights_NxK, onehot_NxKxE)
    hidden_NxExF = jax.nn.silu(gate_NxExF) * up_NxExF * combine_NxE[:, :, None]
    return jnp.dot(hidden_NxExF.reshape(n_tokens, n_experts * width).astype(x_NxD.dtype),
                   w_down_ExFxD.reshape(n_experts * width, d_model), preferred_element_type=jnp.float32)


def capacity_per_expert(
    n_tokens: int, top_k: int, n_experts: int, capacity_factor: float
) -> int:
    """GShard/Switch expert capacity C = ceil(capacity_factor * N * K / E), at least 1."""
    return max(1, math.ceil(capacity_factor * n_tokens * top_k / n_experts))


def _capacity(
    x_NxD: jax.Array,
    copies: SortedCopies,
    weights_NxK: jax.Array,
    w_gate_ExDxF: jax.Array,
    w_up_ExDxF: jax.Array,
    w_down_ExFxD: jax.Array,
    capacity_factor: float,
) -> tuple[jax.Array, jax.Array]:
    """GShard/Switch capacity dispatch into an [E, C, D] buffer; returns (y, dropped)."""
    n_tokens, top_k = weights_NxK.shape
    n_experts = w_gate_ExDxF.shape[0]
    capacity = capacity_per_expert(n_tokens, top_k, n_experts, capacity_factor)
    row_base_E = jnp.arange(n_experts, dtype=jnp.int32) * capacity
    row_copy_R = place_rows(copies, row_base_E, n_experts * capacity, capacity)
    row_token_R, row_weight_R = row_tokens_and_weights(row_copy_R, weights_NxK)

    x_ExCxD = gather_rows(x_NxD, row_token_R).reshape(n_experts, capacity, -1)
    gate_ExCxF = jnp.einsum("ecd,edf->ecf", x_ExCxD, w_gate_ExDxF)
    up_ExCxF = jnp.einsum("ecd,edf->ecf", x_ExCxD, w_up_ExDxF)
    out_ExCxD = jnp.einsum("ecf,efd->ecd", jax.nn.silu(gate_ExCxF) * up_ExCxF, w_down_ExFxD)
    y_NxD = combine_rows(out_ExCxD.reshape(n_experts * capacity, -1), row_token_R,
                          row_weight_R, n_tokens)

    n_valid = jnp.sum(copies.sizes_E)
    n_placed = jnp.sum(jnp.minimum(copies.sizes_E, capacity))
    dropped = (n_valid - n_placed).astype(jnp.float32) / jnp.maximum(n_valid, 1)
    return y_NxD, dropped


def _ragged(
    x_NxD: jax.Array,
    copies: SortedCopies,
    weights_NxK: jax.Array,
    w_gate_ExDxF: jax.Array,
    w_up_ExDxF: jax.Array,
    w_down_ExFxD: jax.Array,
) -> jax.Array:
    """Dropless grouped GEMMs with `jax.lax.ragged_dot` over expert-sorted copies."""
    n_tokens, top_k = weights_NxK.shape
    n_copies = n_tokens * top_k
    # Row r holds the r-th sorted copy; padding copies are sorted past
    # sum(sizes_E), where ragged_dot writes zeros, and get no row here anyway.
    starts_E = jnp.cumsum(copies.sizes_E) - copies.sizes_E
    row_copy_R = place_rows(copies, starts_E, n_copies)
    row_token_R, row_weight_R = row_tokens_and_weights(row_copy_R, weights_NxK)

    x_RxD = gather_rows(x_NxD, row_token_R)
    sizes_E = copies.sizes_E
    gate_RxF = jax.lax.ragged_dot(x_RxD, w_gate_ExDxF, sizes_E)
    up_RxF = jax.lax.ragged_dot(x_RxD, w_up_ExDxF, sizes_E)
    out_RxD = jax.lax.ragged_dot(jax.nn.silu(gate_RxF) * up_RxF, w_down_ExFxD, sizes_E)
    return combine_rows(out_RxD, row_token_R, row_weight_R, n_tokens)


def dispatch_experts(
    x_NxD: jax.Array,
    expert_idx_NxK: jax.Array,
    weights_NxK: jax.Array,
    w_gate_ExDxF: jax.Array,
    w_up_ExDxF: jax.Array,
    w_down_ExFxD: jax.Array,
    *,
    backend: str,
    capacity_factor: float = 1.25,
    token_mask_N: jax.Array | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> tuple[jax.Array, jax.Array]:
    """Runs each token through its top-k SwiGLU experts and combines the results.

    Args:
      x_NxD: flattened tokens in the compute dtype.
      expert_idx_NxK: int32 expert ids chosen by the router, distinct per row.
      weights_NxK: float32 combine weights (already normalised / scaled).
      w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD: stacked SwiGLU expert weights.
      backend: "dense" | "capacity" | "ragged" | "blocked" (see module docstring).
      capacity_factor: "capacity" only; C = ceil(capacity_factor * N * K / E).
      token_mask_N: bool, False marks padding tokens: they take no expert capacity,
        output 0 and receive / contribute no gradient. None means all valid.
      block_size: "blocked" only (static): each expert's rows are padded to a multiple
        of it; the padded rows run in windows of block_size * 2^j rows.

    Returns:
      (y_NxD in x's dtype, dropped_fraction): dropped_fraction is a float32 scalar,
      dropped token copies / valid token copies (0 unless backend="capacity").

    backend, capacity_factor and block_size must be static under jit.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    n_tokens = x_NxD.shape[0]
    n_experts = w_gate_ExDxF.shape[0]
    if token_mask_N is None:
        token_mask_N = jnp.ones((n_tokens,), bool)
    expert_weights = (w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD)
    no_drops = jnp.zeros((), jnp.float32)

    if backend == "dense":
        y_NxD = _dense(x_NxD, expert_idx_NxK, weights_NxK, token_mask_N, *expert_weights)
        return y_NxD.astype(x_NxD.dtype), no_drops

    copies = sort_copies(expert_idx_NxK, token_mask_N, n_experts)
    if backend == "capacity":
        y_NxD, dropped = _capacity(x_NxD, copies, weights_NxK, *expert_weights,
                                   capacity_factor)
        return y_NxD.astype(x_NxD.dtype), dropped
    if backend == "ragged":
        y_NxD = _ragged(x_NxD, copies, weights_NxK, *expert_weights)
    else:
        y_NxD = blocked_experts(x_NxD, copies, weights_NxK, *expert_weights, block_size)
    return y_NxD.astype(x_NxD.dtype), no_drops

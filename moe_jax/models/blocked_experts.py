"""The `blocked` dispatch backend: dropless and fast on CPU.

Copies are sorted by expert and each expert's group is padded to a multiple of `block_size` rows,
so every block belongs to exactly one expert; the number of blocks is statically bounded by
ceil(N*K / block_size) + E. A scan over experts, and within each expert loops with data-dependent
trip counts over its windows (runs of block_size * 2^j rows, tallest first, at most
_MAX_WINDOW_ROWS), gathers the window's token rows, runs the SwiGLU with that expert's weights and
scatter-adds the weighted result into the output. Small blocks keep padding low, tall windows keep
the GEMMs efficient, unused static blocks cost nothing. A hand-written VJP walks the same windows
backwards. Nothing of size [N*K, D] is materialised, which matters on CPU where large temporaries
(and their page faults) cost as much as the matmuls. Design and measurements: BUILD_NOTES.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import jax
import jax.numpy as jnp

from moe_jax.models.expert_rows import SortedCopies, gather_rows, place_rows, row_tokens_and_weights

# "blocked" pads each expert's group to a multiple of DEFAULT_BLOCK_SIZE rows and runs
# it as windows of block_size * 2^j rows, at most _MAX_WINDOW_ROWS. Measured on a 2-core
# AVX-512 CPU (experiments/bench_moe.py, N=4096, D=256, 8-of-64 and 2-of-8 experts):
# small blocks waste little on padding, tall windows keep the GEMMs efficient.
# Single-size blocks of 256 rows (25% padding at 512 rows per expert) were ~15% slower.
DEFAULT_BLOCK_SIZE = 64
_MAX_WINDOW_ROWS = 512

_Carry = TypeVar("_Carry")


def _silu_and_grad(g: jax.Array) -> tuple[jax.Array, jax.Array]:
    """silu(g) and d silu / d g, sharing one sigmoid."""
    sig = jax.nn.sigmoid(g)
    silu = g * sig
    return silu, sig + silu * (1.0 - sig)


def _window_sizes(block: int, n_rows: int) -> tuple[int, ...]:
    """Static window heights, largest first: block * 2^j up to _MAX_WINDOW_ROWS (and n_rows)."""
    sizes = [block]
    while sizes[-1] * 2 <= min(_MAX_WINDOW_ROWS, n_rows):
        sizes.append(sizes[-1] * 2)
    return tuple(reversed(sizes))


def _window_counts(blocks_E: jax.Array, n_levels: int) -> jax.Array:
    """[L, E] number of windows of each size per expert, tiling exactly blocks_E blocks.

    As many largest windows as fit, then the binary digits of the remainder: at most
    one window of each smaller size, so the count of windows stays small.
    """
    top = n_levels - 1
    digits = [(blocks_E >> (top - level)) & 1 for level in range(1, n_levels)]
    return jnp.stack([blocks_E >> top, *digits]).astype(jnp.int32)


def _for_each_window(
    e: jax.Array,
    segment_start_E: jax.Array,
    window_counts_LxE: jax.Array,
    window_sizes: tuple[int, ...],
    body: Callable[[jax.Array, int, _Carry], _Carry],
    carry: _Carry,
) -> _Carry:
    """carry = body(first_row, n_rows, carry) for each window of expert e's segment."""
    first_row = segment_start_E[e]
    for level, n_rows in enumerate(window_sizes):
        count = window_counts_LxE[level, e]

        def one_window(j, carry, first_row=first_row, n_rows=n_rows):
            return body(first_row + j * n_rows, n_rows, carry)

        carry = jax.lax.fori_loop(0, count, one_window, carry)
        first_row = first_row + count * n_rows
    return carry


def _rows(array_R: jax.Array, first_row: jax.Array, n_rows: int) -> jax.Array:
    """array_R[first_row : first_row + n_rows] with a traced start and a static length."""
    return jax.lax.dynamic_slice_in_dim(array_R, first_row, n_rows)


def _blocked_forward(
    x_NxD: jax.Array,
    row_weight_R: jax.Array,
    w_gate_ExDxF: jax.Array,
    w_up_ExDxF: jax.Array,
    w_down_ExFxD: jax.Array,
    row_token_R: jax.Array,
    segment_start_E: jax.Array,
    window_counts_LxE: jax.Array,
    window_sizes: tuple[int, ...],
) -> jax.Array:
    """float32 y = sum over rows of weight * expert(x[token]).

    Walks the experts with a static scan and each expert's windows with loops whose
    trip counts are data-dependent, so the unused tail of the static row buffer costs
    nothing.
    """
    n_tokens, d_model = x_NxD.shape
    n_experts, _, width = w_gate_ExDxF.shape

    def one_expert(carry, per_expert):
        e, w_gate_DxF, w_up_DxF, w_down_FxD = per_expert
        # One [D, 2F] matmul per window instead of two [D, F] ones: wider GEMMs run
        # closer to peak on CPU, and the concat happens once per expert, not per window.
        w_gate_up_Dx2F = jnp.concatenate([w_gate_DxF, w_up_DxF], axis=-1)

        def one_window(first_row, n_rows, y_NxD):
            token_W = _rows(row_token_R, first_row, n_rows)
            x_WxD = gather_rows(x_NxD, token_W)
            gate_up_Wx2F = x_WxD @ w_gate_up_Dx2F
            silu_WxF, _ = _silu_and_grad(gate_up_Wx2F[:, :width])
            out_WxD = jnp.dot(silu_WxF * gate_up_Wx2F[:, width:], w_down_FxD,
                              preferred_element_type=jnp.float32)
            weight_Wx1 = _rows(row_weight_R, first_row, n_rows)[:, None]
            # Padding rows have weight 0 and token id N, which mode="drop" skips.
            return y_NxD.at[token_W].add(out_WxD * weight_Wx1, mode="drop")

        carry = _for_each_window(e, segment_start_E, window_counts_LxE, window_sizes,
                                 one_window, carry)
        return carry, None

    y_NxD, _ = jax.lax.scan(
        one_expert, jnp.zeros((n_tokens, d_model), jnp.float32),
        (jnp.arange(n_experts), w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD))
    return y_NxD


# A custom VJP because (a) the window loops have data-dependent trip counts, which JAX cannot
# reverse-differentiate, and (b) autodiff of a loop that indexes expert weights would materialise a
# full [E, D, F] cotangent per step. `window_sizes` (argument 8) is static.
_blocked_swiglu = jax.custom_vjp(_blocked_forward, nondiff_argnums=(8,))


def _blocked_swiglu_fwd(*args) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    # Keep only the inputs: recomputing gate/up per window in the backward pass measured
    # 5-10% faster end to end than writing and re-reading an [R, 2F] activation buffer.
    return _blocked_forward(*args), args[:-1]  # window_sizes reaches the bwd separately


def _blocked_swiglu_bwd(
    window_sizes: tuple[int, ...], residuals: tuple[jax.Array, ...], dy_NxD: jax.Array
) -> tuple[jax.Array | None, ...]:
    (x_NxD, row_weight_R, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD,
     row_token_R, segment_start_E, window_counts_LxE) = residuals
    n_experts, d_model, width = w_gate_ExDxF.shape
    f32 = jnp.float32

    def one_expert(carry, per_expert):
        e, w_gate_DxF, w_up_DxF, w_down_FxD = per_expert
        w_gate_up_Dx2F = jnp.concatenate([w_gate_DxF, w_up_DxF], axis=-1)

        def one_window(first_row, n_rows, window_carry):
            dx_NxD, dweight_R, dw_gate_up_Dx2F, dw_down_FxD = window_carry
            token_W = _rows(row_token_R, first_row, n_rows)
            weight_Wx1 = _rows(row_weight_R, first_row, n_rows)[:, None]
            x_WxD = gather_rows(x_NxD, token_W)
            dy_WxD = gather_rows(dy_NxD, token_W)

            gate_up_Wx2F = x_WxD @ w_gate_up_Dx2F
            gate_WxF, up_WxF = gate_up_Wx2F[:, :width], gate_up_Wx2F[:, width:]
            silu_WxF, dsilu_WxF = _silu_and_grad(gate_WxF)
            hidden_WxF = silu_WxF * up_WxF

            # d(out)/d(hidden) before weighting; <hidden, dhid_unweighted> is then
            # d y / d row_weight without recomputing the down projection.
            dhid_unweighted_WxF = jnp.dot(dy_WxD.astype(x_WxD.dtype), w_down_FxD.T,
                                          preferred_element_type=f32)
            dweight_R = jax.lax.dynamic_update_slice_in_dim(
                dweight_R, jnp.sum(hidden_WxF.astype(f32) * dhid_unweighted_WxF, axis=-1),
                first_row, axis=0)
            dhid_WxF = dhid_unweighted_WxF * weight_Wx1
            dw_down_FxD += jnp.dot(hidden_WxF.T.astype(f32), dy_WxD * weight_Wx1,
                                   preferred_element_type=f32)
            dgate_up_Wx2F = jnp.concatenate(
                [dhid_WxF * up_WxF * dsilu_WxF, dhid_WxF * silu_WxF], axis=-1)
            dw_gate_up_Dx2F += jnp.dot(x_WxD.T.astype(f32), dgate_up_Wx2F,
                                       preferred_element_type=f32)
            dx_WxD = jnp.dot(dgate_up_Wx2F.astype(w_gate_up_Dx2F.dtype), w_gate_up_Dx2F.T,
                             preferred_element_type=f32)
            dx_NxD = dx_NxD.at[token_W].add(dx_WxD, mode="drop")
            return dx_NxD, dweight_R, dw_gate_up_Dx2F, dw_down_FxD

        dx_NxD, dweight_R = carry
        # Weight gradients accumulate in a per-expert carry and are emitted once per
        # expert as scan outputs: cheaper than a read-modify-write into [E, D, F]
        # per window.
        init = (dx_NxD, dweight_R, jnp.zeros((d_model, 2 * width), f32),
                jnp.zeros((width, d_model), f32))
        dx_NxD, dweight_R, dw_gate_up_Dx2F, dw_down_FxD = _for_each_window(
            e, segment_start_E, window_counts_LxE, window_sizes, one_window, init)
        grads = (dw_gate_up_Dx2F[:, :width].astype(w_gate_DxF.dtype),
                 dw_gate_up_Dx2F[:, width:].astype(w_up_DxF.dtype),
                 dw_down_FxD.astype(w_down_FxD.dtype))
        return (dx_NxD, dweight_R), grads

    init = (jnp.zeros(x_NxD.shape, f32), jnp.zeros(row_weight_R.shape, f32))
    (dx_NxD, dweight_R), (dw_gate, dw_up, dw_down) = jax.lax.scan(
        one_expert, init, (jnp.arange(n_experts), w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD))
    return (dx_NxD.astype(x_NxD.dtype), dweight_R.astype(row_weight_R.dtype),
            dw_gate, dw_up, dw_down, None, None, None)


_blocked_swiglu.defvjp(_blocked_swiglu_fwd, _blocked_swiglu_bwd)


def blocked_experts(
    x_NxD: jax.Array,
    copies: SortedCopies,
    weights_NxK: jax.Array,
    w_gate_ExDxF: jax.Array,
    w_up_ExDxF: jax.Array,
    w_down_ExFxD: jax.Array,
    block_size: int,
) -> jax.Array:
    """Dropless: expert groups padded to whole blocks, SwiGLU per single-expert window."""
    n_tokens, top_k = weights_NxK.shape
    n_copies = n_tokens * top_k
    n_experts = w_gate_ExDxF.shape[0]
    # Tiny inputs (decoding, tests) would otherwise pad every expert to a full block.
    block = max(1, min(block_size, -(-n_copies // 8) * 8))
    # sum_e ceil(g_e / B) <= (sum_e g_e + E * (B - 1)) / B, and <= N*K since each
    # non-empty expert has at least one copy per block: a static bound on blocks.
    n_rows = block * max(1, min((n_copies + n_experts * (block - 1)) // block, n_copies))

    blocks_E = (copies.sizes_E + block - 1) // block
    segment_start_E = (jnp.cumsum(blocks_E) - blocks_E).astype(jnp.int32) * block
    row_copy_R = place_rows(copies, segment_start_E, n_rows)
    row_token_R, row_weight_R = row_tokens_and_weights(row_copy_R, weights_NxK)
    window_sizes = _window_sizes(block, n_rows)
    window_counts_LxE = _window_counts(blocks_E, len(window_sizes))
    return _blocked_swiglu(x_NxD, row_weight_R, w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD,
                           row_token_R, segment_start_E, window_counts_LxE, window_sizes)

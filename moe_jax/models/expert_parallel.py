"""Expert parallelism: the experts' part of the MoE layer inside `jax.shard_map` over the mesh.

Experts are split over the `expert` mesh axis (E_l = E / n_ep per device); tokens are split over
every batch axis. Each device, on its own tokens (GShard §3.2; DeepSeek-V3 §3.2.2):
  1. groups its token copies by the expert shard that owns their expert, into a capacity-padded
     send buffer `[n_ep, C, D]` (with each copy's local expert id);
  2. `all_to_all` over `expert`: every device receives the copies meant for its experts;
  3. runs its local experts on them with a single-device backend (`dispatch.py`, K = 1);
  4. `all_to_all` back, and combines each copy's output with its gate weight.
Per device the exchange moves `2 · n_ep · C · D` values each way, with `C ≈ N_l · K / n_ep ·
capacity factor`: it scales with tokens · top_k · d_model, not with the number of experts.

Routing, balance losses and router statistics stay outside, on the global arrays, so they are
global by construction; the dropped fraction is summed over the whole mesh.
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from moe_jax.models.dispatch import dispatch_experts
from moe_jax.models.expert_rows import (
    combine_rows,
    gather_rows,
    place_rows,
    row_tokens_and_weights,
    sort_copies,
)
from moe_jax.parallel.mesh import BATCH_AXES
from moe_jax.parallel.rules import Rules, logical_to_spec

EXCHANGES = ("all_to_all", "ragged_all_to_all")
EXPERT_WEIGHT_AXES = ("experts", "embed", "expert_mlp")
DOWN_WEIGHT_AXES = ("experts", "expert_mlp", "embed")


def resolve_exchange(exchange: str, platform: str | None = None) -> str:
    """`ragged_all_to_all` is not implemented on CPU in current JAX: fall back, with a warning."""
    if exchange == "ragged_all_to_all" and (platform or jax.default_backend()) == "cpu":
        warnings.warn("ragged_all_to_all is unsupported on CPU; using the capacity-padded "
                      "all_to_all exchange instead", stacklevel=2)
        return "all_to_all"
    return exchange


def ep_capacity(n_local_tokens: int, top_k: int, n_ep: int, capacity_factor: float) -> int:
    """Send-buffer slots per destination shard. `capacity_factor <= 0` means dropless: room for
    every local copy to go to one shard (`N_l · K`)."""
    worst_case = n_local_tokens * top_k
    if capacity_factor <= 0:
        return worst_case
    return max(1, min(worst_case, math.ceil(capacity_factor * worst_case / n_ep)))


def _gather_over(weight: jax.Array, spec: PartitionSpec) -> jax.Array:
    """All-gather the non-expert dims of a local expert weight (FSDP/tensor shards)."""
    for dim, axes in enumerate(spec):
        if dim > 0 and axes is not None:
            weight = jax.lax.all_gather(weight, axes, axis=dim, tiled=True)
    return weight


def ep_dispatch_experts(x_NxD: jax.Array, expert_idx_NxK: jax.Array, weights_NxK: jax.Array,
                        w_gate_ExDxF: jax.Array, w_up_ExDxF: jax.Array, w_down_ExFxD: jax.Array, *,
                        mesh: Mesh, rules: Rules, local_backend: str, capacity_factor: float,
                        token_mask_N: jax.Array, exchange: str = "all_to_all"
                        ) -> tuple[jax.Array, jax.Array]:
    """`dispatch_experts` with experts sharded over the mesh's `expert` axis.

    Returns `(y_NxD, dropped_fraction)` (copies that overflowed a send buffer / valid copies)."""
    exchange = resolve_exchange(exchange)
    if exchange != "all_to_all":
        raise NotImplementedError("the ragged_all_to_all exchange is not implemented yet")
    n_ep, n_experts = mesh.shape["expert"], w_gate_ExDxF.shape[0]
    if n_experts % n_ep:
        raise ValueError(f"n_routed_experts={n_experts} is not divisible by the expert axis "
                         f"({n_ep}). Fix: choose an expert axis size dividing {n_experts}")
    n_tokens, n_batch_shards = x_NxD.shape[0], math.prod(mesh.shape[a] for a in BATCH_AXES)
    if n_tokens % n_batch_shards:  # pad to whole shards with masked tokens (which send nothing)
        pad = -n_tokens % n_batch_shards
        y_NxD, dropped_fraction = ep_dispatch_experts(
            *(jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1)) for a in (x_NxD, expert_idx_NxK, weights_NxK)),
            w_gate_ExDxF, w_up_ExDxF, w_down_ExFxD, mesh=mesh, rules=rules, local_backend=local_backend,
            capacity_factor=capacity_factor, token_mask_N=jnp.pad(token_mask_N, (0, pad)), exchange=exchange)
        return y_NxD[:n_tokens], dropped_fraction
    gate_spec, down_spec = logical_to_spec(EXPERT_WEIGHT_AXES, rules), logical_to_spec(DOWN_WEIGHT_AXES, rules)
    if gate_spec[0] != "expert" or down_spec[0] != "expert":
        raise ValueError("expert parallelism needs the rule experts='expert'")
    tokens = PartitionSpec(BATCH_AXES)
    n_local = x_NxD.shape[0] // n_batch_shards
    capacity = ep_capacity(n_local, expert_idx_NxK.shape[1], n_ep, capacity_factor)

    def local(x_NxD, idx_NxK, weights_NxK, mask_N, w_gate, w_up, w_down):
        w_gate, w_up = _gather_over(w_gate, gate_spec), _gather_over(w_up, gate_spec)
        w_down = _gather_over(w_down, down_spec)
        n_local_experts = w_gate.shape[0]
        # 1. Group copies by destination shard into [n_ep * C] send rows (GShard priority).
        copies = sort_copies(idx_NxK // n_local_experts, mask_N, n_ep)
        row_base = jnp.arange(n_ep, dtype=jnp.int32) * capacity
        row_copy_R = place_rows(copies, row_base, n_ep * capacity, capacity)
        row_token_R, row_weight_R = row_tokens_and_weights(row_copy_R, weights_NxK)
        n_copies = idx_NxK.size
        # Empty rows (copy id N*K) read the fill value: expert 0, masked out on arrival.
        local_expert_R = idx_NxK.T.reshape(-1).at[row_copy_R].get(mode="fill", fill_value=0) % n_local_experts
        send_x = gather_rows(x_NxD, row_token_R).reshape(n_ep, capacity, -1)
        send_meta = jnp.stack([local_expert_R, (row_copy_R < n_copies).astype(jnp.int32)], -1)
        # 2. Exchange: row block j goes to the device holding expert shard j.
        recv_x = jax.lax.all_to_all(send_x, "expert", 0, 0, tiled=True)
        recv_meta = jax.lax.all_to_all(send_meta.reshape(n_ep, capacity, 2), "expert", 0, 0, tiled=True)
        recv_x, recv_meta = recv_x.reshape(n_ep * capacity, -1), recv_meta.reshape(n_ep * capacity, 2)
        # 3. Local experts, one copy per row (K = 1, weight 1; empty rows masked out).
        out_RxD, _ = dispatch_experts(
            recv_x, recv_meta[:, :1], jnp.ones((recv_x.shape[0], 1), jnp.float32), w_gate, w_up,
            w_down, backend=local_backend, token_mask_N=recv_meta[:, 1] == 1)
        # 4. Send the outputs home and combine them with the gate weights.
        back = jax.lax.all_to_all(out_RxD.reshape(n_ep, capacity, -1), "expert", 0, 0, tiled=True)
        y_NxD = combine_rows(back.reshape(n_ep * capacity, -1), row_token_R, row_weight_R,
                             x_NxD.shape[0])
        valid = jnp.sum(copies.sizes_E)
        kept = jnp.sum(jnp.minimum(copies.sizes_E, capacity))
        counts = jax.lax.psum(jnp.stack([valid - kept, valid]).astype(jnp.float32), mesh.axis_names)
        return y_NxD.astype(x_NxD.dtype), counts[0] / jnp.maximum(counts[1], 1.0)

    sharded = jax.shard_map(
        local, mesh=mesh,
        in_specs=(tokens, tokens, tokens, tokens, gate_spec, gate_spec, down_spec),
        out_specs=(tokens, PartitionSpec()),
        check_vma=False)  # the blocked backend's loops carry values the VMA checker cannot type
    return sharded(x_NxD, expert_idx_NxK, weights_NxK, token_mask_N, w_gate_ExDxF, w_up_ExDxF,
                   w_down_ExFxD)

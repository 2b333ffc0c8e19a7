"""Expert parallelism: the experts' part of the MoE layer inside `jax.shard_map` over the mesh.

Experts are split over the `expert` mesh axis (E_l = E / n_ep per device); tokens are split over
every batch axis. Each device, on its own tokens (GShard §3.2; DeepSeek-V3 §3.2.2):
  1. groups its token copies by the expert shard that owns their expert (with each copy's local
     expert id);
  2. sends every device the copies meant for its experts;
  3. runs its local experts on what it received with a single-device backend (`dispatch.py`,
     K = 1);
  4. sends the outputs back, and combines each copy's output with its gate weight.
Two exchanges (`ModelConfig.ep_exchange`):
* ``all_to_all``: a capacity-padded send buffer `[n_ep, C, D]`, `C ≈ N_l · K / n_ep · capacity
  factor` (copies past C are dropped); per device it moves `2 · n_ep · C · D` values each way.
  Runs everywhere, CPU included.
* ``ragged_all_to_all``: each destination gets exactly its copies, no padding on the wire (a
  device sends `N_l · K · (n_ep − 1) / n_ep · D` values each way under balanced routing). A
  source may fill C rows of each receiver, the same C, so a bounded exchange drops exactly the
  copies the padded one drops; the receive buffer is `n_ep · C` rows (dropless: `n_ep · N_l · K`,
  the worst case). XLA:CPU has no ragged-all-to-all, so on CPU it falls back to ``all_to_all``
  with a warning.
Either way the bytes scale with tokens · top_k · d_model, not with the number of experts.

Routing, balance losses and router statistics stay outside, on the global arrays, so they are
global by construction; the dropped fraction is summed over the whole mesh.
"""

from __future__ import annotations

import functools
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
RAGGED_UNSUPPORTED_PLATFORMS = ("cpu",)  # XLA:CPU has no ragged-all-to-all thunk (jax 0.10)
# Looked up at call time, so a CPU test can put an emulation of the collective in its place.
ragged_all_to_all = jax.lax.ragged_all_to_all
EXPERT_WEIGHT_AXES = ("experts", "embed", "expert_mlp")
DOWN_WEIGHT_AXES = ("experts", "expert_mlp", "embed")


def resolve_exchange(exchange: str, platform: str | None = None) -> str:
    """`ragged_all_to_all` is not implemented on CPU in current JAX: fall back, with a warning."""
    platform = platform or jax.default_backend()
    if exchange == "ragged_all_to_all" and platform in RAGGED_UNSUPPORTED_PLATFORMS:
        warnings.warn("ragged_all_to_all is unsupported on CPU; using the capacity-padded "
                      "all_to_all exchange instead", stacklevel=2)
        return "all_to_all"
    return exchange


def ep_capacity(n_local_tokens: int, top_k: int, n_ep: int, capacity_factor: float) -> int:
    """C: the copies a device may send to each expert shard (the padded exchange's slots per
    destination; the ragged exchange's most per chunk), `capacity_factor` times the fair share
    `N_l · K / n_ep`. `capacity_factor <= 0` means dropless: room for every local copy to go to
    one shard (`N_l · K`)."""
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


_all_to_all = functools.partial(jax.lax.all_to_all, axis_name="expert", split_axis=0, concat_axis=0,
                                tiled=True)


def _exclusive_cumsum(sizes: jax.Array) -> jax.Array:
    return jnp.cumsum(sizes) - sizes


def _local_expert_ids(idx_NxK: jax.Array, row_copy_R: jax.Array, n_local_experts: int) -> jax.Array:
    """Each send row's expert, numbered within its shard. Empty rows (copy id N*K) read the fill
    value, expert 0; they are masked out on arrival."""
    return idx_NxK.T.reshape(-1).at[row_copy_R].get(mode="fill", fill_value=0) % n_local_experts


def _local_experts(recv_x_RxD: jax.Array, recv_expert_R: jax.Array, valid_R: jax.Array,
                   w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, local_backend: str) -> jax.Array:
    """Step 3: the local experts on the received copies, one per row (K = 1, weight 1; rows that
    hold no copy are masked out)."""
    out_RxD, _ = dispatch_experts(
        recv_x_RxD, recv_expert_R[:, None], jnp.ones((recv_x_RxD.shape[0], 1), jnp.float32),
        w_gate, w_up, w_down, backend=local_backend, token_mask_N=valid_R)
    return out_RxD


def _padded_exchange(x_NxD, idx_NxK, weights_NxK, mask_N, w_gate, w_up, w_down, *, n_ep: int,
                     capacity: int, local_backend: str) -> tuple[jax.Array, jax.Array]:
    """One device's part with the capacity-padded `all_to_all`. Returns its output and its
    (dropped, valid) copy counts."""
    n_local_experts = w_gate.shape[0]
    # 1. Group copies by destination shard into [n_ep * C] send rows (GShard priority).
    copies = sort_copies(idx_NxK // n_local_experts, mask_N, n_ep)
    row_base = jnp.arange(n_ep, dtype=jnp.int32) * capacity
    row_copy_R = place_rows(copies, row_base, n_ep * capacity, capacity)
    row_token_R, row_weight_R = row_tokens_and_weights(row_copy_R, weights_NxK)
    local_expert_R = _local_expert_ids(idx_NxK, row_copy_R, n_local_experts)
    send_x = gather_rows(x_NxD, row_token_R).reshape(n_ep, capacity, -1)
    send_meta = jnp.stack([local_expert_R, (row_copy_R < idx_NxK.size).astype(jnp.int32)], -1)
    # 2. Exchange: row block j goes to the device holding expert shard j.
    recv_x = _all_to_all(send_x).reshape(n_ep * capacity, -1)
    recv_meta = _all_to_all(send_meta.reshape(n_ep, capacity, 2)).reshape(n_ep * capacity, 2)
    # 3. Local experts.
    out_RxD = _local_experts(recv_x, recv_meta[:, 0], recv_meta[:, 1] == 1, w_gate, w_up, w_down,
                             local_backend)
    # 4. Send the outputs home and combine them with the gate weights.
    back = _all_to_all(out_RxD.reshape(n_ep, capacity, -1))
    y_NxD = combine_rows(back.reshape(n_ep * capacity, -1), row_token_R, row_weight_R, x_NxD.shape[0])
    valid = jnp.sum(copies.sizes_E)
    return y_NxD, jnp.stack([valid - jnp.sum(jnp.minimum(copies.sizes_E, capacity)), valid])


def _ragged_exchange(x_NxD, idx_NxK, weights_NxK, mask_N, w_gate, w_up, w_down, *, n_ep: int,
                     capacity: int, local_backend: str) -> tuple[jax.Array, jax.Array]:
    """One device's part with `ragged_all_to_all`: each destination gets exactly its copies.

    A source may fill `capacity` rows of each receiver — the padded exchange's C — so a chunk
    sends its first C copies in GShard priority, and a bounded exchange drops exactly the copies
    the padded one drops (dropless: C = N_l·K). Per-peer arrays are indexed by the peer's
    position on `expert`: chunk j of the send rows starts at `input_offsets[j]` and sends
    `send_kept[j]` copies; the chunks a device receives are packed in source order at
    `recv_offsets`. A chunk that sends nothing gets offset 0, so no offset points past a buffer.
    Returns the device's output and its (dropped, valid) copy counts."""
    n_local_experts, n_copies = w_gate.shape[0], idx_NxK.size
    # 1. Copies sorted by destination shard: one contiguous chunk per shard, valid copies first.
    copies = sort_copies(idx_NxK // n_local_experts, mask_N, n_ep)
    row_base = _exclusive_cumsum(copies.sizes_E)
    row_copy_R = place_rows(copies, row_base, n_copies)
    row_token_R, row_weight_R = row_tokens_and_weights(row_copy_R, weights_NxK)
    send_kept = jnp.minimum(copies.sizes_E, capacity)
    input_offsets = jnp.where(send_kept > 0, row_base, 0)
    # 2. Each receiver learns how many copies come from each source and where they left from; it
    #    packs them and tells each source where its chunk lands.
    recv_kept, home_offsets = _all_to_all(jnp.stack([send_kept, input_offsets], -1)).T
    recv_offsets = jnp.where(recv_kept > 0, _exclusive_cumsum(recv_kept), 0)
    output_offsets = _all_to_all(recv_offsets)

    def send(rows, n_out_rows, offsets, sizes, peer_offsets, peer_sizes):
        out = jnp.zeros((n_out_rows,) + rows.shape[1:], rows.dtype)
        return ragged_all_to_all(rows, out, offsets, sizes, peer_offsets, peer_sizes, axis_name="expert")

    recv_rows = n_ep * capacity
    there = (input_offsets, send_kept, output_offsets, recv_kept)
    recv_x = send(gather_rows(x_NxD, row_token_R), recv_rows, *there)
    recv_expert_R = send(_local_expert_ids(idx_NxK, row_copy_R, n_local_experts)[:, None], recv_rows,
                         *there)[:, 0]
    valid_R = jnp.arange(recv_rows) < jnp.sum(recv_kept)
    # 3. Local experts.
    out_RxD = _local_experts(recv_x, recv_expert_R, valid_R, w_gate, w_up, w_down, local_backend)
    # 4. Each chunk goes back to where its copies left; copies not sent come back as zeros.
    back = send(out_RxD, n_copies, recv_offsets, recv_kept, home_offsets, send_kept)
    y_NxD = combine_rows(back, row_token_R, row_weight_R, x_NxD.shape[0])
    valid = jnp.sum(copies.sizes_E)
    return y_NxD, jnp.stack([valid - jnp.sum(send_kept), valid])


def ep_dispatch_experts(x_NxD: jax.Array, expert_idx_NxK: jax.Array, weights_NxK: jax.Array,
                        w_gate_ExDxF: jax.Array, w_up_ExDxF: jax.Array, w_down_ExFxD: jax.Array, *,
                        mesh: Mesh, rules: Rules, local_backend: str, capacity_factor: float,
                        token_mask_N: jax.Array, exchange: str = "all_to_all"
                        ) -> tuple[jax.Array, jax.Array]:
    """`dispatch_experts` with experts sharded over the mesh's `expert` axis.

    `capacity_factor` sets the copies a device may send to each expert shard (C, in GShard
    priority; 0 is dropless) for both exchanges. Returns `(y_NxD, dropped_fraction)` (copies that did
    not fit a buffer / valid copies, over the whole mesh)."""
    exchange = resolve_exchange(exchange)
    if exchange not in EXCHANGES:
        raise ValueError(f"unknown exchange {exchange!r}. Fix: use one of {EXCHANGES}")
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
        raise ValueError(f"expert parallelism (a mesh with expert={n_ep}) needs the rule experts='expert', "
                         f"but the expert weights' specs are {gate_spec} and {down_spec}. Fix: drop the "
                         "experts override from sharding_rules, or use expert=1 in --mesh")
    tokens = PartitionSpec(BATCH_AXES)
    n_local, top_k = n_tokens // n_batch_shards, expert_idx_NxK.shape[1]
    device_part = functools.partial(_padded_exchange if exchange == "all_to_all" else _ragged_exchange,
                                    n_ep=n_ep, local_backend=local_backend,
                                    capacity=ep_capacity(n_local, top_k, n_ep, capacity_factor))

    def local(x_NxD, idx_NxK, weights_NxK, mask_N, w_gate, w_up, w_down):
        w_gate, w_up = _gather_over(w_gate, gate_spec), _gather_over(w_up, gate_spec)
        w_down = _gather_over(w_down, down_spec)
        y_NxD, counts = device_part(x_NxD, idx_NxK, weights_NxK, mask_N, w_gate, w_up, w_down)
        counts = jax.lax.psum(counts.astype(jnp.float32), mesh.axis_names)
        return y_NxD.astype(x_NxD.dtype), counts[0] / jnp.maximum(counts[1], 1.0)

    sharded = jax.shard_map(
        local, mesh=mesh,
        in_specs=(tokens, tokens, tokens, tokens, gate_spec, gate_spec, down_spec),
        out_specs=(tokens, PartitionSpec()),
        check_vma=False)  # the blocked backend's loops carry values the VMA checker cannot type
    return sharded(x_NxD, expert_idx_NxK, weights_NxK, token_mask_N, w_gate_ExDxF, w_up_ExDxF,
                   w_down_ExFxD)

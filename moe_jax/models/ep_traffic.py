"""Bytes each expert-parallel exchange moves per device and MoE layer (forward), for
`experiments/bench_ep.py` and the communication model in BUILD_NOTES.md.

The padded `all_to_all` moves whole buffers, so its bytes follow from the shapes; the
`ragged_all_to_all` moves each copy that leaves its device once each way, so its bytes follow
from the routing. The part of a buffer a device keeps for itself is not counted.
"""

from __future__ import annotations

import numpy as np

from moe_jax.models.expert_parallel import ep_capacity


def padded_exchange_bytes(tokens: int, ep: int, top_k: int, d_model: int, capacity_factor: float,
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


def ragged_exchange_bytes(expert_idx_NxK: np.ndarray, ep: int, n_experts: int, d_model: int,
                          capacity_factor: float, itemsize: int = 4) -> dict[str, float]:
    """Per-device bytes of the ragged dispatch (x + an int32 expert id per copy) and return (y),
    from the routing on a mesh `expert=ep` (device s holds tokens [s·N_l, (s+1)·N_l)): device s
    sends each of its copies whose expert lives on another shard once, at most C per shard
    (`ep_capacity`; the rest are dropped and not sent). The largest send and the largest receive
    over the devices are reported (they may be different devices)."""
    n_tokens, top_k = expert_idx_NxK.shape
    n_local = n_tokens // ep
    capacity = ep_capacity(n_local, top_k, ep, capacity_factor)
    shard_SxNxK = expert_idx_NxK.reshape(ep, n_local, top_k) // (n_experts // ep)
    sent_SxR = np.stack([np.bincount(shard_SxNxK[s].ravel(), minlength=ep) for s in range(ep)])
    kept_SxR = np.minimum(sent_SxR, capacity)
    copies_out = kept_SxR.sum(1) - np.diag(kept_SxR)  # device d's copies processed elsewhere
    copies_in = kept_SxR.sum(0) - np.diag(kept_SxR)  # other devices' copies processed on d
    x_bytes = d_model * itemsize
    # A copy travels out as x and an expert id, and back as y.
    send = copies_out * (x_bytes + 4) + copies_in * x_bytes
    recv = copies_in * (x_bytes + 4) + copies_out * x_bytes
    return {"send_bytes": int(send.max()), "recv_bytes": int(recv.max()), "receive_rows": ep * capacity,
            "dropped_fraction": float(1 - kept_SxR.sum() / expert_idx_NxK.size)}

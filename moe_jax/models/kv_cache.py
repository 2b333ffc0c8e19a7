"""Masks and the incremental-decoding KV cache.

Sequences are described by integer segment ids `[B, T]`: 0 marks padding (left padding for
batched prompts), and tokens attend only to earlier tokens of the same non-zero segment, so
packed sequences never see each other. Causality is by slot index, positions only feed RoPE.

The cache is a plain pytree, passed to the model and returned updated in `aux["cache"]`:
`{"index": int32[] or int32[B], "segment_ids": int32[B, S], "layers": (per-layer dict, ...)}`.
With a scalar index all rows write the same slots (`index` .. `index + T`; the caller keeps
`index + T <= S`); a left-padded prompt keeps its padding slots at segment id 0, so they stay
masked for the rest of decoding. With one index per row (`[B]`, a refilling sampler's rows that
each hold their own sample), row b writes slots `index[b] .. index[b] + T` modulo S: a ring, whose
older slots belong to the row's earlier samples (other segment ids, so masked); the caller passes
positions explicitly and keeps each live sample within S slots.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from moe_jax.configs import ModelConfig

Cache = dict
NEG_INF = -1e30  # finite, so fully masked (padding) query rows stay NaN-free


def attention_mask(q_segment_ids_BxT: jax.Array, kv_segment_ids_BxS: jax.Array,
                   q_offset: jax.Array | int = 0) -> jax.Array:
    """Boolean `[B, 1, T, S]`: query slot `q_offset + t` may see key slot `s`.

    True iff `s <= q_offset + t` (causal), the key is not padding, and both share a segment.
    `q_offset` may be one per row (`[B]`, a ring cache's write counts: once a row's count passes S
    every slot is "earlier", and the segment test alone keeps its own sample's keys).
    """
    t_idx_BxTx1 = jnp.arange(q_segment_ids_BxT.shape[1])[None, :, None] + jnp.reshape(q_offset, (-1, 1, 1))
    s_idx = jnp.arange(kv_segment_ids_BxS.shape[1])[None, None, :]
    causal_BxTxS = s_idx <= t_idx_BxTx1
    same_segment_BxTxS = q_segment_ids_BxT[:, :, None] == kv_segment_ids_BxS[:, None, :]
    valid_key_Bx1xS = (kv_segment_ids_BxS != 0)[:, None, :]
    return (causal_BxTxS & same_segment_BxTxS & valid_key_Bx1xS)[:, None]


def segment_positions(segment_ids_BxT: jax.Array) -> jax.Array:
    """RoPE positions that restart at 0 at the start of every segment (padding gets 0)."""
    t = segment_ids_BxT.shape[1]
    idx_BxT = jnp.broadcast_to(jnp.arange(t), segment_ids_BxT.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids_BxT[:, :1], bool),
         segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], axis=1)
    start_idx_BxT = jax.lax.cummax(jnp.where(starts, idx_BxT, 0), axis=1)
    return jnp.where(segment_ids_BxT != 0, idx_BxT - start_idx_BxT, 0).astype(jnp.int32)


def layer_cache_shapes(cfg: ModelConfig, batch: int, max_len: int) -> dict[str, tuple[int, ...]]:
    """What one attention layer caches per slot: K and V for GQA; MLA's latent and RoPE key."""
    if cfg.attention == "mla":
        return {"latent": (batch, max_len, cfg.kv_lora_rank),
                "k_rope": (batch, max_len, cfg.qk_rope_head_dim)}
    kv_shape = (batch, max_len, cfg.num_kv_heads, cfg.gqa_head_dim)
    return {"k": kv_shape, "v": kv_shape}


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: jnp.dtype | None = None) -> Cache:
    """An empty cache for `batch` rows of up to `max_len` slots, in the compute dtype by default."""
    dtype = dtype or jnp.dtype(cfg.compute_dtype)
    layers = tuple(
        {name: jnp.zeros(shape, dtype) for name, shape in layer_cache_shapes(cfg, batch, max_len).items()}
        for _ in range(cfg.n_layers))
    return {"index": jnp.zeros((), jnp.int32),
            "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
            "layers": layers}


def group_leaders(x_Bx: jax.Array, group_size: int) -> jax.Array:
    """Row g·G of each group of G consecutive rows, `[B/G, ...]` (a reshape, so a batch-sharded
    row axis stays local)."""
    if x_Bx.shape[0] % group_size:
        raise ValueError(f"{x_Bx.shape[0]} rows do not split into groups of group_size={group_size}")
    return x_Bx.reshape(x_Bx.shape[0] // group_size, group_size, *x_Bx.shape[1:])[:, 0]


def repeat_rows(cache: Cache, group_size: int) -> Cache:
    """A cache of P rows as one of P·G, row p serving rows [p·G, (p+1)·G): a prompt shared by a
    group is prefilled once (the gradient of a repeat sums over the group)."""
    def repeat(x):
        return jnp.repeat(x, group_size, axis=0)
    return {"index": cache["index"], "segment_ids": repeat(cache["segment_ids"]),
            "layers": jax.tree.map(repeat, cache["layers"])}


def write_slots(buffer_BxSx: jax.Array, new_BxTx: jax.Array, index: jax.Array) -> jax.Array:
    """Write `new` into slots `index .. index + T` of a cache buffer (axis 1); with one index per
    row (`[B]`), row b's into slots `index[b] .. index[b] + T` modulo S (a ring)."""
    new_BxTx = new_BxTx.astype(buffer_BxSx.dtype)
    if jnp.ndim(index) == 0:
        start = (0, index) + (0,) * (buffer_BxSx.ndim - 2)
        return jax.lax.dynamic_update_slice(buffer_BxSx, new_BxTx, start)
    slots_BxT = (index[:, None] + jnp.arange(new_BxTx.shape[1])) % buffer_BxSx.shape[1]
    return buffer_BxSx.at[jnp.arange(buffer_BxSx.shape[0])[:, None], slots_BxT].set(new_BxTx)


def cache_bytes_per_token(cfg: ModelConfig, dtype: jnp.dtype | None = None) -> int:
    """Bytes the cache holds per token over all layers (MLA: latent + RoPE key only)."""
    itemsize = jnp.dtype(dtype or cfg.compute_dtype).itemsize
    per_layer = sum(math.prod(shape[2:]) for shape in layer_cache_shapes(cfg, 1, 1).values())
    return per_layer * cfg.n_layers * itemsize

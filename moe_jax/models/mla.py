"""Multi-head Latent Attention (DeepSeek-V2 §2.1, eq. 9-19; DeepSeek-V3 §2.1.1, eq. 1-11).

Keys and values are reconstructed from one compressed latent `c_KV = W_DKV h` (eq. 1) of width
`kv_lora_rank`; RoPE lives in a separate decoupled key `k_R = RoPE(W_KR h)` (eq. 3) shared by all
heads. Queries optionally pass through their own low-rank bottleneck (eq. 6-8).

Two equal ways to compute it:
- training (no cache): up-project the latent to per-head keys/values and run ordinary attention;
- decoding (cache): the cache holds only `c_KV` and `k_R` (`kv_lora_rank + qk_rope_head_dim`
  numbers per token and layer) and the up-projections are *absorbed*: `W_UK` into the query
  (`q_nope W_UK^T` scores directly against `c_KV`) and `W_UV` applied after attending over `c_KV`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.configs import ModelConfig
from moe_jax.models import kv_cache
from moe_jax.models.attention import dot_product_attention, masked_softmax
from moe_jax.models.layers import RMSNorm, make_param, project
from moe_jax.models.rope import apply_rope, yarn_softmax_scale


class MLAttention(nnx.Module):
    """DeepSeek's MLA with decoupled RoPE; parameter names follow the paper's matrices."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, h, r = cfg.d_model, cfg.n_heads, cfg.kv_lora_rank
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        pdt = jnp.dtype(cfg.param_dtype)
        self.scale = yarn_softmax_scale(cfg)
        qk = self.nope + self.rope
        if cfg.q_lora_rank:
            self.w_dq = make_param(rngs, (d, cfg.q_lora_rank), ("embed", "q_lora"), dtype=pdt)
            self.q_norm = RMSNorm(cfg.q_lora_rank, eps=cfg.latent_norm_eps, rngs=rngs, param_dtype=pdt)
            self.w_uq = make_param(rngs, (cfg.q_lora_rank, h, qk), ("q_lora", "q_heads", "head_dim"),
                                   dtype=pdt)
        else:
            self.w_dq = self.q_norm = None
            self.w_uq = make_param(rngs, (d, h, qk), ("embed", "q_heads", "head_dim"), dtype=pdt)
        # W_DKV and W_KR fused into one projection, as in the released checkpoints.
        self.w_dkv_kr = make_param(rngs, (d, r + self.rope), ("embed", "kv_lora"), dtype=pdt)
        self.kv_norm = RMSNorm(r, eps=cfg.latent_norm_eps, rngs=rngs, param_dtype=pdt)
        self.w_uk = make_param(rngs, (r, h, self.nope), ("kv_lora", "q_heads", "head_dim"), dtype=pdt)
        self.w_uv = make_param(rngs, (r, h, self.v_dim), ("kv_lora", "q_heads", "head_dim"), dtype=pdt)
        self.w_o = make_param(rngs, (h, self.v_dim, d), ("q_heads", "head_dim", "embed"), dtype=pdt)

    def _queries(self, x_BxTxD: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Per-head (q_nope, q_rope), eq. 6-9."""
        h = x_BxTxD
        if self.w_dq is not None:
            h = self.q_norm(project(h, self.w_dq[...]))
        q_BxTxHxQ = project(h, self.w_uq[...])
        q_nope, q_rope = q_BxTxHxQ[..., : self.nope], q_BxTxHxQ[..., self.nope:]
        return q_nope, apply_rope(q_rope, cos, sin)

    def _latent(self, x_BxTxD: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The normalised KV latent `c_KV` `[B,T,r]` and the shared RoPE key `k_R` `[B,T,R]`."""
        c_kr_BxTxC = project(x_BxTxD, self.w_dkv_kr[...])
        latent_BxTxL = self.kv_norm(c_kr_BxTxC[..., : -self.rope])
        k_rope_BxTxR = apply_rope(c_kr_BxTxC[..., None, -self.rope:], cos, sin)[..., 0, :]
        return latent_BxTxL, k_rope_BxTxR

    def __call__(self, x_BxTxD: jax.Array, cos_BxTxR: jax.Array, sin_BxTxR: jax.Array,
                 mask_Bx1xTxS: jax.Array, layer_cache: dict | None = None,
                 cache_index: jax.Array | None = None) -> tuple[jax.Array, dict | None]:
        q_nope, q_rope = self._queries(x_BxTxD, cos_BxTxR, sin_BxTxR)
        latent, k_rope = self._latent(x_BxTxD, cos_BxTxR, sin_BxTxR)
        if layer_cache is not None:
            layer_cache = {"latent": kv_cache.write_slots(layer_cache["latent"], latent, cache_index),
                           "k_rope": kv_cache.write_slots(layer_cache["k_rope"], k_rope, cache_index)}
            latent, k_rope = layer_cache["latent"], layer_cache["k_rope"]
        # One new token attends in latent space; a chunk of T queries (a prefill, or completions
        # scored on a shared prompt's cache) is cheaper expanded: its per-key up-projections are
        # shared by T queries, and each query-key product is H·(dn + dr) wide, not H·(r + dr).
        if layer_cache is not None and x_BxTxD.shape[1] == 1:
            out_BxTxHxV = self._absorbed(q_nope, q_rope, latent, k_rope, mask_Bx1xTxS)
        else:
            out_BxTxHxV = self._expanded(q_nope, q_rope, latent, k_rope, mask_Bx1xTxS)
        y = project(out_BxTxHxV, self.w_o[...], in_axes=2)
        return y, layer_cache

    def _expanded(self, q_nope, q_rope, latent_BxSxL, k_rope_BxSxR, mask_Bx1xTxS) -> jax.Array:
        """Training form: materialise per-head keys (eq. 2, 4) and values (eq. 5)."""
        k_nope_BxSxHxN = project(latent_BxSxL, self.w_uk[...])
        v_BxSxHxV = project(latent_BxSxL, self.w_uv[...])
        k_rope_BxSxHxR = jnp.broadcast_to(k_rope_BxSxR[:, :, None, :],
                                          k_nope_BxSxHxN.shape[:3] + (self.rope,))
        q = jnp.concatenate([q_nope, q_rope], axis=-1)
        k = jnp.concatenate([k_nope_BxSxHxN, k_rope_BxSxHxR], axis=-1)
        return dot_product_attention(q, k, v_BxSxHxV, mask_Bx1xTxS, self.scale)

    def _absorbed(self, q_nope, q_rope, latent_BxSxL, k_rope_BxSxR, mask_Bx1xTxS) -> jax.Array:
        """Decoding form: attend in latent space; `W_UK` and `W_UV` never touch the cache."""
        dtype = latent_BxSxL.dtype
        q_latent_BxTxHxL = jnp.einsum("bthn,lhn->bthl", q_nope.astype(dtype), self.w_uk[...].astype(dtype))
        logits_BxHxTxS = (jnp.einsum("bthl,bsl->bhts", q_latent_BxTxHxL, latent_BxSxL)
                          + jnp.einsum("bthr,bsr->bhts", q_rope.astype(dtype), k_rope_BxSxR))
        probs = masked_softmax(logits_BxHxTxS * self.scale, mask_Bx1xTxS).astype(dtype)
        # Contract into [b, h, t, l] (a canonical batched matmul: XLA:CPU ran "bhts,bsl->bthl"
        # through a slow transposed-operand dot, 3x slower per decoded token).
        ctx_BxHxTxL = jnp.einsum("bhts,bsl->bhtl", probs, latent_BxSxL)
        return jnp.einsum("bhtl,lhv->bthv", ctx_BxHxTxL, self.w_uv[...].astype(dtype))

"""Multi-head / grouped-query attention (Ainslie et al. 2023), with Qwen2's qkv bias, Qwen3's
per-head q/k RMSNorm (or OLMoE's over the whole projection), and the masked softmax attention that
MLA shares."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.configs import ModelConfig
from moe_jax.models import kv_cache
from moe_jax.models.layers import RMSNorm, make_param, project
from moe_jax.models.rope import apply_rope, yarn_softmax_scale


def masked_softmax(logits_BxHxTxS: jax.Array, mask_Bx1xTxS: jax.Array) -> jax.Array:
    """Softmax over keys in fp32; masked keys get probability 0 (padding rows stay finite)."""
    logits = jnp.where(mask_Bx1xTxS, logits_BxHxTxS.astype(jnp.float32), kv_cache.NEG_INF)
    return jax.nn.softmax(logits, axis=-1)


def dot_product_attention(q_BxTxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxV: jax.Array,
                          mask_Bx1xTxS: jax.Array, scale: float) -> jax.Array:
    """softmax(q k^T * scale) v, with the H query heads split into G key/value groups."""
    b, t, h, d_k = q_BxTxHxK.shape
    g = k_BxSxGxK.shape[2]
    q_BxTxGxRxK = q_BxTxHxK.reshape(b, t, g, h // g, d_k)
    logits_BxGxRxTxS = jnp.einsum("btgrk,bsgk->bgrts", q_BxTxGxRxK, k_BxSxGxK) * scale
    probs = masked_softmax(logits_BxGxRxTxS.reshape(b, h, t, -1), mask_Bx1xTxS)
    probs_BxGxRxTxS = probs.reshape(b, g, h // g, t, -1).astype(v_BxSxGxV.dtype)
    out_BxTxGxRxV = jnp.einsum("bgrts,bsgv->btgrv", probs_BxGxRxTxS, v_BxSxGxV)
    return out_BxTxGxRxV.reshape(b, t, h, -1)


class GQAttention(nnx.Module):
    """Grouped-query attention; MHA when n_kv_heads == n_heads, MQA when it is 1."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, h, g, k = cfg.d_model, cfg.n_heads, cfg.num_kv_heads, cfg.gqa_head_dim
        pdt = jnp.dtype(cfg.param_dtype)
        self.scale = yarn_softmax_scale(cfg)
        self.w_q = make_param(rngs, (d, h, k), ("embed", "q_heads", "head_dim"), dtype=pdt)
        self.w_k = make_param(rngs, (d, g, k), ("embed", "kv_heads", "head_dim"), dtype=pdt)
        self.w_v = make_param(rngs, (d, g, k), ("embed", "kv_heads", "head_dim"), dtype=pdt)
        self.w_o = make_param(rngs, (h, k, d), ("q_heads", "head_dim", "embed"), dtype=pdt)
        if cfg.qkv_bias:
            zeros = nnx.initializers.zeros
            self.b_q = make_param(rngs, (h, k), ("q_heads", "head_dim"), init=zeros, dtype=pdt)
            self.b_k = make_param(rngs, (g, k), ("kv_heads", "head_dim"), init=zeros, dtype=pdt)
            self.b_v = make_param(rngs, (g, k), ("kv_heads", "head_dim"), init=zeros, dtype=pdt)
        else:
            self.b_q = self.b_k = self.b_v = None
        self.qk_norm_per_head = cfg.qk_norm_per_head
        if cfg.qk_norm:  # per head: a [head_dim] scale; OLMoE: one over all heads' channels
            q_dim, k_dim = (k, k) if cfg.qk_norm_per_head else (h * k, g * k)
            self.q_norm = RMSNorm(q_dim, eps=cfg.norm_eps, rngs=rngs, param_dtype=pdt)
            self.k_norm = RMSNorm(k_dim, eps=cfg.norm_eps, rngs=rngs, param_dtype=pdt)
        else:
            self.q_norm = self.k_norm = None

    def _qk_norm(self, norm: RMSNorm, x_BxTxHxK: jax.Array) -> jax.Array:
        if self.qk_norm_per_head:
            return norm(x_BxTxHxK)
        b, t, h, k = x_BxTxHxK.shape
        return norm(x_BxTxHxK.reshape(b, t, h * k)).reshape(b, t, h, k)

    def _project(self, x_BxTxD: jax.Array, w: nnx.Param, b: nnx.Param | None) -> jax.Array:
        y = project(x_BxTxD, w[...])
        return y if b is None else y + b[...].astype(y.dtype)

    def __call__(self, x_BxTxD: jax.Array, cos_BxTxR: jax.Array, sin_BxTxR: jax.Array,
                 mask_Bx1xTxS: jax.Array, layer_cache: dict | None = None,
                 cache_index: jax.Array | None = None) -> tuple[jax.Array, dict | None]:
        q = self._project(x_BxTxD, self.w_q, self.b_q)
        k = self._project(x_BxTxD, self.w_k, self.b_k)
        v = self._project(x_BxTxD, self.w_v, self.b_v)
        if self.q_norm is not None:
            q, k = self._qk_norm(self.q_norm, q), self._qk_norm(self.k_norm, k)
        q, k = apply_rope(q, cos_BxTxR, sin_BxTxR), apply_rope(k, cos_BxTxR, sin_BxTxR)
        if layer_cache is not None:
            layer_cache = {"k": kv_cache.write_slots(layer_cache["k"], k, cache_index),
                           "v": kv_cache.write_slots(layer_cache["v"], v, cache_index)}
            k, v = layer_cache["k"], layer_cache["v"]
        out_BxTxHxK = dot_product_attention(q, k, v, mask_Bx1xTxS, self.scale)
        y = project(out_BxTxHxK, self.w_o[...], in_axes=2)
        return y, layer_cache

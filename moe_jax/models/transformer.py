"""The decoder: pre-norm blocks (dense MLP for the first `first_k_dense` layers, MoE after), final
norm, LM head, and DeepSeek-V3's multi-token prediction modules (§2.2, eq. 21-25).

`Transformer(cfg, rngs=nnx.Rngs(0))(tokens_BxT) -> (logits_BxTxV, aux)`, where aux holds
- `moe_aux_loss`: the weighted balance losses summed over MoE layers (add it to the LM loss);
- `router`: per-MoE-layer statistics stacked on a leading layer axis (main layers, then MTP);
  with `router_stats=False`, `routing` instead: each MoE layer's unreduced routing, for a caller
  that joins the routings of a batch run in parts before `router_aux` reduces them;
- `mtp_logits` `[D, B, T, V]` when `mtp_depth > 0` and no cache is given: depth k's logits at position i predict
  token i + k + 1 (the main logits predict i + 1);
- `cache`: the updated KV cache when one was passed in.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.configs import ModelConfig
from moe_jax.models import kv_cache
from moe_jax.models.attention import GQAttention
from moe_jax.models.layers import MLP, Embedding, Linear, RMSNorm, make_param, project
from moe_jax.models.mla import MLAttention
from moe_jax.models.moe import MoELayer, routing_stats
from moe_jax.models.rope import rope_tables
from moe_jax.parallel.rules import constrain

_ACT_BTD = ("batch", "length", "act_embed")


class Block(nnx.Module):
    """`x + Attn(norm(x))`, then `x + FFN(norm(x))` where FFN is a dense MLP or an MoE layer."""

    def __init__(self, cfg: ModelConfig, *, moe: bool, rngs: nnx.Rngs):
        pdt = jnp.dtype(cfg.param_dtype)
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs, param_dtype=pdt)
        self.attn = (MLAttention if cfg.attention == "mla" else GQAttention)(cfg, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs, param_dtype=pdt)
        self.ffn = MoELayer(cfg, rngs=rngs) if moe else MLP(cfg.d_model, cfg.d_ff, rngs=rngs,
                                                            param_dtype=pdt)

    def __call__(self, x_BxTxD, rope, mask_Bx1xTxS, token_mask_BxT, layer_cache=None,
                 cache_index=None, expert_idx_BxTxK=None) -> tuple[jax.Array, dict | None, dict | None]:
        """(output, updated layer cache, the MoE layer's routing or None for a dense block)."""
        attn_out, layer_cache = self.attn(self.attn_norm(x_BxTxD), *rope, mask_Bx1xTxS,
                                          layer_cache, cache_index)
        x_BxTxD = x_BxTxD + attn_out
        h = self.ffn_norm(x_BxTxD)
        if isinstance(self.ffn, MoELayer):
            ffn_out, routing = self.ffn.mix(h, token_mask_BxT, expert_idx_BxTxK)
        else:
            ffn_out, routing = self.ffn(h), None
        return x_BxTxD + ffn_out, layer_cache, routing


class MTPModule(nnx.Module):
    """One MTP depth (V3 eq. 21-22): `h' = M [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)]`, then a
    block; the embedding and output head are the main model's, the final norm its own. The
    concatenation order (embedding first) is the released checkpoints' (`enorm`, `hnorm`,
    `eh_proj`)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pdt = jnp.dtype(cfg.param_dtype)
        d = cfg.d_model
        self.embed_norm = RMSNorm(d, eps=cfg.norm_eps, rngs=rngs, param_dtype=pdt)
        self.hidden_norm = RMSNorm(d, eps=cfg.norm_eps, rngs=rngs, param_dtype=pdt)
        self.proj = Linear(2 * d, d, logical_axes=("mtp_concat", "embed"), rngs=rngs, param_dtype=pdt)
        self.block = Block(cfg, moe=cfg.is_moe, rngs=rngs)
        self.final_norm = RMSNorm(d, eps=cfg.norm_eps, rngs=rngs, param_dtype=pdt)


class Transformer(nnx.Module):
    """A DeepSeek-V3-class decoder built from a `ModelConfig`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt = jnp.dtype(cfg.param_dtype)
        self.embed = Embedding(cfg.vocab_size, cfg.d_model, rngs=rngs, param_dtype=pdt)
        self.blocks = nnx.List([Block(cfg, moe=cfg.is_moe_layer(i), rngs=rngs)
                                for i in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs, param_dtype=pdt)
        self.head = (None if cfg.tie_embeddings else
                     make_param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), dtype=pdt))
        self.mtp = nnx.List([MTPModule(cfg, rngs=rngs) for _ in range(cfg.mtp_depth)])

    def logits(self, h_BxTxD: jax.Array) -> jax.Array:
        """The (shared) output head, returning fp32 logits."""
        if self.head is None:
            logits_BxTxV = self.embed.attend(h_BxTxD)
        else:
            logits_BxTxV = project(h_BxTxD, self.head[...])
        return constrain(logits_BxTxV.astype(jnp.float32), ("batch", "length", "act_vocab"))

    def __call__(self, tokens_BxT: jax.Array, *, positions_BxT: jax.Array | None = None,
                 segment_ids_BxT: jax.Array | None = None, cache: dict | None = None,
                 mtp: bool = True, routing_LxBxTxK: jax.Array | None = None,
                 logits_slice: slice = slice(None), router_stats: bool = True) -> tuple[jax.Array, dict]:
        """Segment id 0 marks padding. `mtp=False` skips the MTP modules (RL and scoring need
        only the main logits). `logits_slice` picks the positions whose logits are computed
        (default all): a sampler's prefill needs only the last, RL scoring only the completion's,
        and with a 150k vocabulary the others' `[B, T, V]` logits would dominate memory.
        `routing_LxBxTxK` replays the main MoE layers' expert choices recorded in an earlier
        forward (`aux["router"]["expert_idx"]`); `router_stats=False` returns the MoE layers'
        routings unreduced (`aux["routing"]`). Positions default to each segment's own count from
        0; when decoding, to the row's number of cached non-padding tokens plus that count (right
        for left-padded prompts; pass positions explicitly for anything else)."""
        cfg = self.cfg
        if segment_ids_BxT is None:
            segment_ids_BxT = jnp.ones_like(tokens_BxT, jnp.int32)
        if positions_BxT is None:
            positions_BxT = kv_cache.segment_positions(segment_ids_BxT)
            if cache is not None:  # continue each row after the tokens it has cached
                positions_BxT = positions_BxT + jnp.sum(cache["segment_ids"] != 0, 1, keepdims=True)
        rope = rope_tables(cfg, positions_BxT)
        token_mask_BxT = segment_ids_BxT != 0
        if cache is None:
            cache_index, kv_segments_BxS = None, segment_ids_BxT
        else:
            cache_index = cache["index"]
            kv_segments_BxS = kv_cache.write_slots(cache["segment_ids"], segment_ids_BxT, cache_index)
        mask_Bx1xTxS = kv_cache.attention_mask(segment_ids_BxT, kv_segments_BxS,
                                               0 if cache is None else cache_index)

        x = constrain(self.embed(tokens_BxT, jnp.dtype(cfg.compute_dtype)), _ACT_BTD)
        routings, new_layer_caches = [], []
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else cache["layers"][i]
            replay = None if routing_LxBxTxK is None or not cfg.is_moe_layer(i) else routing_LxBxTxK[len(routings)]
            x, layer_cache, routing = block(x, rope, mask_Bx1xTxS, token_mask_BxT, layer_cache, cache_index, replay)
            x = constrain(x, _ACT_BTD)
            new_layer_caches.append(layer_cache)
            if routing is not None:
                routings.append(routing)
        logits_BxTxV = self.logits(self.final_norm(x[:, logits_slice]))

        aux: dict = {}
        if self.mtp and mtp and cache is None:  # MTP is a training objective; decoding skips it
            mtp_logits, mtp_routings = self._multi_token_logits(
                x, tokens_BxT, rope, mask_Bx1xTxS, token_mask_BxT)
            aux["mtp_logits"] = mtp_logits
            routings += mtp_routings
        aux.update(router_aux(routings, cfg) if router_stats else {"routing": routings})
        if cache is not None:
            aux["cache"] = {"index": cache_index + tokens_BxT.shape[1],
                            "segment_ids": kv_segments_BxS, "layers": tuple(new_layer_caches)}
        return logits_BxTxV, aux

    def _multi_token_logits(self, h_BxTxD, tokens_BxT, rope, mask_Bx1xTxS, token_mask_BxT):
        """Sequential MTP (eq. 21-23): depth k combines h^{k-1}_i with the embedding of t_{i+k}.
        Positions whose t_{i+k} lies past the end see a zero embedding; the loss masks them."""
        logits, routings = [], []
        for k, module in enumerate(self.mtp, start=1):
            future_BxT = jnp.pad(tokens_BxT[:, k:], ((0, 0), (0, k)))
            emb = self.embed(future_BxT, h_BxTxD.dtype)
            emb = jnp.where((jnp.arange(tokens_BxT.shape[1]) < tokens_BxT.shape[1] - k)[None, :, None],
                            emb, 0)
            h = module.proj(jnp.concatenate([module.embed_norm(emb), module.hidden_norm(h_BxTxD)], -1))
            h_BxTxD, _, routing = module.block(h, rope, mask_Bx1xTxS, token_mask_BxT)
            logits.append(self.logits(module.final_norm(h_BxTxD)))
            if routing is not None:
                routings.append(routing)
        return jnp.stack(logits), routings

    def moe_layers(self) -> list[MoELayer]:
        """Every MoE layer, in the order of `aux["router"]`'s leading axis."""
        blocks = list(self.blocks) + [m.block for m in self.mtp]
        return [b.ffn for b in blocks if isinstance(b.ffn, MoELayer)]

    def update_router_biases(self, load_LxE: jax.Array) -> None:
        """The aux-loss-free bias step for every MoE layer, from `aux["router"]["load"]`; after a
        forward with `mtp=False` the loads cover the main layers only, and only they move."""
        layers = self.moe_layers()
        if load_LxE.shape[0] == self.cfg.n_moe_layers:
            layers = layers[:self.cfg.n_moe_layers]
        for layer, load_E in zip(layers, load_LxE, strict=True):
            layer.update_bias(load_E)


def router_aux(routings: list[dict], cfg: ModelConfig) -> dict:
    """`{"router": per-layer routing_stats stacked on a leading layer axis, "moe_aux_loss": their
    weighted balance losses summed}` (a dense model: only the zero loss)."""
    if not routings:
        return {"moe_aux_loss": jnp.zeros((), jnp.float32)}
    stats = jax.tree.map(lambda *xs: jnp.stack(xs), *[routing_stats(r, cfg) for r in routings])
    return {"router": stats, "moe_aux_loss": stats["aux_loss"].sum()}

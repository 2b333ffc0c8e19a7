"""Analytic parameter and FLOP counts, from the config alone (nothing is allocated).

`count_params` must agree exactly with the parameters the model creates; a test checks it for
every preset against an abstract (`nnx.eval_shape`) instantiation.
"""

from __future__ import annotations

from moe_jax.configs.model_config import ModelConfig


def attention_params(cfg: ModelConfig) -> tuple[int, int]:
    """One attention layer as (matrix weights, vector weights: biases and norms)."""
    d, h = cfg.d_model, cfg.n_heads
    if cfg.attention == "mla":
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        q = cfg.q_lora_rank * (d + h * qk) if cfg.q_lora_rank else d * h * qk
        kv = d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * h * (
            cfg.qk_nope_head_dim + cfg.v_head_dim)
        return q + kv + h * cfg.v_head_dim * d, cfg.q_lora_rank + cfg.kv_lora_rank
    k, g = cfg.gqa_head_dim, cfg.num_kv_heads
    bias = (h + 2 * g) * k if cfg.qkv_bias else 0
    qk_norm = (2 * k if cfg.qk_norm_per_head else (h + g) * k) if cfg.qk_norm else 0
    return 2 * d * h * k + 2 * d * g * k, bias + qk_norm


def _swiglu_params(d_model: int, d_ff: int) -> int:
    return 3 * d_model * d_ff


def moe_params(cfg: ModelConfig) -> dict[str, int]:
    """One MoE layer, split into routed experts, shared experts and the router."""
    return {
        "routed": cfg.n_routed_experts * _swiglu_params(cfg.d_model, cfg.moe_d_ff),
        "shared": _swiglu_params(cfg.d_model, cfg.n_shared_experts * cfg.moe_d_ff),
        "router": cfg.d_model * cfg.n_routed_experts,
    }


def _block_params(cfg: ModelConfig, moe: bool) -> tuple[int, int, int]:
    """(total, activated per token, vector weights) of one block; the vectors are its norms and
    biases, which count as parameters but do no matmul."""
    attn_matrices, attn_vectors = attention_params(cfg)
    vectors = attn_vectors + 2 * cfg.d_model
    base = attn_matrices + vectors
    if not moe:
        dense = _swiglu_params(cfg.d_model, cfg.d_ff)
        return base + dense, base + dense, vectors
    m = moe_params(cfg)
    routed_active = m["routed"] * cfg.top_k // cfg.n_routed_experts
    return base + sum(m.values()), base + routed_active + m["shared"] + m["router"], vectors


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts. `total` / `activated` cover the main model (embedding, blocks, final norm,
    head); MTP modules are counted apart in `mtp` (they share the embedding and head).
    `activated` counts what one token uses: its top-k routed experts out of all. `*_matmul`
    leaves out norms, biases and the embedding lookup: the weights that cost FLOPs."""
    d = cfg.d_model
    embedding = cfg.vocab_size * d
    head = 0 if cfg.tie_embeddings else d * cfg.vocab_size
    blocks = [_block_params(cfg, cfg.is_moe_layer(i)) for i in range(cfg.n_layers)]
    blocks_total = sum(b[0] for b in blocks) + d  # + final norm
    blocks_active = sum(b[1] for b in blocks) + d
    blocks_vectors = sum(b[2] for b in blocks) + d
    mtp_total, mtp_active, mtp_vectors = _block_params(cfg, cfg.is_moe)
    mtp_proj, mtp_norms = 2 * d * d, 3 * d
    return {
        "embedding": embedding,
        "head": head,
        "non_embedding": blocks_total,
        "total": embedding + head + blocks_total,
        "activated_non_embedding": blocks_active,
        "activated": embedding + head + blocks_active,
        # The head's matmul uses the embedding table when tied.
        "activated_matmul": blocks_active - blocks_vectors + d * cfg.vocab_size,
        "mtp": cfg.mtp_depth * (mtp_total + mtp_proj + mtp_norms),
        "mtp_activated": cfg.mtp_depth * (mtp_active + mtp_proj + mtp_norms),
        "mtp_activated_matmul": cfg.mtp_depth * (mtp_active - mtp_vectors + mtp_proj
                                                 + d * cfg.vocab_size),
    }


def _attention_score_flops(cfg: ModelConfig, seq_len: int, causal: bool) -> float:
    """Forward FLOPs per token of one layer's `q k^T` and `p v` (2 per multiply-add), averaged over
    the positions of a sequence: a causal query sees (T+1)/2 keys on average."""
    context = (seq_len + 1) / 2 if causal else seq_len
    return 2 * cfg.n_heads * (cfg.qk_head_dim + cfg.attn_v_head_dim) * context


def flops_per_token(cfg: ModelConfig, seq_len: int, *, training: bool = True,
                    causal: bool = True) -> dict[str, float]:
    """Model FLOPs per token for MFU (Kaplan et al. 2020; PaLM App. B): 2 per activated matmul
    weight in the forward pass plus the attention scores; training triples the forward
    (backward = 2x forward). The MTP modules are reported apart in `mtp`."""
    counts = count_params(cfg)
    factor = 3 if training else 1
    attention_layer = _attention_score_flops(cfg, seq_len, causal)
    matmul = factor * 2 * counts["activated_matmul"]
    attention = factor * cfg.n_layers * attention_layer
    mtp = factor * (2 * counts["mtp_activated_matmul"] + cfg.mtp_depth * attention_layer)
    return {"matmul": matmul, "attention": attention, "total": matmul + attention, "mtp": mtp}


def decode_weight_params(cfg: ModelConfig, batch: int) -> float:
    """Weights one decoding step of `batch` sequences reads, in parameters: every weight a token
    uses (`activated`), except that an untied embedding table gives only `batch` rows and each MoE
    layer reads the routed experts the batch is expected to touch under uniform routing,
    `E · (1 − (1 − K/E)^batch)` (one token: K; a large batch: all E)."""
    counts = count_params(cfg)
    weights = counts["activated"]
    if not cfg.tie_embeddings:  # a tied table is read whole by the head anyway
        weights += min(batch, cfg.vocab_size) * cfg.d_model - counts["embedding"]
    n_moe = cfg.n_moe_layers
    if n_moe:
        experts, k = cfg.n_routed_experts, cfg.top_k
        expert = _swiglu_params(cfg.d_model, cfg.moe_d_ff)
        touched = experts * (1 - (1 - k / experts) ** batch)
        weights += n_moe * (touched - k) * expert
    return weights

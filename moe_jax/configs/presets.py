"""Named configurations: CPU-sized toys and the real shapes of published models.

The real shapes copy the released Hugging Face `config.json` files; they are meant to be
instantiated abstractly (`nnx.eval_shape`) to count parameters and FLOPs, or filled from a
checkpoint. Values not in a config.json (balancing coefficients, dispatch) are our defaults.
"""

from __future__ import annotations

from moe_jax.configs.model_config import ModelConfig

_DEEPSEEK_MLA = {"attention": "mla", "kv_lora_rank": 512, "qk_nope_head_dim": 128,
                 "qk_rope_head_dim": 64, "v_head_dim": 128}

_PRESETS: dict[str, ModelConfig] = {
    # A DeepSeek-V3 in miniature: MLA, sigmoid group-limited routing with a bias, a shared
    # expert, one dense layer first, MTP. Tests and notebooks run it on CPU.
    "tiny-moe": ModelConfig(
        name="tiny-moe", vocab_size=256, d_model=64, n_layers=3, d_ff=128, max_seq_len=128,
        attention="mla", n_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=8, n_shared_experts=1, moe_d_ff=32, top_k=2, score_func="sigmoid",
        n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5, first_k_dense=1,
        router_bias_rate=1e-3, seq_aux_loss_coef=1e-4, mtp_depth=1),
    "tiny-dense": ModelConfig(
        name="tiny-dense", vocab_size=256, d_model=64, n_layers=2, d_ff=128, max_seq_len=128,
        attention="gqa", n_heads=4, n_kv_heads=2),
    # The smaller of the two distillation students (tiny-dense is the larger).
    "tiny-dense-s": ModelConfig(
        name="tiny-dense-s", vocab_size=256, d_model=48, n_layers=2, d_ff=96, max_seq_len=128,
        attention="gqa", n_heads=4, n_kv_heads=2),
    # One-GPU research size (~200M total / ~60M activated): DeepSeek-V3's recipe scaled down.
    "small-moe": ModelConfig(
        name="small-moe", vocab_size=32768, d_model=768, n_layers=12, d_ff=2048, max_seq_len=2048,
        attention="mla", n_heads=12, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64,
        qk_rope_head_dim=32, v_head_dim=64,
        n_routed_experts=32, n_shared_experts=1, moe_d_ff=256, top_k=4, score_func="sigmoid",
        n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5, first_k_dense=1,
        router_bias_rate=1e-3, seq_aux_loss_coef=1e-4, mtp_depth=1),
    "deepseek-v3": ModelConfig(
        name="deepseek-v3", vocab_size=129280, d_model=7168, n_layers=61, d_ff=18432,
        max_seq_len=163840, n_heads=128, q_lora_rank=1536, **_DEEPSEEK_MLA,
        rope_theta=10000.0, rope_scaling_factor=40.0, rope_original_max_len=4096,
        rope_beta_fast=32.0, rope_beta_slow=1.0, rope_mscale=1.0, rope_mscale_all_dim=1.0,
        n_routed_experts=256, n_shared_experts=1, moe_d_ff=2048, top_k=8, score_func="sigmoid",
        n_group=8, topk_group=4, norm_topk_prob=True, routed_scaling_factor=2.5, first_k_dense=3,
        router_bias_rate=1e-3, seq_aux_loss_coef=1e-4, mtp_depth=1, mtp_loss_weight=0.3),
    "deepseek-v2-lite": ModelConfig(
        name="deepseek-v2-lite", vocab_size=102400, d_model=2048, n_layers=27, d_ff=10944,
        max_seq_len=163840, n_heads=16, **_DEEPSEEK_MLA,
        rope_theta=10000.0, rope_scaling_factor=40.0, rope_original_max_len=4096,
        rope_beta_fast=32.0, rope_beta_slow=1.0, rope_mscale=0.707, rope_mscale_all_dim=0.707,
        n_routed_experts=64, n_shared_experts=2, moe_d_ff=1408, top_k=6, score_func="softmax",
        norm_topk_prob=False, routed_scaling_factor=1.0, first_k_dense=1, aux_loss_coef=1e-3),
    "moonlight-16b-a3b": ModelConfig(
        name="moonlight-16b-a3b", vocab_size=163840, d_model=2048, n_layers=27, d_ff=11264,
        max_seq_len=8192, norm_eps=1e-5, n_heads=16, **_DEEPSEEK_MLA, rope_theta=50000.0,
        mla_norm_eps=1e-6,  # the q/kv latent norms keep DeepSeek's default eps
        n_routed_experts=64, n_shared_experts=2, moe_d_ff=1408, top_k=6, score_func="sigmoid",
        norm_topk_prob=True, routed_scaling_factor=2.446, first_k_dense=1, router_bias_rate=1e-3),
    "qwen3-30b-a3b": ModelConfig(
        name="qwen3-30b-a3b", vocab_size=151936, d_model=2048, n_layers=48, d_ff=6144,
        max_seq_len=40960, attention="gqa", n_heads=32, n_kv_heads=4, head_dim=128, qk_norm=True,
        rope_theta=1e6, n_routed_experts=128, moe_d_ff=768, top_k=8, score_func="softmax",
        norm_topk_prob=True, aux_loss_coef=1e-3),
    "mixtral-8x7b": ModelConfig(
        name="mixtral-8x7b", vocab_size=32000, d_model=4096, n_layers=32, d_ff=14336,
        max_seq_len=32768, norm_eps=1e-5, attention="gqa", n_heads=32, n_kv_heads=8,
        rope_theta=1e6, n_routed_experts=8, moe_d_ff=14336, top_k=2, score_func="softmax",
        norm_topk_prob=True, aux_loss_coef=2e-2),
    "qwen2.5-0.5b": ModelConfig(
        name="qwen2.5-0.5b", vocab_size=151936, d_model=896, n_layers=24, d_ff=4864,
        max_seq_len=32768, attention="gqa", n_heads=14, n_kv_heads=2, qkv_bias=True,
        tie_embeddings=True, rope_theta=1e6),
}


def list_presets() -> list[str]:
    """The names `get_preset` knows."""
    return sorted(_PRESETS)


def get_preset(name: str) -> ModelConfig:
    """The preset `name`; an unknown name raises `KeyError` listing the known ones."""
    if name not in _PRESETS:
        raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(list_presets())}")
    return _PRESETS[name]

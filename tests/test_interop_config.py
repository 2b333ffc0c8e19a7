"""config.json <-> ModelConfig without torch: the Hub's own config files map to our presets, every
unsupported option is refused by name, and a config a family cannot express is refused on save."""

import copy
import dataclasses

import pytest

from moe_jax.configs import ModelConfig, get_preset
from moe_jax.interop import config_from_hf, config_to_hf, infer_family
from moe_jax.interop.hf_config import architecture_differences

# The released config.json files (quantization_config left out of DeepSeek-V3: see the FP8 test).
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"}, "aux_loss_alpha": 0.001,
    "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu",
    "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                            "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.46.3", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280}
DEEPSEEK_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64,
    "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6,
    "num_hidden_layers": 27, "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": None,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 102400}
MOONLIGHT = {
    **{k: v for k, v in DEEPSEEK_V3.items() if k != "rope_scaling"},
    "first_k_dense_replace": 1, "hidden_size": 2048, "intermediate_size": 11264, "max_position_embeddings": 8192,
    "moe_intermediate_size": 1408, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2,
    "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16,
    "num_nextn_predict_layers": 0, "q_lora_rank": None, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "rope_theta": 50000.0, "routed_scaling_factor": 2.446, "topk_group": 1, "vocab_size": 163840}
QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
    "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 21, "model_type": "qwen2",
    "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936}
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144,
    "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe",
    "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936}
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32,
    "num_experts_per_tok": 2, "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8,
    "output_router_logits": False, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.02, "sliding_window": None, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.36.0.dev0", "use_cache": True, "vocab_size": 32000}
OLMOE_1B_7B = {
    "architectures": ["OlmoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "clip_qkv": None,
    "eos_token_id": 50279, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 1024, "max_position_embeddings": 4096, "model_type": "olmoe", "norm_topk_prob": False,
    "num_attention_heads": 16, "num_experts": 64, "num_experts_per_tok": 8, "num_hidden_layers": 16,
    "num_key_value_heads": 16, "output_router_logits": False, "pad_token_id": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "rope_theta": 10000.0, "router_aux_loss_coef": 0.01, "tie_word_embeddings": False,
    "torch_dtype": "float32", "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 50304}

HUB_CONFIGS = {"deepseek-v3": DEEPSEEK_V3, "deepseek-v2-lite": DEEPSEEK_V2_LITE, "moonlight-16b-a3b": MOONLIGHT,
               "qwen2.5-0.5b": QWEN25_05B, "qwen3-30b-a3b": QWEN3_30B_A3B, "mixtral-8x7b": MIXTRAL_8X7B}


@pytest.mark.parametrize("preset", list(HUB_CONFIGS))
def test_hub_configs_map_to_the_presets(preset):
    cfg, _ = config_from_hf(HUB_CONFIGS[preset])
    assert architecture_differences(get_preset(preset), cfg) == []


@pytest.mark.parametrize("preset", list(HUB_CONFIGS))
def test_presets_round_trip_through_config_json(preset):
    cfg = get_preset(preset)
    hf = config_to_hf(cfg)
    assert hf["model_type"] == HUB_CONFIGS[preset]["model_type"]
    back, _ = config_from_hf(hf)
    assert architecture_differences(cfg, back) == []


def test_olmoe_config_maps_whole_projection_qk_norm():
    cfg, fmt = config_from_hf(OLMOE_1B_7B)
    assert (fmt.family, cfg.qk_norm, cfg.qk_norm_per_head, cfg.n_routed_experts, cfg.top_k) == (
        "olmoe", True, False, 64, 8)
    assert infer_family(cfg) == "olmoe"


def test_deepseek_layout_facts():
    cfg, fmt = config_from_hf(DEEPSEEK_V3)
    assert fmt.rope_interleave and fmt.declared_mtp_layers == 1 and cfg.mtp_depth == 1
    assert cfg.latent_norm_eps == 1e-6
    moonlight, _ = config_from_hf(MOONLIGHT)
    assert moonlight.norm_eps == 1e-5 and moonlight.latent_norm_eps == 1e-6  # transformers' latent norms


def _refused(hf: dict, *needles: str) -> str:
    with pytest.raises(ValueError) as info:
        config_from_hf(hf)
    for needle in needles:
        assert needle in str(info.value), str(info.value)
    return str(info.value)


@pytest.mark.parametrize(("base", "change", "needle"), [
    (DEEPSEEK_V3, {"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
    (DEEPSEEK_V3, {"scoring_func": "softmax"}, "scoring_func"),
    (DEEPSEEK_V3, {"moe_layer_freq": 2}, "moe_layer_freq"),
    (DEEPSEEK_V3, {"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    (DEEPSEEK_V3, {"rope_scaling": {**DEEPSEEK_V3["rope_scaling"], "mscale_all_dim": 0.0, "mscale": 0.5}},
     "mscale"),
    (DEEPSEEK_V2_LITE, {"norm_topk_prob": True}, "norm_topk_prob"),
    (DEEPSEEK_V2_LITE, {"topk_method": "noaux_tc"}, "topk_method"),
    (QWEN25_05B, {"use_sliding_window": True}, "use_sliding_window"),
    (QWEN25_05B, {"hidden_act": "gelu"}, "hidden_act"),
    (QWEN25_05B, {"rope_scaling": {"type": "yarn", "factor": 4.0, "mscale_all_dim": 1.0}}, "mscale_all_dim"),
    (QWEN25_05B, {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    (QWEN25_05B, {"some_new_option": 3}, "some_new_option"),
    (QWEN3_30B_A3B, {"mlp_only_layers": [5]}, "mlp_only_layers"),
    (QWEN3_30B_A3B, {"attention_bias": True}, "attention_bias"),
    (MIXTRAL_8X7B, {"sliding_window": 4096}, "sliding_window"),
    (OLMOE_1B_7B, {"clip_qkv": 8.0}, "clip_qkv"),
    (OLMOE_1B_7B, {"model_type": "olmo2"}, "model_type"),
])
def test_unsupported_options_are_refused_by_name(base, change, needle):
    _refused({**copy.deepcopy(base), **change}, needle)


def test_missing_required_key_is_named():
    hf = dict(QWEN25_05B)
    del hf["hidden_size"]
    _refused(hf, "hidden_size", "missing")


def test_a_config_the_family_cannot_express_is_refused_on_save():
    mixtral = get_preset("mixtral-8x7b")
    with pytest.raises(ValueError, match="n_shared_experts"):
        config_to_hf(dataclasses.replace(mixtral, n_shared_experts=1), "mixtral")
    with pytest.raises(ValueError, match="qkv_bias"):
        config_to_hf(get_preset("qwen2.5-0.5b"), "qwen3")
    with pytest.raises(ValueError, match="mla_norm_eps"):  # latent norms at another eps than transformers'
        config_to_hf(dataclasses.replace(get_preset("moonlight-16b-a3b"), mla_norm_eps=None))
    tiny = get_preset("tiny-moe")  # deepseek_v3 in miniature saves as such
    assert config_to_hf(tiny)["model_type"] == "deepseek_v3"


def test_architecture_ignores_training_knobs():
    cfg = get_preset("tiny-moe")
    other = dataclasses.replace(cfg, moe_dispatch="dense", router_bias_rate=0.0, aux_loss_coef=0.1,
                                param_dtype="bfloat16", max_seq_len=64, name="x")
    assert architecture_differences(cfg, other) == []
    assert architecture_differences(cfg, dataclasses.replace(cfg, top_k=3)) == ["top_k: 2 != 3"]
    assert isinstance(cfg, ModelConfig)

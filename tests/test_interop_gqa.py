"""Grouped-query-attention families against `transformers`: Qwen2 (qkv bias, tied embeddings),
Qwen3 (per-head q/k norm, explicit head_dim), Qwen3-MoE (softmax top-k with norm_topk_prob, a
dense first layer), Mixtral (w1/w3/w2 experts, YaRN) and OLMoE (q/k norm over the whole
projection)."""

import pytest

pytest.importorskip("torch", reason="the Hugging Face parity tests need the `hf` extra: pip install -e '.[hf]'")
transformers = pytest.importorskip("transformers", reason="the Hugging Face parity tests need the `hf` extra")

import hf_parity as hp

TRUNK = {"vocab_size": hp.VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 256}


def qwen2_config():
    return transformers.Qwen2Config(**TRUNK, intermediate_size=48, tie_word_embeddings=True,
                                    rope_parameters={"rope_type": "default", "rope_theta": 1e6})


def qwen3_config():
    return transformers.Qwen3Config(**TRUNK, intermediate_size=48, head_dim=16, tie_word_embeddings=False,
                                    rope_parameters={"rope_type": "default", "rope_theta": 1e6})


def qwen3_moe_config():
    return transformers.Qwen3MoeConfig(**{**TRUNK, "num_hidden_layers": 3}, intermediate_size=48, head_dim=8,
                                       num_experts=8, num_experts_per_tok=3, moe_intermediate_size=16,
                                       norm_topk_prob=True, mlp_only_layers=[0], decoder_sparse_step=1,
                                       rope_parameters={"rope_type": "default", "rope_theta": 1e6})


def mixtral_config():
    # head_dim explicit: transformers' YaRN reads config.head_dim, which Mixtral leaves None
    return transformers.MixtralConfig(**TRUNK, intermediate_size=24, head_dim=8, num_local_experts=4,
                                      num_experts_per_tok=2,
                                      rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                                       "original_max_position_embeddings": 64})


def olmoe_config():
    return transformers.OlmoeConfig(**TRUNK, intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                                    norm_topk_prob=False, rope_parameters={"rope_type": "default",
                                                                           "rope_theta": 10000.0})


CONFIGS = {"qwen2": qwen2_config, "qwen3": qwen3_config, "qwen3_moe": qwen3_moe_config,
           "mixtral": mixtral_config, "olmoe": olmoe_config}


@pytest.fixture(scope="module", params=list(CONFIGS))
def family(request, tmp_path_factory):
    name = request.param
    fam = hp.load_family(CONFIGS[name](), str(tmp_path_factory.mktemp(name)), seed=len(name))
    fam.name = name
    return fam


def test_config_maps_the_family(family):
    cfg = family.cfg
    expected = {
        "qwen2": {"qkv_bias": True, "tie_embeddings": True, "qk_norm": False, "n_kv_heads": 2},
        "qwen3": {"qk_norm": True, "qk_norm_per_head": True, "head_dim": 16, "qkv_bias": False},
        "qwen3_moe": {"qk_norm": True, "n_routed_experts": 8, "top_k": 3, "norm_topk_prob": True,
                      "first_k_dense": 1, "score_func": "softmax", "n_shared_experts": 0},
        "mixtral": {"n_routed_experts": 4, "top_k": 2, "norm_topk_prob": True, "moe_d_ff": 24,
                    "rope_scaling_factor": 4.0, "rope_original_max_len": 64},
        "olmoe": {"qk_norm": True, "qk_norm_per_head": False, "norm_topk_prob": False, "norm_eps": 1e-5},
    }[family.name]
    assert {k: getattr(cfg, k) for k in expected} == expected


def test_logits_match_transformers(family):
    hp.check_logits(family, family.name)


def test_greedy_decoding_matches_transformers(family):
    hp.check_greedy(family)


def test_save_load_round_trip(family, tmp_path):
    hp.check_round_trip(family, str(tmp_path))


def test_transformers_reads_our_checkpoint(family, tmp_path):
    hp.check_transformers_reads_ours(family, str(tmp_path), family.name)


def test_a_bf16_checkpoint_loads_in_either_dtype(tmp_path):
    """`save_pretrained` of a bf16 model: loads as exact fp32 upcasts by default, or as bf16."""
    import ml_dtypes
    import numpy as np
    import torch

    hf_model = hp.make_hf_model(qwen3_config(), str(tmp_path / "f32")).to(torch.bfloat16)
    hf_model.save_pretrained(str(tmp_path / "bf16"))
    expected = {name: p.detach().float().numpy() for name, p in hf_model.named_parameters()}
    _, f32 = hp.load_hf(str(tmp_path / "bf16"))
    cfg, bf16 = hp.load_hf(str(tmp_path / "bf16"), dtype="bfloat16")
    assert cfg.param_dtype == "bfloat16" and bf16.embed.table[...].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(np.asarray(f32.embed.table[...]), expected["model.embed_tokens.weight"])
    np.testing.assert_array_equal(np.asarray(bf16.blocks[1].attn.w_q[...]).astype(np.float32),
                                  expected["model.layers.1.self_attn.q_proj.weight"].T.reshape(32, 4, 16))

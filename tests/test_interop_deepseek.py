"""DeepSeek-V3 and DeepSeek-V2 checkpoints against `transformers` (MLA with and without query
compression, interleaved RoPE, YaRN, sigmoid group-limited routing with the selection bias, softmax
greedy and group-limited routing, shared experts, dense first layers) and MTP round trips."""

import dataclasses

import numpy as np
import pytest

pytest.importorskip("torch", reason="the Hugging Face parity tests need the `hf` extra: pip install -e '.[hf]'")
transformers = pytest.importorskip("transformers", reason="the Hugging Face parity tests need the `hf` extra")

import hf_parity as hp

from moe_jax.interop import load_hf, save_hf
from moe_jax.interop.safetensors_io import SafetensorsFolder

MLA = {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 4, "kv_lora_rank": 16,
       "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8, "vocab_size": hp.VOCAB,
       "intermediate_size": 48, "moe_intermediate_size": 16, "max_position_embeddings": 256}


def v3_config():
    """DeepSeek-V3 in miniature: q_lora_rank set, 4 groups of which 2 are kept, a shared expert,
    one dense layer first, YaRN (factor 4, mscale = mscale_all_dim = 1) and interleaved RoPE."""
    return transformers.DeepseekV3Config(
        **MLA, num_hidden_layers=3, q_lora_rank=16, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
        norm_topk_prob=True, rope_interleave=True,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 64, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "beta_fast": 32, "beta_slow": 1})


def v2_lite_config():
    """DeepSeek-V2-Lite style: no query compression, softmax greedy top-k, two shared experts,
    YaRN with mscale = mscale_all_dim = 0.707, rms_norm_eps apart from the latent norms' 1e-6."""
    return transformers.DeepseekV2Config(
        **MLA, num_hidden_layers=2, q_lora_rank=None, n_routed_experts=8, n_shared_experts=2,
        num_experts_per_tok=3, first_k_dense_replace=1, topk_method="greedy", norm_topk_prob=False,
        routed_scaling_factor=1.0, rms_norm_eps=1e-5,  # the latent norms keep eps 1e-6
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                         "original_max_position_embeddings": 32, "mscale": 0.707, "mscale_all_dim": 0.707,
                         "beta_fast": 32, "beta_slow": 1})


def v2_grouped_config():
    """DeepSeek-V2 (236B) style routing: group_limited_greedy keeps 2 of 4 groups by their best expert."""
    return transformers.DeepseekV2Config(
        **MLA, num_hidden_layers=2, q_lora_rank=16, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, first_k_dense_replace=0, topk_method="group_limited_greedy", n_group=4,
        topk_group=2, routed_scaling_factor=1.5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    return hp.load_family(v3_config(), str(tmp_path_factory.mktemp("v3")))


@pytest.fixture(scope="module")
def v2_lite(tmp_path_factory):
    return hp.load_family(v2_lite_config(), str(tmp_path_factory.mktemp("v2lite")), seed=1)


@pytest.fixture(scope="module")
def v2_grouped(tmp_path_factory):
    return hp.load_family(v2_grouped_config(), str(tmp_path_factory.mktemp("v2grouped")), seed=2)


def test_v3_config_maps_every_routing_option(v3):
    cfg = v3.cfg
    assert (cfg.attention, cfg.q_lora_rank, cfg.score_func, cfg.n_group, cfg.topk_group) == ("mla", 16, "sigmoid", 4, 2)
    assert (cfg.n_shared_experts, cfg.first_k_dense, cfg.routed_scaling_factor, cfg.rope_scaling_factor) == (
        1, 1, 2.5, 4.0)
    assert cfg.mtp_depth == 0  # transformers declares one MTP layer but writes no MTP weights
    bias = np.asarray(v3.model.blocks[1].ffn.router_bias[...])
    assert np.abs(bias).max() > 0  # the selection bias came across


@pytest.mark.parametrize("name", ["v3", "v2_lite", "v2_grouped"])
def test_logits_match_transformers(name, request):
    diff = hp.check_logits(request.getfixturevalue(name), f"deepseek {name}")
    # Tighter than the 1e-4 contract (we measure ~1e-6): latent norms at eps 1e-5 instead of
    # transformers' 1e-6 would show as ~1.4e-5 in v2_lite.
    assert diff < 5e-6


@pytest.mark.parametrize("name", ["v3", "v2_lite"])
def test_greedy_decoding_matches_transformers(name, request):
    hp.check_greedy(request.getfixturevalue(name))


@pytest.mark.parametrize("name", ["v3", "v2_lite", "v2_grouped"])
def test_save_load_round_trip(name, request, tmp_path):
    hp.check_round_trip(request.getfixturevalue(name), str(tmp_path))


@pytest.mark.parametrize("name", ["v3", "v2_lite"])
def test_transformers_reads_our_checkpoint(name, request, tmp_path):
    hp.check_transformers_reads_ours(request.getfixturevalue(name), str(tmp_path), f"deepseek {name}")


def test_mtp_weights_round_trip_in_deepseek_layout(v3, tmp_path):
    """MTP modules are written as `model.layers.{n_layers + k}` (enorm, hnorm, eh_proj, a block,
    shared_head) and read back bit for bit; transformers still opens the folder (it skips them)."""
    cfg = dataclasses.replace(v3.cfg, mtp_depth=1)
    model = hp.random_model(cfg, seed=4, base=v3.model)
    save_hf(model, cfg, str(tmp_path))
    names = SafetensorsFolder(str(tmp_path)).names()
    n = cfg.n_layers
    for suffix in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                   "shared_head.head.weight", "embed_tokens.weight", "self_attn.q_b_proj.weight",
                   "mlp.experts.7.down_proj.weight", "mlp.gate.e_score_correction_bias"):
        assert f"model.layers.{n}.{suffix}" in names, suffix
    loaded_cfg, again = load_hf(str(tmp_path))
    assert loaded_cfg.mtp_depth == 1
    hp.assert_bit_identical(model, again)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager")
    assert hp.max_logit_diff(hf_model.eval(), model) < hp.LOGIT_TOL

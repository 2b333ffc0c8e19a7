import dataclasses

import jax
import pytest
from flax import nnx

from moe_jax.configs import (
    ModelConfig,
    count_params,
    decode_weight_params,
    flops_per_token,
    get_preset,
    list_presets,
)
from moe_jax.models import Transformer

REAL_PRESETS = ["deepseek-v3", "deepseek-v2-lite", "moonlight-16b-a3b", "qwen3-30b-a3b",
                "mixtral-8x7b", "qwen2.5-0.5b"]


def test_presets_listed_and_unknown_name_lists_them():
    names = list_presets()
    for required in ["tiny-moe", "tiny-dense", "small-moe", *REAL_PRESETS]:
        assert required in names
    with pytest.raises(KeyError, match="tiny-moe"):
        get_preset("deepseek-v9")


@pytest.mark.parametrize("changes, field", [
    ({"top_k": 9}, "top_k"),
    ({"n_group": 3}, "n_group"),
    ({"topk_group": 5}, "topk_group"),
    ({"kv_lora_rank": 0}, "kv_lora_rank"),
    ({"score_func": "relu"}, "score_func"),
    ({"moe_dispatch": "magic"}, "moe_dispatch"),
    ({"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
    ({"first_k_dense": 9}, "first_k_dense"),
    ({"rope_scaling_factor": 0.5}, "rope_scaling_factor"),
    ({"moe_d_ff": 0}, "moe_d_ff"),
    ({"compute_dtype": "float8"}, "compute_dtype"),
    ({"router_bias_rate": -1.0}, "router_bias_rate"),
])
def test_bad_moe_config_names_field_and_fix(changes, field):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}: .*Fix: "):
        dataclasses.replace(get_preset("tiny-moe"), **changes)


@pytest.mark.parametrize("changes, field", [
    ({"n_heads": 3}, "head_dim"),
    ({"n_kv_heads": 3}, "n_kv_heads"),
    ({"head_dim": 15}, "head_dim"),
    ({"d_model": 0}, "d_model"),
    ({"n_routed_experts": 0, "top_k": 2}, "n_routed_experts"),
])
def test_bad_dense_config_names_field(changes, field):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}: "):
        dataclasses.replace(get_preset("tiny-dense"), **changes)


def test_replace_revalidates_and_keeps_good_changes():
    cfg = dataclasses.replace(get_preset("tiny-moe"), moe_dispatch="dense", top_k=3)
    assert cfg.top_k == 3 and cfg.moe_dispatch == "dense"
    assert ModelConfig().attention == "gqa"


def _abstract_param_counts(cfg: ModelConfig) -> dict[str, int]:
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    counts = {"total": 0, "mtp": 0, "embedding": 0}
    for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = leaf.get_value()
        assert isinstance(value, jax.ShapeDtypeStruct)  # nothing was allocated
        size = value.size
        counts["mtp" if path[0] == "mtp" else "total"] += size
        if path[0] == "embed":
            counts["embedding"] += size
    return counts


@pytest.mark.parametrize("name", ["tiny-moe", "tiny-dense", "small-moe", *REAL_PRESETS])
def test_analytic_param_count_equals_abstract_model(name):
    # Two layers past the dense ones: every kind of layer, at a fraction of the abstract build
    # (DeepSeek-V3's 61 layers of 256 experts took 16 s); the full-depth counts are checked
    # against the report below.
    full = get_preset(name)
    cfg = dataclasses.replace(full, n_layers=min(full.n_layers, full.first_k_dense + 2))
    analytic, real = count_params(cfg), _abstract_param_counts(cfg)
    assert analytic["total"] == real["total"]
    assert analytic["mtp"] == real["mtp"]
    assert analytic["embedding"] == real["embedding"]


def test_deepseek_v3_matches_report():
    counts = count_params(get_preset("deepseek-v3"))
    assert round(counts["total"] / 1e9) == 671  # DeepSeek-V3 report, abstract
    assert 36.5e9 < counts["activated"] < 38e9  # "37B activated"
    # The released checkpoint's 685B = 671B + MTP (which stores its own copy of embedding & head).
    mtp_as_stored = counts["mtp"] + counts["embedding"] + counts["head"]
    assert 13e9 < mtp_as_stored < 14e9  # the report's "14B" MTP module
    assert abs(counts["total"] + mtp_as_stored - 685e9) < 1e9


@pytest.mark.parametrize("name, total_b, active_b", [
    ("mixtral-8x7b", 46.7, 12.9), ("qwen3-30b-a3b", 30.5, 3.3), ("qwen2.5-0.5b", 0.49, 0.49),
])
def test_other_published_sizes(name, total_b, active_b):
    counts = count_params(get_preset(name))
    # Published sizes are rounded to the digits given.
    assert counts["total"] / 1e9 == pytest.approx(total_b, rel=0.02)
    assert counts["activated"] / 1e9 == pytest.approx(active_b, rel=0.02)


def test_flops_per_token_hand_computed_dense():
    cfg = ModelConfig(vocab_size=100, d_model=8, n_layers=2, d_ff=16, n_heads=2, n_kv_heads=1)
    # Per layer: q 8*2*4 + k,v 2*8*1*4 + o 2*4*8 = 192 ; mlp 3*8*16 = 384 ; head 8*100 = 800.
    weights = 2 * (192 + 384) + 800
    seq = 10
    attention = 2 * 2 * (4 + 4) * (seq + 1) / 2  # heads * (qk + v) * mean causal context, x2 FLOPs
    flops = flops_per_token(cfg, seq)
    assert flops["matmul"] == 3 * 2 * weights
    assert flops["attention"] == 3 * cfg.n_layers * attention
    assert flops_per_token(cfg, seq, training=False)["total"] == 2 * weights + 2 * attention


def test_flops_count_only_active_experts():
    cfg = get_preset("tiny-moe")
    dense_all = dataclasses.replace(cfg, top_k=cfg.n_routed_experts, n_group=1, topk_group=1)
    routed_per_expert = 3 * cfg.d_model * cfg.moe_d_ff
    extra_experts = cfg.n_routed_experts - cfg.top_k
    diff = flops_per_token(dense_all, 16)["matmul"] - flops_per_token(cfg, 16)["matmul"]
    assert diff == 6 * cfg.n_moe_layers * extra_experts * routed_per_expert


def test_decode_weight_params_hand_computed():
    """tiny-moe: V 256, D 64, 2 MoE layers of E = 8 experts (3·64·32 = 6144 weights each), K = 2.
    One sequence reads one embedding row and K experts per layer; two sequences touch
    8·(1 − 0.75²) = 3.5 experts in expectation; a huge batch reads the whole table and all 8."""
    cfg = get_preset("tiny-moe")
    activated = count_params(cfg)["activated"]
    table = 256 * 64
    assert decode_weight_params(cfg, 1) == activated - table + 64
    assert decode_weight_params(cfg, 2) == pytest.approx(activated - table + 2 * 64 + 2 * 1.5 * 6144)
    assert decode_weight_params(cfg, 10**6) == pytest.approx(activated + 2 * 6 * 6144)
    tied_dense = get_preset("qwen2.5-0.5b")  # the head reads the tied table whole
    assert decode_weight_params(tied_dense, 4) == count_params(tied_dense)["activated"]

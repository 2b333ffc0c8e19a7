"""Hugging Face `config.json` <-> `ModelConfig`, one mapping per family.

`config_from_hf(hf_dict)` reads every key of the file: a key is mapped to a field, checked to hold
a value moe_jax computes identically (e.g. `hidden_act="silu"`, `attention_bias=false`), or known
to leave the forward pass unchanged (metadata, token ids, training-only coefficients). Anything
else — an unknown key, or a known option with a value moe_jax does not implement — raises a
`ValueError` naming the key, so a checkpoint never loads into a model that computes something else.

`config_to_hf(cfg, family)` writes the family's config.json and is checked by reading it back:
a `ModelConfig` the family cannot express (say shared experts in Mixtral) is refused by name.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from moe_jax.configs import ModelConfig

FAMILIES = ("deepseek_v3", "deepseek_v2", "qwen2", "qwen3", "qwen3_moe", "mixtral", "olmoe")
ARCHITECTURES = {
    "deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM",
    "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM", "olmoe": "OlmoeForCausalLM",
}
DEEPSEEK = ("deepseek_v3", "deepseek_v2")
HF_LATENT_NORM_EPS = 1e-6  # transformers' DeepSeek q_a_layernorm / kv_a_layernorm use the default eps

# Keys that do not change the forward pass: metadata, generation defaults, parallelism hints and
# training-only coefficients (the balance-loss coefficients are read where a field exists).
_NEUTRAL_KEYS = frozenset({
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
    "auto_map", "use_cache", "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id",
    "output_router_logits", "output_attentions", "output_hidden_states", "return_dict", "id2label",
    "label2id", "problem_type", "tokenizer_class", "ep_size", "aux_loss_alpha", "seq_aux",
    "max_window_layers", "use_return_dict", "chunk_size_feed_forward", "is_encoder_decoder",
})

# `ModelConfig` fields that do not change what a checkpoint computes (training and execution knobs).
_NON_ARCHITECTURE = frozenset({
    "name", "max_seq_len", "moe_dispatch", "capacity_factor", "ep_exchange", "ep_capacity_factor",
    "router_bias_rate", "aux_loss_coef", "seq_aux_loss_coef", "router_z_loss_coef", "mtp_loss_weight",
    "param_dtype", "compute_dtype",
})


@dataclass(frozen=True)
class HFFormat:
    """How a checkpoint lays its tensors out, beyond what `ModelConfig` says."""
    family: str
    rope_interleave: bool = False  # DeepSeek: RoPE rotates interleaved channel pairs (permuted at load)
    declared_mtp_layers: int = 0  # `num_nextn_predict_layers`; the weights decide what loads


class _Keys:
    """A config.json dict whose every key must be consumed exactly once."""

    def __init__(self, hf: dict[str, Any], family: str):
        self.hf, self.family, self.used = dict(hf), family, set()

    def fail(self, key: str, problem: str, fix: str) -> None:
        raise ValueError(f"config.json ({self.family}): {key}: {problem}. Fix: {fix}")

    def get(self, key: str, default: Any = ...) -> Any:
        self.used.add(key)
        if key in self.hf and self.hf[key] is not None:
            return self.hf[key]
        if default is ...:
            self.fail(key, "missing", f"add `{key}` to config.json (every {self.family} config has it)")
        return default

    def get_alias(self, keys: tuple[str, ...], default: Any = ...) -> Any:
        """One value stored under any of `keys` (transformers' `attribute_map` aliases)."""
        present = {key: self.hf[key] for key in keys if self.hf.get(key) is not None}
        self.used.update(keys)
        if len(set(map(repr, present.values()))) > 1:
            self.fail(", ".join(present), f"aliases disagree: {present}", "keep one of them")
        if present:
            return next(iter(present.values()))
        return self.get(keys[0], default)

    def expect(self, key: str, allowed: tuple, why: str) -> Any:
        """The value of an option moe_jax only implements for `allowed` values (absent = first)."""
        value = self.get(key, allowed[0])
        if value not in allowed:
            self.fail(key, f"{value!r} is not supported ({why})",
                      f"use a checkpoint with {key} in {list(allowed)}")
        return value

    def finish(self) -> None:
        unknown = sorted(set(self.hf) - self.used - _NEUTRAL_KEYS)
        if unknown:
            self.fail(", ".join(unknown), "not understood by moe_jax's importer, which never ignores "
                      "an option that might change the model",
                      "if the option is at its no-op value, delete it from config.json; otherwise "
                      "teach moe_jax/interop/hf_config.py (and the model) the feature")


# --- config.json -> ModelConfig ---

def _trunk(k: _Keys, *, eps_default: float | None = None) -> dict[str, Any]:
    k.expect("hidden_act", ("silu",), "experts and MLPs are SwiGLU")
    if float(k.get("attention_dropout", 0.0)) != 0.0:
        k.fail("attention_dropout", "must be 0 (moe_jax has no attention dropout)", "set it to 0.0")
    k.expect("pretraining_tp", (1,), "tensor-parallel logits emulation is not implemented")
    eps = k.get("rms_norm_eps", eps_default if eps_default is not None else ...)
    return {"vocab_size": k.get("vocab_size"), "d_model": k.get("hidden_size"),
            "n_layers": k.get("num_hidden_layers"), "max_seq_len": k.get("max_position_embeddings"),
            "norm_eps": float(eps), "tie_embeddings": bool(k.get("tie_word_embeddings", False))}


def _rope(k: _Keys, max_position_embeddings: int, deepseek: bool) -> dict[str, Any]:
    """`rope_theta` + `rope_scaling` (Hub style) or `rope_parameters` (transformers 5)."""
    params = dict(k.get("rope_parameters", None) or {})
    params.update(k.get("rope_scaling", None) or {})
    theta = params.pop("rope_theta", None) or k.get("rope_theta", 10000.0)
    rope_type = params.pop("rope_type", None) or params.pop("type", "default")
    params.pop("type", None)
    if float(params.pop("partial_rotary_factor", k.get("partial_rotary_factor", 1.0))) != 1.0:
        k.fail("partial_rotary_factor", "partial RoPE is not implemented", "use a checkpoint with full RoPE")
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if rope_type == "default":
        if params:
            k.fail("rope_parameters", f"keys {sorted(params)} with rope_type 'default'", "remove them")
        return out
    if rope_type != "yarn":
        k.fail("rope_scaling", f"rope_type {rope_type!r} is not implemented (only YaRN)",
               "use a checkpoint with default or YaRN RoPE")
    original = int(params.pop("original_max_position_embeddings", max_position_embeddings))
    factor = params.pop("factor", None)
    factor = float(factor if factor is not None else max_position_embeddings / original)
    beta_fast = float(params.pop("beta_fast", None) or 32.0)
    beta_slow = float(params.pop("beta_slow", None) or 1.0)
    mscale, mscale_all_dim = params.pop("mscale", None), params.pop("mscale_all_dim", None)
    if params.pop("attention_factor", None) is not None:
        k.fail("rope_scaling.attention_factor", "an explicit YaRN attention factor is not implemented",
               "drop it (moe_jax derives it from factor / mscale / mscale_all_dim)")
    if not params.pop("truncate", True):
        k.fail("rope_scaling.truncate", "untruncated YaRN correction ranges are not implemented",
               "use truncate=true")
    if params:
        k.fail("rope_scaling", f"unknown YaRN keys {sorted(params)}", "remove them")
    # transformers scales cos/sin by mscale(f, mscale) / mscale(f, mscale_all_dim) only when both
    # are set, else by mscale(f); DeepSeek attention also multiplies the softmax scale by
    # mscale(f, mscale_all_dim)^2. moe_jax computes exactly these two when rope_mscale and
    # rope_mscale_all_dim carry the values below.
    if mscale_all_dim and not deepseek:
        k.fail("rope_scaling.mscale_all_dim", "only DeepSeek attention applies it", "remove it")
    if mscale and mscale_all_dim:
        ours = (float(mscale), float(mscale_all_dim))
    elif mscale_all_dim or (mscale and float(mscale) != 1.0):
        k.fail("rope_scaling.mscale", f"mscale={mscale} with mscale_all_dim={mscale_all_dim}: transformers "
               "then ignores mscale, a combination moe_jax does not express", "set both or neither")
    else:
        ours = (1.0, 0.0)
    return {**out, "rope_scaling_factor": factor, "rope_original_max_len": original,
            "rope_beta_fast": beta_fast, "rope_beta_slow": beta_slow,
            "rope_mscale": ours[0], "rope_mscale_all_dim": ours[1]}


def _deepseek(k: _Keys, family: str) -> tuple[dict[str, Any], HFFormat]:
    fields = _trunk(k)
    n_heads = k.get("num_attention_heads")
    if k.get("num_key_value_heads", n_heads) != n_heads:
        k.fail("num_key_value_heads", "MLA has one latent for all heads; it must equal num_attention_heads",
               f"set it to {n_heads}")
    nope, rope = k.get("qk_nope_head_dim"), k.get("qk_rope_head_dim")
    if k.get("head_dim", rope) != rope:
        k.fail("head_dim", "transformers sets it to qk_rope_head_dim", f"set it to {rope}")
    if k.get("qk_head_dim", nope + rope) != nope + rope:
        k.fail("qk_head_dim", "must be qk_nope_head_dim + qk_rope_head_dim", f"set it to {nope + rope}")
    k.expect("attention_bias", (False,), "MLA projections have no bias in moe_jax")
    if "quantization_config" in k.hf:
        k.fail("quantization_config", "quantized (FP8) weights are not loaded",
               "dequantize the checkpoint to BF16 first")
    k.expect("moe_layer_freq", (1,), "every layer after first_k_dense_replace is MoE")
    fields.update(
        attention="mla", n_heads=n_heads, q_lora_rank=k.get("q_lora_rank", 0) or 0,
        kv_lora_rank=k.get("kv_lora_rank"), qk_nope_head_dim=nope, qk_rope_head_dim=rope,
        v_head_dim=k.get("v_head_dim"), d_ff=k.get("intermediate_size"),
        moe_d_ff=k.get("moe_intermediate_size"),
        n_routed_experts=k.get_alias(("n_routed_experts", "num_experts", "num_local_experts")),
        n_shared_experts=k.get("n_shared_experts", 0) or 0, top_k=k.get("num_experts_per_tok"),
        routed_scaling_factor=float(k.get("routed_scaling_factor", 1.0)),
        first_k_dense=k.get("first_k_dense_replace", 3 if family == "deepseek_v3" else 0))
    if fields["norm_eps"] != HF_LATENT_NORM_EPS:
        fields["mla_norm_eps"] = HF_LATENT_NORM_EPS
    fields.update(_rope(k, fields["max_seq_len"], deepseek=True))
    if family == "deepseek_v3":
        k.expect("scoring_func", ("sigmoid",), "transformers' DeepSeek-V3 router is sigmoid")
        k.expect("topk_method", ("noaux_tc",), "transformers' DeepSeek-V3 router is noaux_tc")
        fields.update(score_func="sigmoid", n_group=k.get("n_group", 1), topk_group=k.get("topk_group", 1),
                      norm_topk_prob=bool(k.get("norm_topk_prob", True)))
        interleave = bool(k.get("rope_interleave", True))
        mtp = k.get("num_nextn_predict_layers", None)  # `num_mtp_layers` is transformers' alias
        alias = k.get("num_mtp_layers", None)
        mtp = alias if mtp is None else mtp
        return fields, HFFormat(family, rope_interleave=interleave, declared_mtp_layers=int(mtp or 0))
    k.expect("scoring_func", ("softmax",), "transformers' DeepSeek-V2 router is softmax")
    k.expect("mlp_bias", (False,), "MLPs have no bias in moe_jax")
    if k.get("norm_topk_prob", False):
        k.fail("norm_topk_prob", "transformers' DeepSeek-V2 ignores it while DeepSeek's own code applies "
               "it, so the checkpoint's meaning is ambiguous", "load it as deepseek_v3-style or set false")
    method = k.expect("topk_method", ("greedy", "group_limited_greedy"),
                      "the routers transformers implements")
    if method == "group_limited_greedy":
        fields.update(n_group=k.get("n_group"), topk_group=k.get("topk_group"), group_score="max")
    else:  # greedy routing reads neither
        k.used.update(("n_group", "topk_group"))
    fields.update(score_func="softmax", norm_topk_prob=False)
    return fields, HFFormat(family, rope_interleave=True)


def _gqa(k: _Keys, family: str, *, head_dim_default: int | None = None,
         eps_default: float | None = None) -> dict[str, Any]:
    fields = _trunk(k, eps_default=eps_default)
    n_heads = k.get("num_attention_heads")
    head_dim = k.get("head_dim", head_dim_default) or fields["d_model"] // n_heads
    fields.update(attention="gqa", n_heads=n_heads, n_kv_heads=k.get("num_key_value_heads", n_heads),
                  head_dim=head_dim, d_ff=k.get("intermediate_size"))
    fields.update(_rope(k, fields["max_seq_len"], deepseek=False))
    if family in ("qwen2", "qwen3", "qwen3_moe"):
        if k.get("use_sliding_window", False):
            k.fail("use_sliding_window", "sliding-window attention is not implemented", "set it false")
        k.get("sliding_window", None)
        layer_types = k.get("layer_types", None) or []
        if any(t != "full_attention" for t in layer_types):
            k.fail("layer_types", "only full_attention layers are implemented", "use full attention")
    return fields


def _qwen_moe_schedule(k: _Keys, n_layers: int) -> int:
    """Qwen3-MoE's `mlp_only_layers` + `decoder_sparse_step` as moe_jax's `first_k_dense`."""
    dense = sorted(k.get("mlp_only_layers", None) or [])
    if k.get("decoder_sparse_step", 1) != 1 or dense != list(range(len(dense))):
        k.fail("mlp_only_layers", f"dense layers {dense} with decoder_sparse_step="
               f"{k.hf.get('decoder_sparse_step', 1)}: moe_jax puts its dense layers first",
               "use decoder_sparse_step=1 and mlp_only_layers=[0..k-1]")
    return len(dense)


def config_from_hf(hf: dict[str, Any], *, name: str = "hf") -> tuple[ModelConfig, HFFormat]:
    """The `ModelConfig` of a Hugging Face config.json dict, and the layout facts of its weights.
    MTP depth comes out as the declared one; `load_hf` lowers it to the MTP layers actually stored."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise ValueError(f"config.json: model_type {family!r} is not supported. Fix: use one of {FAMILIES}")
    k = _Keys(hf, family)
    k.get("model_type")
    fmt = HFFormat(family)
    if family in DEEPSEEK:
        fields, fmt = _deepseek(k, family)
        fields["mtp_depth"] = fmt.declared_mtp_layers
    elif family == "qwen2":
        fields = _gqa(k, family)
        fields["qkv_bias"] = True
    elif family == "qwen3":
        fields = _gqa(k, family, head_dim_default=128)
        k.expect("attention_bias", (False,), "Qwen3's attention_bias also adds an o_proj bias")
        fields["qk_norm"] = True
    elif family == "qwen3_moe":
        fields = _gqa(k, family)
        k.expect("attention_bias", (False,), "Qwen3's attention_bias also adds an o_proj bias")
        fields.update(qk_norm=True, n_routed_experts=k.get_alias(("num_experts", "num_local_experts")),
                      top_k=k.get("num_experts_per_tok"),
                      moe_d_ff=k.get("moe_intermediate_size"), score_func="softmax",
                      norm_topk_prob=bool(k.get("norm_topk_prob", False)),
                      aux_loss_coef=float(k.get("router_aux_loss_coef", 0.0)),
                      first_k_dense=_qwen_moe_schedule(k, fields["n_layers"]))
    elif family == "mixtral":
        fields = _gqa(k, family)
        if k.get("sliding_window", None) is not None:
            k.fail("sliding_window", "sliding-window attention is not implemented", "set it to null")
        if float(k.get("router_jitter_noise", 0.0)) != 0.0:
            k.fail("router_jitter_noise", "router jitter is not implemented", "set it to 0.0")
        fields.update(n_routed_experts=k.get_alias(("num_local_experts", "num_experts")),
                      top_k=k.get("num_experts_per_tok"),
                      moe_d_ff=fields["d_ff"], score_func="softmax", norm_topk_prob=True,
                      aux_loss_coef=float(k.get("router_aux_loss_coef", 0.0)))
    else:  # olmoe
        fields = _gqa(k, family, eps_default=1e-5)
        k.expect("attention_bias", (False,), "OLMoE's attention_bias also adds an o_proj bias")
        if k.get("clip_qkv", None) is not None:
            k.fail("clip_qkv", "clipping q/k/v is not implemented", "set it to null")
        fields.update(qk_norm=True, qk_norm_per_head=False,
                      n_routed_experts=k.get_alias(("num_experts", "num_local_experts")),
                      top_k=k.get("num_experts_per_tok"), moe_d_ff=fields["d_ff"], score_func="softmax",
                      norm_topk_prob=bool(k.get("norm_topk_prob", False)),
                      aux_loss_coef=float(k.get("router_aux_loss_coef", 0.0)))
    k.finish()
    return ModelConfig(name=name, **fields), fmt


# --- ModelConfig -> config.json ---

def infer_family(cfg: ModelConfig) -> str:
    """The Hugging Face family whose modelling code computes what `cfg` computes."""
    if cfg.attention == "mla":
        return "deepseek_v3" if cfg.score_func == "sigmoid" else "deepseek_v2"
    if not cfg.is_moe:
        return "qwen2" if cfg.qkv_bias else "qwen3"
    if cfg.qk_norm:
        return "qwen3_moe" if cfg.qk_norm_per_head else "olmoe"
    return "mixtral"


def _rope_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"rope_theta": cfg.rope_theta}
    if cfg.rope_scaling_factor > 1.0:
        scaling = {"type": "yarn", "rope_type": "yarn", "factor": cfg.rope_scaling_factor,
                   "original_max_position_embeddings": cfg.rope_original_max_len,
                   "beta_fast": cfg.rope_beta_fast, "beta_slow": cfg.rope_beta_slow}
        if cfg.rope_mscale_all_dim:
            scaling.update(mscale=cfg.rope_mscale, mscale_all_dim=cfg.rope_mscale_all_dim)
        elif cfg.rope_mscale != 1.0:
            scaling["mscale"] = cfg.rope_mscale  # read back: refused with the reason
        out["rope_scaling"] = scaling
    return out


def config_to_hf(cfg: ModelConfig, family: str | None = None, *, dtype: str = "float32") -> dict[str, Any]:
    """The config.json of `cfg` as `family` (default: `infer_family`). Raises ValueError naming the
    fields when the family cannot express `cfg`."""
    family = family or infer_family(cfg)
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; use one of {FAMILIES}")
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[family]], "model_type": family, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len, "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu", "attention_dropout": 0.0, "num_attention_heads": cfg.n_heads,
        "intermediate_size": cfg.d_ff, "torch_dtype": dtype, "use_cache": True, **_rope_to_hf(cfg)}
    if family in DEEPSEEK:
        hf.update(num_key_value_heads=cfg.n_heads, q_lora_rank=cfg.q_lora_rank or None,
                  kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
                  qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim, attention_bias=False,
                  moe_intermediate_size=cfg.moe_d_ff, n_routed_experts=cfg.n_routed_experts,
                  n_shared_experts=cfg.n_shared_experts, num_experts_per_tok=cfg.top_k,
                  routed_scaling_factor=cfg.routed_scaling_factor, first_k_dense_replace=cfg.first_k_dense,
                  n_group=cfg.n_group, topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob,
                  moe_layer_freq=1, scoring_func=cfg.score_func)
        if family == "deepseek_v3":
            hf.update(topk_method="noaux_tc", rope_interleave=True, num_nextn_predict_layers=cfg.mtp_depth)
        else:
            hf["topk_method"] = "group_limited_greedy" if cfg.n_group > 1 else "greedy"
    else:
        hf.update(num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.gqa_head_dim)
        if family in ("qwen3", "qwen3_moe", "olmoe"):
            hf["attention_bias"] = False
        if family in ("qwen2", "qwen3", "qwen3_moe"):
            hf["use_sliding_window"] = False
        if family == "qwen3_moe":
            hf.update(num_experts=cfg.n_routed_experts, num_experts_per_tok=cfg.top_k,
                      moe_intermediate_size=cfg.moe_d_ff, norm_topk_prob=cfg.norm_topk_prob,
                      decoder_sparse_step=1, mlp_only_layers=list(range(cfg.first_k_dense)),
                      router_aux_loss_coef=cfg.aux_loss_coef)
        elif family == "mixtral":
            hf.update(num_local_experts=cfg.n_routed_experts, num_experts_per_tok=cfg.top_k,
                      intermediate_size=cfg.moe_d_ff, router_aux_loss_coef=cfg.aux_loss_coef)
        elif family == "olmoe":
            hf.update(num_experts=cfg.n_routed_experts, num_experts_per_tok=cfg.top_k,
                      intermediate_size=cfg.moe_d_ff, norm_topk_prob=cfg.norm_topk_prob, clip_qkv=None,
                      router_aux_loss_coef=cfg.aux_loss_coef)
            del hf["head_dim"]  # OLMoE derives it from hidden_size
    try:
        back, _ = config_from_hf(hf)
    except ValueError as e:
        raise ValueError(f"ModelConfig {cfg.name!r} cannot be saved as {family}: {e}") from e
    differences = architecture_differences(cfg, back)
    if differences:
        raise ValueError(f"ModelConfig {cfg.name!r} cannot be saved as {family}, whose config.json cannot "
                         "express: " + "; ".join(differences)
                         + f". Fix: save it as another family (one of {FAMILIES}) or change the model")
    return hf


# --- architecture comparison ---

def architecture(cfg: ModelConfig) -> dict[str, Any]:
    """The fields that decide what the weights compute, in a canonical form (derived values
    resolved, fields without effect dropped), so equal dicts mean interchangeable checkpoints."""
    arch = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in _NON_ARCHITECTURE}
    if cfg.attention == "mla":
        arch["mla_norm_eps"] = cfg.latent_norm_eps
        for name in ("n_kv_heads", "head_dim", "qkv_bias", "qk_norm", "qk_norm_per_head"):
            arch.pop(name)
    else:
        arch.update(n_kv_heads=cfg.num_kv_heads, head_dim=cfg.gqa_head_dim)
        for name in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                     "mla_norm_eps"):
            arch.pop(name)
        if not cfg.qk_norm:
            arch.pop("qk_norm_per_head")
    if cfg.rope_scaling_factor <= 1.0:
        for name in ("rope_original_max_len", "rope_beta_fast", "rope_beta_slow", "rope_mscale",
                     "rope_mscale_all_dim"):
            arch.pop(name)
    if not cfg.is_moe:
        for name in ("n_shared_experts", "moe_d_ff", "top_k", "score_func", "n_group", "topk_group",
                     "group_score", "norm_topk_prob", "routed_scaling_factor", "first_k_dense"):
            arch.pop(name)
    elif cfg.n_group == 1:
        arch.pop("topk_group")
        arch.pop("group_score")
    if cfg.is_moe and cfg.first_k_dense == 0:
        arch.pop("d_ff")  # no dense layer reads it
    return arch


def architecture_differences(a: ModelConfig, b: ModelConfig) -> list[str]:
    """`field: a-value != b-value` for every architecture field where the configs disagree."""
    arch_a, arch_b = architecture(a), architecture(b)
    out = []
    for name in sorted(set(arch_a) | set(arch_b)):
        va, vb = arch_a.get(name, "(unused)"), arch_b.get(name, "(unused)")
        if va != vb and not (isinstance(va, float) and isinstance(vb, float) and math.isclose(va, vb)):
            out.append(f"{name}: {va!r} != {vb!r}")
    return out

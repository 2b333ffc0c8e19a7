"""`ModelConfig`: every architectural knob of a DeepSeek-style decoder, validated on construction.

One flat frozen dataclass, so that `dataclasses.replace(cfg, field=value)` and absl's
`--config.field=value` both work and both re-validate. MoE fields carry their DeepSeek names
where DeepSeek defines them (`n_routed_experts`, `n_group`, `topk_group`, ...).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

AttentionKind = Literal["gqa", "mla"]
ScoreFunc = Literal["softmax", "sigmoid"]
GroupScore = Literal["top2_sum", "max"]
Dispatch = Literal["dense", "capacity", "ragged", "blocked", "auto"]

ATTENTION_KINDS = ("gqa", "mla")
SCORE_FUNCS = ("softmax", "sigmoid")
GROUP_SCORES = ("top2_sum", "max")
DISPATCH_BACKENDS = ("dense", "capacity", "ragged", "blocked", "auto")
DTYPES = ("float32", "bfloat16", "float16")
EP_EXCHANGES = ("all_to_all", "ragged_all_to_all")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer with optional MoE layers, MLA and MTP.

    Sizes follow the Hugging Face config names where one exists (in brackets).
    """

    name: str = "custom"
    # --- trunk ---
    vocab_size: int = 256
    d_model: int = 64  # [hidden_size]
    n_layers: int = 2  # [num_hidden_layers]
    d_ff: int = 128  # dense SwiGLU width [intermediate_size]
    norm_eps: float = 1e-6  # [rms_norm_eps]
    tie_embeddings: bool = False  # [tie_word_embeddings]
    max_seq_len: int = 256  # [max_position_embeddings]
    # --- attention ---
    attention: AttentionKind = "gqa"
    n_heads: int = 4  # [num_attention_heads]
    n_kv_heads: int | None = None  # GQA only; None = n_heads (MHA) [num_key_value_heads]
    head_dim: int | None = None  # GQA only; None = d_model // n_heads
    qkv_bias: bool = False  # Qwen2 [attention_bias]
    qk_norm: bool = False  # Qwen3: per-head RMSNorm of q and k before RoPE
    qk_norm_per_head: bool = True  # False: OLMoE's RMSNorm over the whole q (and k) projection
    # MLA (DeepSeek-V2 §2.1): low-rank joint KV compression + decoupled RoPE key.
    q_lora_rank: int = 0  # 0 = queries projected directly from the hidden state
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    mla_norm_eps: float | None = None  # eps of the q/kv latent RMSNorms; None = norm_eps (HF: 1e-6)
    # --- rotary embedding + YaRN (Peng et al. 2023; DeepSeek-V3 §4.3) ---
    rope_theta: float = 10000.0
    rope_scaling_factor: float = 1.0  # 1.0 = no YaRN
    rope_original_max_len: int = 4096
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_mscale: float = 1.0
    rope_mscale_all_dim: float = 0.0
    # --- mixture of experts (DeepSeekMoE; DeepSeek-V3 §2.1.2) ---
    n_routed_experts: int = 0  # 0 = every layer is a dense MLP
    n_shared_experts: int = 0
    moe_d_ff: int = 0  # width of one routed (and one shared) expert [moe_intermediate_size]
    top_k: int = 0  # [num_experts_per_tok]
    score_func: ScoreFunc = "softmax"  # [scoring_func]
    n_group: int = 1  # group-limited routing; 1 = off
    topk_group: int = 1
    group_score: GroupScore = "top2_sum"  # V3 `noaux_tc`: sum of a group's top 2; V2: "max"
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    first_k_dense: int = 0  # [first_k_dense_replace]
    moe_dispatch: Dispatch = "auto"
    capacity_factor: float = 1.25  # only for moe_dispatch="capacity"
    # Expert parallelism (a mesh with expert > 1): how token copies travel to their experts.
    ep_exchange: str = "all_to_all"  # or "ragged_all_to_all" (GPU/TPU)
    # Copies a device may send to each expert shard / fair share (both exchanges); 0 = dropless
    ep_capacity_factor: float = 0.0
    # Balancing; each term is off at 0 and they combine freely.
    router_bias_rate: float = 0.0  # γ of the auxiliary-loss-free bias update; 0 = no bias
    aux_loss_coef: float = 0.0  # Switch/GShard load-balancing loss
    seq_aux_loss_coef: float = 0.0  # DeepSeek-V3 complementary sequence-wise loss (eq. 17-20)
    router_z_loss_coef: float = 0.0  # ST-MoE router z-loss
    # --- multi-token prediction (DeepSeek-V3 §2.2) ---
    mtp_depth: int = 0  # [num_nextn_predict_layers]
    mtp_loss_weight: float = 0.3  # λ
    # --- numerics ---
    param_dtype: str = "float32"
    compute_dtype: str = "float32"

    def __post_init__(self) -> None:
        _validate(self)

    # --- derived sizes ---
    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0

    @property
    def num_kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def gqa_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def qk_head_dim(self) -> int:
        """Per-head query/key width that the softmax scale is computed from."""
        if self.attention == "mla":
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.gqa_head_dim

    @property
    def rope_dim(self) -> int:
        """Number of channels per head that RoPE rotates."""
        return self.qk_rope_head_dim if self.attention == "mla" else self.gqa_head_dim

    @property
    def attn_v_head_dim(self) -> int:
        return self.v_head_dim if self.attention == "mla" else self.gqa_head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return self.is_moe and layer >= self.first_k_dense

    @property
    def n_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.n_layers))

    @property
    def latent_norm_eps(self) -> float:
        """eps of MLA's q and kv latent RMSNorms."""
        return self.norm_eps if self.mla_norm_eps is None else self.mla_norm_eps

    @property
    def n_groups_experts(self) -> int:
        return self.n_routed_experts // self.n_group


def _fail(field: str, problem: str, fix: str) -> None:
    raise ValueError(f"ModelConfig.{field}: {problem}. Fix: {fix}.")


def _positive(cfg: ModelConfig, *fields: str) -> None:
    for field in fields:
        if getattr(cfg, field) <= 0:
            _fail(field, f"must be > 0, got {getattr(cfg, field)}", f"set {field} to a positive value")


def _validate(cfg: ModelConfig) -> None:
    _positive(cfg, "vocab_size", "d_model", "n_layers", "d_ff", "n_heads", "max_seq_len",
              "norm_eps", "rope_theta")
    if cfg.param_dtype not in DTYPES:
        _fail("param_dtype", f"unknown dtype {cfg.param_dtype!r}", f"use one of {DTYPES}")
    if cfg.compute_dtype not in DTYPES:
        _fail("compute_dtype", f"unknown dtype {cfg.compute_dtype!r}", f"use one of {DTYPES}")
    _validate_attention(cfg)
    _validate_rope(cfg)
    _validate_moe(cfg)
    if cfg.mtp_depth < 0:
        _fail("mtp_depth", f"must be >= 0, got {cfg.mtp_depth}", "use 0 to disable MTP")
    if cfg.mtp_loss_weight < 0:
        _fail("mtp_loss_weight", f"must be >= 0, got {cfg.mtp_loss_weight}", "use a weight >= 0")


def _validate_attention(cfg: ModelConfig) -> None:
    if cfg.attention not in ATTENTION_KINDS:
        _fail("attention", f"unknown kind {cfg.attention!r}", f"use one of {ATTENTION_KINDS}")
    if cfg.attention == "gqa":
        if cfg.head_dim is None and cfg.d_model % cfg.n_heads:
            _fail("head_dim", f"d_model={cfg.d_model} is not divisible by n_heads={cfg.n_heads}",
                  "set head_dim explicitly or pick n_heads dividing d_model")
        if cfg.head_dim is not None and cfg.head_dim <= 0:
            _fail("head_dim", f"must be > 0, got {cfg.head_dim}", "set head_dim > 0 or None")
        if cfg.gqa_head_dim % 2:
            _fail("head_dim", f"RoPE needs an even head dim, got {cfg.gqa_head_dim}",
                  "use an even head_dim")
        if not cfg.qk_norm_per_head and not cfg.qk_norm:
            _fail("qk_norm_per_head", "only meaningful with qk_norm=True",
                  "set qk_norm=True (OLMoE-style whole-projection norm) or leave qk_norm_per_head=True")
        if cfg.n_kv_heads is not None and (cfg.n_kv_heads <= 0 or cfg.n_heads % cfg.n_kv_heads):
            _fail("n_kv_heads", f"n_heads={cfg.n_heads} is not a multiple of n_kv_heads="
                  f"{cfg.n_kv_heads}", "pick n_kv_heads dividing n_heads")
        return
    # MLA
    if cfg.kv_lora_rank <= 0:
        _fail("kv_lora_rank", "MLA needs a KV compression rank", "set kv_lora_rank > 0 (512 in DeepSeek-V3)")
    if cfg.q_lora_rank < 0:
        _fail("q_lora_rank", f"must be >= 0, got {cfg.q_lora_rank}", "use 0 for no query compression")
    for field in ("qk_rope_head_dim", "v_head_dim"):
        if getattr(cfg, field) <= 0:
            _fail(field, "MLA needs it > 0", f"set {field} (64 / 128 in DeepSeek-V3)")
    if cfg.qk_nope_head_dim < 0:
        _fail("qk_nope_head_dim", "must be >= 0", "set qk_nope_head_dim (128 in DeepSeek-V3)")
    if cfg.qk_rope_head_dim % 2:
        _fail("qk_rope_head_dim", f"RoPE needs an even width, got {cfg.qk_rope_head_dim}",
              "use an even qk_rope_head_dim")
    if cfg.mla_norm_eps is not None and cfg.mla_norm_eps <= 0:
        _fail("mla_norm_eps", f"must be > 0, got {cfg.mla_norm_eps}", "use None (= norm_eps) or e.g. 1e-6")
    if cfg.qk_norm or cfg.qkv_bias:
        _fail("qk_norm" if cfg.qk_norm else "qkv_bias", "only defined for GQA attention",
              "set it False with attention='mla'")


def _validate_rope(cfg: ModelConfig) -> None:
    if cfg.rope_scaling_factor < 1.0:
        _fail("rope_scaling_factor", f"must be >= 1, got {cfg.rope_scaling_factor}",
              "use 1.0 for plain RoPE or the YaRN extension factor (40 in DeepSeek-V3)")
    if cfg.rope_scaling_factor > 1.0:
        _positive(cfg, "rope_original_max_len", "rope_beta_fast", "rope_beta_slow")
        if cfg.rope_beta_fast <= cfg.rope_beta_slow:
            _fail("rope_beta_fast", f"must exceed rope_beta_slow={cfg.rope_beta_slow}",
                  "use beta_fast=32, beta_slow=1 as in YaRN")


def _validate_moe(cfg: ModelConfig) -> None:
    if cfg.moe_dispatch not in DISPATCH_BACKENDS:
        _fail("moe_dispatch", f"unknown backend {cfg.moe_dispatch!r}", f"use one of {DISPATCH_BACKENDS}")
    if cfg.group_score not in GROUP_SCORES:
        _fail("group_score", f"unknown group score {cfg.group_score!r}", f"use one of {GROUP_SCORES}")
    if cfg.score_func not in SCORE_FUNCS:
        _fail("score_func", f"unknown score function {cfg.score_func!r}", f"use one of {SCORE_FUNCS}")
    if cfg.n_routed_experts < 0:
        _fail("n_routed_experts", "must be >= 0", "use 0 for a dense model")
    if not cfg.is_moe:
        if cfg.n_shared_experts or cfg.top_k:
            _fail("n_routed_experts", "is 0 (dense model) but shared experts / top_k are set",
                  "set n_routed_experts > 0, or n_shared_experts=0 and top_k=0")
        return
    if cfg.moe_d_ff <= 0:
        _fail("moe_d_ff", "MoE layers need an expert width", "set moe_d_ff > 0")
    if not 0 < cfg.top_k <= cfg.n_routed_experts:
        _fail("top_k", f"must be in [1, n_routed_experts={cfg.n_routed_experts}], got {cfg.top_k}",
              "choose top_k <= n_routed_experts")
    if cfg.n_shared_experts < 0:
        _fail("n_shared_experts", "must be >= 0", "use 0 for no shared expert")
    if cfg.n_group <= 0 or cfg.n_routed_experts % cfg.n_group:
        _fail("n_group", f"n_routed_experts={cfg.n_routed_experts} is not divisible by "
              f"n_group={cfg.n_group}", "pick n_group dividing n_routed_experts (1 = no groups)")
    if not 0 < cfg.topk_group <= cfg.n_group:
        _fail("topk_group", f"must be in [1, n_group={cfg.n_group}], got {cfg.topk_group}",
              "choose topk_group <= n_group")
    if cfg.n_group > 1 and cfg.group_score == "top2_sum" and cfg.n_groups_experts < 2:
        _fail("n_group", "group scores sum each group's top-2 experts, so groups need >= 2 experts",
              "use fewer groups")
    if cfg.top_k > cfg.topk_group * cfg.n_groups_experts:
        _fail("top_k", f"top_k={cfg.top_k} exceeds the {cfg.topk_group * cfg.n_groups_experts} "
              "experts in the eligible groups", "raise topk_group or lower top_k")
    if not 0 <= cfg.first_k_dense <= cfg.n_layers:
        _fail("first_k_dense", f"must be in [0, n_layers={cfg.n_layers}]", "lower first_k_dense")
    if cfg.capacity_factor <= 0:
        _fail("capacity_factor", "must be > 0", "use e.g. 1.25")
    if cfg.ep_exchange not in EP_EXCHANGES:
        _fail("ep_exchange", f"unknown exchange {cfg.ep_exchange!r}", f"use one of {EP_EXCHANGES}")
    if cfg.ep_capacity_factor < 0:
        _fail("ep_capacity_factor", "must be >= 0", "use 0 for a dropless exchange or e.g. 1.25")
    if cfg.routed_scaling_factor <= 0:
        _fail("routed_scaling_factor", "must be > 0", "use 1.0 for no scaling")
    for field in ("router_bias_rate", "aux_loss_coef", "seq_aux_loss_coef", "router_z_loss_coef"):
        if getattr(cfg, field) < 0 or not math.isfinite(getattr(cfg, field)):
            _fail(field, f"must be a finite value >= 0, got {getattr(cfg, field)}", "use 0 to disable")

"""Which Hugging Face tensors make which moe_jax parameters, and how their layouts differ.

One `Rule` ties a few of our parameters (flat paths such as `blocks/3/attn/w_uq`) to a few HF
tensors and converts both ways:
- `load(get)` builds *lazy* arrays for our parameters from memory-mapped HF tensors (`get(name)`):
  transposes and reshapes are numpy views, expert stacks and the RoPE permutation are read slice
  by slice, so a device shard is read without materialising the whole tensor;
- `save(ours)` computes the HF tensors from our full host arrays.

Layouts (HF `nn.Linear.weight` is `[out, in]`; ours `[in..., out...]`):
- projections are transposed, and our head axes split out of HF's flat `heads * head_dim`;
- routed experts are stacked: HF `mlp.experts.{e}.gate_proj.weight` `[F, D]` (Mixtral `w1`, with
  `w3` = up and `w2` = down) -> our `w_gate[e]` `[D, F]`; checkpoints with transformers' fused
  `experts.gate_up_proj` `[E, 2F, D]` / `experts.down_proj` `[E, D, F]` load too;
- MLA: `kv_b_proj` `[H*(nope+v), r]` splits into `w_uk` `[r, H, nope]` and `w_uv` `[r, H, v]`;
  DeepSeek rotates interleaved RoPE pairs `(2i, 2i+1)` where we rotate `(i, i+R/2)`, so the RoPE
  output columns of `q_b_proj`/`q_proj` and `kv_a_proj_with_mqa` are permuted on load (evens
  first, then odds) and back on save; q·k is unchanged because q and k move together;
- the DeepSeek-V3 selection bias `mlp.gate.e_score_correction_bias` is our `router_bias`;
- MTP depth k is `model.layers.{n_layers + k}`: `enorm`, `hnorm`, `eh_proj` (input = [embedding;
  hidden]), a full block, `shared_head.norm`; its `embed_tokens`/`shared_head.head` copies of the
  shared embedding and head are written on save and skipped on load.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from moe_jax.configs import ModelConfig
from moe_jax.interop.hf_config import HFFormat

Getter = Callable[[str], np.ndarray]


class Stack:
    """`np.stack(parts)` along a new axis 0, evaluated only for the requested slice."""

    def __init__(self, parts: Sequence):
        self.parts = list(parts)
        self.shape = (len(self.parts), *self.parts[0].shape)
        self.dtype = self.parts[0].dtype

    def __getitem__(self, index: tuple) -> np.ndarray:
        first, rest = index[0], tuple(index[1:])
        return np.stack([np.asarray(self.parts[i][rest]) for i in range(len(self.parts))[first]])


class PermuteLast:
    """`inner[..., perm]`, reading only the requested slice of the last axis."""

    def __init__(self, inner: np.ndarray, perm: np.ndarray):
        self.inner, self.perm = inner, perm
        self.shape, self.dtype = inner.shape, inner.dtype

    def __getitem__(self, index: tuple) -> np.ndarray:
        return np.asarray(self.inner[tuple(index[:-1]) + (self.perm[index[-1]],)])


Lazy = np.ndarray | Stack | PermuteLast


def read_slice(lazy: Lazy, index: tuple) -> np.ndarray:
    """The `index` (a tuple of slices, one per axis) of a lazy array, as an in-memory array."""
    index = tuple(index) + (slice(None),) * (len(lazy.shape) - len(index))
    if not index:
        return np.asarray(lazy)
    return np.asarray(lazy[index])


@dataclass
class Rule:
    ours: tuple[str, ...]
    hf: dict[str, tuple[int, ...]]  # HF tensor names -> shapes
    load: Callable[[Getter], dict[str, Lazy]] | None  # None: the HF tensors are copies, skipped
    save: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
    keep_fp32: bool = False  # HF keeps these in fp32 whatever the checkpoint dtype
    optional: bool = False  # skipped tensors need not be present
    copies: tuple[str, ...] = ()  # our parameters a skipped (copy) tensor is written from

    @property
    def save_inputs(self) -> tuple[str, ...]:
        return self.ours + self.copies


def _inverse(perm: np.ndarray) -> np.ndarray:
    return np.argsort(perm)


def linear(our: str, hf: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
           perm: np.ndarray | None = None) -> Rule:
    """HF `[prod(out), prod(in)]` <-> ours `[*in, *out]`, with an optional permutation of our
    last axis (`ours = hf_view[..., perm]`)."""
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)

    def load(get: Getter) -> dict[str, Lazy]:
        view = get(hf).T.reshape(*in_shape, *out_shape)
        return {our: view if perm is None else PermuteLast(view, perm)}

    def save(ours: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = ours[our] if perm is None else ours[our][..., _inverse(perm)]
        return {hf: x.reshape(n_in, n_out).T}

    return Rule((our,), {hf: (n_out, n_in)}, load, save)


def vector(our: str, hf: str, our_shape: tuple[int, ...], keep_fp32: bool = False,
           hf_shape: tuple[int, ...] | None = None) -> Rule:
    """Same data, reshaped (HF flattens our head axes): norm scales, biases, the embedding table."""
    hf_shape = hf_shape or (math.prod(our_shape),)

    def load(get: Getter) -> dict[str, Lazy]:
        return {our: get(hf).reshape(our_shape)}

    return Rule((our,), {hf: hf_shape}, load, lambda ours: {hf: ours[our].reshape(hf_shape)}, keep_fp32)


def copy_of(our: str, hf: str, shape: tuple[int, ...], transpose: bool = False) -> Rule:
    """An HF tensor that duplicates one of ours: written on save, skipped on load."""
    return Rule((), {hf: shape}, None, lambda ours: {hf: ours[our].T if transpose else ours[our]},
                optional=True, copies=(our,))


def zeros(our: str, shape: tuple[int, ...], why: str) -> Rule:
    """A parameter the family does not store (loaded as zeros; saving refuses anything else)."""

    def save(ours: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if np.any(ours[our] != 0):
            raise ValueError(f"{our} is not zero, but {why}. Fix: save as a family that stores it "
                             "(deepseek_v3), or reset it to zero if it does not matter")
        return {}

    return Rule((our,), {}, lambda get: {our: np.zeros(shape, np.float32)}, save)


def experts(ours: tuple[str, str, str], hf_names: Callable[[int], tuple[str, str, str]],
            e: int, d: int, f: int) -> Rule:
    """Per-expert HF (gate, up, down) `[F,D], [F,D], [D,F]` <-> our stacks `[E,D,F], [E,D,F], [E,F,D]`."""
    names = [hf_names(i) for i in range(e)]
    shapes = ((f, d), (f, d), (d, f))

    def load(get: Getter) -> dict[str, Lazy]:
        return {our: Stack([get(n[j]).T for n in names]) for j, our in enumerate(ours)}

    def save(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {n[j]: arrays[our][i].T for i, n in enumerate(names) for j, our in enumerate(ours)}

    return Rule(ours, {n[j]: shapes[j] for n in names for j in range(3)}, load, save)


def fused_experts(ours: tuple[str, str, str], gate_up: str, down: str, e: int, d: int, f: int) -> Rule:
    """transformers' in-memory layout `gate_up_proj` `[E, 2F, D]` (gate first), `down_proj`
    `[E, D, F]`. Loaded when a checkpoint stores it; we always save per-expert tensors."""

    def load(get: Getter) -> dict[str, Lazy]:
        gu = get(gate_up)
        return {ours[0]: gu[:, :f, :].transpose(0, 2, 1), ours[1]: gu[:, f:, :].transpose(0, 2, 1),
                ours[2]: get(down).transpose(0, 2, 1)}

    def save(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        gate_up_hf = np.concatenate([arrays[ours[0]], arrays[ours[1]]], axis=2).transpose(0, 2, 1)
        return {gate_up: gate_up_hf, down: arrays[ours[2]].transpose(0, 2, 1)}

    return Rule(ours, {gate_up: (e, 2 * f, d), down: (e, d, f)}, load, save)


def kv_up_projection(w_uk: str, w_uv: str, hf: str, r: int, h: int, nope: int, v: int) -> Rule:
    """MLA's `kv_b_proj` `[H*(nope+v), r]` (per head: key rows, then value rows) <-> `w_uk`, `w_uv`."""

    def load(get: Getter) -> dict[str, Lazy]:
        w = get(hf).reshape(h, nope + v, r)
        return {w_uk: w[:, :nope, :].transpose(2, 0, 1), w_uv: w[:, nope:, :].transpose(2, 0, 1)}

    def save(ours: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        w = np.concatenate([ours[w_uk].transpose(1, 2, 0), ours[w_uv].transpose(1, 2, 0)], axis=1)
        return {hf: w.reshape(h * (nope + v), r)}

    return Rule((w_uk, w_uv), {hf: (h * (nope + v), r)}, load, save)


def rope_permutation(rope_dim: int) -> np.ndarray:
    """Our half-split channel j holds HF's interleaved channel perm[j]: evens, then odds."""
    return np.concatenate([np.arange(0, rope_dim, 2), np.arange(1, rope_dim, 2)])


# --- per-family plans ---

def _attention_rules(cfg: ModelConfig, fmt: HFFormat, q: str, p: str) -> list[Rule]:
    d, h = cfg.d_model, cfg.n_heads
    if cfg.attention == "mla":
        nope, rope, r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
        q_perm = kv_perm = None
        if fmt.rope_interleave:
            q_perm = np.concatenate([np.arange(nope), nope + rope_permutation(rope)])
            kv_perm = np.concatenate([np.arange(r), r + rope_permutation(rope)])
        rules = []
        if cfg.q_lora_rank:
            rules += [linear(f"{q}/w_dq", f"{p}.q_a_proj.weight", (d,), (cfg.q_lora_rank,)),
                      vector(f"{q}/q_norm/scale", f"{p}.q_a_layernorm.weight", (cfg.q_lora_rank,)),
                      linear(f"{q}/w_uq", f"{p}.q_b_proj.weight", (cfg.q_lora_rank,), (h, nope + rope),
                             q_perm)]
        else:
            rules.append(linear(f"{q}/w_uq", f"{p}.q_proj.weight", (d,), (h, nope + rope), q_perm))
        return rules + [
            linear(f"{q}/w_dkv_kr", f"{p}.kv_a_proj_with_mqa.weight", (d,), (r + rope,), kv_perm),
            vector(f"{q}/kv_norm/scale", f"{p}.kv_a_layernorm.weight", (r,)),
            kv_up_projection(f"{q}/w_uk", f"{q}/w_uv", f"{p}.kv_b_proj.weight", r, h, nope, cfg.v_head_dim),
            linear(f"{q}/w_o", f"{p}.o_proj.weight", (h, cfg.v_head_dim), (d,))]
    g, k = cfg.num_kv_heads, cfg.gqa_head_dim
    rules = [linear(f"{q}/w_q", f"{p}.q_proj.weight", (d,), (h, k)),
             linear(f"{q}/w_k", f"{p}.k_proj.weight", (d,), (g, k)),
             linear(f"{q}/w_v", f"{p}.v_proj.weight", (d,), (g, k)),
             linear(f"{q}/w_o", f"{p}.o_proj.weight", (h, k), (d,))]
    if cfg.qkv_bias:
        rules += [vector(f"{q}/b_q", f"{p}.q_proj.bias", (h, k)),
                  vector(f"{q}/b_k", f"{p}.k_proj.bias", (g, k)),
                  vector(f"{q}/b_v", f"{p}.v_proj.bias", (g, k))]
    if cfg.qk_norm:
        q_dim, k_dim = (k, k) if cfg.qk_norm_per_head else (h * k, g * k)
        rules += [vector(f"{q}/q_norm/scale", f"{p}.q_norm.weight", (q_dim,)),
                  vector(f"{q}/k_norm/scale", f"{p}.k_norm.weight", (k_dim,))]
    return rules


def _mlp_rules(q: str, p: str, d: int, f: int) -> list[Rule]:
    return [linear(f"{q}/w_gate", f"{p}.gate_proj.weight", (d,), (f,)),
            linear(f"{q}/w_up", f"{p}.up_proj.weight", (d,), (f,)),
            linear(f"{q}/w_down", f"{p}.down_proj.weight", (f,), (d,))]


def _moe_rules(cfg: ModelConfig, fmt: HFFormat, q: str, p: str, names: set[str] | None) -> list[Rule]:
    d, e, f = cfg.d_model, cfg.n_routed_experts, cfg.moe_d_ff
    moe = f"{p}.block_sparse_moe" if fmt.family == "mixtral" else f"{p}.mlp"
    ours = (f"{q}/w_gate", f"{q}/w_up", f"{q}/w_down")
    fused_moe = f"{p}.mlp"  # transformers' fused layout (Mixtral's block_sparse_moe renamed to mlp)
    if names is not None and f"{fused_moe}.experts.gate_up_proj" in names:
        moe = fused_moe
        expert_rule = fused_experts(ours, f"{moe}.experts.gate_up_proj", f"{moe}.experts.down_proj", e, d, f)
    elif fmt.family == "mixtral":
        expert_rule = experts(ours, lambda i: tuple(f"{moe}.experts.{i}.{w}.weight"
                                                    for w in ("w1", "w3", "w2")), e, d, f)
    else:
        expert_rule = experts(ours, lambda i: tuple(f"{moe}.experts.{i}.{w}_proj.weight"
                                                    for w in ("gate", "up", "down")), e, d, f)
    rules = [linear(f"{q}/w_router", f"{moe}.gate.weight", (d,), (e,)), expert_rule]
    if fmt.family == "deepseek_v3":
        rules.append(vector(f"{q}/router_bias", f"{moe}.gate.e_score_correction_bias", (e,), keep_fp32=True))
    else:
        rules.append(zeros(f"{q}/router_bias", (e,),
                           f"{fmt.family} checkpoints have no expert selection bias"))
    if cfg.n_shared_experts:
        rules += _mlp_rules(f"{q}/shared", f"{moe}.shared_experts", d, cfg.n_shared_experts * f)
    return rules


def _block_rules(cfg: ModelConfig, fmt: HFFormat, q: str, p: str, moe: bool, names: set[str] | None
                 ) -> list[Rule]:
    rules = [vector(f"{q}/attn_norm/scale", f"{p}.input_layernorm.weight", (cfg.d_model,)),
             vector(f"{q}/ffn_norm/scale", f"{p}.post_attention_layernorm.weight", (cfg.d_model,))]
    rules += _attention_rules(cfg, fmt, f"{q}/attn", f"{p}.self_attn")
    if moe:
        return rules + _moe_rules(cfg, fmt, f"{q}/ffn", p, names)
    return rules + _mlp_rules(f"{q}/ffn", f"{p}.mlp", cfg.d_model, cfg.d_ff)


def tensor_rules(cfg: ModelConfig, fmt: HFFormat, names: set[str] | None = None) -> list[Rule]:
    """Every rule of a model, in checkpoint order. `names` (the checkpoint's tensors, on load)
    picks between per-expert and fused expert layouts; saving writes per-expert tensors."""
    d, v = cfg.d_model, cfg.vocab_size
    rules = [vector("embed/table", "model.embed_tokens.weight", (v, d), hf_shape=(v, d))]
    for i in range(cfg.n_layers):
        rules += _block_rules(cfg, fmt, f"blocks/{i}", f"model.layers.{i}", cfg.is_moe_layer(i), names)
    rules.append(vector("final_norm/scale", "model.norm.weight", (d,)))
    if cfg.tie_embeddings:
        if names is not None and "lm_head.weight" in names:  # some tied checkpoints store a copy
            rules.append(Rule((), {"lm_head.weight": (v, d)}, None, lambda ours: {}, optional=True))
    else:
        rules.append(linear("head", "lm_head.weight", (d,), (v,)))
    for k in range(cfg.mtp_depth):
        q, p = f"mtp/{k}", f"model.layers.{cfg.n_layers + k}"
        rules += [vector(f"{q}/embed_norm/scale", f"{p}.enorm.weight", (d,)),
                  vector(f"{q}/hidden_norm/scale", f"{p}.hnorm.weight", (d,)),
                  linear(f"{q}/proj/kernel", f"{p}.eh_proj.weight", (2 * d,), (d,))]
        rules += _block_rules(cfg, fmt, f"{q}/block", p, cfg.is_moe, names)
        rules += [vector(f"{q}/final_norm/scale", f"{p}.shared_head.norm.weight", (d,)),
                  copy_of("embed/table", f"{p}.embed_tokens.weight", (v, d)),
                  copy_of("embed/table" if cfg.tie_embeddings else "head", f"{p}.shared_head.head.weight",
                          (v, d), transpose=not cfg.tie_embeddings)]
    return rules


def is_ignorable(name: str) -> bool:
    """Tensors some checkpoints carry that are recomputed, never learned."""
    return name.endswith("rotary_emb.inv_freq")

"""Independent float64 numpy references: written from the papers' equations with explicit loops,
sharing no code with `moe_jax` (only the parameter arrays are read from the modules)."""

from __future__ import annotations

import math

import numpy as np


def rms_norm(x, scale, eps):
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * np.asarray(scale, np.float64)


def silu(x):
    return x / (1.0 + np.exp(-x))


def swiglu(x, w_gate, w_up, w_down):
    return (silu(x @ w_gate) * (x @ w_up)) @ w_down


def rope_frequencies(dim, base, factor=1.0, original_max_len=4096, beta_fast=32.0, beta_slow=1.0):
    """Per-pair frequency θ_i, YaRN-blended (Peng et al. 2023, §3.2 'NTK-by-parts') pair by pair."""
    freqs = []
    for i in range(dim // 2):
        theta = base ** (-2.0 * i / dim)
        if factor <= 1.0:
            freqs.append(theta)
            continue

        def dim_for(rotations):
            return dim * math.log(original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(dim_for(beta_fast)), 0)
        high = min(math.ceil(dim_for(beta_slow)), dim - 1)
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        freqs.append(theta / factor * ramp + theta * (1.0 - ramp))
    return np.array(freqs)


def rotate(vec, position, freqs, scale=1.0):
    """RoPE on one head vector, pairing channel i with i + d/2."""
    vec = np.asarray(vec, np.float64)
    half = vec.shape[-1] // 2
    out = np.empty_like(vec)
    for i in range(half):
        c, s = math.cos(position * freqs[i]) * scale, math.sin(position * freqs[i]) * scale
        out[i] = vec[i] * c - vec[i + half] * s
        out[i + half] = vec[i + half] * c + vec[i] * s
    return out


def visible(segments, t, s):
    """Causal, same non-padding segment."""
    return s <= t and segments[s] != 0 and segments[s] == segments[t]


def attend(q_list, k_list, v_list, segments, scale):
    """Loop attention for one head: q_list[t], k_list[s], v_list[s] -> out[t]."""
    out = []
    for t in range(len(q_list)):
        keys = [s for s in range(len(k_list)) if visible(segments, t, s)] or list(range(len(k_list)))
        logits = np.array([q_list[t] @ k_list[s] * scale for s in keys])
        p = np.exp(logits - logits.max())
        p /= p.sum()
        out.append(sum(pi * v_list[s] for pi, s in zip(p, keys)))
    return np.stack(out)


def gqa_layer(x_TxD, w_q, w_k, w_v, w_o, positions, segments, freqs, b_q=None, b_k=None, b_v=None,
              q_norm=None, k_norm=None, eps=1e-6):
    """One sequence through grouped-query attention, head by head."""
    x = np.asarray(x_TxD, np.float64)
    n_heads, n_kv, head_dim = w_q.shape[1], w_k.shape[1], w_q.shape[2]
    out = np.zeros((x.shape[0], n_heads, head_dim))
    for h in range(n_heads):
        g = h // (n_heads // n_kv)
        qs, ks, vs = [], [], []
        for t in range(x.shape[0]):
            q, k, v = x[t] @ w_q[:, h], x[t] @ w_k[:, g], x[t] @ w_v[:, g]
            if b_q is not None:
                q, k, v = q + b_q[h], k + b_k[g], v + b_v[g]
            if q_norm is not None:
                q, k = rms_norm(q, q_norm, eps), rms_norm(k, k_norm, eps)
            qs.append(rotate(q, positions[t], freqs))
            ks.append(rotate(k, positions[t], freqs))
            vs.append(v)
        out[:, h] = attend(qs, ks, vs, segments, head_dim ** -0.5)
    return np.einsum("thk,hkd->td", out, w_o)


def mla_layer(x_TxD, p, positions, segments, freqs, scale, eps, rope_scale=1.0):
    """One sequence through MLA (DeepSeek-V2 eq. 9-19), with explicit per-head keys and values."""
    x = np.asarray(x_TxD, np.float64)
    n_heads, nope = p["w_uk"].shape[1], p["w_uk"].shape[2]
    out = []
    c_q = rms_norm(x @ p["w_dq"], p["q_norm"], eps) if "w_dq" in p else x
    q_all = np.einsum("tc,chq->thq", c_q, p["w_uq"])
    c_kr = x @ p["w_dkv_kr"]
    r = p["w_uk"].shape[0]
    c_kv = rms_norm(c_kr[:, :r], p["kv_norm"], eps)
    k_rope = [rotate(c_kr[t, r:], positions[t], freqs, rope_scale) for t in range(len(x))]
    for h in range(n_heads):
        qs = [np.concatenate([q_all[t, h, :nope], rotate(q_all[t, h, nope:], positions[t], freqs,
                                                         rope_scale)]) for t in range(len(x))]
        ks = [np.concatenate([c_kv[t] @ p["w_uk"][:, h], k_rope[t]]) for t in range(len(x))]
        vs = [c_kv[t] @ p["w_uv"][:, h] for t in range(len(x))]
        out.append(attend(qs, ks, vs, segments, scale))
    return np.einsum("htv,hvd->td", np.stack(out), p["w_o"])


def moe_layer(x_NxD, w_router, bias, w_gate, w_up, w_down, *, top_k, score_func, n_group,
              topk_group, norm_topk_prob, routed_scaling_factor, shared=None):
    """DeepSeek-V3 eq. 12-16 token by token: returns (y_NxD, chosen experts per token)."""
    x = np.asarray(x_NxD, np.float64)
    n_experts = w_router.shape[1]
    per_group = n_experts // n_group
    ys, chosen = [], []
    for x_t in x:
        logits = x_t @ w_router
        if score_func == "sigmoid":
            s = 1 / (1 + np.exp(-logits))
        else:
            s = np.exp(logits - logits.max())
            s /= s.sum()
        choice = s + bias
        group_score = [sorted(choice[g * per_group:(g + 1) * per_group])[-2:] for g in range(n_group)]
        group_score = [sum(v) for v in group_score] if n_group > 1 else [0.0]
        groups = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group] if n_group > 1 else [0]
        eligible = [e for e in range(n_experts) if n_group == 1 or e // per_group in groups]
        experts = sorted(eligible, key=lambda e: -choice[e])[:top_k]
        g = np.array([s[e] for e in experts])
        if norm_topk_prob:
            g = g / g.sum()
        g = g * routed_scaling_factor
        y = sum(gi * swiglu(x_t, w_gate[e], w_up[e], w_down[e]) for gi, e in zip(g, experts))
        if shared is not None:
            y = y + swiglu(x_t, *shared)
        ys.append(y)
        chosen.append(experts)
    return np.stack(ys), chosen

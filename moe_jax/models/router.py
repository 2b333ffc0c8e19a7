"""The MoE router: gate, balancing losses, router statistics and the loss-free bias update.

Pure functions, one per equation, so each can be held against its paper:
- `route`: DeepSeek-V3 eq. 12-16 (with the selection bias of §2.1.2) and group-limited routing
  (DeepSeek-V3's `noaux_tc`: a group scores as the sum of its top-2 experts; DeepSeek-V2 §3.2.1
  `group_limited_greedy`: as its best expert).
- `switch_balance_loss`: Switch Transformer eq. 4 (Fedus et al. 2021) / GShard.
- `sequence_balance_loss`: DeepSeek-V3's complementary sequence-wise loss, eq. 17-20.
- `router_z_loss`: ST-MoE eq. 5 (Zoph et al. 2022).
- `loss_free_bias_update`: DeepSeek-V3 §2.1.2, `b_i += γ · sign(mean_load − load_i)`.

Padding tokens (mask False) are routed like any other token but count in no loss or statistic.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.configs import ModelConfig


def router_scores(logits_NxE: jax.Array, score_func: str) -> jax.Array:
    """Affinities `s_{i,t}`: softmax over experts (V2, Mixtral, Qwen) or per-expert sigmoid (V3)."""
    logits = logits_NxE.astype(jnp.float32)
    return jax.nn.sigmoid(logits) if score_func == "sigmoid" else jax.nn.softmax(logits, axis=-1)


def _limit_to_top_groups(choice_NxE: jax.Array, n_group: int, topk_group: int,
                         group_score: str = "top2_sum") -> jax.Array:
    """Keep only experts in the `topk_group` best groups; a group scores the sum of its top-2
    experts (V3's `noaux_tc`) or its best expert (`max`, V2's `group_limited_greedy`)."""
    n, e = choice_NxE.shape
    grouped_NxGxM = choice_NxE.reshape(n, n_group, e // n_group)
    if group_score == "max":
        group_score_NxG = grouped_NxGxM.max(-1)
    elif e // n_group <= 2:  # the top-2 of a group of two is all of it (and no sort: 0.6 ms on CPU)
        group_score_NxG = grouped_NxGxM.sum(-1)
    else:
        group_score_NxG = jax.lax.top_k(grouped_NxGxM, 2)[0].sum(-1)
    _, top_groups_NxK = jax.lax.top_k(group_score_NxG, topk_group)
    keep_NxG = jnp.zeros((n, n_group), bool).at[jnp.arange(n)[:, None], top_groups_NxK].set(True)
    return jnp.where(keep_NxG[:, :, None], grouped_NxGxM, -jnp.inf).reshape(n, e)


def route(logits_NxE: jax.Array, bias_E: jax.Array | None, cfg: ModelConfig
          ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Choose top-k experts per token and their gate values g_{i,t} (DeepSeek-V3 eq. 12-16).

    The bias (aux-loss-free balancing) only shifts *which* experts are chosen; the gate values
    come from the unbiased scores. Returns `(expert_idx_NxK int32, weights_NxK fp32, scores_NxE)`.
    """
    scores_NxE = router_scores(logits_NxE, cfg.score_func)
    choice_NxE = scores_NxE if bias_E is None else scores_NxE + jax.lax.stop_gradient(bias_E)
    if cfg.n_group > 1:
        choice_NxE = _limit_to_top_groups(choice_NxE, cfg.n_group, cfg.topk_group, cfg.group_score)
    _, expert_idx_NxK = jax.lax.top_k(choice_NxE, cfg.top_k)
    return expert_idx_NxK.astype(jnp.int32), gate_weights(scores_NxE, expert_idx_NxK, cfg), scores_NxE


def gate_weights(scores_NxE: jax.Array, expert_idx_NxK: jax.Array, cfg: ModelConfig) -> jax.Array:
    """The gate values g_{i,t} of the chosen experts (V3 eq. 13): their unbiased scores,
    normalised over the top-k if `norm_topk_prob`, times `routed_scaling_factor`."""
    weights_NxK = jnp.take_along_axis(scores_NxE, expert_idx_NxK, axis=-1)
    if cfg.norm_topk_prob:
        weights_NxK = weights_NxK / (weights_NxK.sum(-1, keepdims=True) + 1e-20)
    return weights_NxK * cfg.routed_scaling_factor


def expert_counts(expert_idx_NxK: jax.Array, mask_N: jax.Array, n_experts: int) -> jax.Array:
    """Tokens routed to each expert (`[E]`, fp32), counting valid tokens only."""
    one_hot_NxKxE = jax.nn.one_hot(expert_idx_NxK, n_experts, dtype=jnp.float32)
    return jnp.einsum("nke,n->e", one_hot_NxKxE, mask_N.astype(jnp.float32))


def _normalized(scores_NxE: jax.Array) -> jax.Array:
    """`s'_{i,t} = s_{i,t} / Σ_j s_{j,t}` (V3 eq. 19); the identity for softmax scores."""
    return scores_NxE / scores_NxE.sum(-1, keepdims=True)


def switch_balance_loss(scores_NxE: jax.Array, expert_idx_NxK: jax.Array, mask_N: jax.Array
                        ) -> jax.Array:
    """`Σ_i f_i P_i` with `f_i = E/(K N) · count_i` and `P_i = mean_t s'_{i,t}` over the batch."""
    n_experts, top_k = scores_NxE.shape[-1], expert_idx_NxK.shape[-1]
    mask = mask_N.astype(jnp.float32)
    n_valid = jnp.maximum(mask.sum(), 1.0)
    f_E = expert_counts(expert_idx_NxK, mask_N, n_experts) * n_experts / (top_k * n_valid)
    p_E = (_normalized(scores_NxE) * mask[:, None]).sum(0) / n_valid
    return jnp.sum(f_E * p_E)


def sequence_balance_loss(scores_BxTxE: jax.Array, expert_idx_BxTxK: jax.Array,
                          mask_BxT: jax.Array) -> jax.Array:
    """DeepSeek-V3 eq. 17-20: the Switch loss computed within each sequence, averaged over
    sequences (rows with no valid token are left out)."""
    per_row = jax.vmap(switch_balance_loss)(scores_BxTxE, expert_idx_BxTxK, mask_BxT)
    has_tokens_B = mask_BxT.any(-1).astype(jnp.float32)
    return jnp.sum(per_row * has_tokens_B) / jnp.maximum(has_tokens_B.sum(), 1.0)


def router_z_loss(logits_NxE: jax.Array, mask_N: jax.Array) -> jax.Array:
    """`mean_t (log Σ_i exp x_{i,t})^2` (ST-MoE eq. 5): keeps router logits small."""
    lse_N = jax.nn.logsumexp(logits_NxE.astype(jnp.float32), axis=-1)
    mask = mask_N.astype(jnp.float32)
    return jnp.sum(lse_N**2 * mask) / jnp.maximum(mask.sum(), 1.0)


def max_violation(load_E: jax.Array) -> jax.Array:
    """MaxVio = (max_i load_i − mean load) / mean load (DeepSeek, Wang et al. 2024)."""
    mean = jnp.mean(load_E)
    return (jnp.max(load_E) - mean) / jnp.maximum(mean, 1e-9)


def router_entropy(scores_NxE: jax.Array, mask_N: jax.Array) -> jax.Array:
    """Mean over valid tokens of the entropy of the normalised router distribution (nats)."""
    p = _normalized(scores_NxE)
    entropy_N = -jnp.sum(p * jnp.log(jnp.maximum(p, 1e-20)), axis=-1)
    mask = mask_N.astype(jnp.float32)
    return jnp.sum(entropy_N * mask) / jnp.maximum(mask.sum(), 1.0)


def loss_free_bias_update(bias_E: jax.Array, load_E: jax.Array, rate: float) -> jax.Array:
    """Auxiliary-loss-free balancing (DeepSeek-V3 §2.1.2): raise the bias of under-loaded experts
    and lower it for over-loaded ones by a fixed step γ."""
    return bias_E + rate * jnp.sign(jnp.mean(load_E) - load_E)

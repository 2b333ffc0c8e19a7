"""The maths of GRPO and its published variants as pure functions: group advantages, the clipped
surrogate of every loss type (token- or sequence-level ratios, optional k3 KL), DAPO's overlong
reward shaping, truncation masking and the zero-variance groups of dynamic sampling.

Shapes: B completions (rows `[g·G, (g+1)·G)` are the G samples of prompt g), T completion tokens.
`logp_BxT` etc. are per-token log-probabilities of the sampled tokens; `mask_BxT` marks the
tokens that count (1) and padding / masked-out completions (0).

Papers, for holding the code against the equations:
- GRPO: Shao et al. 2024, "DeepSeekMath", eq. 3 (objective) and §4.1.2 (outcome supervision:
  A_i = (r_i − mean(r)) / std(r)); the KL estimator is their eq. 4 (Schulman's k3).
- DAPO: Yu et al. 2025, eq. 8 (clip-higher ε_low/ε_high and the token-level sum over the whole
  batch), eq. 13 (soft overlong punishment), §3.2 (dynamic sampling).
- Dr. GRPO: Liu et al. 2025, "Understanding R1-Zero-Like Training", §3.1 (drop the 1/|o_i|
  length normaliser and the std division of the advantage).
- GSPO: Zheng et al. 2025, "Group Sequence Policy Optimization", eq. 5-7 (sequence-level ratio
  s_i = (π_θ(y_i)/π_old(y_i))^(1/|y_i|)) and §4.3 (GSPO-token).
Names and conventions follow Hugging Face TRL's `GRPOTrainer`, so metrics read the same.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
ADVANTAGE_SCALES = ("group", "batch", "none")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence", "sequence_token")


def _groups(x_B: jax.Array, group_size: int) -> jax.Array:
    """`[B] -> [B/G, G]`, rows `[g·G, (g+1)·G)` forming group g."""
    if group_size < 1 or x_B.ndim != 1 or x_B.shape[0] % group_size:
        raise ValueError(f"need a 1-D array whose length is a multiple of group_size={group_size}, "
                         f"got shape {x_B.shape}")
    return x_B.reshape(-1, group_size)


def group_advantages(rewards_B: jax.Array, group_size: int, scale: str = "group",
                     eps: float = 1e-4) -> jax.Array:
    """Group-relative advantages `[B]` (DeepSeekMath §4.1.2; one scalar per completion).

        A_i = r_i − mean_{j∈g(i)} r_j                       scale="none"  (Dr. GRPO)
        A_i = (r_i − mean_{g(i)} r) / (std_{g(i)}(r) + eps)  scale="group" (GRPO)
        A_i = (r_i − mean_{g(i)} r) / (std_batch(r) + eps)   scale="batch" (TRL's "batch")

    std uses Bessel's correction (ddof=1), as torch's default std in TRL does, so `group_size`
    (or B for "batch") must be >= 2. A group whose rewards are all equal gets A = 0.
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"unknown scale {scale!r}; use one of {ADVANTAGE_SCALES}")
    rewards_B = jnp.asarray(rewards_B)
    if not jnp.issubdtype(rewards_B.dtype, jnp.floating):
        rewards_B = rewards_B.astype(jnp.float32)
    rewards_GxS = _groups(rewards_B, group_size)
    centred_B = (rewards_GxS - rewards_GxS.mean(axis=1, keepdims=True)).reshape(-1)
    if scale == "none":
        return centred_B
    if scale == "group":
        if group_size < 2:
            raise ValueError("scale='group' needs group_size >= 2 (std with ddof=1)")
        std_B = jnp.repeat(rewards_GxS.std(axis=1, ddof=1), group_size)
    else:
        if rewards_B.shape[0] < 2:
            raise ValueError("scale='batch' needs at least 2 rewards (std with ddof=1)")
        std_B = rewards_B.std(ddof=1)
    return centred_B / (std_B + eps)


def zero_std_groups(rewards_B: jax.Array, group_size: int) -> jax.Array:
    """`bool[B/G]`: groups whose rewards are all equal, so every advantage is 0 and the group
    carries no learning signal (DAPO §3.2 dynamic sampling drops them; TRL logs their fraction
    as `frac_reward_zero_std`)."""
    rewards_GxS = _groups(jnp.asarray(rewards_B), group_size)
    return rewards_GxS.max(axis=1) == rewards_GxS.min(axis=1)


def overlong_penalty(lengths_B: jax.Array, max_len: int, cache_len: int) -> jax.Array:
    """DAPO eq. 13, the soft overlong punishment added to the reward `[B]` (float32):

        0                                  if |y| <= L_max − L_cache
        ((L_max − L_cache) − |y|) / L_cache  if L_max − L_cache < |y| <= L_max
        −1                                 if |y| > L_max

    with L_max = `max_len` (the generation budget) and L_cache = `cache_len` (the punishment
    interval; 0 switches the linear ramp off, leaving only −1 beyond L_max).
    """
    if not 0 <= cache_len <= max_len:
        raise ValueError(f"need 0 <= cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}")
    lengths_B = jnp.asarray(lengths_B).astype(jnp.float32)
    start = max_len - cache_len
    ramp_B = (start - lengths_B) / max(cache_len, 1)
    return jnp.where(lengths_B > max_len, -1.0,
                     jnp.where(lengths_B > start, ramp_B, 0.0)).astype(jnp.float32)


def mask_truncated(mask_BxT: jax.Array, truncated_B: jax.Array) -> jax.Array:
    """DAPO's overlong filtering (TRL `mask_truncated_completions`): completions that hit the length
    budget without a stop token contribute no tokens to the loss. Keeps the mask's dtype."""
    mask_BxT = jnp.asarray(mask_BxT)
    keep_Bx1 = jnp.logical_not(jnp.asarray(truncated_B, bool))[:, None]
    return jnp.where(keep_Bx1, mask_BxT, jnp.zeros_like(mask_BxT))


def k3_kl(logp_BxT: jax.Array, ref_logp_BxT: jax.Array) -> jax.Array:
    """Per-token k3 estimator of KL(π_θ || π_ref) (DeepSeekMath eq. 4), >= 0:
    exp(ref − logp) − (ref − logp) − 1."""
    delta_BxT = ref_logp_BxT - logp_BxT
    return jnp.exp(delta_BxT) - delta_BxT - 1.0


def policy_loss(logp_BxT: jax.Array, old_logp_BxT: jax.Array, advantages_B: jax.Array,
                mask_BxT: jax.Array, *, loss_type: str, epsilon: float = 0.2,
                epsilon_high: float | None = None, beta: float = 0.0,
                ref_logp_BxT: jax.Array | None = None, importance_sampling_level: str = "token",
                max_completion_length: int | None = None, normalizer: jax.Array | float | None = None,
                entropy_BxT: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The clipped surrogate loss to minimise and its metrics (DeepSeekMath eq. 3 and its variants).

    Ratio (gradients flow through `logp_BxT` only; old/ref log-probs are constants):
    - level "token" (GRPO/DAPO):  r_{i,t} = exp(logp_{i,t} − old_{i,t}).
    - level "sequence" (GSPO eq. 7): s_i = exp(Σ_t m_{i,t}(logp − old)_{i,t} / Σ_t m_{i,t}), the
      geometric mean of the token ratios, the same for every token of sequence i. Gradients flow
      through the mean into every token, ∇s_i = s_i · (1/|y_i|) Σ_t ∇logp_{i,t} (GSPO eq. 10), as
      TRL's `importance_sampling_level="sequence"` (`log_importance_weights = seq_level_log_weights`,
      no detach) does.
    - level "sequence_token" (GSPO-token, §4.3): r_{i,t} = sg[s_i] · π_{i,t}/sg[π_{i,t}], i.e. the
      log-ratio logp − sg(logp) + sg(log s_i): the value of s_i with a per-token gradient (TRL's
      "sequence_token"). Equal to "sequence" in value, and in gradient when A_i is the same for
      every token, as it is here; kept for parity with TRL and per-token advantages later.

    Per token, with ε_low = `epsilon`, ε_high = `epsilon_high` (default ε_low; DAPO clip-higher):
        l_{i,t} = −min(r·A_i, clip(r, 1 − ε_low, 1 + ε_high)·A_i)
                  + β·(exp(ref − logp) − (ref − logp) − 1)          (k3 KL, only when β > 0)

    Aggregation over the counted tokens m:
    - "grpo" (DeepSeekMath eq. 3): (1/B) Σ_i [Σ_t l·m / max(Σ_t m, 1)]. With level "sequence" this is
      GSPO's eq. 5 (TRL's recommended GSPO setting).
    - "bnpo": Σ l·m / max(Σ m, 1) over this (local) batch.
    - "dapo" (DAPO eq. 8): Σ l·m / `normalizer`, where the normaliser must be the token count of the
      *whole generation batch* (all devices, all microbatches / accumulation steps), so every token
      weighs the same in the update however the batch is split. The caller passes it (e.g. the
      global Σm divided by the number of microbatches when the microbatch losses are summed, or
      the global Σm itself when they are averaged, as in TRL's `num_items_in_batch`). Without
      one it falls back to the local max(Σm, 1), i.e. "bnpo".
    - "dr_grpo" (Dr. GRPO §3.1): Σ l·m / (B · max_completion_length), the length defaulting to T.

    Metrics (TRL's names; means over counted tokens m, computed without gradient):
    - `clip_ratio/low_mean`: r < 1 − ε_low and A < 0 (the clip binds from below);
      `clip_ratio/high_mean`: r > 1 + ε_high and A > 0; `clip_ratio/region_mean`: either. At the
      sequence levels, where the ratio is one per sequence, these are fractions of the sequences
      that have counted tokens (TRL takes the mean over the [B, 1] ratios).
    - `kl`: mean k3 over counted tokens, whenever `ref_logp_BxT` is given.
    - `entropy`: mean of `entropy_BxT` over counted tokens, when given.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; use one of {LOSS_TYPES}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(f"unknown importance_sampling_level {importance_sampling_level!r}; "
                         f"use one of {IMPORTANCE_SAMPLING_LEVELS}")
    if beta > 0 and ref_logp_BxT is None:
        raise ValueError("beta > 0 needs ref_logp_BxT (the reference policy's log-probs)")
    if normalizer is not None and loss_type != "dapo":
        raise ValueError(f"normalizer is the 'dapo' loss's global token count; loss_type={loss_type!r}")
    epsilon_low = epsilon
    epsilon_high = epsilon if epsilon_high is None else epsilon_high

    dtype = logp_BxT.dtype
    m_BxT = jnp.asarray(mask_BxT).astype(dtype)
    counted_BxT = m_BxT > 0
    tokens_B = m_BxT.sum(axis=1)
    advantages_Bx1 = jnp.asarray(advantages_B).astype(dtype)[:, None]
    # Padding may hold any log-prob (even -inf): keep it out of exp() so 0·inf never makes a NaN.
    log_ratio_BxT = jnp.where(counted_BxT, logp_BxT - old_logp_BxT, 0.0)

    if importance_sampling_level == "token":
        log_weight_BxT = log_ratio_BxT
    else:
        seq_log_ratio_Bx1 = ((log_ratio_BxT * m_BxT).sum(axis=1) / jnp.maximum(tokens_B, 1.0))[:, None]
        if importance_sampling_level == "sequence":
            log_weight_BxT = jnp.broadcast_to(seq_log_ratio_Bx1, logp_BxT.shape)
        else:
            sg = jax.lax.stop_gradient
            log_weight_BxT = jnp.where(counted_BxT, logp_BxT - sg(logp_BxT), 0.0) + sg(seq_log_ratio_Bx1)
    ratio_BxT = jnp.exp(log_weight_BxT)
    clipped_BxT = jnp.clip(ratio_BxT, 1.0 - epsilon_low, 1.0 + epsilon_high)
    loss_BxT = -jnp.minimum(ratio_BxT * advantages_Bx1, clipped_BxT * advantages_Bx1)

    kl_BxT = None
    if ref_logp_BxT is not None:
        kl_BxT = k3_kl(jnp.where(counted_BxT, logp_BxT, 0.0),
                       jnp.where(counted_BxT, jnp.asarray(ref_logp_BxT).astype(dtype), 0.0))
        if beta > 0:
            loss_BxT = loss_BxT + beta * kl_BxT

    masked_BxT = loss_BxT * m_BxT
    if loss_type == "grpo":
        loss = (masked_BxT.sum(axis=1) / jnp.maximum(tokens_B, 1.0)).mean()
    elif loss_type == "bnpo" or (loss_type == "dapo" and normalizer is None):
        loss = masked_BxT.sum() / jnp.maximum(tokens_B.sum(), 1.0)
    elif loss_type == "dapo":
        loss = masked_BxT.sum() / jnp.asarray(normalizer, dtype)
    else:  # dr_grpo
        length = logp_BxT.shape[1] if max_completion_length is None else max_completion_length
        loss = masked_BxT.sum() / (logp_BxT.shape[0] * length)

    return loss, _metrics(jax.lax.stop_gradient(ratio_BxT), advantages_Bx1, m_BxT, epsilon_low, epsilon_high,
                          sequence_level=importance_sampling_level != "token",
                          kl_BxT=None if kl_BxT is None else jax.lax.stop_gradient(kl_BxT),
                          entropy_BxT=entropy_BxT)


def _metrics(ratio_BxT, advantages_Bx1, m_BxT, epsilon_low, epsilon_high, *, sequence_level, kl_BxT,
             entropy_BxT) -> dict[str, jax.Array]:
    def token_mean(x_BxT):
        return (x_BxT * m_BxT).sum() / jnp.maximum(m_BxT.sum(), 1.0)

    def clip_mean(flag_BxT):
        if not sequence_level:
            return token_mean(flag_BxT.astype(m_BxT.dtype))
        has_tokens_B = m_BxT.sum(axis=1) > 0  # one ratio per sequence: count sequences, not tokens
        return (flag_BxT[:, 0] & has_tokens_B).sum() / jnp.maximum(has_tokens_B.sum(), 1)

    low_BxT = (ratio_BxT < 1.0 - epsilon_low) & (advantages_Bx1 < 0)
    high_BxT = (ratio_BxT > 1.0 + epsilon_high) & (advantages_Bx1 > 0)
    metrics = {"clip_ratio/low_mean": clip_mean(low_BxT), "clip_ratio/high_mean": clip_mean(high_BxT),
               "clip_ratio/region_mean": clip_mean(low_BxT | high_BxT)}
    metrics = {name: value.astype(m_BxT.dtype) for name, value in metrics.items()}
    if kl_BxT is not None:
        metrics["kl"] = token_mean(kl_BxT)
    if entropy_BxT is not None:
        metrics["entropy"] = token_mean(jax.lax.stop_gradient(jnp.asarray(entropy_BxT)).astype(m_BxT.dtype))
    return metrics

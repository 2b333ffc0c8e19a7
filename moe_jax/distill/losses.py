"""The generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024, "On-Policy Distillation of
Language Models", eq. 1), with Hugging Face TRL's conventions, per token and averaged over the
tokens a mask keeps:

    p_T = softmax(teacher / τ),  p_S = softmax(student / τ)
    β = 0:  KL(p_T ‖ p_S)                       (forward KL: the student covers the teacher's modes)
    β = 1:  KL(p_S ‖ p_T)                       (reverse KL: mode seeking)
    else:   β · KL(p_T ‖ M) + (1 − β) · KL(p_S ‖ M),   M = β · p_T + (1 − β) · p_S

A teacher's logits can be cached once as their top-k (ids and log-probs): `topk_generalized_jsd`
then computes the same divergence on the top-k support, with both distributions renormalised over
those k ids (the student's mass outside them gets no gradient). With k = V it is the full
divergence; applying τ to cached log-probs and renormalising is exactly the tempered teacher
restricted to its top k (log_softmax(z/τ) and log_softmax(z)/τ differ by a constant per token).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _divergence_BxT(student_logp_BxTxV: jax.Array, teacher_logp_BxTxV: jax.Array, beta: float) -> jax.Array:
    """Per-token generalized JSD of two log-distributions over the last axis."""

    def kl_BxT(p_logp: jax.Array, q_logp: jax.Array) -> jax.Array:
        """KL(p ‖ q) with 0·log 0 = 0 where p has no mass (e.g. -inf logits of a masked vocabulary);
        the masked branch is fed zeros so that its gradient is 0, not NaN."""
        support = p_logp > -jnp.inf
        safe_p, safe_q = jnp.where(support, p_logp, 0.0), jnp.where(support, q_logp, 0.0)
        return jnp.sum(jnp.where(support, jnp.exp(safe_p) * (safe_p - safe_q), 0.0), axis=-1)

    if beta == 0:
        return kl_BxT(teacher_logp_BxTxV, student_logp_BxTxV)
    if beta == 1:
        return kl_BxT(student_logp_BxTxV, teacher_logp_BxTxV)
    mixture_logp = jnp.logaddexp(teacher_logp_BxTxV + jnp.log(beta), student_logp_BxTxV + jnp.log1p(-beta))
    return beta * kl_BxT(teacher_logp_BxTxV, mixture_logp) + (1 - beta) * kl_BxT(student_logp_BxTxV, mixture_logp)


def _at_least_f32(x: jax.Array) -> jax.Array:
    """bf16/fp16 logits are upcast (a softmax over a vocabulary needs fp32); fp64 stays fp64."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _masked_mean(values_BxT: jax.Array, mask_BxT: jax.Array, normalizer: jax.Array | None) -> jax.Array:
    """Σ mask · values / normalizer (default: Σ mask, i.e. the mean over the masked-in tokens)."""
    mask_BxT = mask_BxT.astype(values_BxT.dtype)
    normalizer = jnp.sum(mask_BxT) if normalizer is None else normalizer
    return jnp.sum(values_BxT * mask_BxT) / jnp.maximum(normalizer, 1.0)


def _check_beta(beta: float) -> None:
    if not 0 <= beta <= 1:
        raise ValueError(f"beta must lie in [0, 1] (0: KL(teacher||student), 1: KL(student||teacher)), got {beta}")


def generalized_jsd(student_logits_BxTxV: jax.Array, teacher_logits_BxTxV: jax.Array, mask_BxT: jax.Array, *,
                    beta: float = 0.5, temperature: float = 1.0, normalizer: jax.Array | None = None
                    ) -> jax.Array:
    """GKD eq. 1 (module docstring), the mean over the tokens where `mask_BxT` is nonzero (0 when
    none is); with `normalizer`, the sum over them divided by it (a microbatch's share of a whole
    step's mean: pass the step's token count). Gradients flow into both arguments: a frozen teacher's logits are constants (wrap
    them in `jax.lax.stop_gradient` when they come out of a differentiated function)."""
    _check_beta(beta)
    student_logp = jax.nn.log_softmax(_at_least_f32(student_logits_BxTxV) / temperature, axis=-1)
    teacher_logp = jax.nn.log_softmax(_at_least_f32(teacher_logits_BxTxV) / temperature, axis=-1)
    return _masked_mean(_divergence_BxT(student_logp, teacher_logp, beta), mask_BxT, normalizer)


def teacher_topk(teacher_logits_BxTxV: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """(ids `[B, T, k]` int32, log-probs `[B, T, k]` float32) of the teacher's k likeliest tokens at
    temperature 1: what a top-k cache stores (k·8 bytes a token instead of V·4)."""
    logp_BxTxV = jax.nn.log_softmax(_at_least_f32(teacher_logits_BxTxV), axis=-1)
    logp_BxTxK, ids_BxTxK = jax.lax.top_k(logp_BxTxV, k)
    return ids_BxTxK.astype(jnp.int32), logp_BxTxK


def topk_generalized_jsd(student_logits_BxTxV: jax.Array, teacher_ids_BxTxK: jax.Array,
                         teacher_logp_BxTxK: jax.Array, mask_BxT: jax.Array, *, beta: float = 0.5,
                         temperature: float = 1.0, normalizer: jax.Array | None = None) -> jax.Array:
    """`generalized_jsd` on the teacher's cached top-k support: the teacher's log-probs and the
    student's logits at those ids, each renormalised over the k ids at `temperature` (`normalizer`
    as there)."""
    _check_beta(beta)
    student_BxTxK = jnp.take_along_axis(_at_least_f32(student_logits_BxTxV), teacher_ids_BxTxK, axis=-1)
    student_logp = jax.nn.log_softmax(student_BxTxK / temperature, axis=-1)
    teacher_logp = jax.nn.log_softmax(_at_least_f32(teacher_logp_BxTxK) / temperature, axis=-1)
    return _masked_mean(_divergence_BxT(student_logp, teacher_logp, beta), mask_BxT, normalizer)

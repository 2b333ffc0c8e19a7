"""Language-model losses on packed batches: next-token cross-entropy and DeepSeek-V3's MTP loss.

A target counts only if it is a real token of the *same* document as its context (segment ids
equal and non-zero) and the loss mask is on at the target (SFT: response tokens only).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def _nll_sum(logits_BxTxV: jax.Array, targets_BxT: jax.Array, valid_BxT: jax.Array) -> jax.Array:
    """Summed negative log-likelihood over the valid targets."""
    log_probs = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
    nll_BxT = -jnp.take_along_axis(log_probs, targets_BxT[..., None], axis=-1)[..., 0]
    return jnp.sum(nll_BxT * valid_BxT)


def target_mask(segment_ids_BxT: jax.Array, loss_mask_BxT: jax.Array, shift: int) -> jax.Array:
    """Where the token `shift` ahead of each of the first T - shift positions is a valid target."""
    same_document = segment_ids_BxT[:, shift:] == segment_ids_BxT[:, :-shift]
    return same_document & (segment_ids_BxT[:, shift:] != 0) & (loss_mask_BxT[:, shift:] != 0)


def count_targets(segment_ids_BxT: jax.Array, loss_mask_BxT: jax.Array, shifts: Sequence[int]
                  ) -> jax.Array:
    """Valid targets per shift `[len(shifts)]`: the normalisers of a whole (accumulated) batch."""
    return jnp.stack([target_mask(segment_ids_BxT, loss_mask_BxT, s).sum() for s in shifts])


def next_token_loss(logits_BxTxV: jax.Array, tokens_BxT: jax.Array, segment_ids_BxT: jax.Array,
                    loss_mask_BxT: jax.Array | None = None, normalizer: jax.Array | None = None,
                    weight_BxT: jax.Array | None = None) -> jax.Array:
    """Cross-entropy of position i predicting token i + 1, summed over valid targets (each
    weighted by `weight_BxT` at the target, when given) and divided by `normalizer` (default:
    this batch's target count; pass the whole step's count when accumulating microbatches, so
    their sum is the full batch's mean)."""
    if loss_mask_BxT is None:
        loss_mask_BxT = jnp.ones_like(tokens_BxT)
    valid = target_mask(segment_ids_BxT, loss_mask_BxT, 1)
    normalizer = valid.sum() if normalizer is None else normalizer
    if weight_BxT is not None:
        valid = valid * weight_BxT[:, 1:]
    return _nll_sum(logits_BxTxV[:, :-1], tokens_BxT[:, 1:], valid) / jnp.maximum(normalizer, 1)


def mtp_loss(mtp_logits_DxBxTxV: jax.Array, tokens_BxT: jax.Array, segment_ids_BxT: jax.Array,
             loss_mask_BxT: jax.Array | None = None, normalizers_D: jax.Array | None = None,
             weight_BxT: jax.Array | None = None) -> jax.Array:
    """DeepSeek-V3 eq. 24-25 without λ: the mean over depths k = 1..D of the cross-entropy of
    depth k's logits at position i against token i + k + 1 (segments being contiguous, equal
    segment ids at i and i + k + 1 mean the whole span is one document). `normalizers_D` and
    `weight_BxT` as in `next_token_loss`, one normaliser per depth."""
    if loss_mask_BxT is None:
        loss_mask_BxT = jnp.ones_like(tokens_BxT)
    depth = mtp_logits_DxBxTxV.shape[0]
    if normalizers_D is None:
        normalizers_D = count_targets(segment_ids_BxT, loss_mask_BxT, range(2, depth + 2))

    def weighted_targets(shift: int) -> jax.Array:
        valid = target_mask(segment_ids_BxT, loss_mask_BxT, shift)
        return valid if weight_BxT is None else valid * weight_BxT[:, shift:]

    losses = [_nll_sum(mtp_logits_DxBxTxV[k - 1][:, : -(k + 1)], tokens_BxT[:, k + 1:], weighted_targets(k + 1))
              / jnp.maximum(normalizers_D[k - 1], 1) for k in range(1, depth + 1)]
    return jnp.mean(jnp.stack(losses))


def mtp_acceptance(mtp_logits_DxBxTxV: jax.Array, logits_BxTxV: jax.Array, segment_ids_BxT: jax.Array,
                   loss_mask_BxT: jax.Array | None = None) -> jax.Array:
    """The MTP module as a speculative draft (DeepSeek-V3 §5.4.3: 85–90% of second tokens
    accepted): the share of positions i whose depth-1 draft of token i + 2 (argmax of the MTP
    logits at i) is the main model's own greedy choice for it (argmax of its logits at i + 1),
    given the same tokens up to i + 1 — over the positions whose token i + 2 is a valid target."""
    if loss_mask_BxT is None:
        loss_mask_BxT = jnp.ones_like(segment_ids_BxT)
    draft_BxT = jnp.argmax(mtp_logits_DxBxTxV[0][:, :-2], axis=-1)
    main_BxT = jnp.argmax(logits_BxTxV[:, 1:-1], axis=-1)
    valid_BxT = target_mask(segment_ids_BxT, loss_mask_BxT, 2).astype(jnp.float32)
    return jnp.sum((draft_BxT == main_BxT) * valid_BxT) / jnp.maximum(valid_BxT.sum(), 1.0)

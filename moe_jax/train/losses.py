"""Language-model losses on packed batches: next-token cross-entropy and DeepSeek-V3's MTP loss.

A target counts only if it is a real token of the *same* document as its context (segment ids
equal and non-zero) and the loss mask is on at the target (SFT: response tokens only).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _masked_nll(logits_BxTxV: jax.Array, targets_BxT: jax.Array, valid_BxT: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
    """(mean negative log-likelihood over valid targets, number of valid targets)."""
    log_probs = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
    nll_BxT = -jnp.take_along_axis(log_probs, targets_BxT[..., None], axis=-1)[..., 0]
    count = valid_BxT.sum()
    return jnp.sum(nll_BxT * valid_BxT) / jnp.maximum(count, 1), count


def _shifted_targets(tokens_BxT, segment_ids_BxT, loss_mask_BxT, shift: int):
    """Targets `shift` tokens ahead and where they are valid, for the first T - shift positions."""
    same_document = segment_ids_BxT[:, shift:] == segment_ids_BxT[:, :-shift]
    valid = same_document & (segment_ids_BxT[:, shift:] != 0) & (loss_mask_BxT[:, shift:] != 0)
    return tokens_BxT[:, shift:], valid


def next_token_loss(logits_BxTxV: jax.Array, tokens_BxT: jax.Array, segment_ids_BxT: jax.Array,
                    loss_mask_BxT: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy of position i predicting token i + 1: (mean loss, number of targets)."""
    if loss_mask_BxT is None:
        loss_mask_BxT = jnp.ones_like(tokens_BxT)
    targets, valid = _shifted_targets(tokens_BxT, segment_ids_BxT, loss_mask_BxT, 1)
    return _masked_nll(logits_BxTxV[:, :-1], targets, valid)


def mtp_loss(mtp_logits_DxBxTxV: jax.Array, tokens_BxT: jax.Array, segment_ids_BxT: jax.Array,
             loss_mask_BxT: jax.Array | None = None) -> jax.Array:
    """DeepSeek-V3 eq. 24-25 without λ: the mean over depths k = 1..D of the cross-entropy of
    depth k's logits at position i against token i + k + 1 (segments being contiguous, equal
    segment ids at i and i + k + 1 mean the whole span is one document)."""
    if loss_mask_BxT is None:
        loss_mask_BxT = jnp.ones_like(tokens_BxT)
    losses = []
    for k in range(1, mtp_logits_DxBxTxV.shape[0] + 1):
        targets, valid = _shifted_targets(tokens_BxT, segment_ids_BxT, loss_mask_BxT, k + 1)
        losses.append(_masked_nll(mtp_logits_DxBxTxV[k - 1][:, : -(k + 1)], targets, valid)[0])
    return jnp.mean(jnp.stack(losses))

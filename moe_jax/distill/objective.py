"""The logit-KD objective, a `LossFn` for `make_train_step`: the batch carries the teacher's top-k
next-token distributions (`teacher_ids`, `teacher_logp` `[B, T, k]`, from the cache or a jitted
teacher forward), so the train step stays the generic one and the teacher takes no optimizer
state.

    loss = (1 − α) · JSD_β,τ(student ‖ teacher) + α · cross-entropy on the data tokens

over the targets `loss_mask` selects (the response's), the teacher's distribution at position i
predicting token i + 1 like the student's logits there. Both terms are sums over this
microbatch's targets divided by the whole step's target count, so accumulated microbatches give
exactly the full batch's means.
"""

from __future__ import annotations

import jax

from moe_jax.distill.config import KDConfig
from moe_jax.distill.losses import topk_generalized_jsd
from moe_jax.models import Transformer
from moe_jax.train.losses import next_token_loss, target_mask
from moe_jax.train.step import STEP_MICROBATCHES, STEP_TARGETS, Batch, LossFn


def kd_loss(kd: KDConfig) -> LossFn:
    """The objective above for the settings `kd` holds (β, τ, α)."""

    def loss_fn(model: Transformer, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
        segment_ids, loss_mask = batch["segment_ids"], batch["loss_mask"]
        logits, aux = model(batch["tokens"], segment_ids_BxT=segment_ids, positions_BxT=batch["positions"], mtp=False)
        weight_BxT = batch.get("loss_weight")
        valid = target_mask(segment_ids, loss_mask, 1)
        normalizer = batch[STEP_TARGETS][0] if STEP_TARGETS in batch else valid.sum()
        if weight_BxT is not None:
            valid = valid * weight_BxT[:, 1:]
        jsd = topk_generalized_jsd(logits[:, :-1], batch["teacher_ids"][:, :-1], batch["teacher_logp"][:, :-1],
                                   valid, beta=kd.beta, temperature=kd.temperature, normalizer=normalizer)
        ce = next_token_loss(logits, batch["tokens"], segment_ids, loss_mask, normalizer, weight_BxT)
        moe_aux = aux["moe_aux_loss"] / batch.get(STEP_MICROBATCHES, 1)
        loss = (1 - kd.alpha) * jsd + kd.alpha * ce + moe_aux
        return loss, {"loss": loss, "jsd": jsd, "ce": ce}

    return loss_fn

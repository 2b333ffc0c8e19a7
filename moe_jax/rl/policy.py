"""The policy's per-token log-probs of sampled completions, from one training forward pass.

They are taken under the same distribution the sampler drew from (logits / temperature, with the
same top-k / top-p filter), so for the old policy they equal the sampler's log-probs to fp32
rounding: the ratio of the first inner GRPO update is exactly 1, with no train/inference
mismatch to correct for.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.models.sampler import sampling_logits
from moe_jax.models.transformer import Transformer


def rollout_rows(prompt_tokens_BxP: jax.Array, prompt_segment_ids_BxP: jax.Array,
                 completion_BxN: jax.Array, completion_mask_BxN: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(tokens, segment ids) `[B, P + N]` of prompt + completion: one segment per row, padding
    (left of the prompt, after the completion's eos) at segment id 0."""
    tokens_BxS = jnp.concatenate([prompt_tokens_BxP, completion_BxN], axis=1)
    segment_ids_BxS = jnp.concatenate([prompt_segment_ids_BxP, completion_mask_BxN], axis=1)
    return tokens_BxS, segment_ids_BxS.astype(jnp.int32)


def completion_width(longest: int, max_new_tokens: int) -> int:
    """How many completion columns a training batch keeps: the longest completion rounded up to a
    power of two (at least 8), at most `max_new_tokens`. The columns past every row's end are all
    padding, so dropping them changes nothing but the cost; the rounding bounds the number of
    step shapes to compile by log2(max_new_tokens)."""
    width = 8
    while width < longest:
        width *= 2
    return min(width, max_new_tokens)


def completion_logprobs(model: Transformer, tokens_BxS: jax.Array, segment_ids_BxS: jax.Array,
                        n_completion: int, *, temperature: float = 1.0, top_p: float = 1.0,
                        top_k: int = 0, routing_LxBxSxK: jax.Array | None = None
                        ) -> tuple[jax.Array, jax.Array, dict]:
    """(log-probs `[B, N]` of the last N tokens, their entropies `[B, N]`, the model's aux).

    The logits at slot t predict the token at t + 1, so the completion (slots S-N .. S-1) is
    scored by slots S-N-1 .. S-2. Entropy is of the sampling distribution (a metric; its
    gradient is not used). The MTP heads are skipped: RL has no use for them. `routing_LxBxSxK`
    replays recorded expert choices (`aux["router"]["expert_idx"]` of an earlier call)."""
    logits_BxNxV, aux = model(tokens_BxS, segment_ids_BxT=segment_ids_BxS, mtp=False,
                              routing_LxBxTxK=routing_LxBxSxK, logits_slice=slice(-n_completion - 1, -1))
    b, n, v = logits_BxNxV.shape
    filtered = sampling_logits(logits_BxNxV.reshape(b * n, v), temperature, top_p, top_k)
    logp_BxNxV = jax.nn.log_softmax(filtered, axis=-1).reshape(b, n, v)
    target_BxN = tokens_BxS[:, -n_completion:]
    logp_BxN = jnp.take_along_axis(logp_BxNxV, target_BxN[..., None], axis=-1)[..., 0]
    probs_BxNxV = jnp.exp(jax.lax.stop_gradient(logp_BxNxV))
    entropy_BxN = -jnp.sum(jnp.where(probs_BxNxV > 0, probs_BxNxV * jax.lax.stop_gradient(logp_BxNxV), 0.0), -1)
    return logp_BxN, entropy_BxN, aux

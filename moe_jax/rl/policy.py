"""The policy's per-token log-probs of sampled completions, from one training forward pass.

They are taken under the same distribution the sampler drew from (logits / temperature, with the
same top-k / top-p filter), so for the old policy they equal the sampler's log-probs to fp32
rounding: the ratio of the first inner GRPO update is exactly 1, with no train/inference
mismatch to correct for.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.models import kv_cache
from moe_jax.models.sampler import sampling_logits
from moe_jax.models.transformer import Transformer, router_aux


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
                        top_k: int = 0, routing_LxBxSxK: jax.Array | None = None, group_size: int = 1
                        ) -> tuple[jax.Array, jax.Array, dict]:
    """(log-probs `[B, N]` of the last N tokens, their entropies `[B, N]`, the model's aux).

    The logits at slot t predict the token at t + 1, so the completion (slots S-N .. S-1) is
    scored by slots S-N-1 .. S-2. Entropy is of the sampling distribution (a metric; its
    gradient is not used). The MTP heads are skipped: RL has no use for them. `routing_LxBxSxK`
    replays recorded expert choices (`aux["router"]["expert_idx"]` of an earlier call).

    `group_size` G > 1 declares that rows [g·G, (g+1)·G) share their prompt (the first S - N
    columns), as GRPO's groups do: each prompt then runs once and its KV cache serves its G
    completions (`shared_prompt_forward`) — the same numbers, router statistics included."""
    if group_size > 1:
        logits_BxNxV, aux = shared_prompt_forward(model, tokens_BxS, segment_ids_BxS, n_completion,
                                                  group_size, routing_LxBxSxK)
    else:
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


def shared_prompt_forward(model: Transformer, tokens_BxS: jax.Array, segment_ids_BxS: jax.Array,
                          n_completion: int, group_size: int, routing_LxBxSxK: jax.Array | None = None
                          ) -> tuple[jax.Array, dict]:
    """The logits that score the last N tokens `[B, N, V]` and the aux (router statistics over
    every row's prompt and completion, as one forward over the rows would give), computing each
    group's shared prompt once: the P = B/G prompts fill a KV cache (the sampler's prefill),
    which is repeated to the B rows and extended by the completions, differentiably. Per group
    the layers run (S - N) + G·N tokens instead of G·S (GRPO bench: training 52 → 41 ms)."""
    b, s = tokens_BxS.shape
    prompt_len, g = s - n_completion, group_size
    replay_prompt = replay_completion = None
    if routing_LxBxSxK is not None:
        replay_prompt = jax.vmap(lambda r: kv_cache.group_leaders(r, g))(routing_LxBxSxK[:, :, :prompt_len])
        replay_completion = routing_LxBxSxK[:, :, prompt_len:]
    last_Px1xV, prompt_aux = model(kv_cache.group_leaders(tokens_BxS[:, :prompt_len], g),
                                   segment_ids_BxT=kv_cache.group_leaders(segment_ids_BxS[:, :prompt_len], g),
                                   cache=kv_cache.init_cache(model.cfg, b // g, s), routing_LxBxTxK=replay_prompt,
                                   logits_slice=slice(-1, None), router_stats=False)
    rest_BxNm1xV, completion_aux = model(tokens_BxS[:, prompt_len:], segment_ids_BxT=segment_ids_BxS[:, prompt_len:],
                                         cache=kv_cache.repeat_rows(prompt_aux["cache"], g),
                                         routing_LxBxTxK=replay_completion, logits_slice=slice(None, -1),
                                         router_stats=False)
    routings = [_join_routing(prompt, completion, g)
                for prompt, completion in zip(prompt_aux["routing"], completion_aux["routing"], strict=True)]
    logits_BxNxV = jnp.concatenate([jnp.repeat(last_Px1xV, g, axis=0), rest_BxNm1xV], axis=1)
    return logits_BxNxV, router_aux(routings, model.cfg)


def _join_routing(prompt: dict, completion: dict, group_size: int) -> dict:
    """One MoE layer's routing over the full rows `[B, S]` from the prompts' `[P, S-N]` (each
    repeated for its G rows) and the completions' `[B, N]`."""
    joined = {name: jnp.concatenate([jnp.repeat(prompt[name], group_size, axis=0), completion[name]], axis=1)
              for name in ("logits", "scores", "expert_idx", "mask")}
    tokens_prompt = group_size * prompt["mask"].sum().astype(jnp.float32)
    tokens_completion = completion["mask"].sum().astype(jnp.float32)
    joined["dropped_fraction"] = ((prompt["dropped_fraction"] * tokens_prompt
                                   + completion["dropped_fraction"] * tokens_completion)
                                  / jnp.maximum(tokens_prompt + tokens_completion, 1.0))
    return joined

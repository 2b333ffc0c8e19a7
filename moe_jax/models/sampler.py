"""Autoregressive sampling with the KV cache: greedy decoding for task-accuracy evals, and
temperature / nucleus (top-p) sampling for GRPO rollouts, which need each token's log-prob under
the distribution it was actually drawn from (the "old policy" of the importance ratio).

One prefill call writes the left-padded prompts into a cache of `P + N` slots, then a
`jax.lax.while_loop` decodes one token per step until every row has stopped (or N tokens), so
the whole rollout is a single XLA program.
`generate` only calls the model, never mutates it; Flax NNX 0.12 Modules are pytrees, so
`jit_generate(model, ...)` (a plain `jax.jit`) works as is, and a caller holding a split
`(graphdef, state)` can call `generate(nnx.merge(graphdef, state), ...)` inside its own jit.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from moe_jax.models import kv_cache
from moe_jax.models.transformer import Transformer

GENERATE_STATIC_ARGNAMES = ("max_new_tokens", "eos_id", "pad_id", "temperature", "top_p", "top_k",
                            "group_size")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How completions are drawn — one setting shared by the GRPO loop, the evaluator (greedy:
    temperature 0) and rejection sampling: `generate(..., **sampling.generate_kwargs())`."""

    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    max_new_tokens: int = 64
    samples_per_prompt: int = 1  # GRPO's group size G

    def __post_init__(self) -> None:
        def fail(field: str, problem: str, fix: str) -> None:
            raise ValueError(f"SamplingConfig.{field}: {problem}. Fix: {fix}")

        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            fail("temperature", f"must be a finite number >= 0, got {self.temperature}", "use e.g. 1.0, or 0 for greedy")
        if not 0 < self.top_p <= 1:
            fail("top_p", f"must lie in (0, 1], got {self.top_p}", "use 1.0 for no nucleus cut")
        if self.top_k < 0:
            fail("top_k", f"must be >= 0, got {self.top_k}", "use 0 for no limit")
        for name in ("max_new_tokens", "samples_per_prompt"):
            if getattr(self, name) < 1:
                fail(name, f"must be >= 1, got {getattr(self, name)}", "use a positive value")

    def generate_kwargs(self) -> dict[str, float | int]:
        """The sampling keywords of `generate` (rows of a group share their prompt)."""
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k, "group_size": self.samples_per_prompt}


def sampling_logits(logits_BxV: jax.Array, temperature: float, top_p: float, top_k: int = 0) -> jax.Array:
    """The logits of the distribution a token is drawn from: divided by `temperature`, then the
    tokens outside the `top_k` most likely (0 = no limit) and outside the nucleus at -inf. The
    nucleus is the smallest set of most likely tokens whose probability reaches `top_p` (the top
    token is always in it); tokens tied with the least likely member of either set are kept too,
    which avoids scattering a sort back to vocabulary order."""
    scaled_BxV = logits_BxV.astype(jnp.float32) / temperature
    if 0 < top_k < scaled_BxV.shape[-1]:
        kth_Bx1 = jax.lax.top_k(scaled_BxV, top_k)[0][:, -1:]
        scaled_BxV = jnp.where(scaled_BxV >= kth_Bx1, scaled_BxV, -jnp.inf)
    if top_p >= 1.0:
        return scaled_BxV
    probs_BxV = jax.nn.softmax(scaled_BxV, axis=-1)
    sorted_BxV = -jnp.sort(-probs_BxV, axis=-1)
    in_nucleus_BxV = jnp.cumsum(sorted_BxV, axis=-1) - sorted_BxV < top_p
    cutoff_Bx1 = jnp.min(jnp.where(in_nucleus_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(probs_BxV >= cutoff_Bx1, scaled_BxV, -jnp.inf)


def first_argmax(x_BxV: jax.Array) -> jax.Array:
    """`jnp.argmax(x, -1)` (the lowest index of each row's maximum) as two plain reductions.

    argmax lowers to one variadic (value, index) reduce that XLA:CPU does not vectorize; this form
    measured ~4x faster on [64, 256], and it runs once per decoded token (BUILD_NOTES.md)."""
    max_Bx1 = jnp.max(x_BxV, axis=-1, keepdims=True)
    index_V = jnp.arange(x_BxV.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(x_BxV == max_Bx1, index_V, x_BxV.shape[-1] - 1), axis=-1)


def sample_token(logits_BxV: jax.Array, key: jax.Array | None, temperature: float,
                 top_p: float, top_k: int = 0) -> tuple[jax.Array, jax.Array]:
    """One token per row and its log-prob under the sampling distribution; `temperature == 0` is
    greedy argmax, scored under the model's plain softmax (what an eval reports). `key` is one key
    for the batch, or one per row (`[B]`: a refilling sampler's rows each draw for their own sample)."""
    if temperature == 0.0:
        token_B = first_argmax(logits_BxV)
        logp_BxV = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
    else:
        filtered_BxV = sampling_logits(logits_BxV, temperature, top_p, top_k)
        # Gumbel-max, i.e. `jax.random.categorical` (the same tokens for the same key).
        if jnp.ndim(key) == 0:
            gumbel_BxV = jax.random.gumbel(key, filtered_BxV.shape)
        else:
            gumbel_BxV = jax.vmap(lambda row_key: jax.random.gumbel(row_key, filtered_BxV.shape[1:]))(key)
        token_B = first_argmax(filtered_BxV + gumbel_BxV)
        logp_BxV = jax.nn.log_softmax(filtered_BxV, axis=-1)
    return token_B, jnp.take_along_axis(logp_BxV, token_B[:, None], axis=-1)[:, 0]


def generate(model: Transformer, prompt_tokens_BxP: jax.Array, prompt_segment_ids_BxP: jax.Array, *,
             max_new_tokens: int, eos_id: int, pad_id: int, rng: jax.Array | None = None,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             group_size: int = 1) -> dict[str, jax.Array]:
    """Continue left-padded prompts (segment id 0 = padding; every row needs >= 1 prompt token)
    by `max_new_tokens` = N tokens.

    Returns `tokens` int32 `[B, N]` (pad_id after a row's first eos), `logprobs` fp32 `[B, N]`
    (see `sample_token`; 0 where `mask` is 0), `mask` int32 `[B, N]` (1 for generated tokens up to
    and including eos), `lengths` int32 `[B]` and `truncated` bool `[B]` (no eos within N tokens). A finished row keeps being fed, as padding
    (segment id 0), so the batch stays rectangular without polluting router statistics.
    `rng` is required when `temperature > 0`; step t draws with `jax.random.split(rng, N)[t]`.
    `group_size` G > 1 declares that rows [g·G, (g+1)·G) hold the same prompt (GRPO's groups): it
    is prefilled once and its cache serves the G rows, which then sample independently.
    """
    if max_new_tokens < 1 or temperature < 0 or not 0.0 < top_p <= 1.0 or top_k < 0:
        raise ValueError("need max_new_tokens >= 1, temperature >= 0, 0 < top_p <= 1 and top_k >= 0, "
                         f"got {max_new_tokens=}, {temperature=}, {top_p=}, {top_k=}")
    if temperature > 0 and rng is None:
        raise ValueError("sampling with temperature > 0 needs an rng key")
    batch, prompt_len = prompt_tokens_BxP.shape
    keys_N = jax.random.split(rng if rng is not None else jax.random.key(0), max_new_tokens)

    cache = kv_cache.init_cache(model.cfg, batch // group_size, prompt_len + max_new_tokens)
    # Left padding puts every row's last prompt token in the last slot.
    logits_Px1xV, aux = model(kv_cache.group_leaders(prompt_tokens_BxP, group_size),
                              segment_ids_BxT=kv_cache.group_leaders(prompt_segment_ids_BxP, group_size),
                              cache=cache, logits_slice=slice(-1, None))
    logits_Bx1xV = jnp.repeat(logits_Px1xV, group_size, axis=0)
    token_B, logp_B = sample_token(logits_Bx1xV[:, 0], keys_N[0], temperature, top_p, top_k)
    done_B = token_B == eos_id

    def unfinished(carry) -> jax.Array:
        t, _, _, done_B, _ = carry
        return (t < max_new_tokens) & ~jnp.all(done_B)

    def step(carry):
        t, cache, token_B, done_B, out = carry
        logits_Bx1xV, aux = model(token_B[:, None], segment_ids_BxT=(~done_B)[:, None].astype(jnp.int32),
                                  cache=cache)
        new_B, logp_B = sample_token(logits_Bx1xV[:, 0], keys_N[t], temperature, top_p, top_k)
        new_B = jnp.where(done_B, pad_id, new_B)
        out = {"tokens": out["tokens"].at[:, t].set(new_B),
               "logprobs": out["logprobs"].at[:, t].set(jnp.where(done_B, 0.0, logp_B)),
               "mask": out["mask"].at[:, t].set(~done_B)}
        return t + 1, aux["cache"], new_B, done_B | (new_B == eos_id), out

    # A while loop, not a scan: decoding stops as soon as every row has finished (the columns it
    # never reaches already hold what a finished row emits: padding, log-prob 0, mask 0).
    out = {"tokens": jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token_B),
           "logprobs": jnp.zeros((batch, max_new_tokens), jnp.float32).at[:, 0].set(logp_B),
           "mask": jnp.zeros((batch, max_new_tokens), bool).at[:, 0].set(True)}
    cache = kv_cache.repeat_rows(aux["cache"], group_size)
    *_, done_B, out = jax.lax.while_loop(unfinished, step, (1, cache, token_B, done_B, out))
    mask_BxN = out["mask"].astype(jnp.int32)
    return {"tokens": out["tokens"], "logprobs": out["logprobs"], "mask": mask_BxN,
            "lengths": mask_BxN.sum(axis=1), "truncated": ~done_B}


jit_generate = jax.jit(generate, static_argnames=GENERATE_STATIC_ARGNAMES)

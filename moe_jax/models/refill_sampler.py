"""Sampling a long stream of prompts with rows that refill as they finish (continuous batching).

`generate`'s static batch decodes until its longest row ends, so a row that stops early idles for
the rest of the batch: with completions of very different lengths (a reasoning model's), half the
row-steps can go to nothing. Here B rows work through Q samples: when at least `refill_rows` = R
rows have finished (or the stream's last samples are left), R of them take the next R prompts —
prefilled together on a fresh `[R, P]` cache, whose keys and values are then written into those
rows of the big cache — while the others keep decoding. The big cache is a ring per row (one write
index per row, `moe_jax.models.kv_cache`) of P + N slots: a sample's prompt and completion; a row's
earlier samples keep other segment ids (sample q is segment q + 1), so they are never attended.

Every draw of sample q at its step t uses the key `fold_in(fold_in(rng, q), t)`, so what a sample
is does not depend on which row ran it or when: the same stream gives the same samples for any B
and R (to fp32 rounding), on any number of devices and processes. The whole stream is one
`jax.lax.while_loop`, one XLA program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.models import kv_cache
from moe_jax.models.sampler import sample_token
from moe_jax.models.transformer import Transformer

STREAM_STATIC_ARGNAMES = ("rows", "refill_rows", "max_new_tokens", "eos_id", "pad_id", "temperature", "top_p",
                          "top_k")


def _sample_keys(rng: jax.Array, sample_B: jax.Array, step_B: jax.Array) -> jax.Array:
    return jax.vmap(lambda q, t: jax.random.fold_in(jax.random.fold_in(rng, q), t))(sample_B, step_B)


def generate_stream(model: Transformer, prompt_tokens_QxP: jax.Array, prompt_segment_ids_QxP: jax.Array, *,
                    rows: int, refill_rows: int, max_new_tokens: int, eos_id: int, pad_id: int,
                    rng: jax.Array | None = None, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0
                    ) -> dict[str, jax.Array]:
    """Complete Q left-padded prompts (segment id 0 = padding, >= 1 prompt token each) by up to
    `max_new_tokens` = N tokens, `rows` at a time, refilling `refill_rows` rows at once (module
    docstring). Returns, per sample, what `generate` returns per row: `tokens` `[Q, N]` (pad_id
    after eos), `logprobs` `[Q, N]`, `mask` int32 `[Q, N]`, `lengths` `[Q]`, `truncated` `[Q]`."""
    if not 0 < refill_rows <= rows:
        raise ValueError(f"need 0 < refill_rows <= rows, got {refill_rows=}, {rows=}")
    if temperature > 0 and rng is None:
        raise ValueError("sampling with temperature > 0 needs an rng key")
    rng = rng if rng is not None else jax.random.key(0)
    n_samples, prompt_len = prompt_tokens_QxP.shape
    N, R = max_new_tokens, refill_rows
    ring = prompt_len + N

    def refill(state):
        """R idle rows take the next R samples: prefill, cache write, first token."""
        cache, row = state["cache"], state["row"]
        idle_B = row["sample"] < 0
        rows_R = jnp.argsort(~idle_B, stable=True)[:R]  # idle rows first
        take = jnp.minimum(jnp.minimum(jnp.sum(idle_B), n_samples - state["next"]), R)
        valid_R = jnp.arange(R) < take
        sample_R = jnp.where(valid_R, state["next"] + jnp.arange(R), n_samples)  # n_samples: dropped writes
        source_R = jnp.minimum(sample_R, n_samples - 1)
        segments_RxP = jnp.where(valid_R[:, None], prompt_segment_ids_QxP[source_R] * (sample_R[:, None] + 1), 0)
        positions_RxP = kv_cache.segment_positions(segments_RxP)
        logits_Rx1xV, aux = model(prompt_tokens_QxP[source_R], segment_ids_BxT=segments_RxP,
                                  positions_BxT=positions_RxP, cache=kv_cache.init_cache(model.cfg, R, prompt_len),
                                  logits_slice=slice(-1, None), mtp=False)
        index_R = cache["index"][rows_R]
        # Only the rows that take a sample are written (a row index of B is out of range: dropped);
        # a row still decoding is never touched.
        target_R = jnp.where(valid_R, rows_R, rows)

        def put(buffer_BxSx, new_RxPx):  # the R rows' ring slots index .. index + P
            slots_RxP = (index_R[:, None] + jnp.arange(prompt_len)) % ring
            return buffer_BxSx.at[target_R[:, None], slots_RxP].set(new_RxPx.astype(buffer_BxSx.dtype), mode="drop")

        cache = {"index": cache["index"].at[target_R].add(prompt_len, mode="drop"),
                 "segment_ids": put(cache["segment_ids"], segments_RxP),
                 "layers": jax.tree.map(put, cache["layers"], aux["cache"]["layers"])}
        token_R, logp_R = sample_token(logits_Rx1xV[:, 0], _sample_keys(rng, sample_R, jnp.zeros_like(sample_R)),
                                       temperature, top_p, top_k)
        out = _record(state["out"], sample_R, jnp.zeros_like(sample_R), token_R, logp_R)
        finished_R = (token_R == eos_id) | (N == 1)
        out["truncated"] = out["truncated"].at[sample_R].set((token_R != eos_id) & finished_R, mode="drop")
        row = {"sample": row["sample"].at[target_R].set(jnp.where(finished_R, -1, sample_R), mode="drop"),
               "step": row["step"].at[target_R].set(1, mode="drop"),
               "position": row["position"].at[target_R].set(jnp.sum(segments_RxP != 0, axis=1), mode="drop"),
               "token": row["token"].at[target_R].set(token_R, mode="drop")}
        return {**state, "cache": cache, "row": row, "out": out, "next": state["next"] + take}

    def decode(state):
        """One token for every live row (idle rows are fed padding)."""
        row = state["row"]
        live_B = row["sample"] >= 0
        logits_Bx1xV, aux = model(row["token"][:, None], segment_ids_BxT=jnp.where(live_B, row["sample"] + 1, 0)[:, None],
                                  positions_BxT=row["position"][:, None], cache=state["cache"], mtp=False)
        sample_B = jnp.where(live_B, row["sample"], n_samples)
        token_B, logp_B = sample_token(logits_Bx1xV[:, 0], _sample_keys(rng, sample_B, row["step"]), temperature,
                                       top_p, top_k)
        out = _record(state["out"], sample_B, row["step"], token_B, logp_B)
        last_B = row["step"] + 1 == N
        finished_B = live_B & ((token_B == eos_id) | last_B)
        out["truncated"] = out["truncated"].at[jnp.where(finished_B, sample_B, n_samples)].set(
            token_B != eos_id, mode="drop")
        row = {"sample": jnp.where(finished_B, -1, row["sample"]), "step": row["step"] + 1,
               "position": row["position"] + 1, "token": token_B}
        return {**state, "cache": aux["cache"], "row": row, "out": out}

    def body(state):
        idle = jnp.sum(state["row"]["sample"] < 0)
        left = n_samples - state["next"]
        state = jax.lax.cond((left > 0) & (idle >= jnp.minimum(R, left)), refill, lambda s: s, state)
        return decode(state)

    def unfinished(state) -> jax.Array:
        return (state["next"] < n_samples) | jnp.any(state["row"]["sample"] >= 0)

    cache = kv_cache.init_cache(model.cfg, rows, ring)
    state = {
        "cache": {**cache, "index": jnp.zeros((rows,), jnp.int32)},
        "row": {"sample": jnp.full((rows,), -1, jnp.int32), "step": jnp.zeros((rows,), jnp.int32),
                "position": jnp.zeros((rows,), jnp.int32), "token": jnp.full((rows,), pad_id, jnp.int32)},
        "out": {"tokens": jnp.full((n_samples, N), pad_id, jnp.int32), "logprobs": jnp.zeros((n_samples, N), jnp.float32),
                "mask": jnp.zeros((n_samples, N), jnp.int32), "truncated": jnp.zeros((n_samples,), bool)},
        "next": jnp.zeros((), jnp.int32)}
    out = jax.lax.while_loop(unfinished, body, state)["out"]
    return {**out, "lengths": out["mask"].sum(axis=1)}


def _record(out: dict, sample_B: jax.Array, step_B: jax.Array, token_B: jax.Array, logp_B: jax.Array) -> dict:
    """Write each row's token at (its sample, its step); rows whose sample is Q (none) are dropped."""
    return {**out, "tokens": out["tokens"].at[sample_B, step_B].set(token_B, mode="drop"),
            "logprobs": out["logprobs"].at[sample_B, step_B].set(logp_B, mode="drop"),
            "mask": out["mask"].at[sample_B, step_B].set(1, mode="drop")}


jit_generate_stream = jax.jit(generate_stream, static_argnames=STREAM_STATIC_ARGNAMES)

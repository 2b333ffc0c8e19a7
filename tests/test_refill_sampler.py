"""The refilling sampler against the static one: greedy completions equal `generate`'s for any number
of rows and refill size (rows end early at eos and take the next prompt), samples at temperature do
not depend on the rows that drew them and carry the model's log-probs; and the per-row ring writes
of the KV cache."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.configs import get_preset
from moe_jax.models import Transformer, kv_cache
from moe_jax.models.refill_sampler import jit_generate_stream
from moe_jax.models.sampler import jit_generate
from moe_jax.rl.policy import completion_logprobs, rollout_rows

Q, P, N = 20, 7, 12
CONFIGS = {"mla-moe": dataclasses.replace(get_preset("tiny-moe"), n_layers=2),
           "gqa": dataclasses.replace(get_preset("tiny-dense"), n_layers=2)}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def setup(request):
    """A model, Q left-padded prompts of 1..P tokens, and an eos the greedy model often writes (so
    rows end at different steps)."""
    model = Transformer(CONFIGS[request.param], rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    tokens, segments = np.zeros((Q, P), np.int32), np.zeros((Q, P), np.int32)
    for q, length in enumerate(rng.integers(1, P + 1, Q)):
        tokens[q, P - length:] = rng.integers(3, 200, length)
        segments[q, P - length:] = 1
    prompts = jnp.asarray(tokens), jnp.asarray(segments)
    free = jit_generate(model, *prompts, max_new_tokens=N, eos_id=-1, pad_id=0)
    values, counts = np.unique(np.asarray(free["tokens"])[:, 1:], return_counts=True)
    eos = int(values[np.argsort(counts)[-2]])
    reference = jit_generate(model, *prompts, max_new_tokens=N, eos_id=eos, pad_id=0)
    lengths = np.asarray(reference["lengths"])
    assert lengths.min() < N and (lengths == N).any()  # early ends and full-length rows both
    return model, prompts, eos, reference


@pytest.mark.parametrize("rows,refill_rows", [(4, 1), (6, 3), (32, 8)])
def test_greedy_streams_equal_the_static_sampler(setup, rows, refill_rows):
    model, prompts, eos, reference = setup
    out = jit_generate_stream(model, *prompts, rows=rows, refill_rows=refill_rows, max_new_tokens=N, eos_id=eos,
                              pad_id=0)
    for name in ("tokens", "mask", "lengths", "truncated"):
        np.testing.assert_array_equal(np.asarray(out[name]), np.asarray(reference[name]), err_msg=name)
    np.testing.assert_allclose(np.asarray(out["logprobs"]), np.asarray(reference["logprobs"]), atol=1e-5)


def test_samples_do_not_depend_on_the_rows_and_carry_the_models_log_probs(setup):
    model, prompts, eos, _ = setup
    sampling = {"temperature": 0.5, "top_k": 4}  # sharp enough that the eos gets drawn
    kwargs = {"max_new_tokens": N, "eos_id": eos, "pad_id": 0, "rng": jax.random.key(3), **sampling}
    outs = [jit_generate_stream(model, *prompts, rows=rows, refill_rows=r, **kwargs) for rows, r in ((4, 1), (20, 20))]
    np.testing.assert_array_equal(np.asarray(outs[0]["tokens"]), np.asarray(outs[1]["tokens"]))
    out = outs[0]
    tokens, segments = rollout_rows(*prompts, out["tokens"], out["mask"])
    score = jax.jit(completion_logprobs, static_argnums=3, static_argnames=("temperature", "top_k"))
    scored, _, _ = score(model, tokens, segments, N, **sampling)
    mask = np.asarray(out["mask"]).astype(bool)
    np.testing.assert_allclose(np.asarray(scored)[mask], np.asarray(out["logprobs"])[mask], atol=2e-5)
    assert np.asarray(out["lengths"]).min() < N  # some rows refilled early


def test_one_token_budgets_and_bad_refill_sizes(setup):
    model, prompts, eos, _ = setup
    one = jit_generate_stream(model, *prompts, rows=4, refill_rows=2, max_new_tokens=1, eos_id=eos, pad_id=0)
    static = jit_generate(model, *prompts, max_new_tokens=1, eos_id=eos, pad_id=0)
    np.testing.assert_array_equal(np.asarray(one["tokens"]), np.asarray(static["tokens"]))
    np.testing.assert_array_equal(np.asarray(one["truncated"]), np.asarray(static["truncated"]))
    with pytest.raises(ValueError, match="refill_rows"):
        jit_generate_stream(model, *prompts, rows=4, refill_rows=5, max_new_tokens=2, eos_id=eos, pad_id=0)


def test_per_row_cache_writes_wrap_around_a_ring():
    buffer = jnp.zeros((2, 5), jnp.int32)
    written = kv_cache.write_slots(buffer, jnp.asarray([[1, 2, 3], [4, 5, 6]]), jnp.asarray([1, 4]))
    np.testing.assert_array_equal(np.asarray(written), [[0, 1, 2, 3, 0], [5, 6, 0, 0, 4]])
    shared = kv_cache.write_slots(buffer, jnp.asarray([[1, 2], [3, 4]]), jnp.asarray(2))
    np.testing.assert_array_equal(np.asarray(shared), [[0, 0, 1, 2, 0], [0, 0, 3, 4, 0]])
    # A row whose write count passed S sees every slot of its own segment as earlier.
    mask = kv_cache.attention_mask(jnp.asarray([[7], [7]]), jnp.asarray([[7, 7, 0, 7, 3]] * 2), jnp.asarray([1, 9]))
    np.testing.assert_array_equal(np.asarray(mask)[:, 0, 0], [[1, 1, 0, 0, 0], [1, 1, 0, 1, 0]])

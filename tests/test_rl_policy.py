"""The training forward scores sampled completions exactly as the sampler did (no train/inference
mismatch), for plain, tempered and top-k sampling, with early eos and left padding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.configs import get_preset
from moe_jax.models import Transformer
from moe_jax.models.sampler import jit_generate
from moe_jax.rl.policy import completion_logprobs, rollout_rows

CFG = dataclasses.replace(get_preset("tiny-moe"), n_layers=2)
PROMPTS = [[5, 17, 33, 9, 101], [42, 7], [88, 3, 250], [60]]
N = 10


@pytest.fixture(scope="module")
def model():
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)  # perturbed weights: a peaked, input-dependent distribution
    nnx.update(model, jax.tree.map(lambda p: jnp.asarray(np.asarray(p) + 0.3 * rng.normal(size=p.shape), p.dtype),
                                   nnx.state(model, nnx.Param)))
    return model


@pytest.mark.parametrize("sampling", [{"temperature": 1.0}, {"temperature": 0.7, "top_k": 5},
                                      {"temperature": 1.3, "top_p": 0.8}])
def test_training_forward_logprobs_equal_the_samplers(model, sampling):
    width = max(map(len, PROMPTS))
    prompt_BxP = jnp.array([[0] * (width - len(p)) + p for p in PROMPTS], jnp.int32)
    segments_BxP = jnp.array([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS], jnp.int32)
    out = jit_generate(model, prompt_BxP, segments_BxP, max_new_tokens=N, eos_id=12, pad_id=0,
                       rng=jax.random.key(0), **sampling)
    tokens_BxS, segment_ids_BxS = rollout_rows(prompt_BxP, segments_BxP, out["tokens"], out["mask"])
    logp_BxN, entropy_BxN, _ = jax.jit(completion_logprobs, static_argnums=3, static_argnames=tuple(sampling))(
        model, tokens_BxS, segment_ids_BxS, N, **sampling)
    mask = np.asarray(out["mask"], bool)
    np.testing.assert_allclose(np.asarray(logp_BxN)[mask], np.asarray(out["logprobs"])[mask], rtol=1e-5,
                               atol=1e-5)
    assert (np.asarray(entropy_BxN)[mask] >= 0).all()

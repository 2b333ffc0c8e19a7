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


def test_shared_prompt_forward_equals_full_rows():
    """GRPO's groups share their prompt: running it once (`group_size`) changes no log-prob,
    entropy, router statistic or gradient, with every balance loss on, and none with the routing
    replayed either."""
    cfg = dataclasses.replace(CFG, aux_loss_coef=0.1, seq_aux_loss_coef=0.01, router_z_loss_coef=0.01)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    nnx.update(model, jax.tree.map(lambda p: jnp.asarray(np.asarray(p) + 0.3 * rng.normal(size=p.shape), p.dtype),
                                   nnx.state(model, nnx.Param)))
    group, grouped = 3, [p for p in PROMPTS[:3] for _ in range(3)]
    width = max(map(len, grouped))
    prompt_BxP = jnp.array([[0] * (width - len(p)) + p for p in grouped], jnp.int32)
    segments_BxP = jnp.array([[0] * (width - len(p)) + [1] * len(p) for p in grouped], jnp.int32)
    out = jit_generate(model, prompt_BxP, segments_BxP, max_new_tokens=N, eos_id=-1, pad_id=0,
                       rng=jax.random.key(0), temperature=1.0)
    # End rows at their first sample of a token row 0 drew: what that eos would have given.
    tokens_BxN = np.asarray(out["tokens"])
    ended_BxN = np.cumsum(np.cumsum(tokens_BxN == tokens_BxN[0, 2], 1), 1) > 1
    mask_BxN = ~ended_BxN
    assert mask_BxN.sum(1).min() < N
    tokens_BxS, segment_ids_BxS = rollout_rows(prompt_BxP, segments_BxP, jnp.asarray(np.where(mask_BxN, tokens_BxN, 0)),
                                               jnp.asarray(mask_BxN, jnp.int32))
    weights_BxN = jnp.asarray(rng.normal(size=mask_BxN.shape) * mask_BxN, jnp.float32)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def objective(params, group_size, routing_LxBxSxK=None):
        logp, entropy, aux = completion_logprobs(nnx.merge(graphdef, params, rest), tokens_BxS, segment_ids_BxS,
                                                 N, routing_LxBxSxK=routing_LxBxSxK, group_size=group_size)
        return jnp.sum(logp * weights_BxN) + aux["moe_aux_loss"], (logp, entropy, aux["router"])

    paths = jax.jit(lambda params: [jax.value_and_grad(objective, has_aux=True)(params, g) for g in (1, group)])
    ((_, (logp, entropy, stats)), grads), ((_, (logp_s, entropy_s, stats_s)), grads_s) = paths(params)
    np.testing.assert_allclose(np.asarray(logp_s)[mask_BxN], np.asarray(logp)[mask_BxN], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(logp_s)[mask_BxN], np.asarray(out["logprobs"])[mask_BxN],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(entropy_s)[mask_BxN], np.asarray(entropy)[mask_BxN], rtol=1e-5, atol=1e-5)
    for name in ("aux_loss", "switch_loss", "seq_loss", "z_loss", "load", "max_vio", "router_entropy",
                 "dropped_fraction"):
        np.testing.assert_allclose(stats_s[name], stats[name], rtol=1e-5, atol=1e-7, err_msg=name)
    valid_BxS = np.asarray(segment_ids_BxS) != 0
    np.testing.assert_array_equal(np.asarray(stats_s["expert_idx"])[:, valid_BxS],
                                  np.asarray(stats["expert_idx"])[:, valid_BxS])
    for (path, g), g_s in zip(jax.tree.leaves_with_path(grads), jax.tree.leaves(grads_s), strict=True):
        np.testing.assert_allclose(g_s, g, rtol=1e-5, atol=1e-5 * np.abs(g).max(), err_msg=jax.tree_util.keystr(path))

    with pytest.raises(ValueError, match="9 rows do not split into groups of group_size=2"):
        objective(params, 2)

    # Replayed routing: each prompt's choices are taken from its group's first row.
    replay = jax.jit(lambda params, routing: [objective(params, g, routing)[1][0] for g in (1, group)])
    logp_r, logp_rs = replay(params, stats["expert_idx"])
    np.testing.assert_allclose(np.asarray(logp_rs)[mask_BxN], np.asarray(logp_r)[mask_BxN], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(logp_r)[mask_BxN], np.asarray(logp)[mask_BxN], rtol=1e-5, atol=1e-5)

"""The jitted GRPO step: on 8 simulated devices it equals one device, and its first update is
on-policy (ratio 1: nothing clipped) when the old log-probs are the sampler's."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.configs import get_preset
from moe_jax.models import Transformer
from moe_jax.models.sampler import SamplingConfig, jit_generate
from moe_jax.parallel import init_sharded, make_mesh
from moe_jax.rl.config import GRPOLoss
from moe_jax.rl.grpo import group_advantages
from moe_jax.rl.policy import completion_width, rollout_rows
from moe_jax.rl.step import make_grpo_step
from moe_jax.train.optimizer import make_optimizer

CFG = dataclasses.replace(get_preset("tiny-moe"), n_layers=2, moe_dispatch="dense")
G, N = 4, 8
LOSS = GRPOLoss(loss_type="dapo", num_iterations=2, minibatches=2, beta=0.0)
SAMPLING = SamplingConfig(samples_per_prompt=G, max_new_tokens=N)


def _model_and_optimizer():
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    return model, nnx.Optimizer(model, make_optimizer(1e-3, warmup_steps=1, total_steps=10), wrt=nnx.Param)


@pytest.fixture(scope="module")
def rollout():
    model, _ = _model_and_optimizer()
    prompts = [[5, 17, 33, 9], [42, 7, 8, 9]]
    prompt_BxP = jnp.repeat(jnp.array(prompts, jnp.int32), G, axis=0)
    segments_BxP = jnp.ones_like(prompt_BxP)
    out = jit_generate(model, prompt_BxP, segments_BxP, max_new_tokens=N, eos_id=2, pad_id=0,
                       rng=jax.random.key(0), temperature=1.0)
    tokens, segment_ids = rollout_rows(prompt_BxP, segments_BxP, out["tokens"], out["mask"])
    rewards_B = jnp.asarray(np.random.default_rng(0).random(2 * G), jnp.float32)
    return {"tokens": tokens, "segment_ids": segment_ids, "mask": out["mask"], "old_logp": out["logprobs"],
            "advantages": group_advantages(rewards_B, G, scale="group")}


def _run(mesh, rollout, steps=2):
    model, optimizer = init_sharded(_model_and_optimizer, mesh) if mesh else _model_and_optimizer()
    step, state = make_grpo_step(model, optimizer, LOSS, sampling=SAMPLING, mesh=mesh)
    history = []
    for _ in range(steps):
        state, metrics = step(state, rollout)
        history.append(jax.device_get(metrics))
    return jax.device_get(nnx.to_pure_dict(state[0])), history


def test_two_steps_on_eight_devices_equal_one_device(rollout):
    params_1, metrics_1 = _run(None, rollout)
    params_8, metrics_8 = _run(make_mesh("data=2,expert=4"), rollout)
    for m1, m8 in zip(metrics_1, metrics_8, strict=True):
        for name in m1:
            np.testing.assert_allclose(m8[name], m1[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # Adam divides by sqrt(v): reduction-order noise in the gradients shows up as ~1e-6 in the
    # weights after 8 updates of size ~lr = 1e-3, so the bound is 1% of one update.
    for a, b in zip(jax.tree.leaves(params_1), jax.tree.leaves(params_8), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def test_first_update_is_on_policy(rollout):
    single = dataclasses.replace(LOSS, num_iterations=1, minibatches=1)
    model, optimizer = _model_and_optimizer()
    step, state = make_grpo_step(model, optimizer, single, sampling=SAMPLING)
    _, metrics = step(state, rollout)
    assert float(metrics["clip_ratio/region_mean"]) == 0.0
    assert float(metrics["grad_norm"]) > 0


def test_routing_replay_matches_on_policy_and_runs_the_inner_updates(rollout):
    def run(loss):
        model, optimizer = _model_and_optimizer()
        step, state = make_grpo_step(model, optimizer, loss, sampling=SAMPLING)
        return jax.device_get(step(state, rollout)[1])

    single = dataclasses.replace(LOSS, num_iterations=1, minibatches=1)
    plain, replayed = run(single), run(dataclasses.replace(single, routing_replay=True))
    for name in plain:  # the recorded routing is the policy's own: the same first update
        np.testing.assert_allclose(replayed[name], plain[name], rtol=1e-6, atol=1e-7, err_msg=name)
    inner = run(dataclasses.replace(LOSS, routing_replay=True))
    assert all(np.isfinite(v).all() for v in inner.values())


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_microbatch_accumulation_gives_the_same_update(rollout, loss_type):
    """Each loss type's normaliser survives the split: 2 accumulated microbatches = 1 batch, with
    the chunks holding different numbers of loss tokens."""
    mask = np.asarray(rollout["mask"]).copy()
    mask[: len(mask) // 2, N // 2:] = 0  # the first chunk counts fewer tokens than the second
    rollout = {**rollout, "mask": jnp.asarray(mask)}

    def run(microbatches):  # a one-layer dense policy: the accumulation does not depend on MoE
        model = Transformer(dataclasses.replace(get_preset("tiny-dense"), n_layers=1), rngs=nnx.Rngs(0))
        optimizer = nnx.Optimizer(model, make_optimizer(1e-3, warmup_steps=1, total_steps=10), wrt=nnx.Param)
        loss = GRPOLoss(loss_type=loss_type, beta=0.0)
        step, state = make_grpo_step(model, optimizer, loss, sampling=SamplingConfig(max_new_tokens=N),
                                     microbatches=microbatches)
        state, metrics = step(state, rollout)
        return jax.device_get(nnx.to_pure_dict(state[0])), jax.device_get(metrics)

    params_1, metrics_1 = run(1)
    params_2, metrics_2 = run(2)
    # On-policy, the loss is -mean(A) ~ 0 up to rounding: the weights below are the real check.
    np.testing.assert_allclose(metrics_2["policy_loss"], metrics_1["policy_loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics_2["grad_norm"], metrics_1["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(params_1), jax.tree.leaves(params_2), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_type", ["dapo", "dr_grpo"])
def test_padding_columns_past_every_completion_change_nothing(rollout, loss_type):
    """The loop trims completion columns that only hold padding (`completion_width`): the update
    must be the one of the untrimmed batch. The two normalisers padding could reach are DAPO's
    token count and Dr. GRPO's fixed length; grpo's per-sequence means use the same masked sums."""
    extra = 4
    padded = {**rollout,
              "tokens": jnp.pad(rollout["tokens"], ((0, 0), (0, extra))),
              "segment_ids": jnp.pad(rollout["segment_ids"], ((0, 0), (0, extra))),
              "mask": jnp.pad(rollout["mask"], ((0, 0), (0, extra))),
              "old_logp": jnp.pad(rollout["old_logp"], ((0, 0), (0, extra)))}
    loss = dataclasses.replace(LOSS, loss_type=loss_type)
    sampling = dataclasses.replace(SAMPLING, max_new_tokens=N + extra)

    def run(batch):
        model, optimizer = _model_and_optimizer()
        step, state = make_grpo_step(model, optimizer, loss, sampling=sampling)
        state, metrics = step(state, batch)
        return jax.device_get(nnx.to_pure_dict(state[0])), jax.device_get(metrics)

    (params, metrics), (params_padded, metrics_padded) = run(rollout), run(padded)
    for name in metrics:
        np.testing.assert_allclose(metrics_padded[name], metrics[name], rtol=1e-5, atol=1e-7, err_msg=name)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_padded), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)  # 1% of one update, as above


def test_completion_width_rounds_up_to_a_power_of_two_within_the_budget():
    assert [completion_width(n, 96) for n in (0, 5, 8, 9, 33, 64, 65, 96)] == [8, 8, 8, 16, 64, 64, 96, 96]

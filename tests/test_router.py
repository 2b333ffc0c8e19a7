import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest
from flax import nnx

from moe_jax.configs import ModelConfig
from moe_jax.models import router
from moe_jax.models.moe import MoELayer

# Router flavours of the presets: DeepSeek-V3 (sigmoid, groups, bias, scaling; groups of 2 as in
# tiny-moe, of 4 as in the full model's 32 where a group scores its top-2), DeepSeek-V2-Lite
# (softmax, raw weights), Mixtral/Qwen3 (softmax, renormalised top-k).
ROUTERS = {
    "v3": {"score_func": "sigmoid", "n_group": 4, "topk_group": 2, "norm_topk_prob": True,
               "routed_scaling_factor": 2.5, "n_shared_experts": 1},
    "v3-groups-of-4": {"score_func": "sigmoid", "n_group": 2, "topk_group": 1, "norm_topk_prob": True,
                       "routed_scaling_factor": 2.5},
    "v2-lite": {"score_func": "softmax", "norm_topk_prob": False, "n_shared_experts": 2},
    "mixtral": {"score_func": "softmax", "norm_topk_prob": True},
}


def _cfg(**router_options) -> ModelConfig:
    return ModelConfig(d_model=16, n_heads=2, n_routed_experts=8, moe_d_ff=8, top_k=2,
                       moe_dispatch="dense", **router_options)


@pytest.mark.parametrize("flavour", list(ROUTERS))
def test_moe_layer_matches_token_loop_reference(flavour):
    cfg = _cfg(**ROUTERS[flavour])
    layer = MoELayer(cfg, rngs=nnx.Rngs(0))
    bias = np.random.default_rng(1).normal(size=8) * 0.2 if flavour.startswith("v3") else np.zeros(8)
    layer.router_bias.set_value(jnp.asarray(bias, jnp.float32))
    x = np.random.default_rng(2).normal(size=(2, 5, 16)).astype(np.float32)
    y, stats = layer(jnp.asarray(x), jnp.ones((2, 5), bool))

    def arr(v):
        return np.asarray(v.get_value(), np.float64)

    shared = ((arr(layer.shared.w_gate), arr(layer.shared.w_up), arr(layer.shared.w_down))
              if layer.shared is not None else None)
    expected, chosen = ref.moe_layer(
        x.reshape(10, 16), arr(layer.w_router), bias, arr(layer.w_gate), arr(layer.w_up),
        arr(layer.w_down), top_k=cfg.top_k, score_func=cfg.score_func, n_group=cfg.n_group,
        topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob,
        routed_scaling_factor=cfg.routed_scaling_factor, shared=shared)
    np.testing.assert_allclose(np.asarray(y).reshape(10, 16), expected, rtol=1e-5, atol=1e-5)
    expected_load = np.bincount(np.ravel(chosen), minlength=8)
    np.testing.assert_array_equal(stats["load"], expected_load)


def test_group_limit_excludes_best_single_expert_in_weak_group():
    cfg = _cfg(score_func="sigmoid", n_group=4, topk_group=2)
    # Groups of 2: group 0 holds the single best expert (0.9) but a weak partner (sum 0.95);
    # groups 1 and 2 sum higher (1.4, 1.2), so experts 0 and 1 are ineligible.
    scores = np.array([[0.9, 0.05, 0.7, 0.7, 0.6, 0.6, 0.1, 0.1]])
    logits = np.log(scores / (1 - scores))
    idx, weights, _ = router.route(jnp.asarray(logits), None, cfg)
    assert sorted(np.asarray(idx[0]).tolist()) == [2, 3]
    np.testing.assert_allclose(weights[0], [0.7, 0.7], rtol=1e-6)  # raw scores: norm_topk_prob off
    normed = dataclasses.replace(cfg, norm_topk_prob=True, routed_scaling_factor=2.0)
    np.testing.assert_allclose(router.route(jnp.asarray(logits), None, normed)[1][0], [1.0, 1.0],
                               rtol=1e-6)


def test_bias_selects_but_gate_uses_unbiased_scores():
    cfg = _cfg(score_func="sigmoid")
    logits = jnp.asarray([[2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -4.0, -5.0]])
    bias = jnp.zeros(8).at[7].set(100.0)
    idx, weights, scores = router.route(logits, bias, cfg)
    assert set(np.asarray(idx[0]).tolist()) == {0, 7}
    np.testing.assert_allclose(np.sort(weights[0]), np.sort(scores[0, jnp.array([0, 7])]), rtol=1e-6)


def test_switch_loss_hand_cases():
    n_experts = 4
    # Perfect balance: f_i = 1 and P_i = 1/E, so the loss is exactly 1.
    idx = jnp.asarray([[0], [1], [2], [3]])
    uniform = jnp.full((4, n_experts), 0.25)
    assert float(router.switch_balance_loss(uniform, idx, jnp.ones(4, bool))) == pytest.approx(1.0)
    # Collapse onto expert 0 with P_0 = 0.7: f_0 = E, loss = E * 0.7.
    scores = jnp.tile(jnp.asarray([[0.7, 0.1, 0.1, 0.1]]), (4, 1))
    collapsed = router.switch_balance_loss(scores, jnp.zeros((4, 1), jnp.int32), jnp.ones(4, bool))
    assert float(collapsed) == pytest.approx(4 * 0.7)
    # Padding tokens do not count.
    masked = router.switch_balance_loss(scores, jnp.asarray([[0], [0], [1], [1]]),
                                        jnp.asarray([True, True, False, False]))
    assert float(masked) == pytest.approx(4 * 0.7)


def test_sequence_loss_matches_loop_over_sequences():
    rng = np.random.default_rng(3)
    b, t, e, k = 3, 6, 8, 2
    scores = rng.uniform(0.05, 1.0, size=(b, t, e))  # sigmoid-like, unnormalised
    idx = np.stack([[rng.choice(e, k, replace=False) for _ in range(t)] for _ in range(b)])
    mask = np.ones((b, t), bool)
    mask[1, 4:] = False
    mask[2] = False  # an all-padding row is left out of the mean
    per_sequence = []
    for row in range(2):
        valid = np.flatnonzero(mask[row])
        f = np.zeros(e)
        for tok in valid:
            for ex in idx[row, tok]:
                f[ex] += e / (k * len(valid))
        s_norm = scores[row, valid] / scores[row, valid].sum(-1, keepdims=True)
        per_sequence.append(np.sum(f * s_norm.mean(0)))
    got = router.sequence_balance_loss(jnp.asarray(scores), jnp.asarray(idx), jnp.asarray(mask))
    assert float(got) == pytest.approx(np.mean(per_sequence), rel=1e-5)


def test_z_loss_entropy_and_max_violation_hand_cases():
    logits = jnp.zeros((3, 8))
    assert float(router.router_z_loss(logits, jnp.ones(3, bool))) == pytest.approx(math.log(8) ** 2)
    uniform = jax.nn.softmax(logits)
    assert float(router.router_entropy(uniform, jnp.ones(3, bool))) == pytest.approx(math.log(8))
    assert float(router.max_violation(jnp.asarray([4.0, 0.0, 1.0, 3.0]))) == pytest.approx(1.0)


def test_loss_free_bias_update_steps_by_sign():
    new = router.loss_free_bias_update(jnp.zeros(4), jnp.asarray([4.0, 0.0, 2.0, 2.0]), 0.01)
    np.testing.assert_allclose(new, [-0.01, 0.01, 0.0, 0.0])


def test_layer_losses_weighted_and_padding_excluded():
    cfg = _cfg(aux_loss_coef=0.1, seq_aux_loss_coef=0.01, router_z_loss_coef=0.001)
    layer = MoELayer(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 4, 16))
    mask = jnp.asarray([[True] * 4, [True, True, False, False]])
    _, stats = layer(x, mask)
    expected = 0.1 * stats["switch_loss"] + 0.01 * stats["seq_loss"] + 0.001 * stats["z_loss"]
    assert float(stats["aux_loss"]) == pytest.approx(float(expected), rel=1e-6)
    assert float(stats["load"].sum()) == 6 * cfg.top_k
    # The padded tokens' values must not matter.
    x_other_padding = x.at[1, 2:].set(100.0)
    _, stats_other = layer(x_other_padding, mask)
    for name in ("aux_loss", "max_vio", "router_entropy"):
        assert float(stats_other[name]) == pytest.approx(float(stats[name]), rel=1e-6)


def test_unused_loss_terms_are_not_computed():
    layer = MoELayer(dataclasses.replace(_cfg()), rngs=nnx.Rngs(0))
    _, stats = layer(jnp.ones((1, 2, 16)), jnp.ones((1, 2), bool))
    assert not {"switch_loss", "seq_loss", "z_loss"} & set(stats)
    assert float(stats["aux_loss"]) == 0.0


@pytest.mark.parametrize("backend, capacity_factor", [
    ("blocked", 1.25), ("ragged", 1.25), ("capacity", 8.0 / 2), ("auto", 1.25)])
def test_layer_backends_equal_dense_in_outputs_and_gradients(backend, capacity_factor):
    """Through the whole layer (router, shared expert, padding): outputs and every gradient."""
    base = _cfg(**ROUTERS["v3"], aux_loss_coef=0.1)
    x = jax.random.normal(jax.random.key(3), (2, 6, 16))
    mask = jnp.asarray([[True] * 6, [False, False, True, True, True, True]])

    def value_and_grads(cfg):
        layer = MoELayer(cfg, rngs=nnx.Rngs(0))

        def loss(layer, x):
            y, stats = layer(x, mask)
            return jnp.sum(jnp.where(mask[..., None], y, 0.0) ** 2) + stats["aux_loss"], stats

        (value, stats), grads = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(layer, x)
        return value, stats, grads

    expected, _, expected_grads = value_and_grads(base)
    got, stats, grads = value_and_grads(dataclasses.replace(
        base, moe_dispatch=backend, capacity_factor=capacity_factor))
    assert float(stats["dropped_fraction"]) == 0.0
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    for g, e in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.configs import get_preset
from moe_jax.models import Transformer
from moe_jax.models.moe import RouterBias
from moe_jax.train.losses import count_targets, mtp_acceptance, mtp_loss, next_token_loss
from moe_jax.train.optimizer import learning_rate_schedule, make_optimizer

SEGMENTS = np.array([[1, 1, 1, 2, 2, 2, 2, 0], [0, 0, 3, 3, 3, 3, 3, 3]])
LOSS_MASK = np.array([[1, 1, 1, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 0, 1]])


def _loop_loss(logits, tokens, segments, mask, shift):
    """Average -log p over every (row, i) whose target i + shift is valid, by explicit loops."""
    total, count = 0.0, 0
    for b in range(tokens.shape[0]):
        for i in range(tokens.shape[1] - shift):
            j = i + shift
            if segments[b, j] != 0 and all(segments[b, i:j + 1] == segments[b, i]) and mask[b, j]:
                row = logits[b, i].astype(np.float64)
                log_z = np.log(np.exp(row - row.max()).sum()) + row.max()
                total += log_z - row[tokens[b, j]]
                count += 1
    return total / count, count


def test_next_token_loss_matches_loop_and_skips_document_boundaries():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 8, 11)).astype(np.float32)
    tokens = rng.integers(0, 11, size=(2, 8))
    loss = next_token_loss(jnp.asarray(logits), jnp.asarray(tokens), jnp.asarray(SEGMENTS),
                           jnp.asarray(LOSS_MASK))
    expected, expected_count = _loop_loss(logits, tokens, SEGMENTS, LOSS_MASK, 1)
    assert int(count_targets(jnp.asarray(SEGMENTS), jnp.asarray(LOSS_MASK), [1])[0]) == expected_count
    assert expected_count == 9  # 5 + 4 targets inside documents with the mask on
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_mtp_loss_targets_k_plus_one_tokens_ahead():
    rng = np.random.default_rng(1)
    mtp_logits = rng.normal(size=(2, 2, 8, 11)).astype(np.float32)
    tokens = rng.integers(0, 11, size=(2, 8))
    got = mtp_loss(jnp.asarray(mtp_logits), jnp.asarray(tokens), jnp.asarray(SEGMENTS), jnp.asarray(LOSS_MASK))
    expected = np.mean([_loop_loss(mtp_logits[k - 1], tokens, SEGMENTS, LOSS_MASK, k + 1)[0] for k in (1, 2)])
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_schedule_warms_up_then_decays_to_a_tenth():
    schedule = learning_rate_schedule(1e-3, warmup_steps=10, total_steps=110)
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == pytest.approx(1e-3)
    assert float(schedule(60)) == pytest.approx(0.55e-3, rel=1e-4)  # cosine midpoint
    assert float(schedule(110)) == pytest.approx(1e-4)


def test_weight_decay_hits_matrices_only_and_never_the_router_bias():
    model = Transformer(get_preset("tiny-moe"), rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, make_optimizer(1.0, warmup_steps=1, total_steps=10, weight_decay=0.5),
                              wrt=nnx.Param)
    before = nnx.state(model, nnx.Param)
    bias_before = jax.tree.leaves(nnx.state(model, RouterBias))
    optimizer.update(model, jax.tree.map(jnp.zeros_like, before))  # zero gradients: decay alone
    after = nnx.state(model, nnx.Param)
    lr_step1 = float(learning_rate_schedule(1.0, 1, 10)(0))
    for (path, b), (_, a) in zip(nnx.to_flat_state(before), nnx.to_flat_state(after), strict=True):
        b, a = np.asarray(b.get_value()), np.asarray(a.get_value())
        expected = b * (1 - 0.5 * lr_step1) if b.ndim >= 2 else b
        np.testing.assert_allclose(a, expected, rtol=1e-6, err_msg=str(path))
    for b, a in zip(bias_before, jax.tree.leaves(nnx.state(model, RouterBias)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_grpo_schedule_counts_updates_not_steps():
    """GRPO makes μ × minibatches updates a step: the schedule warms up over warmup_steps steps
    and reaches its floor at the run's last update, not a quarter of the way in."""
    from moe_jax.rl.config import GRPOConfig, GRPOLoss
    from moe_jax.train.config_tree import override
    from moe_jax.train.optimizer import run_schedule

    cfg = GRPOConfig(steps=10, loss=GRPOLoss(num_iterations=2, minibatches=2))
    cfg = override(cfg, {"optimizer.learning_rate": 1e-3, "optimizer.warmup_steps": 2})
    schedule = run_schedule(cfg)
    assert float(schedule(0)) == 0.0 and float(schedule(8)) == pytest.approx(1e-3)  # 2 steps x 4 updates
    assert float(schedule(20)) > 5e-4  # mid-run (update 20 of 40) still high
    assert float(schedule(39)) == pytest.approx(1e-4, rel=3e-2)  # the floor at the last update
    plain = override(cfg, {"loss.num_iterations": 1, "loss.minibatches": 1})
    assert float(run_schedule(plain)(2)) == pytest.approx(1e-3)  # one update a step: steps as before


def test_mtp_acceptance_counts_drafts_equal_to_the_main_models_next_choice():
    """A loop over positions: the depth-1 draft at i (for token i + 2) against the main model's
    argmax at i + 1, where token i + 2 is a target of the same document."""
    rng = np.random.default_rng(0)
    B, T, V = 2, 9, 5
    logits = rng.normal(size=(B, T, V)).astype(np.float32)
    mtp = rng.normal(size=(1, B, T, V)).astype(np.float32)
    mtp[0, :, :-2] += 3.0 * np.eye(V)[logits[:, 1:-1].argmax(-1)] * (rng.random((B, T - 2, 1)) < 0.5)
    segments = np.array([[1, 1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1]])
    loss_mask = np.ones((B, T), np.int32)
    loss_mask[1, 3] = 0
    accepted = total = 0
    for b in range(B):
        for i in range(T - 2):
            if segments[b, i] == segments[b, i + 2] != 0 and loss_mask[b, i + 2]:
                total += 1
                accepted += int(mtp[0, b, i].argmax() == logits[b, i + 1].argmax())
    assert 0 < accepted < total
    got = mtp_acceptance(jnp.asarray(mtp), jnp.asarray(logits), jnp.asarray(segments), jnp.asarray(loss_mask))
    assert float(got) == pytest.approx(accepted / total, abs=1e-7)

"""GKD's generalized JSD (Agarwal et al. 2024, eq. 1; TRL's conventions) against hand-computed
values and a float64 numpy reference, its gradient against finite differences, and the top-k
cache against the full logits."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from moe_jax.distill import generalized_jsd, teacher_topk, topk_generalized_jsd


def _reference(student_logits, teacher_logits, mask, beta, temperature):
    """Plain loops in float64: softmax, the three cases of eq. 1, the masked mean."""
    total, count = 0.0, 0
    for b in range(student_logits.shape[0]):
        for t in range(student_logits.shape[1]):
            if not mask[b, t]:
                continue
            s = np.exp(student_logits[b, t] / temperature)
            s /= s.sum()
            q = np.exp(teacher_logits[b, t] / temperature)
            q /= q.sum()

            def kl(p, r):
                return sum(pi * math.log(pi / ri) for pi, ri in zip(p, r) if pi > 0)

            if beta == 0:
                value = kl(q, s)
            elif beta == 1:
                value = kl(s, q)
            else:
                m = beta * q + (1 - beta) * s
                value = beta * kl(q, m) + (1 - beta) * kl(s, m)
            total, count = total + value, count + 1
    return total / max(count, 1)


def test_hand_computed_two_token_case():
    """Student uniform over 2 tokens, teacher (0.75, 0.25): every case by hand."""
    student = jnp.log(jnp.asarray([[[0.5, 0.5]]]))
    teacher = jnp.log(jnp.asarray([[[0.75, 0.25]]]))
    mask = jnp.ones((1, 1))
    forward = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # KL(teacher || student)
    reverse = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)  # KL(student || teacher)
    m = (0.625, 0.375)  # 0.5 * teacher + 0.5 * student
    jsd = 0.5 * (0.75 * math.log(0.75 / m[0]) + 0.25 * math.log(0.25 / m[1])) + 0.5 * (
        0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1]))
    assert float(generalized_jsd(student, teacher, mask, beta=0.0)) == pytest.approx(forward, rel=1e-6)
    assert float(generalized_jsd(student, teacher, mask, beta=1.0)) == pytest.approx(reverse, rel=1e-6)
    assert float(generalized_jsd(student, teacher, mask, beta=0.5)) == pytest.approx(jsd, rel=1e-5)
    assert float(generalized_jsd(teacher, teacher, mask, beta=0.3)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_against_the_float64_reference_with_masks(beta, temperature):
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(2, 5, 7)) * 2, rng.normal(size=(2, 5, 7)) * 2
    mask = rng.random((2, 5)) < 0.6
    mask[0, 0] = True
    got = generalized_jsd(jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32), jnp.asarray(mask),
                          beta=beta, temperature=temperature)
    assert float(got) == pytest.approx(_reference(student, teacher, mask, beta, temperature), rel=1e-5, abs=1e-7)
    # Masked positions do not count: changing them changes nothing.
    student[~mask] += 5.0
    again = generalized_jsd(jnp.asarray(student, jnp.float32), jnp.asarray(teacher, jnp.float32), jnp.asarray(mask),
                            beta=beta, temperature=temperature)
    assert float(again) == pytest.approx(float(got), rel=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_gradient_matches_finite_differences(beta):
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        student = jnp.asarray(rng.normal(size=(2, 3, 5)))
        teacher = jnp.asarray(rng.normal(size=(2, 3, 5)))
        mask = jnp.asarray([[1, 1, 0], [0, 1, 1]])
        check_grads(lambda s: generalized_jsd(s, teacher, mask, beta=beta, temperature=1.5), (student,), order=1,
                    modes=["rev"], atol=1e-6, rtol=1e-6)
        check_grads(lambda t: generalized_jsd(student, t, mask, beta=beta), (teacher,), order=1, modes=["rev"],
                    atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_topk_cache_with_k_equal_v_is_the_full_divergence(beta, temperature):
    rng = np.random.default_rng(2)
    student = jnp.asarray(rng.normal(size=(2, 4, 9)), jnp.float32)
    teacher = jnp.asarray(rng.normal(size=(2, 4, 9)) * 3, jnp.float32)
    mask = jnp.asarray(rng.random((2, 4)) < 0.7)
    ids, logp = teacher_topk(teacher, k=9)
    assert ids.dtype == jnp.int32 and logp.shape == (2, 4, 9)
    full = generalized_jsd(student, teacher, mask, beta=beta, temperature=temperature)
    cached = topk_generalized_jsd(student, ids, logp, mask, beta=beta, temperature=temperature)
    np.testing.assert_allclose(cached, full, rtol=1e-5, atol=1e-7)


def test_topk_below_v_renormalises_both_sides_over_the_teachers_k_ids():
    rng = np.random.default_rng(3)
    student, teacher = rng.normal(size=(1, 3, 8)), rng.normal(size=(1, 3, 8)) * 2
    mask = np.ones((1, 3), bool)
    ids, logp = teacher_topk(jnp.asarray(teacher, jnp.float32), k=3)
    top = np.argsort(-teacher, axis=-1)[..., :3]
    np.testing.assert_array_equal(np.sort(np.asarray(ids), -1), np.sort(top, -1))
    # The reference: both restricted to the teacher's 3 ids, then the plain divergence at T = 1.3.
    restricted_student = np.take_along_axis(student, top, -1)
    restricted_teacher = np.take_along_axis(teacher, top, -1)
    expected = _reference(restricted_student, restricted_teacher, mask, 0.5, 1.3)
    got = topk_generalized_jsd(jnp.asarray(student, jnp.float32), ids, logp, jnp.asarray(mask), beta=0.5,
                               temperature=1.3)
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_bad_beta_and_masked_vocabulary():
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(jnp.zeros((1, 1, 2)), jnp.zeros((1, 1, 2)), jnp.ones((1, 1)), beta=1.5)
    # A teacher that gives a token no mass (-inf logit): finite loss and finite gradients.
    teacher = jnp.asarray([[[0.0, -jnp.inf, 1.0]]])
    student = jnp.asarray([[[0.3, 0.2, 0.1]]])
    loss, grad = jax.value_and_grad(lambda s: generalized_jsd(s, teacher, jnp.ones((1, 1)), beta=0.0))(student)
    assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad)))

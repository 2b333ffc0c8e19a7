"""`moe_jax.rl.grpo` against hand-written float64 references: explicit loops over sequences and
tokens written from the papers' formulas (sharing no code with the library), hand-computed small
cases, finite-difference gradients and crafted clip-metric cases."""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.rl import grpo

# ----------------------------------------------------------------------------- references


def ref_advantages(rewards, group_size, scale, eps):
    rewards = [float(r) for r in rewards]
    n = len(rewards)

    def std(values):  # Bessel-corrected
        mean = sum(values) / len(values)
        return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))

    out = []
    for i, r in enumerate(rewards):
        g = i // group_size
        group = rewards[g * group_size:(g + 1) * group_size]
        a = r - sum(group) / len(group)
        if scale == "group":
            a /= std(group) + eps
        elif scale == "batch":
            a /= std(rewards) + eps
        out.append(a)
    assert len(out) == n
    return np.array(out)


def ref_policy_loss(logp, old, adv, mask, *, loss_type, epsilon=0.2, epsilon_high=None, beta=0.0,
                    ref=None, level="token", max_completion_length=None, normalizer=None):
    """Loss and metrics, one token at a time."""
    B, T = logp.shape
    eps_high = epsilon if epsilon_high is None else epsilon_high
    token_loss = [[0.0] * T for _ in range(B)]
    low = high = counted = 0
    seq_low = seq_high = seq_region = seqs = 0
    kl_sum = 0.0
    for i in range(B):
        n_i = sum(1 for t in range(T) if mask[i][t])
        if level == "token":
            ratios = [math.exp(logp[i][t] - old[i][t]) if mask[i][t] else 1.0 for t in range(T)]
        else:  # GSPO: the geometric mean of the sequence's token ratios
            mean_log = sum(logp[i][t] - old[i][t] for t in range(T) if mask[i][t]) / max(n_i, 1)
            ratios = [math.exp(mean_log)] * T
        a = float(adv[i])
        for t in range(T):
            if not mask[i][t]:
                continue
            r = ratios[t]
            clipped = min(max(r, 1 - epsilon), 1 + eps_high)
            loss = -min(r * a, clipped * a)
            if ref is not None:
                d = ref[i][t] - logp[i][t]
                k3 = math.exp(d) - d - 1
                kl_sum += k3
                if beta > 0:
                    loss += beta * k3
            token_loss[i][t] = loss
            counted += 1
            is_low, is_high = r < 1 - epsilon and a < 0, r > 1 + eps_high and a > 0
            low += is_low
            high += is_high
        if n_i and level != "token":
            seqs += 1
            r = ratios[0]
            is_low, is_high = r < 1 - epsilon and a < 0, r > 1 + eps_high and a > 0
            seq_low, seq_high, seq_region = seq_low + is_low, seq_high + is_high, seq_region + (is_low or is_high)

    total = sum(sum(row) for row in token_loss)
    if loss_type == "grpo":
        value = sum(sum(token_loss[i]) / max(sum(1 for t in range(T) if mask[i][t]), 1) for i in range(B)) / B
    elif loss_type == "bnpo" or (loss_type == "dapo" and normalizer is None):
        value = total / max(counted, 1)
    elif loss_type == "dapo":
        value = total / normalizer
    else:
        value = total / (B * (T if max_completion_length is None else max_completion_length))

    if level == "token":
        region = sum(1 for i in range(B) for t in range(T) if mask[i][t] and (
            (math.exp(logp[i][t] - old[i][t]) < 1 - epsilon and adv[i] < 0)
            or (math.exp(logp[i][t] - old[i][t]) > 1 + eps_high and adv[i] > 0)))
        metrics = {"clip_ratio/low_mean": low / counted, "clip_ratio/high_mean": high / counted,
                   "clip_ratio/region_mean": region / counted}
    else:
        metrics = {"clip_ratio/low_mean": seq_low / seqs, "clip_ratio/high_mean": seq_high / seqs,
                   "clip_ratio/region_mean": seq_region / seqs}
    if ref is not None:
        metrics["kl"] = kl_sum / counted
    return value, metrics


# ----------------------------------------------------------------------------- data


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def make_batch(seed=0, B=8, T=7, spread=0.3):
    """Ratios on both sides of both clip boundaries and between 1 + ε and 1 + ε_high, at token and
    at sequence level (each row's masked mean log-ratio is set to a chosen bias); advantages of both
    signs and one zero; ragged masks including an empty row; garbage (-inf / huge) in the padding."""
    rng = np.random.default_rng(seed)
    # Row i's sequence ratio exp(bias_i) against A_i: 1.24 (clipped unless ε_high = 0.28) with A > 0,
    # 0.67 with A < 0 (low), 1.65 with A > 0 (high), 1.05 with A = 0, 1.35 with A < 0 and 0.74 with
    # A > 0 (outside the range, not clipped), 0.95, and an empty row.
    bias = np.array([0.215, -0.4, 0.5, 0.05, 0.3, -0.3, -0.05, 0.0])[:B]
    sign = np.array([1, -1, 1, 0, -1, 1, -1, 1])[:B]
    adv = sign * rng.uniform(0.5, 1.5, B)
    lengths = rng.integers(2, T + 1, B)
    lengths[0] = T
    lengths[-1] = 0
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float64)
    noise = rng.normal(0.0, spread, (B, T)) * mask
    noise -= (noise.sum(1) / np.maximum(mask.sum(1), 1))[:, None] * mask
    old = rng.normal(-2.0, 0.7, (B, T))
    logp = old + bias[:, None] + noise
    ref = old + rng.normal(0.0, 0.3, (B, T))
    logp = np.where(mask > 0, logp, -np.inf)
    old = np.where(mask > 0, old, 0.0)
    ref = np.where(mask > 0, ref, 1e30)
    entropy = rng.uniform(0.0, 3.0, (B, T))
    return {"logp": logp, "old": old, "ref": ref, "adv": adv, "mask": mask, "entropy": entropy}


LEVELS = ("token", "sequence", "sequence_token")
CASES = list(itertools.product(grpo.LOSS_TYPES, LEVELS, (0.0, 0.04), (None, 0.28)))


def _kwargs(loss_type, level, beta, epsilon_high):
    return {"loss_type": loss_type, "epsilon": 0.2, "epsilon_high": epsilon_high, "beta": beta,
            "importance_sampling_level": level}


# ----------------------------------------------------------------------------- advantages


def test_group_advantages_hand_computed(x64):
    rewards = jnp.array([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    # group 0: mean 1/4, std (ddof=1) = sqrt((9/16 + 3/16) / 3) = 1/2; group 1: mean 1/2, std = sqrt(1/3)
    s3 = math.sqrt(1 / 3)
    np.testing.assert_allclose(grpo.group_advantages(rewards, 4, "group", eps=0.0)[:8],
                               [1.5, -0.5, -0.5, -0.5, 0.5 / s3, 0.5 / s3, -0.5 / s3, -0.5 / s3], rtol=1e-12)
    np.testing.assert_array_equal(grpo.group_advantages(rewards, 4, "group")[8:], 0.0)  # zero std: A = 0
    np.testing.assert_allclose(grpo.group_advantages(rewards, 4, "none"),
                               [0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5, 0, 0, 0, 0], atol=1e-12)
    # batch: mean 5/12 over all 12, Σ(r − mean)^2 = 3·(7/12)^2 + 5·(5/12)^2 + 4·(1/12)^2 = 276/144
    batch_std = math.sqrt(276 / 144 / 11)
    np.testing.assert_allclose(grpo.group_advantages(rewards, 4, "batch", eps=1e-4)[:4],
                               np.array([0.75, -0.25, -0.25, -0.25]) / (batch_std + 1e-4), rtol=1e-12)


@pytest.mark.parametrize("scale", grpo.ADVANTAGE_SCALES)
@pytest.mark.parametrize("group_size", [2, 5])
def test_group_advantages_vs_reference(x64, scale, group_size):
    rewards = np.random.default_rng(group_size).normal(size=4 * group_size)
    rewards[:group_size] = 0.3  # one zero-std group
    got = grpo.group_advantages(jnp.asarray(rewards), group_size, scale)
    np.testing.assert_allclose(got, ref_advantages(rewards, group_size, scale, 1e-4), rtol=1e-6, atol=1e-12)


def test_group_advantages_float32_and_errors():
    rewards = np.array([1, 0, 1, 1, 0, 0], np.float32)
    got = grpo.group_advantages(rewards, 3)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, ref_advantages(rewards, 3, "group", 1e-4), rtol=1e-5)
    assert grpo.group_advantages(np.array([1, 0, 1, 1]), 2).dtype == jnp.float32  # integer rewards
    with pytest.raises(ValueError, match="multiple of group_size"):
        grpo.group_advantages(rewards, 4)
    with pytest.raises(ValueError, match="unknown scale"):
        grpo.group_advantages(rewards, 3, scale="std")
    with pytest.raises(ValueError, match="group_size >= 2"):
        grpo.group_advantages(rewards, 1)


def test_zero_std_groups_overlong_and_truncation():
    rewards = np.array([1, 1, 1, 0, 1, 0, 0.5, 0.5, 0.5])
    np.testing.assert_array_equal(grpo.zero_std_groups(rewards, 3), [True, False, True])
    lengths = np.array([0, 5, 6, 7, 8, 10, 11])
    # DAPO eq. 13 with L_max = 10, L_cache = 4: the ramp starts after 6 tokens.
    np.testing.assert_allclose(grpo.overlong_penalty(lengths, 10, 4), [0, 0, 0, -0.25, -0.5, -1, -1])
    np.testing.assert_allclose(grpo.overlong_penalty(lengths, 10, 0), [0, 0, 0, 0, 0, 0, -1])
    with pytest.raises(ValueError):
        grpo.overlong_penalty(lengths, 10, 11)
    mask = jnp.ones((3, 4), jnp.int32)
    out = grpo.mask_truncated(mask, jnp.array([False, True, False]))
    assert out.dtype == jnp.int32
    np.testing.assert_array_equal(out, [[1] * 4, [0] * 4, [1] * 4])


# ----------------------------------------------------------------------------- the loss


def _call(batch, *, ref=True, entropy=False, **kwargs):
    return grpo.policy_loss(jnp.asarray(batch["logp"]), jnp.asarray(batch["old"]), jnp.asarray(batch["adv"]),
                            jnp.asarray(batch["mask"]), ref_logp_BxT=jnp.asarray(batch["ref"]) if ref else None,
                            entropy_BxT=jnp.asarray(batch["entropy"]) if entropy else None, **kwargs)


@pytest.mark.parametrize("loss_type,level,beta,epsilon_high", CASES)
def test_policy_loss_vs_reference(x64, loss_type, level, beta, epsilon_high):
    batch = make_batch()
    kwargs = _kwargs(loss_type, level, beta, epsilon_high)
    extra = {"normalizer": 3.0 * batch["mask"].sum()} if loss_type == "dapo" else {}
    if loss_type == "dr_grpo":
        extra = {"max_completion_length": 9}
    loss, metrics = _call(batch, **kwargs, **extra)
    want, want_metrics = ref_policy_loss(batch["logp"], batch["old"], batch["adv"], batch["mask"],
                                         ref=batch["ref"], level=level.replace("_token", ""), **{
                                             k: v for k, v in kwargs.items()
                                             if k not in ("importance_sampling_level",)}, **extra)
    assert loss.dtype == jnp.float64
    np.testing.assert_allclose(float(loss), want, rtol=1e-6, atol=1e-12)
    assert set(metrics) == set(want_metrics)
    for name, value in want_metrics.items():
        np.testing.assert_allclose(float(metrics[name]), value, rtol=1e-6, atol=1e-12, err_msg=name)


def test_dapo_without_normalizer_is_local_token_mean_and_dr_grpo_defaults_to_T(x64):
    batch = make_batch(seed=1)
    dapo, _ = _call(batch, loss_type="dapo")
    bnpo, _ = _call(batch, loss_type="bnpo")
    np.testing.assert_allclose(dapo, bnpo, rtol=1e-12)
    dr, _ = _call(batch, loss_type="dr_grpo")
    want, _ = ref_policy_loss(batch["logp"], batch["old"], batch["adv"], batch["mask"], loss_type="dr_grpo",
                              max_completion_length=batch["mask"].shape[1])
    np.testing.assert_allclose(dr, want, rtol=1e-6)


def test_fp32_jit_matches_reference():
    batch = make_batch(seed=2)
    fn = jax.jit(functools.partial(grpo.policy_loss, loss_type="dapo", epsilon=0.2, epsilon_high=0.28,
                                   beta=0.04))
    args = [jnp.asarray(batch[k], jnp.float32) for k in ("logp", "old", "adv", "mask")]
    loss, metrics = fn(*args, ref_logp_BxT=jnp.asarray(batch["ref"], jnp.float32),
                       normalizer=jnp.float32(batch["mask"].sum() * 2))
    assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
    assert all(v.dtype == jnp.float32 and np.isfinite(float(v)) for v in metrics.values())
    want, _ = ref_policy_loss(batch["logp"], batch["old"], batch["adv"], batch["mask"], loss_type="dapo",
                              epsilon_high=0.28, beta=0.04, ref=batch["ref"], normalizer=batch["mask"].sum() * 2)
    np.testing.assert_allclose(float(loss), want, rtol=2e-5)


# ----------------------------------------------------------------------------- gradients


def _finite_difference(batch, kwargs, extra, h=1e-6):
    mask = batch["mask"]
    grad = np.zeros_like(batch["logp"])
    for i, t in zip(*np.nonzero(mask)):
        values = []
        for sign in (1, -1):
            logp = batch["logp"].copy()
            logp[i, t] += sign * h
            values.append(ref_policy_loss(logp, batch["old"], batch["adv"], mask, ref=batch["ref"],
                                          level=kwargs["importance_sampling_level"].replace("_token", ""),
                                          **{k: v for k, v in kwargs.items() if k != "importance_sampling_level"},
                                          **extra)[0])
        grad[i, t] = (values[0] - values[1]) / (2 * h)
    return grad


@pytest.mark.parametrize("loss_type,level", list(itertools.product(grpo.LOSS_TYPES, LEVELS)))
def test_gradient_vs_finite_differences(x64, loss_type, level):
    batch = make_batch(seed=3, B=4, T=5)
    kwargs = _kwargs(loss_type, level, beta=0.04, epsilon_high=0.28)
    extra = {"normalizer": 2.0 * batch["mask"].sum()} if loss_type == "dapo" else {}

    def loss_of(logp):
        return grpo.policy_loss(logp, jnp.asarray(batch["old"]), jnp.asarray(batch["adv"]),
                                jnp.asarray(batch["mask"]), ref_logp_BxT=jnp.asarray(batch["ref"]),
                                **kwargs, **extra)[0]

    grad = jax.grad(loss_of)(jnp.asarray(batch["logp"]))
    assert np.all(np.isfinite(grad)), "padding with -inf log-probs must not leak NaN into the gradient"
    np.testing.assert_array_equal(np.asarray(grad)[batch["mask"] == 0], 0.0)
    np.testing.assert_allclose(grad, _finite_difference(batch, kwargs, extra), rtol=1e-5, atol=1e-8)


def test_gradient_analytic_token_grpo(x64):
    """Token-level "grpo", β = 0: ∂L/∂logp_{i,t} = −r·A/(B·n_i) where the clip does not bind, 0 where
    it does (r < 1 − ε with A < 0, or r > 1 + ε with A > 0)."""
    batch = make_batch(seed=4)
    logp, old, adv, mask = (batch[k] for k in ("logp", "old", "adv", "mask"))
    grad = jax.grad(lambda lp: grpo.policy_loss(lp, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask),
                                                loss_type="grpo")[0])(jnp.asarray(logp))
    B, T = logp.shape
    want = np.zeros((B, T))
    for i in range(B):
        n_i = mask[i].sum()
        for t in range(T):
            if mask[i, t]:
                r = math.exp(logp[i, t] - old[i, t])
                binds = (r < 0.8 and adv[i] < 0) or (r > 1.2 and adv[i] > 0)
                want[i, t] = 0.0 if binds else -r * adv[i] / (B * n_i)
    np.testing.assert_allclose(grad, want, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_gspo_token_equals_gspo_with_sequence_advantages(x64, loss_type):
    """GSPO §4.3: with one advantage per sequence, GSPO-token has GSPO's value and gradient."""
    batch = make_batch(seed=5)

    def loss_of(logp, level):
        return _call({**batch, "logp": logp}, loss_type=loss_type, beta=0.04, importance_sampling_level=level)[0]

    for level in ("sequence", "sequence_token"):
        assert np.isfinite(float(loss_of(jnp.asarray(batch["logp"]), level)))
    np.testing.assert_allclose(loss_of(jnp.asarray(batch["logp"]), "sequence"),
                               loss_of(jnp.asarray(batch["logp"]), "sequence_token"), rtol=1e-12)
    g_seq = jax.grad(functools.partial(loss_of, level="sequence"))(jnp.asarray(batch["logp"]))
    g_tok = jax.grad(functools.partial(loss_of, level="sequence_token"))(jnp.asarray(batch["logp"]))
    np.testing.assert_allclose(g_seq, g_tok, rtol=1e-10, atol=1e-14)


# ----------------------------------------------------------------------------- metrics


def test_clip_metrics_crafted_token_level(x64):
    """Row 0 (A = +1): r = 1.5 clipped high, 0.5 below the range but A > 0 (not clipped), 1.1 inside.
    Row 1 (A = −1): r = 0.5 clipped low, 1.5 above the range but A < 0 (not clipped), and a masked
    r = 0.1 that must not count. With ε = 0.2, ε_high = 0.3: 5 counted tokens, 1 low, 1 high."""
    ratios = np.array([[1.5, 0.5, 1.1], [0.5, 1.5, 0.1]])
    old = np.full((2, 3), -1.0)
    logp = old + np.log(ratios)
    mask = np.array([[1, 1, 1], [1, 1, 0]], np.float64)
    ref = old + 0.25
    entropy = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])
    _, metrics = grpo.policy_loss(jnp.asarray(logp), jnp.asarray(old), jnp.array([1.0, -1.0]), jnp.asarray(mask),
                                  loss_type="bnpo", epsilon=0.2, epsilon_high=0.3, ref_logp_BxT=jnp.asarray(ref),
                                  entropy_BxT=jnp.asarray(entropy))
    assert float(metrics["clip_ratio/low_mean"]) == pytest.approx(1 / 5)
    assert float(metrics["clip_ratio/high_mean"]) == pytest.approx(1 / 5)
    assert float(metrics["clip_ratio/region_mean"]) == pytest.approx(2 / 5)
    assert float(metrics["entropy"]) == pytest.approx(15 / 5)
    d = ref - logp  # k3 = e^d − d − 1 over the 5 counted tokens
    assert float(metrics["kl"]) == pytest.approx(((np.exp(d) - d - 1) * mask).sum() / 5, rel=1e-12)


def test_clip_metrics_sequence_level_count_sequences(x64):
    """One ratio per sequence: row 0 long and clipped high, row 1 short and not clipped, row 2 empty."""
    old = np.zeros((3, 4))
    logp = np.array([[0.5, 0.5, 0.5, 0.5], [0.0, 0, 0, 0], [9.0, 9, 9, 9]])
    mask = np.array([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]], np.float64)
    _, metrics = grpo.policy_loss(jnp.asarray(logp), jnp.asarray(old), jnp.array([1.0, 1.0, 1.0]),
                                  jnp.asarray(mask), loss_type="grpo", importance_sampling_level="sequence")
    assert float(metrics["clip_ratio/high_mean"]) == pytest.approx(1 / 2)
    assert float(metrics["clip_ratio/low_mean"]) == 0.0
    assert "kl" not in metrics and "entropy" not in metrics


def test_policy_loss_errors():
    batch = {k: jnp.asarray(v, jnp.float32) for k, v in make_batch().items()}
    args = (batch["logp"], batch["old"], batch["adv"], batch["mask"])
    with pytest.raises(ValueError, match="loss_type"):
        grpo.policy_loss(*args, loss_type="ppo")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        grpo.policy_loss(*args, loss_type="grpo", importance_sampling_level="seq")
    with pytest.raises(ValueError, match="ref_logp_BxT"):
        grpo.policy_loss(*args, loss_type="grpo", beta=0.1)
    with pytest.raises(ValueError, match="normalizer"):
        grpo.policy_loss(*args, loss_type="bnpo", normalizer=10.0)

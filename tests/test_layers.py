import dataclasses

import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest
from flax import nnx

from moe_jax.configs import ModelConfig, get_preset
from moe_jax.models.layers import MLP, Embedding, RMSNorm
from moe_jax.models.rope import apply_rope, rope_inv_freq, rope_tables, yarn_mscale, yarn_softmax_scale


def test_rms_norm_matches_reference_and_keeps_dtype():
    norm = RMSNorm(16, eps=1e-6, rngs=nnx.Rngs(0))
    norm.scale[...] = jnp.linspace(0.5, 2.0, 16)
    x = np.random.default_rng(0).normal(size=(3, 5, 16)).astype(np.float32)
    np.testing.assert_allclose(norm(jnp.asarray(x)), ref.rms_norm(x, norm.scale[...], 1e-6),
                               rtol=1e-5, atol=1e-6)
    assert norm(jnp.asarray(x, jnp.bfloat16)).dtype == jnp.bfloat16


def test_swiglu_mlp_matches_reference():
    mlp = MLP(8, 12, rngs=nnx.Rngs(1))
    x = np.random.default_rng(1).normal(size=(4, 8)).astype(np.float32)
    expected = ref.swiglu(x, np.asarray(mlp.w_gate[...]), np.asarray(mlp.w_up[...]),
                          np.asarray(mlp.w_down[...]))
    np.testing.assert_allclose(mlp(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-6)


def test_tied_embedding_head_is_transpose_of_table():
    emb = Embedding(10, 4, rngs=nnx.Rngs(0))
    x = jnp.eye(4)
    np.testing.assert_allclose(emb.attend(x), np.asarray(emb.table[...]).T, rtol=1e-6)
    np.testing.assert_allclose(emb(jnp.array([3, 7]), jnp.float32), emb.table[...][jnp.array([3, 7])])


def _rope_cfg(**kw) -> ModelConfig:
    return ModelConfig(d_model=64, n_heads=2, rope_theta=10000.0, **kw)  # head dim 32


def test_rope_matches_pairwise_rotation_reference():
    cfg = _rope_cfg()
    x = np.random.default_rng(2).normal(size=(1, 5, 2, 32)).astype(np.float32)
    positions = np.array([[0, 1, 7, 100, 3]])
    cos, sin = rope_tables(cfg, jnp.asarray(positions))
    got = np.asarray(apply_rope(jnp.asarray(x), cos, sin))
    freqs = ref.rope_frequencies(32, 10000.0)
    for t in range(5):
        for h in range(2):
            np.testing.assert_allclose(got[0, t, h], ref.rotate(x[0, t, h], positions[0, t], freqs),
                                       rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    cfg = _rope_cfg()
    rng = np.random.default_rng(3)
    q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, 32)), jnp.float32) for _ in range(2))

    def score(pq, pk):
        cq, sq = rope_tables(cfg, jnp.array([[pq]]))
        ck, sk = rope_tables(cfg, jnp.array([[pk]]))
        return float(jnp.sum(apply_rope(q, cq, sq) * apply_rope(k, ck, sk)))

    assert score(5, 2) == pytest.approx(score(105, 102), rel=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 4), rel=1e-3)


@pytest.mark.parametrize("factor", [1.0, 4.0, 40.0])
def test_yarn_inv_freq_matches_reference(factor):
    cfg = _rope_cfg(rope_scaling_factor=factor, rope_original_max_len=4096)
    expected = ref.rope_frequencies(32, 10000.0, factor, 4096, 32.0, 1.0)
    np.testing.assert_allclose(rope_inv_freq(cfg), expected, rtol=1e-6)


def test_yarn_keeps_high_frequencies_and_interpolates_low_ones():
    base = rope_inv_freq(_rope_cfg())
    yarn = rope_inv_freq(_rope_cfg(rope_scaling_factor=40.0))
    assert yarn[0] == base[0]  # fastest rotation untouched
    np.testing.assert_allclose(yarn[-1], base[-1] / 40.0, rtol=1e-6)  # slowest divided by s


def test_deepseek_v3_softmax_scale_and_mscale():
    # DeepSeek-V3: q_head_dim 192, factor 40, mscale_all_dim 1 -> 192^-0.5 * (0.1 ln 40 + 1)^2.
    cfg = get_preset("deepseek-v3")
    assert yarn_mscale(40.0, 1.0) == pytest.approx(1.368888, abs=1e-6)
    assert yarn_softmax_scale(cfg) == pytest.approx(0.135234, abs=1e-6)
    assert yarn_softmax_scale(get_preset("deepseek-v2-lite")) == pytest.approx(0.114721, abs=1e-6)
    assert yarn_softmax_scale(get_preset("moonlight-16b-a3b")) == pytest.approx(192 ** -0.5)


def test_yarn_cos_sin_scaled_by_mscale_ratio():
    cfg = _rope_cfg(rope_scaling_factor=8.0, rope_mscale=1.0, rope_mscale_all_dim=0.5)
    cos, sin = rope_tables(cfg, jnp.array([[0]]))
    expected = (0.1 * np.log(8) + 1) / (0.05 * np.log(8) + 1)
    np.testing.assert_allclose(cos[0, 0], expected, rtol=1e-6)
    np.testing.assert_allclose(sin[0, 0], 0.0, atol=1e-7)
    no_scale = dataclasses.replace(cfg, rope_mscale_all_dim=1.0)
    np.testing.assert_allclose(rope_tables(no_scale, jnp.array([[0]]))[0][0, 0], 1.0, rtol=1e-6)

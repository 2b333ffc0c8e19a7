import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest
from flax import nnx

from moe_jax.configs import ModelConfig
from moe_jax.models import kv_cache
from moe_jax.models.attention import GQAttention
from moe_jax.models.mla import MLAttention
from moe_jax.models.rope import rope_cos_sin_scale, rope_inv_freq, rope_tables, yarn_softmax_scale


def randomize(module: nnx.Module, seed: int, scale: float = 0.3) -> dict:
    """Give every parameter random values (init zeros/ones would hide bias and norm bugs)."""
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    state = nnx.state(module, nnx.Param)
    state = jax.tree.map(lambda p: jax.random.normal(next(keys), p.shape) * scale + (p == 1), state)
    nnx.update(module, state)
    return {"/".join(map(str, path)): np.asarray(v.get_value(), np.float64)
            for path, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


# Two packed sequences and a padding tail: segment ids, and positions restarting per segment.
SEGMENTS = np.array([[1, 1, 1, 2, 2, 2, 2, 0]])


def _inputs(cfg: ModelConfig, seed: int = 0):
    x = np.random.default_rng(seed).normal(size=(1, SEGMENTS.shape[1], cfg.d_model)).astype(np.float32)
    positions = kv_cache.segment_positions(jnp.asarray(SEGMENTS))
    mask = kv_cache.attention_mask(jnp.asarray(SEGMENTS), jnp.asarray(SEGMENTS))
    cos, sin = rope_tables(cfg, positions)
    return x, np.asarray(positions[0]), cos, sin, mask


def test_segment_positions_restart_per_segment():
    got = kv_cache.segment_positions(jnp.array([[0, 0, 1, 1, 1, 2, 2, 0], [3, 3, 3, 3, 4, 4, 5, 5]]))
    np.testing.assert_array_equal(got, [[0, 0, 0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1, 0, 1]])


@pytest.mark.parametrize("options", [{}, {"qkv_bias": True}, {"qk_norm": True, "n_kv_heads": 1}])
def test_gqa_matches_loop_reference(options):
    cfg = ModelConfig(d_model=32, n_heads=4, n_kv_heads=options.pop("n_kv_heads", 2), **options)
    layer = GQAttention(cfg, rngs=nnx.Rngs(0))
    p = randomize(layer, seed=1)
    x, positions, cos, sin, mask = _inputs(cfg)
    got, _ = layer(jnp.asarray(x), cos, sin, mask)
    expected = ref.gqa_layer(
        x[0], p["w_q"], p["w_k"], p["w_v"], p["w_o"], positions, SEGMENTS[0],
        ref.rope_frequencies(8, cfg.rope_theta), p.get("b_q"), p.get("b_k"), p.get("b_v"),
        p.get("q_norm/scale"), p.get("k_norm/scale"), cfg.norm_eps)
    valid = SEGMENTS[0] != 0
    np.testing.assert_allclose(np.asarray(got[0])[valid], expected[valid], rtol=1e-5, atol=1e-5)


MLA_YARN = {"attention": "mla", "d_model": 32, "n_heads": 4, "kv_lora_rank": 12, "qk_nope_head_dim": 8,
                "qk_rope_head_dim": 4, "v_head_dim": 6, "rope_scaling_factor": 4.0, "rope_original_max_len": 16,
                "rope_mscale": 1.0, "rope_mscale_all_dim": 0.5}


@pytest.mark.parametrize("q_lora_rank", [0, 10])
def test_mla_matches_loop_reference_expanded_and_absorbed(q_lora_rank):
    cfg = ModelConfig(q_lora_rank=q_lora_rank, **MLA_YARN)
    layer = MLAttention(cfg, rngs=nnx.Rngs(0))
    p = randomize(layer, seed=2)
    p = {k.replace("/scale", ""): v for k, v in p.items()}
    x, positions, cos, sin, mask = _inputs(cfg, seed=3)
    freqs = rope_inv_freq(cfg).astype(np.float64)
    expected = ref.mla_layer(x[0], p, positions, SEGMENTS[0], freqs, yarn_softmax_scale(cfg),
                             cfg.norm_eps, rope_cos_sin_scale(cfg))
    valid = SEGMENTS[0] != 0
    expanded, _ = layer(jnp.asarray(x), cos, sin, mask)
    np.testing.assert_allclose(np.asarray(expanded[0])[valid], expected[valid], rtol=1e-5, atol=1e-5)
    cache = {name: jnp.zeros(shape) for name, shape in
             kv_cache.layer_cache_shapes(cfg, 1, SEGMENTS.shape[1]).items()}
    absorbed, new_cache = layer(jnp.asarray(x), cos, sin, mask, cache, jnp.int32(0))
    np.testing.assert_allclose(np.asarray(absorbed[0])[valid], expected[valid], rtol=1e-5, atol=1e-5)
    assert set(new_cache) == {"latent", "k_rope"}


def test_mla_caches_only_latent_and_rope_key():
    cfg = ModelConfig(**MLA_YARN)
    per_layer_values = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert kv_cache.cache_bytes_per_token(cfg, jnp.bfloat16) == cfg.n_layers * per_layer_values * 2
    gqa = ModelConfig(d_model=32, n_heads=4, n_kv_heads=2)
    assert kv_cache.cache_bytes_per_token(gqa, jnp.float32) == gqa.n_layers * 2 * 2 * 8 * 4


def test_mask_blocks_other_segments_padding_and_future():
    mask = np.asarray(kv_cache.attention_mask(jnp.asarray(SEGMENTS), jnp.asarray(SEGMENTS))[0, 0])
    for t in range(8):
        for s in range(8):
            assert mask[t, s] == ref.visible(SEGMENTS[0], t, s)

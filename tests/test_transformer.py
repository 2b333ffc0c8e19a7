import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest
from flax import nnx

from moe_jax.configs import get_preset
from moe_jax.models import Transformer, init_cache
from moe_jax.models.layers import MLP
from moe_jax.models.moe import MoELayer, RouterBias

MODELS = {
    "gqa": dataclasses.replace(get_preset("tiny-dense"), qk_norm=True),
    # MoE + MLA + MTP; the dense dispatch keeps these tests about the transformer, not the backend.
    "mla-moe": dataclasses.replace(get_preset("tiny-moe"), moe_dispatch="dense"),
}


class Compiled:
    """A model with one jitted forward (split/merge, as Flax's performance guide recommends)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.model = Transformer(cfg, rngs=nnx.Rngs(0))
        keys = iter(jax.random.split(jax.random.key(1), 256))
        # Non-trivial norm scales and biases, so that a skipped norm cannot go unnoticed.
        nnx.update(self.model, jax.tree.map(
            lambda p: p + 0.1 * jax.random.normal(next(keys), p.shape),
            nnx.state(self.model, nnx.Param)))
        graphdef, state = nnx.split(self.model)

        @jax.jit
        def forward(state, tokens, segment_ids, positions, cache):
            return nnx.merge(graphdef, state)(tokens, segment_ids_BxT=segment_ids,
                                              positions_BxT=positions, cache=cache)

        self.forward = lambda tokens, segments=None, positions=None, cache=None: forward(
            state, tokens, segments, positions, cache)


@pytest.fixture(scope="module", params=list(MODELS))
def compiled(request):
    return Compiled(MODELS[request.param])


def _tokens(cfg, shape, seed=0):
    return jax.random.randint(jax.random.key(seed), shape, 0, cfg.vocab_size)


def test_packed_sequences_equal_separate_runs(compiled):
    a, b = _tokens(compiled.cfg, (1, 5), 1), _tokens(compiled.cfg, (1, 7), 2)
    packed = jnp.concatenate([a, b], axis=1)
    segments = jnp.array([[1] * 5 + [2] * 7])
    logits, _aux = compiled.forward(packed, segments)
    logits_a, _ = compiled.forward(a)
    logits_b, _ = compiled.forward(b)
    np.testing.assert_allclose(logits[:, :5], logits_a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits[:, 5:], logits_b, rtol=1e-5, atol=1e-5)


def test_left_padding_equals_unpadded(compiled):
    tokens = _tokens(compiled.cfg, (1, 6), 3)
    padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), tokens], axis=1)
    segments = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    logits_padded, _ = compiled.forward(padded, segments)
    logits, _ = compiled.forward(tokens)
    np.testing.assert_allclose(logits_padded[:, 3:], logits, rtol=1e-5, atol=1e-5)
    assert np.isfinite(np.asarray(logits_padded)).all()


def test_logits_slice_computes_only_those_positions(compiled):
    model, tokens = compiled.model, _tokens(compiled.cfg, (2, 9), 4)
    full, _ = model(tokens, mtp=False)
    for positions in (slice(-4, -1), slice(-1, None)):
        sliced, _ = model(tokens, mtp=False, logits_slice=positions)
        np.testing.assert_allclose(sliced, full[:, positions], rtol=1e-6, atol=1e-6)


def test_prefill_then_decode_equals_full_forward(compiled):
    cfg = compiled.cfg
    length, prompt = 10, 6
    tokens = _tokens(cfg, (2, length), 4)
    segments = jnp.array([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1], [1] * length])  # row 0 left-padded
    full_logits, _ = compiled.forward(tokens, segments)
    cache = init_cache(cfg, batch=2, max_len=length)
    logits, aux = compiled.forward(tokens[:, :prompt], segments[:, :prompt], cache=cache)
    step_logits = [logits]
    for t in range(prompt, length):
        logits, aux = compiled.forward(tokens[:, t:t + 1], segments[:, t:t + 1], cache=aux["cache"])
        step_logits.append(logits)
    decoded = np.concatenate(step_logits, axis=1)
    valid = np.asarray(segments) != 0
    np.testing.assert_allclose(decoded[valid], np.asarray(full_logits)[valid], rtol=1e-5, atol=1e-5)
    assert int(aux["cache"]["index"]) == length


def test_dense_model_matches_numpy_reference():
    compiled = Compiled(MODELS["gqa"])
    cfg, model = compiled.cfg, compiled.model
    tokens = np.asarray(_tokens(cfg, (1, 7), 5))
    logits, _ = compiled.forward(jnp.asarray(tokens))

    def arr(v):
        return np.asarray(v.get_value(), np.float64)

    x = arr(model.embed.table)[tokens[0]]
    freqs = ref.rope_frequencies(cfg.gqa_head_dim, cfg.rope_theta)
    positions, segments = np.arange(7), np.ones(7)
    for block in model.blocks:
        a = block.attn
        x = x + ref.gqa_layer(ref.rms_norm(x, arr(block.attn_norm.scale), cfg.norm_eps), arr(a.w_q),
                              arr(a.w_k), arr(a.w_v), arr(a.w_o), positions, segments, freqs,
                              q_norm=arr(a.q_norm.scale), k_norm=arr(a.k_norm.scale), eps=cfg.norm_eps)
        h = ref.rms_norm(x, arr(block.ffn_norm.scale), cfg.norm_eps)
        x = x + ref.swiglu(h, arr(block.ffn.w_gate), arr(block.ffn.w_up), arr(block.ffn.w_down))
    expected = ref.rms_norm(x, arr(model.final_norm.scale), cfg.norm_eps) @ arr(model.head)
    np.testing.assert_allclose(logits[0], expected, rtol=1e-5, atol=1e-5)


def test_moe_schedule_aux_and_router_stats():
    cfg = MODELS["mla-moe"]
    model = Compiled(cfg).model
    kinds = [type(b.ffn) for b in model.blocks]
    assert kinds == [MLP] + [MoELayer] * (cfg.n_layers - 1)
    _logits, aux = model(_tokens(cfg, (2, 8)))
    n_moe = cfg.n_moe_layers + cfg.mtp_depth
    assert aux["router"]["load"].shape == (n_moe, cfg.n_routed_experts)
    # Every valid token picks top_k experts in every MoE layer.
    np.testing.assert_allclose(aux["router"]["load"].sum(-1), 2 * 8 * cfg.top_k)
    assert aux["mtp_logits"].shape == (cfg.mtp_depth, 2, 8, cfg.vocab_size)
    expected = sum(cfg.seq_aux_loss_coef * aux["router"]["seq_loss"])
    np.testing.assert_allclose(aux["moe_aux_loss"], expected, rtol=1e-6)


def test_mtp_logits_see_exactly_the_next_token():
    """Depth-1 MTP at position i combines h_i with Emb(t_{i+1}) and predicts t_{i+2}: it must
    change with t_{i+1} and not with t_{i+2}."""
    compiled = Compiled(MODELS["mla-moe"])
    tokens = _tokens(compiled.cfg, (1, 8), 6)
    _, aux = compiled.forward(tokens)
    changed = tokens.at[0, 5].set((tokens[0, 5] + 1) % compiled.cfg.vocab_size)
    _, aux_changed = compiled.forward(changed)
    mtp, mtp_changed = aux["mtp_logits"][0, 0], aux_changed["mtp_logits"][0, 0]
    np.testing.assert_allclose(mtp[:4], mtp_changed[:4], rtol=1e-6, atol=1e-6)  # positions < 4
    assert not np.allclose(mtp[4], mtp_changed[4])  # position 4 embeds t_5


def test_router_bias_is_state_not_parameter_and_updates_by_sign():
    cfg = MODELS["mla-moe"]
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    assert not any("router_bias" in str(path) for path, _ in nnx.to_flat_state(params))
    assert len(jax.tree.leaves(nnx.state(model, RouterBias))) == cfg.n_moe_layers + cfg.mtp_depth
    load = jnp.array([[4.0, 0, 1, 3, 0, 0, 0, 0]] * (cfg.n_moe_layers + cfg.mtp_depth))
    model.update_router_biases(load)
    bias = np.asarray(model.blocks[1].ffn.router_bias.get_value())
    expected = cfg.router_bias_rate * np.sign(1.0 - np.array([4.0, 0, 1, 3, 0, 0, 0, 0]))
    np.testing.assert_allclose(bias, expected, rtol=1e-6)


def test_bias_changes_choice_not_gate_values():
    cfg = MODELS["mla-moe"]
    layer = Transformer(cfg, rngs=nnx.Rngs(0)).blocks[1].ffn
    x = jax.random.normal(jax.random.key(0), (1, 4, cfg.d_model))
    _, stats = layer(x, jnp.ones((1, 4), bool))
    favourite = int(jnp.argmin(stats["load"]))
    layer.router_bias.set_value(jnp.zeros(cfg.n_routed_experts).at[favourite].set(10.0))
    _, stats_biased = layer(x, jnp.ones((1, 4), bool))
    assert stats_biased["load"][favourite] == 4  # every token now picks it


def test_bf16_compute_keeps_fp32_params_and_logits():
    cfg = dataclasses.replace(MODELS["mla-moe"], compute_dtype="bfloat16")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype("float32")}
    tokens = _tokens(cfg, (2, 8))
    logits, _ = model(tokens)
    fp32_logits, _ = Transformer(dataclasses.replace(cfg, compute_dtype="float32"),
                                 rngs=nnx.Rngs(0))(tokens)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, fp32_logits, atol=0.1)  # bf16 has ~3 significant digits


def test_gradients_flow_to_every_parameter():
    cfg = MODELS["mla-moe"]
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = _tokens(cfg, (2, 8))

    def loss(model):
        logits, aux = model(tokens)
        return jnp.mean(logits**2) + jnp.mean(aux["mtp_logits"] ** 2) + aux["moe_aux_loss"]

    grads = nnx.grad(loss)(model)
    for path, g in nnx.to_flat_state(grads):
        assert np.isfinite(np.asarray(g.get_value())).all(), path
        assert np.abs(np.asarray(g.get_value())).sum() > 0, path


def test_routing_replay_reproduces_recorded_choices_and_keeps_the_router_trained():
    cfg = dataclasses.replace(get_preset("tiny-moe"), moe_dispatch="dense", n_layers=2)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, cfg.vocab_size)
    forward = nnx.jit(lambda m, routing: m(tokens, mtp=False, routing_LxBxTxK=routing))
    logits, aux = forward(model, None)
    recorded = aux["router"]["expert_idx"]
    assert recorded.shape == (cfg.n_moe_layers, 2, 12, cfg.top_k)
    replayed, replay_aux = forward(model, recorded)
    np.testing.assert_array_equal(replay_aux["router"]["expert_idx"], recorded)
    np.testing.assert_allclose(replayed, logits, rtol=1e-6, atol=1e-6)
    other = (recorded + 1) % cfg.n_routed_experts  # different experts: different outputs
    assert not np.allclose(forward(model, other)[0], logits, atol=1e-4)
    grads = nnx.jit(nnx.grad(lambda m: m(tokens, mtp=False, routing_LxBxTxK=other)[0].mean()))(model)
    assert np.abs(np.asarray(grads.blocks[1].ffn.w_router[...])).max() > 0  # gates stay trainable

"""Sharded models on 8 simulated CPU devices compute what one device computes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.configs import get_preset
from moe_jax.models import Transformer
from moe_jax.models.moe import MoELayer
from moe_jax.parallel import init_sharded, make_mesh, make_rules, parse_mesh_spec, state_shardings, use_mesh

MLA_MOE = get_preset("tiny-moe")
GQA_MOE = dataclasses.replace(
    MLA_MOE, attention="gqa", n_kv_heads=2, q_lora_rank=0, kv_lora_rank=0, qk_nope_head_dim=0,
    qk_rope_head_dim=0, v_head_dim=0, score_func="softmax", n_group=1, topk_group=1,
    aux_loss_coef=1e-2, router_z_loss_coef=1e-3)
MODELS = {"mla-moe": MLA_MOE, "gqa-moe": GQA_MOE}


def test_mesh_spec_parsing_and_errors():
    assert parse_mesh_spec("data=2,expert=4", 8) == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
    assert parse_mesh_spec("auto", 8)["data"] == 8
    with pytest.raises(ValueError, match="covers 4 devices but 8 are available"):
        parse_mesh_spec("data=4", 8)
    with pytest.raises(ValueError, match="bad entry 'pipeline=2'"):
        parse_mesh_spec("pipeline=2,data=4", 8)
    assert make_mesh("fsdp=2,expert=2,tensor=2").shape == {"data": 1, "fsdp": 2, "expert": 2, "tensor": 2}


def test_indivisible_dimension_fails_before_compiling():
    abstract = nnx.eval_shape(lambda: Transformer(GQA_MOE, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"w_k: dimension 1 \(size 2\) is not divisible .*tensor"):
        state_shardings(nnx.state(abstract), make_mesh("tensor=8"))
    with pytest.raises(ValueError, match="unknown logical axes"):
        make_rules({"pipeline": "data"})


def _loss_fn(tokens):
    def loss(model):
        logits, aux = model(tokens)
        log_probs = jax.nn.log_softmax(logits[:, :-1])
        nll = -jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1).mean()
        return nll + aux["moe_aux_loss"], (logits, aux["router"]["load"])
    return loss


def _step(model, tokens):
    """Loss, logits, gradients, and the router biases after one loss-free update."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state):
        model = nnx.merge(graphdef, state)
        (loss, (logits, load)), grads = nnx.value_and_grad(_loss_fn(tokens), has_aux=True)(model)
        model.update_router_biases(load)
        return loss, logits, nnx.state(grads, nnx.Param), nnx.state(model, nnx.Variable)

    return step(state)


@pytest.fixture(scope="module")
def single_device():
    tokens = jax.random.randint(jax.random.key(7), (8, 16), 0, MLA_MOE.vocab_size)
    results = {}
    for name, cfg in MODELS.items():
        model = Transformer(cfg, rngs=nnx.Rngs(0))
        results[name] = _step(model, tokens)
    return tokens, results


def _assert_close(got, expected):
    for (path, g), (_, e) in zip(nnx.to_flat_state(got), nnx.to_flat_state(expected), strict=True):
        g, e = np.asarray(g.get_value()), np.asarray(e.get_value())
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5 * max(np.abs(e).max(), 1e-30),
                                   err_msg=str(path))


@pytest.mark.parametrize("name, spec", [
    ("mla-moe", "data=8"), ("mla-moe", "expert=8"), ("mla-moe", "data=2,expert=4"),
    ("mla-moe", "fsdp=2,expert=2,tensor=2"), ("gqa-moe", "data=2,expert=4"),
    ("gqa-moe", "fsdp=2,expert=2,tensor=2"),
])
def test_mesh_matches_single_device(single_device, name, spec):
    tokens, results = single_device
    mesh = make_mesh(spec)
    with use_mesh(mesh):
        model = init_sharded(lambda: Transformer(MODELS[name], rngs=nnx.Rngs(0)), mesh)
        w_gate = model.blocks[1].ffn.w_gate[...]
        assert w_gate.sharding.spec == jax.P("expert", "fsdp", "tensor")
        loss, logits, grads, variables = _step(model, tokens)
    ref_loss, ref_logits, ref_grads, ref_variables = results[name]
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
    _assert_close(grads, ref_grads)
    _assert_close(variables, ref_variables)  # parameters and the updated router biases


def _forward_on_mesh(cfg, spec, tokens):
    mesh = make_mesh(spec)
    with use_mesh(mesh):
        model = init_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), mesh)
        graphdef, state = nnx.split(model)
        return jax.jit(lambda s: nnx.merge(graphdef, s)(tokens))(state)


@pytest.mark.parametrize("local_backend", ["dense", "capacity"])
def test_expert_parallel_local_backends_match_single_device(single_device, local_backend):
    tokens, results = single_device
    cfg = dataclasses.replace(MLA_MOE, moe_dispatch=local_backend, capacity_factor=8.0)
    logits, aux = _forward_on_mesh(cfg, "data=2,expert=4", tokens)
    np.testing.assert_allclose(logits, results["mla-moe"][1], rtol=1e-5, atol=1e-5)
    assert float(aux["router"]["dropped_fraction"].max()) == 0.0


def test_small_ep_capacity_drops_and_reports_globally(single_device):
    tokens, _ = single_device
    cfg = dataclasses.replace(MLA_MOE, ep_capacity_factor=0.25)
    logits, aux = _forward_on_mesh(cfg, "expert=8", tokens)
    dropped = np.asarray(aux["router"]["dropped_fraction"])
    assert (dropped > 0).all() and (dropped < 1).all()
    assert np.isfinite(np.asarray(logits)).all()


def test_expert_parallel_pads_tokens_that_do_not_fill_every_shard():
    """5 tokens on 8 shards (a prompt batch of the shared-prompt GRPO forward, a decode step):
    padded with masked tokens, the layer still equals one device."""
    x = jax.random.normal(jax.random.key(1), (1, 5, MLA_MOE.d_model))
    mask = jnp.asarray([[True, True, False, True, True]])
    y_expected, stats_expected = MoELayer(MLA_MOE, rngs=nnx.Rngs(0))(x, mask)
    mesh = make_mesh("expert=8")
    with use_mesh(mesh):
        layer = init_sharded(lambda: MoELayer(MLA_MOE, rngs=nnx.Rngs(0)), mesh)
        y, stats = jax.jit(lambda layer, x: layer(x, mask))(layer, x)
    np.testing.assert_allclose(y, y_expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(stats["load"], stats_expected["load"])
    assert float(stats["dropped_fraction"]) == 0.0


def test_ragged_exchange_falls_back_on_cpu_with_warning(single_device):
    tokens, results = single_device
    cfg = dataclasses.replace(MLA_MOE, ep_exchange="ragged_all_to_all")
    with pytest.warns(UserWarning, match="ragged_all_to_all is unsupported on CPU"):
        logits, _ = _forward_on_mesh(cfg, "expert=8", tokens)
    np.testing.assert_allclose(logits, results["mla-moe"][1], rtol=1e-5, atol=1e-5)


def test_process_batch_slices_partition_the_batch():
    from moe_jax.parallel.distributed import grain_shard_options, process_batch_slice

    rows = [list(range(32))[process_batch_slice(32, i, 4)] for i in range(4)]
    assert [i for r in rows for i in r] == list(range(32)) and all(len(r) == 8 for r in rows)
    with pytest.raises(ValueError, match="not divisible by 3 processes"):
        process_batch_slice(32, 0, 3)
    with pytest.raises(ValueError, match="outside"):
        process_batch_slice(32, 4, 4)
    options = grain_shard_options(2, 4)
    assert (options.shard_index, options.shard_count, options.drop_remainder) == (2, 4, True)


def test_single_process_global_batch_and_initialize_is_opt_in():
    from moe_jax.parallel.distributed import global_batch_array, initialize_distributed

    assert initialize_distributed() is False
    with pytest.raises(ValueError, match="together"):
        initialize_distributed(coordinator_address="localhost:1234")
    mesh = make_mesh("data=2,expert=4")
    batch = global_batch_array(np.arange(16 * 3).reshape(16, 3), mesh)
    assert batch.shape == (16, 3) and batch.sharding.spec == jax.P(("data", "fsdp", "expert"))
    np.testing.assert_array_equal(batch, np.arange(48).reshape(16, 3))

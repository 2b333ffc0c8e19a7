"""Sharded models on 8 simulated CPU devices compute what one device computes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ragged_emulation import emulated_ragged_all_to_all

from moe_jax.configs import get_preset
from moe_jax.models import Transformer, expert_parallel
from moe_jax.models.ep_traffic import padded_exchange_bytes, ragged_exchange_bytes
from moe_jax.models.moe import MoELayer
from moe_jax.parallel import (
    init_sharded,
    make_mesh,
    make_rules,
    parse_mesh_spec,
    parse_rules,
    state_shardings,
    use_mesh,
)
from moe_jax.train.context import init_model_and_optimizer
from moe_jax.train.experiment_config import ExperimentConfig, OptimizerConfig
from moe_jax.train.step import make_train_step

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


def test_rules_from_a_config_string():
    rules = parse_rules("embed=None, experts=expert+fsdp,vocab=tensor")
    assert rules == {**make_rules(), "embed": None, "experts": ("expert", "fsdp")}
    assert parse_rules("") == make_rules()
    for bad, message in [("embed", "bad rule 'embed'"), ("embed=pipeline", "bad rule"),
                         ("pipeline=data", "unknown logical axes"),
                         ("batch=data", "'batch' is not configurable")]:
        with pytest.raises(ValueError, match=message):
            parse_rules(bad)


def test_config_rules_shard_the_training_state(single_device):
    """`ExperimentConfig.sharding_rules` reaches the initial state and the jitted step: with
    `embed=None` the embedding-dimension shards go (FSDP off), the step keeps that layout, and its
    loss and gradient norm are one device's."""
    tokens, _ = single_device
    cfg = ExperimentConfig(model=MLA_MOE, sharding_rules="embed=None", optimizer=OptimizerConfig(learning_rate=1e-3))
    mesh = make_mesh("fsdp=2,expert=2,tensor=2")
    model, optimizer = init_model_and_optimizer(cfg, mesh)
    assert model.blocks[1].ffn.w_gate[...].sharding.spec == jax.P("expert", None, "tensor")
    step, state = make_train_step(model, optimizer, mesh=mesh, rules=parse_rules(cfg.sharding_rules))
    batch = {"tokens": tokens, "segment_ids": jnp.ones_like(tokens),
             "positions": jnp.tile(jnp.arange(16), (8, 1)), "loss_mask": jnp.ones(tokens.shape, jnp.float32)}
    state, metrics = step(state, batch)
    w_gate = nnx.merge(nnx.graphdef((model, optimizer)), state)[0].blocks[1].ffn.w_gate[...]
    assert w_gate.sharding.spec == jax.P("expert", None, "tensor")
    one_device = make_mesh("data=1", devices=jax.devices()[:1])
    reference_step, reference_state = make_train_step(*init_model_and_optimizer(cfg, one_device))
    _, reference_metrics = reference_step(reference_state, batch)
    for name in ("loss", "grad_norm"):
        np.testing.assert_allclose(metrics[name], reference_metrics[name], rtol=1e-5, err_msg=name)


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


@pytest.fixture
def emulated_ragged(monkeypatch):
    """The ragged exchange on CPU, through `emulated_ragged_all_to_all` (XLA:CPU lacks the op)."""
    monkeypatch.setattr(expert_parallel, "ragged_all_to_all", emulated_ragged_all_to_all)
    monkeypatch.setattr(expert_parallel, "RAGGED_UNSUPPORTED_PLATFORMS", ())


def test_ragged_emulation_follows_the_documented_example():
    """The two-device example of `jax.lax.ragged_all_to_all`'s docstring."""
    args = {  # per device: operand, output, input_offsets, send_sizes, output_offsets, recv_sizes
        0: ([1, 2, 2], [0, 0, 0, 0], [0, 1], [1, 2], [0, 0], [1, 1]),
        1: ([3, 4, 0], [0, 0, 0, 0], [0, 1], [1, 1], [1, 2], [2, 1]),
    }
    stacked = [jnp.asarray([args[0][i], args[1][i]], jnp.int32).reshape(-1) for i in range(6)]
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ("x",))
    run = jax.jit(jax.shard_map(lambda *a: emulated_ragged_all_to_all(*a, axis_name="x"), mesh=mesh,
                                in_specs=(jax.P("x"),) * 6, out_specs=jax.P("x")))
    np.testing.assert_array_equal(np.asarray(run(*stacked)).reshape(2, 4), [[1, 3, 0, 0], [2, 2, 4, 0]])


@pytest.mark.skipif(jax.default_backend() in expert_parallel.RAGGED_UNSUPPORTED_PLATFORMS
                    or jax.device_count() < 2, reason="ragged_all_to_all needs several GPUs or TPUs")
def test_ragged_emulation_matches_the_collective():
    n = jax.device_count()
    rng = np.random.default_rng(0)
    send = rng.integers(0, 3, (n, n)).astype(np.int32)  # send[src, dst]
    input_offsets = np.cumsum(send, 1) - send
    recv = send.T  # recv[dst, src]
    recv_offsets = np.cumsum(recv, 1) - recv
    output_offsets = recv_offsets.T  # where src's chunk lands on dst
    operand = rng.normal(size=(n, 3 * n, 2)).astype(np.float32)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("x",))
    args = (operand.reshape(n * 3 * n, 2), np.zeros((n * 3 * n, 2), np.float32),
            *(a.reshape(-1) for a in (input_offsets, send, output_offsets, recv)))
    results = [jax.shard_map(lambda *a, f=f: f(*a, axis_name="x"), mesh=mesh, in_specs=(jax.P("x"),) * 6,
                             out_specs=jax.P("x"))(*args)
               for f in (jax.lax.ragged_all_to_all, emulated_ragged_all_to_all)]
    np.testing.assert_array_equal(*results)


@pytest.mark.parametrize("name, spec, exchange", [
    ("mla-moe", "data=8", "all_to_all"), ("mla-moe", "expert=8", "all_to_all"),
    ("mla-moe", "data=2,expert=4", "all_to_all"), ("mla-moe", "fsdp=2,expert=2,tensor=2", "all_to_all"),
    ("gqa-moe", "data=2,expert=4", "all_to_all"), ("gqa-moe", "fsdp=2,expert=2,tensor=2", "all_to_all"),
    ("mla-moe", "expert=8", "ragged"), ("mla-moe", "data=2,expert=4", "ragged"),
    ("gqa-moe", "fsdp=2,expert=2,tensor=2", "ragged"),
])
def test_mesh_matches_single_device(single_device, request, name, spec, exchange):
    tokens, results = single_device
    cfg = MODELS[name]
    if exchange == "ragged":
        request.getfixturevalue("emulated_ragged")
        cfg = dataclasses.replace(cfg, ep_exchange="ragged_all_to_all")
    mesh = make_mesh(spec)
    with use_mesh(mesh):
        model = init_sharded(lambda: Transformer(cfg, rngs=nnx.Rngs(0)), mesh)
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


def _layer_value_and_grads(cfg, spec, x, mask, replay):
    """One MoE layer on a mesh: its output, router stats and the gradients of sum(y²) with
    respect to the layer's parameters and its input."""
    mesh = make_mesh(spec)
    with use_mesh(mesh):
        graphdef, state = nnx.split(init_sharded(lambda: MoELayer(cfg, rngs=nnx.Rngs(0)), mesh))

        def loss(state, x):
            y, stats = nnx.merge(graphdef, state)(x, mask, replay)
            return jnp.sum(y**2), (y, stats)

        (_, (y, stats)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(state, x)
    return y, stats, grads


@pytest.mark.parametrize("capacity_factor", [0.0, 1.0])
def test_ragged_exchange_with_every_copy_on_one_shard(emulated_ragged, capacity_factor):
    """Every token replays experts {0, 1}, both on shard 0 of `data=2,expert=4`: the worst case.
    Dropless, the ragged layer equals one device. With c = 1 each source may send C = 2 copies
    to shard 0, in GShard priority, exactly as the padded exchange keeps them: outputs and
    gradients equal the padded exchange's, and 16 of the 58 valid copies are kept."""
    x = jax.random.normal(jax.random.key(2), (8, 4, MLA_MOE.d_model))
    mask = jnp.ones((8, 4), bool).at[3, 1:].set(False)
    replay = jnp.broadcast_to(jnp.asarray([1, 0]), (8, 4, 2))
    ragged, padded = (dataclasses.replace(MLA_MOE, ep_exchange=exchange, ep_capacity_factor=capacity_factor)
                      for exchange in ("ragged_all_to_all", "all_to_all"))
    y, stats, (grads, dx) = _layer_value_and_grads(ragged, "data=2,expert=4", x, mask, replay)
    if capacity_factor == 0:
        y_ref, stats_ref, (grads_ref, dx_ref) = _layer_value_and_grads(ragged, "data=8", x, mask, replay)
        assert float(stats["dropped_fraction"]) == 0.0
    else:
        y_ref, stats_ref, (grads_ref, dx_ref) = _layer_value_and_grads(padded, "data=2,expert=4", x, mask, replay)
        # Each of the 8 token shards (one row of 4 tokens; row 3 has 1 valid token) sends 2 copies.
        assert float(stats["dropped_fraction"]) == pytest.approx(1 - 16 / 58)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-6)
    _assert_close(grads, grads_ref)
    np.testing.assert_array_equal(stats["load"], stats_ref["load"])
    assert float(stats["dropped_fraction"]) == float(stats_ref["dropped_fraction"])


def test_ragged_exchange_lowers_for_gpu_with_the_real_collective(monkeypatch):
    """The real `ragged_all_to_all` (not the emulation) accepts the exchange's arrays: the
    gradient of an EP layer with respect to its parameters and its input lowers for CUDA, with
    the collective in its HLO — three exchanges forward (copies, their expert ids, outputs) and the
    transposes of the outputs' and the copies' exchanges backward."""
    monkeypatch.setattr(expert_parallel, "RAGGED_UNSUPPORTED_PLATFORMS", ())
    cfg = dataclasses.replace(MLA_MOE, ep_exchange="ragged_all_to_all", moe_dispatch="ragged")
    x = jax.random.normal(jax.random.key(2), (8, 4, cfg.d_model))
    mask = jnp.ones((8, 4), bool)
    mesh = make_mesh("data=2,expert=4")
    with use_mesh(mesh):
        graphdef, state = nnx.split(init_sharded(lambda: MoELayer(cfg, rngs=nnx.Rngs(0)), mesh))
        grad = jax.jit(jax.grad(lambda state, x: jnp.sum(nnx.merge(graphdef, state)(x, mask)[0] ** 2),
                                argnums=(0, 1)))
        hlo = grad.trace(state, x).lower(lowering_platforms=("cuda",)).as_text()
    assert hlo.count("ragged_all_to_all") == 5


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


def test_exchange_bytes_hand_computed():
    # Padded: 8 tokens on ep=2, K=2, D=4 fp32, dropless -> C = N_l·K = 8 slots per shard, 16 in all,
    # of which 8 leave the device: 8 · (16 B of x + 8 B of metadata) out, 8 · 16 B back.
    padded = padded_exchange_bytes(8, 2, 2, 4, capacity_factor=0.0)
    assert (padded["capacity_per_shard"], padded["send_bytes"]) == (8, 8 * 24 + 8 * 16)
    # Ragged: experts 0, 1 on shard 0 and 2, 3 on shard 1, D = 2 (8 B rows). Each device keeps one
    # copy and sends one (8 B + a 4 B id), and returns one output for the other (8 B).
    balanced = ragged_exchange_bytes(np.asarray([[0], [2], [3], [1]]), 2, 4, 2, capacity_factor=0.0)
    assert (balanced["send_bytes"], balanced["recv_bytes"], balanced["dropped_fraction"]) == (20, 20, 0.0)
    # Every copy to shard 0 with c = 1: each device may send C = ceil(1 · 2 · 1 / 2) = 1 copy per
    # shard, so shard 0 keeps one of its own and one of device 1's (receive rows 2·C). Device 1
    # sends 12 B, and shard 0 receives them and sends 8 B back; half the copies are dropped.
    skewed = ragged_exchange_bytes(np.asarray([[0], [1], [0], [1]]), 2, 4, 2, capacity_factor=1.0)
    assert (skewed["send_bytes"], skewed["recv_bytes"], skewed["receive_rows"]) == (12, 12, 2)
    assert skewed["dropped_fraction"] == 0.5

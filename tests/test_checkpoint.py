import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax.configs import get_preset
from moe_jax.data.pipelines import packed_batches, task_examples
from moe_jax.data.tasks import make_task
from moe_jax.data.tokenizer import CharTokenizer
from moe_jax.models import Transformer
from moe_jax.parallel import make_mesh
from moe_jax.train.checkpoint import Checkpointer
from moe_jax.train.context import init_model_and_optimizer
from moe_jax.train.experiment_config import ExperimentConfig
from moe_jax.train.optimizer import make_optimizer
from moe_jax.train.step import make_train_step

CFG = dataclasses.replace(get_preset("tiny-moe"), moe_dispatch="dense")


def _run_parts():
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, make_optimizer(3e-3, warmup_steps=1, total_steps=50), wrt=nnx.Param)
    step, state = make_train_step(model, optimizer)
    data = iter(packed_batches(task_examples(make_task("arithmetic", max_digits=2), CharTokenizer(), seed=0),
                               seq_len=64, batch_size=2, seed=0))
    return step, state, data


def _next(data):
    return {k: jnp.asarray(v) for k, v in next(data).items()}


def test_resume_from_checkpoint_reproduces_the_losses(tmp_path):
    step, state, data = _run_parts()
    checkpointer = Checkpointer(str(tmp_path), save_every=2)
    losses = []
    for i in range(1, 5):
        state, metrics = step(state, _next(data))
        losses.append(float(metrics["loss"]))
        checkpointer.save(i, state, {"data": data.get_state()})
    checkpointer.close()
    saved = Checkpointer(str(tmp_path), save_every=2).manager.all_steps()
    assert {2, 4} <= set(saved) and 3 not in saved  # every 2nd step (Orbax also keeps the first)

    # A new run restores step 2 (model, optimizer, router biases, data position) and goes on.
    step2, fresh_state, data2 = _run_parts()
    restored = Checkpointer(str(tmp_path), save_every=2).restore(fresh_state, step=2)
    assert restored is not None
    start, state2, data_state = restored
    data2.set_state(data_state["data"])
    resumed = []
    for _ in range(start + 1, 5):
        state2, metrics = step2(state2, _next(data2))
        resumed.append(float(metrics["loss"]))
    np.testing.assert_allclose(resumed, losses[2:], rtol=1e-6)
    for (path, a), (_, b) in zip(nnx.to_flat_state(state), nnx.to_flat_state(state2), strict=True):
        np.testing.assert_allclose(np.asarray(b.get_value()), np.asarray(a.get_value()), rtol=1e-6,
                                   atol=1e-7, err_msg=str(path))


def test_no_checkpoint_restores_nothing(tmp_path):
    _, state, _ = _run_parts()
    assert Checkpointer(str(tmp_path / "empty"), save_every=1).restore(state) is None
    assert jax.tree.leaves(state)  # the caller's state is untouched


def test_restore_onto_another_mesh_and_rules(tmp_path):
    """A run resumed with another `--mesh` or `sharding_rules` (layout fields) reads the same
    values into the new layout: saved FSDP-sharded on `fsdp=4,expert=2`, restored with
    `embed=None` on `data=2,expert=2,tensor=2`."""
    saved_cfg = ExperimentConfig(model=CFG)
    resumed_cfg = dataclasses.replace(saved_cfg, sharding_rules="embed=None")
    saved_state = nnx.state(init_model_and_optimizer(saved_cfg, make_mesh("fsdp=4,expert=2")))
    checkpointer = Checkpointer(str(tmp_path), save_every=1)
    checkpointer.save(1, saved_state, {}, force=True)
    checkpointer.close()
    target = nnx.state(init_model_and_optimizer(resumed_cfg, make_mesh("data=2,expert=2,tensor=2")))
    start, restored, _ = Checkpointer(str(tmp_path), save_every=1).restore(target)
    assert start == 1
    pairs = zip(nnx.to_flat_state(saved_state), nnx.to_flat_state(restored), nnx.to_flat_state(target),
                strict=True)
    for (path, saved), (_, got), (_, want) in pairs:
        assert got.get_value().sharding == want.get_value().sharding, path
        np.testing.assert_array_equal(np.asarray(got.get_value()), np.asarray(saved.get_value()),
                                      err_msg=str(path))
    w_gate = restored[0]["blocks"][1]["ffn"]["w_gate"].get_value()
    assert w_gate.sharding.spec == jax.P("expert", None, "tensor")

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
from moe_jax.train.checkpoint import Checkpointer
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

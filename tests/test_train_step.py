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
from moe_jax.models.moe import RouterBias
from moe_jax.train.optimizer import make_optimizer
from moe_jax.train.step import make_train_step

CFG = dataclasses.replace(get_preset("tiny-moe"), moe_dispatch="dense")


def _batch(batch_size=4, seq_len=64, seed=0):
    examples = task_examples(make_task("arithmetic", max_digits=2), CharTokenizer(), seed=seed)
    batch = next(iter(packed_batches(examples, seq_len=seq_len, batch_size=batch_size, seed=seed)))
    return {k: jnp.asarray(v) for k, v in batch.items()}


def _fresh(microbatches, lr=1e-2):
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, make_optimizer(lr, warmup_steps=1, total_steps=100), wrt=nnx.Param)
    step, state = make_train_step(model, optimizer, microbatches=microbatches)
    return model, optimizer, step, state


def test_microbatching_gives_the_full_batch_update():
    batch = _batch()
    _, _, step1, state1 = _fresh(1)
    _, _, step2, state2 = _fresh(2)
    state1, metrics1 = step1(state1, batch)
    state2, metrics2 = step2(state2, batch)
    np.testing.assert_allclose(metrics2["loss"], metrics1["loss"], rtol=1e-5)
    np.testing.assert_allclose(metrics2["grad_norm"], metrics1["grad_norm"], rtol=1e-4)
    for (path, a), (_, b) in zip(nnx.to_flat_state(state1), nnx.to_flat_state(state2), strict=True):
        np.testing.assert_allclose(np.asarray(b.get_value()), np.asarray(a.get_value()),
                                   rtol=1e-4, atol=1e-6, err_msg=str(path))


def test_steps_lower_the_loss_and_move_the_router_bias():
    batch = _batch()
    model, optimizer, step, state = _fresh(1, lr=3e-3)
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.5, losses
    nnx.update((model, optimizer), state)
    biases = jax.tree.leaves(nnx.state(model, RouterBias))
    assert any(np.abs(np.asarray(b)).max() > 0 for b in biases)
    steps = int(optimizer.step.get_value())
    assert steps == 8


def test_a_custom_loss_plugs_into_the_step():
    """A made-up objective (squared log-partition, no MoE terms) through `make_train_step` gives
    the update a hand-written gradient + optimizer step gives, and leaves the router biases."""
    batch = _batch()

    def z_loss(model, batch):
        logits, _ = model(batch["tokens"], segment_ids_BxT=batch["segment_ids"], positions_BxT=batch["positions"])
        loss = jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)
        return loss, {"loss": loss}

    model = Transformer(CFG, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, make_optimizer(1e-2, warmup_steps=1, total_steps=100), wrt=nnx.Param)
    step, state = make_train_step(model, optimizer, loss_fn=z_loss)
    state, metrics = step(state, batch)
    nnx.update((model, optimizer), state)

    reference = Transformer(CFG, rngs=nnx.Rngs(0))
    reference_optimizer = nnx.Optimizer(reference, make_optimizer(1e-2, warmup_steps=1, total_steps=100),
                                        wrt=nnx.Param)
    loss, grads = nnx.value_and_grad(lambda m: z_loss(m, batch)[0])(reference)
    reference_optimizer.update(reference, grads)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
    for (path, got), (_, want) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                                      nnx.to_flat_state(nnx.state(reference, nnx.Param)), strict=True):
        np.testing.assert_allclose(np.asarray(got.get_value()), np.asarray(want.get_value()), rtol=1e-5,
                                   atol=1e-7, err_msg=str(path))
    assert all(not np.asarray(b).any() for b in jax.tree.leaves(nnx.state(model, RouterBias)))

"""The jitted training step, whatever its objective: loss → gradients (accumulated over
microbatches) → optax update → the auxiliary-loss-free router-bias update, outside the gradient.

The objective is a parameter: a `LossFn` `(model, batch) -> (loss, aux)` (nanodo's
`get_loss_fn`). `lm_loss` — next-token cross-entropy, DeepSeek-V3's MTP loss and the MoE balance
losses — is the default; the GRPO step (`moe_jax.rl.step`) plugs in its clipped surrogate through
the same `accumulated_update`, and distillation losses plug in the same way.

Flax's split/merge pattern: the model and optimizer are split once into a static graph and a
state pytree; the step is a plain `jax.jit` function of (state, batch) with the state donated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moe_jax.models import Transformer
from moe_jax.parallel.mesh import BATCH_AXES
from moe_jax.parallel.rules import Rules, state_shardings, use_mesh
from moe_jax.train.losses import count_targets, mtp_acceptance, mtp_loss, next_token_loss

Batch = dict[str, Any]
# `(model, batch) -> (loss, aux)`: the microbatch's share of the step's loss, and its metrics
# (scalars or per-layer vectors, summed over the step's microbatches). An MoE objective also puts
# the router loads `[L, E]` under `ROUTER_LOAD`; their sum over microbatches drives the bias step.
LossFn = Callable[[Transformer, Batch], tuple[jax.Array, dict[str, jax.Array]]]
ROUTER_LOAD = "router_load"
# What the train step adds to every microbatch it hands the loss: the whole step's target counts
# per shift (1 for next-token, k + 1 for MTP depth k) and the number of microbatches, so a token
# mean accumulated over microbatches equals the full batch's exactly.
STEP_TARGETS, STEP_MICROBATCHES = "step_targets", "step_microbatches"


def lm_loss(model: Transformer, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The language-model objective of pretraining and SFT: next-token cross-entropy over the
    targets `loss_mask` selects (plus `mtp_loss_weight` × DeepSeek-V3's MTP loss, eq. 24-25) over
    the whole step's target counts, each target weighted by `loss_weight` when the batch has it
    (a dataset record's weight), plus this microbatch's share of the MoE balance losses."""
    cfg = model.cfg
    microbatches = batch.get(STEP_MICROBATCHES, 1)
    normalizers = batch.get(STEP_TARGETS)
    if normalizers is None:
        normalizers = count_targets(batch["segment_ids"], batch["loss_mask"], range(1, cfg.mtp_depth + 2))
    logits, aux = model(batch["tokens"], segment_ids_BxT=batch["segment_ids"],
                        positions_BxT=batch["positions"])
    weight_BxT = batch.get("loss_weight")
    ce = next_token_loss(logits, batch["tokens"], batch["segment_ids"], batch["loss_mask"],
                         normalizers[0], weight_BxT)
    loss = ce + aux["moe_aux_loss"] / microbatches
    metrics = {"ce": ce, "moe_aux_loss": aux["moe_aux_loss"] / microbatches}
    if "mtp_logits" in aux:
        mtp = mtp_loss(aux["mtp_logits"], batch["tokens"], batch["segment_ids"], batch["loss_mask"],
                       normalizers[1:], weight_BxT)
        loss = loss + cfg.mtp_loss_weight * mtp
        metrics["mtp_loss"] = mtp
        metrics["mtp_acceptance"] = jax.lax.stop_gradient(mtp_acceptance(
            aux["mtp_logits"], logits, batch["segment_ids"], batch["loss_mask"])) / microbatches
    if "router" in aux:
        metrics["maxvio"] = aux["router"]["max_vio"] / microbatches
        metrics["drop_frac"] = aux["router"]["dropped_fraction"] / microbatches
        metrics[ROUTER_LOAD] = aux["router"]["load"]
    metrics["loss"] = loss
    return loss, metrics


def accumulate_gradients(loss_fn: Callable[[nnx.State, Any], tuple[jax.Array, Any]], params: nnx.State,
                         chunks: Any) -> tuple[nnx.State, Any]:
    """(Σ_c ∇ loss_fn(params, chunk_c), every chunk's aux stacked `[C, ...]`) over the leading
    axis of `chunks`, by a scan: one chunk's activations live at a time."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if len(jax.tree.leaves(chunks)[0]) == 1:  # one chunk: no loop to compile
        (_, aux), grads = grad_fn(params, jax.tree.map(lambda x: x[0], chunks))
        return grads, jax.tree.map(lambda x: x[None], aux)

    def add(grads, chunk):
        (_, aux), chunk_grads = grad_fn(params, chunk)
        return jax.tree.map(jnp.add, grads, chunk_grads), aux

    return jax.lax.scan(add, jax.tree.map(jnp.zeros_like, params), chunks)


def accumulated_update(model: Transformer, optimizer: nnx.Optimizer, loss_fn: LossFn, chunks: Any
                       ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """One optimizer update from the gradient of `loss_fn` summed over the chunks (leading axis
    of every leaf), then the router-bias step from their summed loads; returns (the chunks'
    metrics stacked `[C, ...]`, the update's: `grad_norm` and `state_health`'s). Used by every
    step: the objective changes, the update does not."""
    params_graph, params, rest = nnx.split(model, nnx.Param, ...)
    grads, metrics_C = accumulate_gradients(
        lambda params, chunk: loss_fn(nnx.merge(params_graph, params, rest), chunk), params, chunks)
    load_CxLxE = metrics_C.pop(ROUTER_LOAD, None)
    optimizer.update(model, grads)
    if load_CxLxE is not None and model.cfg.is_moe and model.cfg.router_bias_rate > 0:
        model.update_router_biases(load_CxLxE.sum(0))
    return metrics_C, {"grad_norm": optax.tree.norm(grads), **state_health(model, optimizer)}


def state_health(model: Transformer, optimizer: nnx.Optimizer) -> dict[str, jax.Array]:
    """`state_finite` (1.0 when every parameter, router bias and optimizer moment is finite, else
    0.0) and `param_norm` (the parameters' global norm): what the driver checks before a save and
    a run's health check watches. Elementwise reductions over arrays the update just wrote, so XLA
    fuses them with it."""
    floats = [x for x in jax.tree.leaves(nnx.state((model, optimizer))) if jnp.issubdtype(x.dtype, jnp.inexact)]
    finite = jnp.stack([jnp.isfinite(x).all() for x in floats]).all()
    return {"state_finite": finite.astype(jnp.float32), "param_norm": optax.tree.norm(nnx.state(model, nnx.Param))}


def jit_over_mesh(fn: Callable, state: nnx.State, mesh: Mesh | None, *, donate: bool,
                  rules: Rules | None = None) -> Callable:
    """`jax.jit(fn)` for `fn(state, batch) -> (state or metrics, ...)`: with a mesh, the state keeps
    its rule-given shardings in and out (`rules`, default `DEFAULT_RULES`), the batch is split over
    the batch axes, and tracing sees the mesh and rules (so `constrain` in the model applies)."""
    donate_argnums = (0,) if donate else ()
    if mesh is None:
        return jax.jit(fn, donate_argnums=donate_argnums)
    state_sharding = state_shardings(state, mesh, rules)
    batch_sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    jitted = jax.jit(fn, in_shardings=(state_sharding, batch_sharding), donate_argnums=donate_argnums,
                     out_shardings=(state_sharding, None) if donate else None)

    def call(state, batch):
        with use_mesh(mesh, rules):
            return jitted(state, batch)

    return call


def make_train_step(model: Transformer, optimizer: nnx.Optimizer, *, loss_fn: LossFn = lm_loss,
                    microbatches: int = 1, mesh: Mesh | None = None, rules: Rules | None = None
                    ) -> tuple[Callable[[nnx.State, Batch], tuple[nnx.State, dict]], nnx.State]:
    """(jitted `step(state, batch) -> (state, metrics)`, initial state) minimising `loss_fn`.
    The state is donated; with a `mesh` it keeps its sharding from step to step. The batch's
    leading dimension must divide into `microbatches`; every microbatch reaches `loss_fn` with
    the whole step's `STEP_TARGETS` (when the batch has `segment_ids` and `loss_mask`) and
    `STEP_MICROBATCHES`. `nnx.update((model, optimizer), state)` writes a state back."""
    graphdef, state = nnx.split((model, optimizer))
    shifts = range(1, model.cfg.mtp_depth + 2)

    def step(state: nnx.State, batch: Batch) -> tuple[nnx.State, dict]:
        model, optimizer = nnx.merge(graphdef, state)
        context: Batch = {STEP_MICROBATCHES: microbatches}
        if "segment_ids" in batch and "loss_mask" in batch:
            context[STEP_TARGETS] = count_targets(batch["segment_ids"], batch["loss_mask"], shifts)
        chunks = jax.tree.map(lambda x: x.reshape(microbatches, -1, *x.shape[1:]), batch)
        metrics_C, update_metrics = accumulated_update(
            model, optimizer, lambda m, chunk: loss_fn(m, {**chunk, **context}), chunks)
        metrics = {**{k: v.sum(0) for k, v in metrics_C.items()}, **update_metrics}
        return nnx.state((model, optimizer)), metrics

    return jit_over_mesh(step, state, mesh, donate=True, rules=rules), state


def make_eval_step(model: Transformer, *, loss_fn: LossFn = lm_loss, mesh: Mesh | None = None,
                   rules: Rules | None = None) -> Callable[[nnx.State, Batch], dict]:
    """Jitted `eval_step(model_state, batch) -> metrics`: the objective's terms without a
    gradient (`model_state` is `nnx.state(model)`, or `state[0]` of the train step's state),
    with an MoE's router loads `[L, E]` under `ROUTER_LOAD` (the whole eval set's balance is
    measured from their sum)."""
    graphdef, state = nnx.split(model)

    def eval_step(state: nnx.State, batch: Batch) -> dict:
        _, metrics = loss_fn(nnx.merge(graphdef, state), batch)
        return metrics

    return jit_over_mesh(eval_step, state, mesh, donate=False, rules=rules)

"""The jitted training step: loss → gradients (accumulated over microbatches) → optax update →
the auxiliary-loss-free router-bias update, outside the gradient.

Flax's split/merge pattern: the model and optimizer are split once into a static graph and a
state pytree; the step is a plain `jax.jit` function of (state, batch) with the state donated.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moe_jax.configs import ModelConfig
from moe_jax.models import Transformer
from moe_jax.parallel.mesh import BATCH_AXES
from moe_jax.parallel.rules import Rules, state_shardings, use_mesh
from moe_jax.train.losses import count_targets, mtp_loss, next_token_loss

Batch = dict[str, jax.Array]


def loss_fn(model: Transformer, batch: Batch, normalizers: jax.Array, n_microbatches: int,
            cfg: ModelConfig) -> tuple[jax.Array, tuple[dict, jax.Array]]:
    """One microbatch's share of the step loss: its summed cross-entropy (and MTP cross-entropy)
    over the whole step's target counts `normalizers` (so accumulated gradients equal the full
    batch's exactly), plus its share of the MoE balance losses. Returns (loss, (metrics, loads))."""
    logits, aux = model(batch["tokens"], segment_ids_BxT=batch["segment_ids"],
                        positions_BxT=batch["positions"])
    ce = next_token_loss(logits, batch["tokens"], batch["segment_ids"], batch["loss_mask"],
                         normalizers[0])
    loss = ce + aux["moe_aux_loss"] / n_microbatches
    metrics = {"ce": ce, "moe_aux_loss": aux["moe_aux_loss"] / n_microbatches}
    if "mtp_logits" in aux:
        mtp = mtp_loss(aux["mtp_logits"], batch["tokens"], batch["segment_ids"], batch["loss_mask"],
                       normalizers[1:])
        loss = loss + cfg.mtp_loss_weight * mtp
        metrics["mtp_loss"] = mtp
    if "router" in aux:
        metrics["maxvio"] = aux["router"]["max_vio"] / n_microbatches
        metrics["drop_frac"] = aux["router"]["dropped_fraction"] / n_microbatches
        loads = aux["router"]["load"]
    else:
        loads = jnp.zeros((0,))
    metrics["loss"] = loss
    return loss, (metrics, loads)


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


def make_train_step(model: Transformer, optimizer: nnx.Optimizer, *, microbatches: int = 1,
                    mesh: Mesh | None = None, rules: Rules | None = None
                    ) -> tuple[Callable[[nnx.State, Batch], tuple[nnx.State, dict]], nnx.State]:
    """(jitted `step(state, batch) -> (state, metrics)`, initial state). The state is donated; with
    a `mesh` it keeps its sharding from step to step. The batch's leading dimension must divide
    into `microbatches`; `nnx.update((model, optimizer), state)` writes a state back."""
    cfg = model.cfg
    graphdef, state = nnx.split((model, optimizer))

    def step(state: nnx.State, batch: Batch) -> tuple[nnx.State, dict]:
        model, optimizer = nnx.merge(graphdef, state)
        params_graph, params, rest = nnx.split(model, nnx.Param, ...)
        # Targets of the whole step, for next-token (shift 1) and each MTP depth (shift k + 1).
        normalizers = count_targets(batch["segment_ids"], batch["loss_mask"],
                                    range(1, cfg.mtp_depth + 2))

        def micro_loss(params, microbatch):
            return loss_fn(nnx.merge(params_graph, params, rest), microbatch, normalizers,
                           microbatches, cfg)

        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
        micro = jax.tree.map(lambda x: x.reshape(microbatches, -1, *x.shape[1:]), batch)
        first = jax.tree.map(lambda x: x[0], micro)
        (_, (metrics, loads)), grads = grad_fn(params, first)

        def accumulate(carry, microbatch):
            (_, (m, l)), g = grad_fn(params, microbatch)
            return jax.tree.map(jnp.add, carry, (g, m, l)), None

        rest_micro = jax.tree.map(lambda x: x[1:], micro)
        (grads, metrics, loads), _ = jax.lax.scan(accumulate, (grads, metrics, loads), rest_micro)
        optimizer.update(model, grads)
        if cfg.is_moe and cfg.router_bias_rate > 0:
            model.update_router_biases(loads)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return nnx.state((model, optimizer)), metrics

    return jit_over_mesh(step, state, mesh, donate=True, rules=rules), state


def make_eval_step(model: Transformer, *, mesh: Mesh | None = None, rules: Rules | None = None
                   ) -> Callable[[nnx.State, Batch], dict]:
    """Jitted `eval_step(model_state, batch) -> metrics`: the training loss terms without a
    gradient (`model_state` is `nnx.state(model)`, or `state[0]` of the train step's state)."""
    graphdef, state = nnx.split(model)

    def eval_step(state: nnx.State, batch: Batch) -> dict:
        model = nnx.merge(graphdef, state)
        normalizers = count_targets(batch["segment_ids"], batch["loss_mask"],
                                    range(1, model.cfg.mtp_depth + 2))
        _, (metrics, _) = loss_fn(model, batch, normalizers, 1, model.cfg)
        return metrics

    return jit_over_mesh(eval_step, state, mesh, donate=False, rules=rules)

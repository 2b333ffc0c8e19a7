"""Create a model directly in its sharding: the abstract model gives shapes and logical axes,
the rules give shardings, and a jitted initializer with `out_shardings` writes each device's
shard in place — the full model never exists on one host."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import jax
from flax import nnx
from jax.sharding import Mesh

from moe_jax.parallel.rules import Rules, state_shardings

M = TypeVar("M")  # a Module, or a tuple of them (e.g. a model and its optimizer)


def init_sharded(make_module: Callable[[], M], mesh: Mesh, rules: Rules | None = None) -> M:
    """`make_module()` (e.g. `lambda: Transformer(cfg, rngs=nnx.Rngs(0))`, or a function returning
    a model and its `nnx.Optimizer`) built shard by shard.

    Shardings are checked against the mesh before anything is compiled."""
    graphdef, abstract_state = nnx.split(nnx.eval_shape(make_module))
    shardings = state_shardings(abstract_state, mesh, rules)

    def initialize() -> nnx.State:
        return nnx.split(make_module())[1]

    with jax.set_mesh(mesh):
        state = jax.jit(initialize, out_shardings=shardings)()
    return nnx.merge(graphdef, state)

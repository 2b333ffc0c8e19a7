"""Orbax checkpoints of a training run: the model + optimizer state (with the router biases and
the optimizer's step), the data iterator's state and any JSON-able extras, every N steps, keeping
the last K. Orbax writes each step to a temporary directory and renames it when complete, so a
crash or kill mid-save never damages the last good checkpoint.

Layout: `<step>/{model,optimizer,data}` inside the directory it is given (a run's
`checkpoints/`, `moe_jax.train.workdir`)."""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx


def _target(abstract_state: nnx.State) -> dict:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.to_pure_dict(abstract_state))


class Checkpointer:
    """`save(step, state, data_state)` asynchronously; `restore(abstract_state)` the latest."""

    def __init__(self, directory: str, *, save_every: int, keep: int = 3, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(save_interval_steps=save_every, max_to_keep=keep,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: nnx.State, data_state: dict[str, Any], *, force: bool = False
             ) -> bool:
        """Start saving the train step's `(model, optimizer)` state (if `step` is due or `force`);
        returns whether a save was started. Model and optimizer are separate items, so a later
        stage can load the model alone (`restore_model`)."""
        model_state, optimizer_state = state[0], state[1]
        return self.manager.save(step, args=ocp.args.Composite(
            model=ocp.args.StandardSave(nnx.to_pure_dict(model_state)),
            optimizer=ocp.args.StandardSave(nnx.to_pure_dict(optimizer_state)),
            data=ocp.args.JsonSave(data_state)), force=force)

    def restore(self, abstract_state: nnx.State, step: int | None = None
                ) -> tuple[int, nnx.State, dict[str, Any]] | None:
        """(step, state, data_state) of `step` (default: the latest), laid out like
        `abstract_state` (shapes, dtypes and shardings); None when there is no checkpoint."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        restored = self.manager.restore(step, args=ocp.args.Composite(
            model=ocp.args.StandardRestore(_target(abstract_state[0])),
            optimizer=ocp.args.StandardRestore(_target(abstract_state[1])),
            data=ocp.args.JsonRestore()))
        state = jax.tree.map(lambda x: x, abstract_state)  # a copy: the caller's state stays intact
        nnx.replace_by_pure_dict(state, {0: restored["model"], 1: restored["optimizer"]})
        return step, state, restored["data"]

    def restore_model(self, abstract_model_state: nnx.State, step: int | None = None) -> nnx.State:
        """Only the model (parameters and router biases) of `step` (default: the latest)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.manager.directory}")
        restored = self.manager.restore(step, args=ocp.args.Composite(
            model=ocp.args.StandardRestore(_target(abstract_model_state))))
        state = jax.tree.map(lambda x: x, abstract_model_state)
        nnx.replace_by_pure_dict(state, restored["model"])
        return state

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

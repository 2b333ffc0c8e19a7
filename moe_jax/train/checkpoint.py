"""Orbax checkpoints of a training run: the model + optimizer state (with the router biases and
the optimizer's step), the data iterator's state and a checksum of every array, every N steps,
keeping the last K. Orbax writes each step to a temporary directory and renames it when complete,
so a crash or kill mid-save never damages the last good checkpoint.

Integrity: each save records, beside the data position, two 32-bit sums of every array's bytes
(plain and position-weighted, computed on device: `fingerprints`). A restore recomputes them; a
checkpoint whose sums differ (flipped bits) or that fails to load at all (a truncated, deleted or
garbled file, a missing manifest) is reported by step and reason and the next newest is tried;
once an older one loads, the failed newer ones are moved aside to `damaged_dir` (never deleted).

Layout: `<step>/{model,optimizer,data}` inside the directory it is given (a run's
`checkpoints/`, `moe_jax.train.workdir`)."""

from __future__ import annotations

import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from moe_jax.parallel.distributed import all_rows, is_lead, sync

CHECKSUMS = "_checksums"  # key of the checksums inside the checkpoint's JSON item
MODULUS = 65521  # position weights cycle through 1..MODULUS (a prime, as in Adler-32)


class CheckpointError(RuntimeError):
    """No checkpoint could be restored, or one could not be saved."""


def _target(abstract_state: nnx.State) -> dict:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.to_pure_dict(abstract_state))


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
    """`[2]` uint32: the sum of the array's bytes and their sum weighted by position (mod MODULUS,
    + 1), both mod 2^32 — integer sums, so the same for any sharding or reduction order."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    bytes_N = jax.lax.bitcast_convert_type(x, jnp.uint8).reshape(-1).astype(jnp.uint32)
    weights_N = jnp.arange(bytes_N.size, dtype=jnp.uint32) % MODULUS + 1
    return jnp.stack([bytes_N.sum(dtype=jnp.uint32), (bytes_N * weights_N).sum(dtype=jnp.uint32)])


_fingerprints = jax.jit(lambda tree: jax.tree.map(_leaf_fingerprint, tree))


def fingerprints(tree: Any) -> dict[str, list[int]]:
    """`{array path: [sum, weighted sum]}` of every array in a pytree."""
    sums = jax.device_get(_fingerprints(tree))
    return {jax.tree_util.keystr(path): [int(v) for v in value]
            for path, value in jax.tree_util.tree_flatten_with_path(sums)[0]}


def _all_processes_agree(ok: bool) -> bool:
    """Whether `ok` holds on every process (a damaged file may fail one process's shard only)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(all_rows(np.asarray([ok], np.int32))))


class Checkpointer:
    """`save(step, state, data_state)` asynchronously; `restore(abstract_state)` the newest good
    checkpoint; damaged ones go to `damaged_dir` (default: `<directory>_damaged`)."""

    def __init__(self, directory: str, *, save_every: int, keep: int = 3, async_save: bool = True,
                 damaged_dir: str | None = None):
        self.directory = os.path.abspath(directory)
        self.damaged_dir = damaged_dir or self.directory + "_damaged"
        options = ocp.CheckpointManagerOptions(save_interval_steps=save_every, max_to_keep=keep,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: nnx.State, data_state: dict[str, Any], *, force: bool = False
             ) -> bool:
        """Start saving the train step's `(model, optimizer)` state (if `step` is due or `force`)
        with its checksums; returns whether a save was started. Model and optimizer are separate
        items, so a later stage can load the model alone (`restore_model`)."""
        model = nnx.to_pure_dict(state[0])
        optimizer = nnx.to_pure_dict(state[1])
        checksums = {"model": fingerprints(model), "optimizer": fingerprints(optimizer)}
        return self.manager.save(step, args=ocp.args.Composite(
            model=ocp.args.StandardSave(model), optimizer=ocp.args.StandardSave(optimizer),
            data=ocp.args.JsonSave({**data_state, CHECKSUMS: checksums})), force=force)

    def check_for_errors(self) -> None:
        """Raise the error of a background save that failed (it surfaces nowhere else)."""
        self.manager.check_for_errors()

    def _restore_verified(self, step: int, items: dict[str, Any]) -> dict[str, Any]:
        """The items of `step` (`{name: abstract pure dict}`), plus `data`; raises CheckpointError
        when a checksum differs."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            **{name: ocp.args.StandardRestore(target) for name, target in items.items()},
            data=ocp.args.JsonRestore()))
        saved = restored["data"].pop(CHECKSUMS, None)
        if saved is None:
            logging.warning("checkpoint step %d was saved without checksums (an older version): not verified",
                            step)
            return restored
        for name in items:
            got = fingerprints(restored[name])
            if set(got) != set(saved[name]):
                raise CheckpointError(f"its {name} arrays are not the ones saved (differing: "
                                      f"{sorted(set(got) ^ set(saved[name]))[:3]})")
            bad = sorted(path for path in saved[name] if got[path] != saved[name][path])
            if bad:
                raise CheckpointError(f"{len(bad)} of its {len(saved[name])} {name} arrays fail their checksum "
                                      f"(first: {name}{bad[0]})")
        return restored

    def _move_aside(self, step: int, reason: str) -> None:
        """Move a damaged step out of the run's checkpoints (kept, never deleted)."""
        target = os.path.join(self.damaged_dir, str(step))
        if is_lead():
            os.makedirs(self.damaged_dir, exist_ok=True)
            if os.path.exists(target):
                shutil.rmtree(target)  # an older copy of the same step, moved aside before
            shutil.move(os.path.join(self.directory, str(step)), target)
        sync(f"moved aside checkpoint {step}")
        self.manager.reload()
        logging.warning("checkpoint step %d is damaged (%s): moved to %s", step, reason, target)

    def restore(self, abstract_state: nnx.State, step: int | None = None
                ) -> tuple[int, nnx.State, dict[str, Any]] | None:
        """(step, state, data_state) of the newest checkpoint that loads and passes its checksums
        (or of `step`, which must), laid out like `abstract_state` (shapes, dtypes and shardings);
        None when there is no checkpoint. Newer checkpoints that fail while an older one loads are
        damaged and moved aside; when none loads (damage everywhere, or a changed model), nothing is
        moved and a CheckpointError gives each step's reason."""
        targets = {"model": _target(abstract_state[0]), "optimizer": _target(abstract_state[1])}

        def as_state(restored: dict[str, Any]) -> nnx.State:
            state = jax.tree.map(lambda x: x, abstract_state)  # a copy: the caller's stays intact
            nnx.replace_by_pure_dict(state, {0: restored["model"], 1: restored["optimizer"]})
            return state

        if step is not None:
            restored = self._restore_verified(step, targets)
            return step, as_state(restored), restored["data"]
        steps = sorted(self.manager.all_steps(), reverse=True)
        failures: list[tuple[int, str]] = []
        for candidate in steps:
            try:
                restored, reason = self._restore_verified(candidate, targets), None
            except Exception as e:  # noqa: BLE001 -- any failure to load means this step is unusable
                restored, reason = None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if _all_processes_agree(reason is None):
                # An older checkpoint of the same model loads: the newer ones are damaged.
                for damaged, why in failures:
                    self._move_aside(damaged, why)
                if failures:
                    logging.warning("resuming from checkpoint step %d, the newest good one", candidate)
                return candidate, as_state(restored), restored["data"]
            failures.append((candidate, reason or "another process could not load it"))
        if failures:  # none loads: damage everywhere, or a model or layout that changed; nothing moved
            raise CheckpointError(
                f"no checkpoint in {self.directory} could be restored: "
                + "; ".join(f"step {damaged}: {why}" for damaged, why in failures)
                + ". Nothing was moved. Fix: if the model or its layout changed, resume with the run's own "
                  "config; if the files are damaged, move them away (the run then starts over) or restore a copy")
        return None

    def restore_model(self, abstract_model_state: nnx.State, step: int | None = None) -> nnx.State:
        """Only the model (parameters and router biases) of `step` (default: the latest), verified
        against its checksums (CheckpointError otherwise)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        try:
            restored = self._restore_verified(step, {"model": _target(abstract_model_state)})
        except CheckpointError as e:
            raise CheckpointError(f"checkpoint step {step} of {self.directory} is damaged ({e}). Fix: give "
                                  f"an earlier step's directory ({self.directory}/<step>)") from e
        state = jax.tree.map(lambda x: x, abstract_model_state)
        nnx.replace_by_pure_dict(state, restored["model"])
        return state

    def close(self) -> None:
        """Wait for pending saves and release the manager. A failed save is not raised here (the
        driver asks `check_for_errors` first); this runs in `finally` blocks, where raising would
        hide the error that stopped the run."""
        try:
            self.manager.wait_until_finished()
            self.manager.close()
        except Exception as e:  # noqa: BLE001
            logging.warning("a checkpoint save had failed: %s", e)

"""The run driver: everything a run needs but its step, its data and its evaluation.

Every kind of run — pretraining, SFT, GRPO, and each pipeline or distillation stage — is
`run(cfg, workdir, build)`. The driver owns the workdir (`moe_jax.train.workdir`: the lock, the
config check, `config.json`, the tokenizer copy, `DONE`), the setup (`moe_jax.train.context`:
mesh, tokenizer, task, the model and its optimizer born sharded, `--init_from`), resume from the
newest checkpoint that verifies (model, optimizer, router biases, step and data position), the
loop (`moe_jax.train.loop`: its services — hooks, SIGTERM checkpointing, the finite-state guard,
evaluation, saving, metrics and progress — each with its cadence), the plot and the summary it
returns. `build(context) -> RunParts` is what a kind of run writes: its step, its data iterator and
its evaluation.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import logging
from flax import nnx

from moe_jax.parallel.distributed import is_lead
from moe_jax.train import workdir as workdir_format
from moe_jax.train.checkpoint import Checkpointer
from moe_jax.train.context import RunContext, load_init_from, make_context
from moe_jax.train.experiment_config import RunConfig
from moe_jax.train.lock import lock_workdir
from moe_jax.train.loop import ELAPSED_KEY, TrainLoop
from moe_jax.train.parts import BuildRun, RunParts
from moe_jax.train.run_log import RunLog

# `hook(step, state)` runs after step N is dispatched (e.g. a custom probe, or a test's kill).
Hook = Callable[[int, nnx.State], None]




def run(cfg: RunConfig, workdir: str, build: BuildRun, *, mesh_spec: str | None = None,
        init_from: str | None = None, init_from_on_resume: bool = False, hooks: Sequence[Hook] = (),
        allow_config_change: Sequence[str] = ()) -> dict[str, Any]:
    """Run (or resume) the run `build` describes in `workdir`; returns `{"status", "step",
    "metrics"}` where status is "finished" or "preempted" (SIGTERM: checkpointed, rerun to
    continue). A finished run (its `DONE`) returns its final metrics without building anything.
    A non-finite loss or state raises FloatingPointError. `init_from` (a run, a checkpoint or
    `hf:<folder>`) gives the starting weights of a new run; a resumed run ignores it unless
    `init_from_on_resume` (GRPO: it is the KL term's reference). `allow_config_change` names the
    config paths (or parts, e.g. `optimizer`) a resumed run may change; the changes are recorded
    in the workdir. Another live run on `workdir` makes this one fail at once (WorkdirLockedError)."""
    will_load = init_from and (init_from_on_resume or not workdir_format.has_checkpoints(workdir))
    if will_load and not os.path.exists(init_from.removeprefix("hf:")):
        raise FileNotFoundError(f"--init_from={init_from}: no such run or checkpoint. Fix: give a run's "
                                "workdir, one of its checkpoints/<step> directories, or hf:<folder>")
    with lock_workdir(workdir):
        return _run_locked(cfg, workdir, build, mesh_spec=mesh_spec, init_from=init_from,
                           init_from_on_resume=init_from_on_resume, hooks=hooks,
                           allow_config_change=allow_config_change)


def _run_locked(cfg: RunConfig, workdir: str, build: BuildRun, *, mesh_spec: str | None, init_from: str | None,
                init_from_on_resume: bool, hooks: Sequence[Hook], allow_config_change: Sequence[str]
                ) -> dict[str, Any]:
    attempt_start = time.perf_counter()
    changes = workdir_format.check_config(cfg, workdir, allow_config_change)
    done = workdir_format.read_done(workdir)
    if done is not None and (not changes or cfg.steps <= done["step"]):  # nothing left to train
        logging.info("%s finished at step %d; nothing to do", workdir, done["step"])
        return {"status": "finished", "step": done["step"], "metrics": done["metrics"]}
    tokenizer = workdir_format.tokenizer_path(workdir, cfg)  # the run's own copy once it has one
    context = make_context(cfg, mesh_spec, tokenizer=tokenizer)
    checkpointer = Checkpointer(workdir_format.checkpoint_dir(workdir), save_every=cfg.loop.checkpoint_every,
                                keep=cfg.loop.keep_checkpoints, damaged_dir=workdir_format.damaged_dir(workdir))
    try:
        parts, start, state, elapsed_before = _build_and_resume(
            cfg, workdir, build, context, checkpointer, changes,
            init_from=init_from if init_from and (init_from_on_resume or checkpointer.latest_step() is None) else None)
        model_graphdef = nnx.graphdef(context.model)
    except BaseException:
        checkpointer.close()
        raise
    del context  # the state pytree is the truth from here on (it is donated each step)
    run_log = RunLog(workdir, steps=cfg.steps, start=start, is_lead=is_lead(), progress_keys=parts.progress_keys,
                     plot_keys=parts.plot_keys)
    loop = TrainLoop(cfg, parts, checkpointer, run_log, model_graphdef, start=start, attempt_start=attempt_start,
                     elapsed_before=elapsed_before, workdir=workdir)
    for hook in hooks:
        loop.add_hook(hook)
    try:
        status, step, metrics = loop.run(state)
    finally:
        run_log.close()
        checkpointer.close()
    run_log.plot()
    if status == "finished" and is_lead():
        workdir_format.mark_done(workdir, step, metrics)
    return {"status": status, "step": step, "metrics": metrics}


def _build_and_resume(cfg: RunConfig, workdir: str, build: BuildRun, context: RunContext, checkpointer: Checkpointer,
                      changes: Sequence[str], *, init_from: str | None) -> tuple[RunParts, int, nnx.State, float]:
    """The run's parts on its starting weights (`init_from`, when given), `config.json` written
    (after the changed settings are recorded), and the state of the newest good checkpoint:
    `(parts, start step, state, wall seconds the earlier attempts spent)`."""
    if init_from:
        load_init_from(context.model, init_from)
    parts = build(context)  # a bad dataset file fails here, before config.json is written
    if changes and is_lead():  # recorded (and DONE gone) before config.json takes the new values
        workdir_format.record_config_changes(workdir, checkpointer.latest_step(), changes)
        logging.warning("%s goes on with changed settings:\n  %s", workdir, "\n  ".join(changes))
    workdir_format.prepare(cfg, workdir)
    restored = checkpointer.restore(parts.state)
    if restored is None:
        return parts, 0, parts.state, 0.0
    start, state, data_state = restored
    parts.data.set_state(data_state[parts.data_key])
    logging.info("resumed %s from step %d", workdir, start)
    return parts, start, state, float(data_state.get(ELAPSED_KEY, 0.0))

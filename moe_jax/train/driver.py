"""The run driver: everything a run needs but its step, its data and its evaluation.

Every kind of run — pretraining, SFT, GRPO, and each pipeline or distillation stage — is
`run(cfg, workdir, build)`. The driver owns the workdir (`moe_jax.train.workdir`: the lock, the
config check, `config.json`, the tokenizer copy, `DONE`), the setup (`moe_jax.train.context`:
mesh, tokenizer, task, the model and its optimizer born sharded, `--init_from`), resume from the
newest checkpoint that verifies (model, optimizer, router biases, step and data position), the
loop's services (hooks, SIGTERM checkpointing, the finite-state guard, evaluation, saving,
metrics, progress and the plot) and the summary it returns. `build(context) -> RunParts` is what a
kind of run writes: its step, its data iterator and its evaluation.

The loop dispatches step N before it fetches step N-1's metrics, so the host never stalls the
device for logging; it syncs only to checkpoint or evaluate. Before step N's state is saved, every
step up to N is checked: a finite loss and gradient norm, and parameters and optimizer state that
are all finite (`state_finite`, computed on device inside the step) — so a non-finite state is
never written. A background save that fails stops the run at the next step with one line.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import jax
from absl import logging
from flax import nnx

from moe_jax.train import workdir as workdir_format
from moe_jax.train.checkpoint import Checkpointer, CheckpointError
from moe_jax.train.context import RunContext, load_init_from, make_context
from moe_jax.train.experiment_config import RunConfig
from moe_jax.train.lock import lock_workdir
from moe_jax.train.metrics import mfu
from moe_jax.train.optimizer import run_schedule
from moe_jax.train.preemption import PreemptionWatcher
from moe_jax.train.run_log import RunLog

THROUGHPUT_WINDOW = 10  # steps over which tokens/s is measured
ELAPSED_KEY = "elapsed_s"  # a checkpoint's record of the wall time the run had spent (for `loop.max_seconds`)
# `hook(step, state)` runs after step N is dispatched (e.g. a custom probe, or a test's kill).
Hook = Callable[[int, nnx.State], None]


class Checkpointable(Protocol):
    """A data iterator whose position is saved with every checkpoint (grain's iterators)."""

    def get_state(self) -> Any: ...

    def set_state(self, state: Any) -> None: ...


@dataclasses.dataclass
class RunParts:
    """What a kind of run supplies. `step(n, state) -> (state, metrics)` dispatches step n (it
    draws its own batch from `data`); metrics may stay on the device, and must hold `loss` and
    `grad_norm`. `evaluate(model) -> metrics` runs at `eval_every` and at the end (and at step 0
    when `evaluate_at_start`). With `tokens_per_step` and `flops_per_token` the driver reports
    tokens/s and MFU; without, the step reports its own `tokens_per_s`."""

    step: Callable[[int, nnx.State], tuple[nnx.State, dict]]
    state: nnx.State
    data: Checkpointable
    evaluate: Callable[[nnx.Module], dict[str, float]]
    data_key: str = "train"  # the data position's name inside a checkpoint
    tokens_per_step: int | None = None
    flops_per_token: int | None = None
    evaluate_at_start: bool = False
    progress_keys: Mapping[str, str] | None = None
    plot_keys: Sequence[str] | None = None
    # `check(step, host metrics)` after each step's finite check: a run's own health signals
    # (it raises to stop the run, logs to warn)
    check: Callable[[int, dict[str, Any]], None] | None = None




BuildRun = Callable[[RunContext], RunParts]


def host_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Device metrics to Python numbers; per-layer vectors also get their mean as `<name>_mean`."""
    host = {}
    for name, value in jax.device_get(dict(metrics)).items():
        if getattr(value, "ndim", 0) == 0:
            host[name] = float(value)
        else:
            host[name] = [float(v) for v in value]
            host[f"{name}_mean"] = float(value.mean())
    return host


def check_finite(step: int, metrics: Mapping[str, Any], last_good: int | None) -> None:
    """FloatingPointError when the step's loss or gradient norm is NaN/Inf, or its parameters or
    optimizer state are not all finite (before anything of that step is saved)."""
    fix = ("Fix: rerun with a gentler optimizer, e.g. --allow_config_change=optimizer "
           "--config.optimizer.learning_rate=<lower> (or a longer --config.optimizer.warmup_steps); it goes "
           "on from the last good checkpoint, or starts over if there is none")
    where = f"the last good checkpoint is step {last_good}" if last_good else "no checkpoint was saved yet"
    for name in ("loss", "grad_norm"):
        if not math.isfinite(metrics[name]):
            raise FloatingPointError(f"step {step}: {name} is {metrics[name]}; stopping without saving this "
                                     f"state ({where}). {fix}")
    if metrics.get("state_finite", 1.0) != 1.0:
        raise FloatingPointError(f"step {step}: the parameters or optimizer state are not all finite; stopping "
                                 f"without saving this state ({where}). {fix}")


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
    context = make_context(cfg, mesh_spec, tokenizer=workdir_format.tokenizer_path(workdir, cfg))
    loop = cfg.loop
    checkpointer = Checkpointer(workdir_format.checkpoint_dir(workdir), save_every=loop.checkpoint_every,
                                keep=loop.keep_checkpoints, damaged_dir=workdir_format.damaged_dir(workdir))
    try:
        if init_from and (init_from_on_resume or checkpointer.latest_step() is None):
            load_init_from(context.model, init_from)
        parts = build(context)  # a bad dataset file fails here, before config.json is written
        is_lead = jax.process_index() == 0
        if changes and is_lead:  # recorded (and DONE gone) before config.json takes the new values
            workdir_format.record_config_changes(workdir, checkpointer.latest_step(), changes)
            logging.warning("%s goes on with changed settings:\n  %s", workdir, "\n  ".join(changes))
        workdir_format.prepare(cfg, workdir)
        model_graphdef = nnx.graphdef(context.model)
        del context  # the state pytree is the truth from here on (it is donated each step)
        state, start = parts.state, 0
        restored = checkpointer.restore(state)
    except BaseException:
        checkpointer.close()
        raise
    elapsed_before = 0.0  # wall seconds the attempts before this one spent, up to their last save
    if restored is not None:
        start, state, data_state = restored
        parts.data.set_state(data_state[parts.data_key])
        elapsed_before = float(data_state.get(ELAPSED_KEY, 0.0))
        logging.info("resumed %s from step %d", workdir, start)

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - attempt_start

    schedule = run_schedule(cfg)
    run_log = RunLog(workdir, steps=cfg.steps, start=start, is_lead=is_lead,
                     progress_keys=parts.progress_keys, plot_keys=parts.plot_keys)
    status, last_metrics, step = "finished", {}, start
    last_good = start or None
    fetched_at: collections.deque[float] = collections.deque(maxlen=THROUGHPUT_WINDOW + 1)

    def fetch(step: int, device_metrics: dict) -> dict:
        """Step `step`'s metrics on the host (waiting for it), checked, with lr and speed."""
        host = host_metrics(device_metrics)
        check_finite(step, host, last_good)
        if parts.check is not None:
            parts.check(step, host)
        host["lr"] = float(schedule((step - 1) * cfg.updates_per_step))  # at the step's first update
        fetched_at.append(time.perf_counter())
        if parts.tokens_per_step and len(fetched_at) > 1:  # a window: one interval alone is jittery
            tokens_per_s = parts.tokens_per_step * (len(fetched_at) - 1) / (fetched_at[-1] - fetched_at[0])
            host["tokens_per_s"] = tokens_per_s
            if parts.flops_per_token:
                host["mfu"] = mfu(parts.flops_per_token, tokens_per_s, jax.devices())
        return host

    def evaluate(step: int, state: nnx.State) -> dict:
        metrics = parts.evaluate(nnx.merge(model_graphdef, state[0]))
        logging.info("step %d: %s", step, " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    @contextlib.contextmanager
    def saving(intact: int | None) -> Iterator[None]:
        """A save that fails — when it starts, in the background, or while the run waits for it —
        stops the run at once with one line, naming the checkpoint known complete before it."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 -- whatever the storage raised, the run must stop
            cause = str(e).splitlines()[0] if str(e) else ""
            whole = (f"The previous checkpoint (step {intact}) is intact. Fix: free space or fix the storage, then "
                     "rerun (it resumes from that checkpoint)") if intact else (
                "No checkpoint was written yet. Fix: free space or fix the storage, then rerun (it starts over)")
            raise CheckpointError(f"saving a checkpoint to {checkpointer.directory} failed: {type(e).__name__}: "
                                  f"{cause}. {whole}") from None

    pending = None  # (step, device metrics) dispatched but not yet fetched
    last_complete = last_good  # the newest checkpoint known to be on disk whole
    try:
        if start == 0 and parts.evaluate_at_start:  # the curve's starting point
            last_metrics = evaluate(0, state)
            run_log.write(0, last_metrics)
        with PreemptionWatcher() as preemption:
            for step in range(start + 1, cfg.steps + 1):
                state, metrics = parts.step(step, state)
                data_state = parts.data.get_state()
                with saving(last_complete):  # the background save of an earlier step
                    checkpointer.check_for_errors()
                if pending:
                    last_metrics = fetch(*pending)
                    run_log.write(pending[0], last_metrics)
                pending = (step, metrics)
                for hook in hooks:
                    hook(step, state)
                stop = preemption.stop_requested(step, checkpointer.manager)
                out_of_time = 0 < loop.max_seconds <= elapsed()
                final = step == cfg.steps or out_of_time
                save = final or stop or step % loop.checkpoint_every == 0
                evaluate_now = final or step % loop.eval_every == 0
                if not (save or evaluate_now):
                    continue
                last_metrics, pending = fetch(step, metrics), None  # checks this step before saving
                if evaluate_now:
                    last_metrics.update(evaluate(step, state))
                run_log.write(step, last_metrics)
                if save:
                    with saving(last_complete):  # one save at a time: the previous one ends first
                        checkpointer.manager.wait_until_finished()
                        checkpointer.check_for_errors()
                    last_complete = last_good
                    with saving(last_complete):
                        checkpointer.save(step, state, {parts.data_key: data_state, ELAPSED_KEY: elapsed()},
                                          force=True)
                    last_good = step
                fetched_at.clear()  # the next interval would include this sync's work
                if out_of_time:
                    logging.info("%s: its time budget (loop.max_seconds=%g) is spent at step %d", workdir,
                                 loop.max_seconds, step)
                    break
                if stop:
                    status = "preempted"
                    logging.warning("preemption notice: saved step %d; rerun to resume", step)
                    break
        with saving(last_complete):
            checkpointer.manager.wait_until_finished()
            checkpointer.check_for_errors()
    finally:
        run_log.close()
        checkpointer.close()
    run_log.plot()
    if status == "finished" and is_lead:
        workdir_format.mark_done(workdir, step, last_metrics)
    return {"status": status, "step": step, "metrics": last_metrics}

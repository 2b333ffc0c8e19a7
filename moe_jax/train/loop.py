"""The training loop of the run driver, its services each with a cadence (levanter's
`trainer.add_hook(fn, every=n)`): the step itself, the deferred metrics fetch and log (every step,
one step late, so the host never stalls the device), the hooks, evaluation (`loop.eval_every`),
saving (`loop.checkpoint_every`), SIGTERM and the wall-clock budget — and the final step, which
both evaluates and saves.

Before step N's state is saved, every step up to N is checked: a finite loss and gradient norm,
and parameters and optimizer state that are all finite (`state_finite`, computed on device inside
the step), so a non-finite state is never written. A background save that fails stops the run at
the next step with one line.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
from absl import logging
from flax import nnx

from moe_jax.train.checkpoint import Checkpointer, CheckpointError
from moe_jax.train.experiment_config import RunConfig
from moe_jax.train.metrics import mfu
from moe_jax.train.optimizer import run_schedule
from moe_jax.train.parts import RunParts
from moe_jax.train.preemption import PreemptionWatcher
from moe_jax.train.run_log import RunLog

THROUGHPUT_WINDOW = 10  # steps over which tokens/s is measured
ELAPSED_KEY = "elapsed_s"  # a checkpoint's record of the wall time the run had spent (for `loop.max_seconds`)


@dataclasses.dataclass(frozen=True)
class CadencedHook:
    """`fn(step, state)` after step N is dispatched, when N is a multiple of `every` (a probe, a
    test's kill)."""

    fn: Callable[[int, nnx.State], None]
    every: int = 1


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


class TrainLoop:
    """Steps `start + 1 .. cfg.steps` of a run whose parts (`RunParts`) are built and whose
    state is restored; `run()` returns `(status, last step, last metrics)`."""

    def __init__(self, cfg: RunConfig, parts: RunParts, checkpointer: Checkpointer, run_log: RunLog,
                 model_graphdef: nnx.GraphDef, *, start: int, attempt_start: float, elapsed_before: float,
                 workdir: str):
        self.cfg, self.parts, self.checkpointer, self.run_log = cfg, parts, checkpointer, run_log
        self.model_graphdef, self.start, self.workdir = model_graphdef, start, workdir
        self.hooks: list[CadencedHook] = []
        self.schedule = run_schedule(cfg)
        self.attempt_start, self.elapsed_before = attempt_start, elapsed_before  # perf_counter at the attempt's setup
        self.last_good = start or None  # the newest checkpoint this run saved or resumed from
        self.last_complete = self.last_good  # the newest checkpoint known to be on disk whole
        self.pending: tuple[int, dict] | None = None  # (step, device metrics) dispatched, not yet fetched
        self.last_metrics: dict[str, Any] = {}
        self.fetched_at: collections.deque[float] = collections.deque(maxlen=THROUGHPUT_WINDOW + 1)

    def add_hook(self, fn: Callable[[int, nnx.State], None], every: int = 1) -> None:
        self.hooks.append(CadencedHook(fn, every))

    def elapsed(self) -> float:
        """Wall seconds of every attempt (the earlier ones up to their last save, and this one)."""
        return self.elapsed_before + time.perf_counter() - self.attempt_start

    def run(self, state: nnx.State) -> tuple[str, int, dict[str, Any]]:
        cfg, loop, parts = self.cfg, self.cfg.loop, self.parts
        status, step = "finished", self.start
        if self.start == 0 and parts.evaluate_at_start:  # the curve's starting point
            self.last_metrics = self._evaluate(0, state)
            self.run_log.write(0, self.last_metrics)
        with PreemptionWatcher() as preemption:
            for step in range(self.start + 1, cfg.steps + 1):
                state, metrics = parts.step(step, state)
                data_state = parts.data.get_state()
                self._log_pending()
                self.pending = (step, metrics)
                for hook in self.hooks:
                    if step % hook.every == 0:
                        hook.fn(step, state)
                stop = preemption.stop_requested(step, self.checkpointer.manager)
                out_of_time = 0 < loop.max_seconds <= self.elapsed()
                final = step == cfg.steps or out_of_time
                save = final or stop or step % loop.checkpoint_every == 0
                evaluate = final or step % loop.eval_every == 0
                if save or evaluate:
                    self._sync_point(step, state, data_state, save=save, evaluate=evaluate)
                if out_of_time:
                    logging.info("%s: its time budget (loop.max_seconds=%g) is spent at step %d", self.workdir,
                                 loop.max_seconds, step)
                    break
                if stop:
                    status = "preempted"
                    logging.warning("preemption notice: saved step %d; rerun to resume", step)
                    break
            # Still under the watcher: a SIGTERM that comes while the last save is written (a sweep
            # stopping its points) lets it finish instead of killing it halfway.
            with self._saving():
                self.checkpointer.manager.wait_until_finished()
                self.checkpointer.check_for_errors()
        return status, step, self.last_metrics

    def _log_pending(self) -> None:
        """The previous step's metrics, fetched (after the background save's error check) and logged."""
        with self._saving():  # the background save of an earlier step
            self.checkpointer.check_for_errors()
        if self.pending:
            self.last_metrics = self._fetch(*self.pending)
            self.run_log.write(self.pending[0], self.last_metrics)
            self.pending = None

    def _sync_point(self, step: int, state: nnx.State, data_state: Any, *, save: bool, evaluate: bool) -> None:
        """Wait for `step`, check it, evaluate and save as due, and log it."""
        self.last_metrics, self.pending = self._fetch(step, self.pending[1]), None  # checks it before saving
        if evaluate:
            self.last_metrics.update(self._evaluate(step, state))
        self.run_log.write(step, self.last_metrics)
        if save:
            self._save(step, state, data_state)
        self.fetched_at.clear()  # the next interval would include this sync's work

    def _fetch(self, step: int, device_metrics: dict) -> dict:
        """Step `step`'s metrics on the host (waiting for it), checked, with lr and speed."""
        parts = self.parts
        host = host_metrics(device_metrics)
        check_finite(step, host, self.last_good)
        if parts.check is not None:
            parts.check(step, host)
        host["lr"] = float(self.schedule((step - 1) * self.cfg.updates_per_step))  # at the step's first update
        self.fetched_at.append(time.perf_counter())
        if parts.tokens_per_step and len(self.fetched_at) > 1:  # a window: one interval alone is jittery
            window = self.fetched_at[-1] - self.fetched_at[0]
            tokens_per_s = parts.tokens_per_step * (len(self.fetched_at) - 1) / window
            host["tokens_per_s"] = tokens_per_s
            if parts.flops_per_token:
                host["mfu"] = mfu(parts.flops_per_token, tokens_per_s, jax.devices())
        return host

    def _evaluate(self, step: int, state: nnx.State) -> dict:
        metrics = self.parts.evaluate(nnx.merge(self.model_graphdef, state[0]))
        logging.info("step %d: %s", step, " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    def _save(self, step: int, state: nnx.State, data_state: Any) -> None:
        """One save at a time: the previous one ends (and is checked) before this one starts."""
        with self._saving():
            self.checkpointer.manager.wait_until_finished()
            self.checkpointer.check_for_errors()
        self.last_complete = self.last_good
        with self._saving():
            self.checkpointer.save(step, state, {self.parts.data_key: data_state, ELAPSED_KEY: self.elapsed()},
                                   force=True)
        self.last_good = step

    @contextlib.contextmanager
    def _saving(self) -> Iterator[None]:
        """A save that fails — when it starts, in the background, or while the run waits for it —
        stops the run at once with one line, naming the checkpoint known complete before it."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 -- whatever the storage raised, the run must stop
            cause = str(e).splitlines()[0] if str(e) else ""
            intact = self.last_complete
            whole = (f"The previous checkpoint (step {intact}) is intact. Fix: free space or fix the storage, then "
                     "rerun (it resumes from that checkpoint)") if intact else (
                "No checkpoint was written yet. Fix: free space or fix the storage, then rerun (it starts over)")
            raise CheckpointError(f"saving a checkpoint to {self.checkpointer.directory} failed: {type(e).__name__}: "
                                  f"{cause}. {whole}") from None
